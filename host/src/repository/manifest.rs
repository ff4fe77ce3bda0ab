//! Manifest files: magic, prost `Manifest`, BLAKE3 trailer over both, so a
//! damaged manifest is detected rather than restored.

use super::{RepositoryError, io_err};
use arca_transport::{MANIFEST_FORMAT_VERSION, Manifest};
use prost::Message;
use std::path::Path;

const MAGIC: &[u8; 8] = b"ARCAMAN1";

pub fn encode(m: &Manifest) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    m.encode(&mut out).expect("Vec grows as needed");
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

pub fn decode(bytes: &[u8], path: &Path) -> Result<Manifest, RepositoryError> {
    let bad = |reason: String| RepositoryError::Manifest {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < MAGIC.len() + 32 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("not a manifest (bad magic or truncated)".into()));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(bad("checksum mismatch: the manifest is damaged".into()));
    }
    let m = Manifest::decode(&body[MAGIC.len()..]).map_err(|e| bad(e.to_string()))?;
    if m.format_version > MANIFEST_FORMAT_VERSION {
        return Err(bad(format!(
            "manifest format {} is newer than this arca ({MANIFEST_FORMAT_VERSION})",
            m.format_version
        )));
    }
    if m.block_size == 0 || m.block_hashes.len() as u64 != m.block_count() * 32 {
        return Err(bad("block list does not match the disk size".into()));
    }
    Ok(m)
}

pub fn read(path: &Path) -> Result<Manifest, RepositoryError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    decode(&bytes, path)
}

/// How much of a manifest `read_header` reads: names and ids are short.
const HEADER_READ: usize = 64 << 10;
/// The block list's field: everything before it is the header.
const BLOCK_HASHES_TAG: u32 = 10;

/// A manifest's fields before its block list (tags 1–9: names, point id,
/// creation time, geometry, parent), with `block_hashes` empty, read from
/// the first bytes of the file only. A disk's restore points are ordered by
/// these, and a point's block list is 32 bytes per block (128 MiB for a
/// 1 TiB disk), so finding the newest of many points must not read them
/// all. Not checked against the trailer: whoever keeps a point reads it
/// whole with `read`. A file shorter than the read is decoded whole.
pub fn read_header(path: &Path) -> Result<Manifest, RepositoryError> {
    use std::io::Read;
    let bad = |reason: String| RepositoryError::Manifest {
        path: path.to_owned(),
        reason,
    };
    let mut buf = Vec::with_capacity(HEADER_READ);
    std::fs::File::open(path)
        .and_then(|f| f.take(HEADER_READ as u64).read_to_end(&mut buf))
        .map_err(io_err(path))?;
    if buf.len() < HEADER_READ {
        return decode(&buf, path);
    }
    if &buf[..MAGIC.len()] != MAGIC {
        return Err(bad("not a manifest (bad magic)".into()));
    }
    let body = &buf[MAGIC.len()..];
    let mut rest = body;
    while !rest.is_empty() {
        let at = body.len() - rest.len();
        // A key or field cut by the end of the read: read it whole below.
        let Ok((tag, wire_type)) = prost::encoding::decode_key(&mut rest) else {
            break;
        };
        if tag == BLOCK_HASHES_TAG {
            return Manifest::decode(&body[..at]).map_err(|e| bad(e.to_string()));
        }
        let ctx = prost::encoding::DecodeContext::default();
        if prost::encoding::skip_field(wire_type, tag, &mut rest, ctx).is_err() {
            break;
        }
    }
    // The header did not end within the read (never so for arca's own
    // manifests): read it whole.
    read(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_of_a_large_manifest_matches_the_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        // The last: a header longer than the first read (a parent id of
        // 70 000 characters) is read whole.
        for (blocks, parent) in [(0u64, 1), (3, 1), (100_000, 1), (100_000, 70_000)] {
            let m = Manifest {
                format_version: MANIFEST_FORMAT_VERSION,
                job: "nightly".into(),
                vm: "web01".into(),
                disk: "disk0".into(),
                point_id: "20261201T000000Z-00000000".into(),
                created_unix_ms: 1_764_547_200_123,
                disk_size: blocks * 4096,
                block_size: 4096,
                parent_point: "p".repeat(parent),
                block_hashes: vec![7; blocks as usize * 32],
                consistency: "crash-consistent".into(),
                ..Default::default()
            };
            let path = dir.path().join(format!("{blocks}-{parent}.manifest"));
            std::fs::write(&path, encode(&m)).unwrap();
            let h = read_header(&path).unwrap();
            assert_eq!(
                (&h.point_id, h.created_unix_ms, h.disk_size, &h.parent_point),
                (&m.point_id, m.created_unix_ms, m.disk_size, &m.parent_point)
            );
            assert_eq!(read(&path).unwrap(), m);
        }
        let path = dir.path().join("junk.manifest");
        std::fs::write(&path, vec![1u8; HEADER_READ + 10]).unwrap();
        assert!(read_header(&path).is_err());
    }
}
