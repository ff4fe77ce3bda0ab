//! Pack files and their index files (repository format 2).
//!
//! A pack holds chunk records one after another; a record is exactly what a
//! format-1 chunk file held (magic, header length, header, payload), so a
//! pack can be read record by record even without its index. Packs exist so
//! that a restore point costs a few files and one `fdatasync` each, not a
//! file per block and a `syncfs` that also waits for every other writer on
//! the filesystem (a hypervisor's own disks among them).
//!
//! An index file lists the records of one pack:
//! ```text
//! "ARCAIDX1"  u32 LE count  count × (32-byte address, u64 LE offset, u32 LE length)  BLAKE3 of all before
//! ```
//! The trailing hash lets a reader tell a damaged index from a valid one
//! instead of believing wrong offsets. The format is hand-written: it is
//! four fixed-width fields, which no crate would make shorter or safer.

use arca_transport::{ChunkHash, HASH_LEN};

const MAGIC: &[u8; 8] = b"ARCAIDX1";
const ENTRY_LEN: usize = HASH_LEN + 8 + 4;
/// A pack is sealed once it holds this much: small enough that a future
/// garbage collection rewrites little to drop a few dead chunks, large enough
/// that a full backup of a 4 GiB disk makes tens of files, not thousands.
pub const PACK_TARGET: u64 = 32 << 20;

/// Where one chunk record lies in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub hash: ChunkHash,
    pub offset: u64,
    pub len: u32,
}

pub fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + entries.len() * ENTRY_LEN + HASH_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.hash);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// How many records an index file of `len` bytes holds, if it is whole
/// (what to make room for before reading it).
pub fn records_in_index_of_len(len: u64) -> usize {
    let overhead = (MAGIC.len() + 4 + HASH_LEN) as u64;
    (len.saturating_sub(overhead) / ENTRY_LEN as u64) as usize
}

pub fn decode_index(bytes: &[u8]) -> Result<Vec<IndexEntry>, String> {
    let head = MAGIC.len() + 4;
    if bytes.len() < head + HASH_LEN || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a pack index (bad magic or too short)".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - HASH_LEN);
    if blake3::hash(body).as_bytes() != sum {
        return Err("pack index does not match its checksum (damaged)".into());
    }
    let count = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
    let records = &body[head..];
    if records.len() != count.saturating_mul(ENTRY_LEN) {
        return Err(format!(
            "pack index says {count} entries but holds {} bytes of them",
            records.len()
        ));
    }
    Ok(records
        .chunks_exact(ENTRY_LEN)
        .map(|r| IndexEntry {
            hash: r[..HASH_LEN].try_into().expect("32 bytes"),
            offset: u64::from_le_bytes(r[HASH_LEN..HASH_LEN + 8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(r[HASH_LEN + 8..].try_into().expect("4 bytes")),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_round_trips_and_any_damage_is_refused() {
        let entries: Vec<IndexEntry> = (0..3u8)
            .map(|i| IndexEntry {
                hash: [i; 32],
                offset: u64::from(i) * 1000 + (1 << 33),
                len: 77 + u32::from(i),
            })
            .collect();
        let bytes = encode_index(&entries);
        assert_eq!(decode_index(&bytes).unwrap(), entries);
        assert_eq!(records_in_index_of_len(bytes.len() as u64), entries.len());
        assert_eq!(records_in_index_of_len(3), 0);
        assert_eq!(decode_index(&encode_index(&[])).unwrap(), vec![]);
        for at in [0, 9, 20, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert!(decode_index(&bad).is_err(), "flip at {at} accepted");
        }
        assert!(decode_index(&bytes[..bytes.len() - 5]).is_err());
        assert!(decode_index(b"ARCAIDX1").is_err());
    }
}
