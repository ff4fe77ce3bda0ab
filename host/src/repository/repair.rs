//! Taking damaged chunk copies out of the index (`arca verify --repair`).
//!
//! A chunk whose stored bytes no longer match its address hurts every
//! restore point that references it, and as long as the index lists it,
//! every later backup deduplicates against it and references it too. Once
//! its copy is out of the index the chunk reads as missing: a point that
//! lacks it is no task's parent, so the next backup of a disk that still
//! holds the data reads it, finds it missing and stores it again, and every
//! restore point that referenced the address is whole again.
//!
//! A pack whose index file is damaged is walked record by record (each
//! starts with the record magic and says its length), and its index is
//! written again from what the records decode to.
//!
//! Under the exclusive repository lock, like prune. The damaged record's
//! bytes stay in their pack, unindexed, until a prune rewrites the pack.

use super::chunk::{self, ChunkHeader};
use super::lock::RepoLock;
use super::pack::{self, IndexEntry};
use super::writer::{sync_dir, write_atomic};
use super::{Repository, RepositoryError, hex, io_err, packer};
use arca_transport::ChunkHash;
use serde::Serialize;
use std::collections::BTreeMap;

/// A copy of a chunk that was taken out of the repository.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DroppedCopy {
    pub hash: String,
    /// The pack whose index listed it, or the format-1 chunk file deleted.
    pub file: String,
}

/// A record found by walking a pack without its index.
#[derive(Debug)]
pub struct ScannedRecord {
    pub offset: u64,
    pub len: u32,
    pub header: ChunkHeader,
    /// Where its payload lies in the pack's bytes (not copied: a guest can
    /// write blocks full of headers that each claim the rest of the pack).
    pub payload: std::ops::Range<usize>,
}

/// A pack's bytes and the records they may hold.
pub struct ScannedPack {
    pub bytes: Vec<u8>,
    pub records: Vec<ScannedRecord>,
}

impl ScannedPack {
    pub fn payload(&self, r: &ScannedRecord) -> &[u8] {
        &self.bytes[r.payload.clone()]
    }
}

/// The records that a pack's bytes may hold: one at each place the record
/// magic starts and a whole record parses, in order. Not only at the end of
/// the one before: a damaged length would hide every record after it.
/// A place that is not really a record (the magic inside a payload) is
/// found out by its caller, which checks each against its address.
fn records(bytes: &[u8]) -> Vec<ScannedRecord> {
    let magic = chunk::MAGIC.as_slice();
    let mut out = Vec::new();
    let mut from = 0usize;
    while let Some(found) = bytes[from..].windows(magic.len()).position(|w| w == magic) {
        let at = from + found;
        from = at + 1;
        let Ok(Some((header, start))) = chunk::StoredChunk::parse_prefix(&bytes[at..]) else {
            continue;
        };
        let Some(end) = (at + start)
            .checked_add(header.payload_len as usize)
            .filter(|&end| end <= bytes.len())
        else {
            continue;
        };
        out.push(ScannedRecord {
            offset: at as u64,
            len: (end - at) as u32,
            payload: at + start..end,
            header,
        });
    }
    out
}

impl Repository {
    /// The records of pack `id` (see `records`), for an index that is lost.
    pub fn scan_pack(&self, id: &str) -> Result<ScannedPack, RepositoryError> {
        let path = packer::pack_path(&self.root, id);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let records = records(&bytes);
        Ok(ScannedPack { bytes, records })
    }

    /// Writes the index files of packs anew (ones that were damaged), each
    /// from entries whose records were checked against their addresses;
    /// the index is then loaded again once, here and in other processes.
    pub fn rewrite_indexes(
        &self,
        lock: &RepoLock,
        packs: &[(String, Vec<IndexEntry>)],
    ) -> Result<(), RepositoryError> {
        if packs.is_empty() {
            return Ok(());
        }
        self.begin_change(lock)?;
        for (id, entries) in packs {
            let idx = packer::index_path(&self.root, id);
            write_atomic(
                &idx,
                &pack::encode_index(entries),
                &self.root.join("staging"),
            )?;
        }
        self.refresh_locked(lock)
    }

    /// Before repair changes an index file: as for prune, an arca from
    /// before the lock must not write into the repository any more, and
    /// every process that has the index loaded loads it again.
    fn begin_change(&self, lock: &RepoLock) -> Result<(), RepositoryError> {
        self.mark_pruned()?;
        lock.bump()
    }

    /// The exclusive lock for repair, with the index loaded under it.
    /// Refuses (`Busy`) while a session, restore, verify or prune runs.
    pub fn repair_lock(&self) -> Result<RepoLock, RepositoryError> {
        let lock = RepoLock::exclusive(&self.root, "repair")?;
        self.refresh_locked(&lock)?;
        Ok(lock)
    }

    /// Takes the copy of each chunk in `hashes` that reads use (the one the
    /// index points at, or a format-1 chunk file) out of the repository:
    /// its pack's index file is written again without it, a chunk file is
    /// deleted. Another copy of the same chunk, in another pack, is what
    /// the index finds afterwards. Chunks the repository lacks are skipped.
    /// The index is loaded again, and other processes reload theirs (a new
    /// prune generation).
    pub fn drop_copies(
        &self,
        lock: &RepoLock,
        hashes: &[ChunkHash],
    ) -> Result<Vec<DroppedCopy>, RepositoryError> {
        let mut by_pack: BTreeMap<String, Vec<(ChunkHash, u64)>> = BTreeMap::new();
        let mut loose = Vec::new();
        {
            let index = self.shared.index.read().expect("chunk index lock");
            for h in hashes {
                match index.get(h) {
                    Some(loc) => by_pack
                        .entry(index.pack_id(loc.pack).to_owned())
                        .or_default()
                        .push((*h, loc.offset)),
                    None if self.is_loose(h) => loose.push((*h, self.chunk_path(h))),
                    None => {}
                }
            }
        }
        if by_pack.is_empty() && loose.is_empty() {
            return Ok(Vec::new());
        }
        self.begin_change(lock)?;
        let staging = self.root.join("staging");
        let mut dropped = Vec::new();
        for (id, copies) in &by_pack {
            let idx = packer::index_path(&self.root, id);
            let bytes = std::fs::read(&idx).map_err(io_err(&idx))?;
            let entries = pack::decode_index(&bytes).map_err(|reason| RepositoryError::Io {
                path: idx.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
            })?;
            let (gone, kept): (Vec<IndexEntry>, Vec<IndexEntry>) = entries
                .into_iter()
                .partition(|e| copies.contains(&(e.hash, e.offset)));
            // Only what the file still lists counts as taken out, so that
            // a caller's loop ends whatever the index in memory says.
            if gone.is_empty() {
                continue;
            }
            // Atomic and durable: the index says the old list or the new one.
            write_atomic(&idx, &pack::encode_index(&kept), &staging)?;
            let file = packer::pack_path(&self.root, id).display().to_string();
            dropped.extend(gone.iter().map(|e| DroppedCopy {
                hash: hex(&e.hash),
                file: file.clone(),
            }));
        }
        for (h, path) in loose {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            sync_dir(path.parent().expect("a chunk file has a folder"))?;
            dropped.push(DroppedCopy {
                hash: hex(&h),
                file: path.display().to_string(),
            });
        }
        self.refresh_locked(lock)?;
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::super::prune::tests::second_copy;
    use super::super::writer::tests::{chunk, commit};
    use super::*;
    use arca_transport::{StoreChunks, TargetMover};
    use std::os::unix::fs::FileExt;

    /// Flips a byte in the middle of a chunk's record, where reads find it.
    fn damage(repo: &Repository, h: &ChunkHash) {
        let (file, offset, len) = repo.chunk_record(h).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(file)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, offset + len / 2).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], offset + len / 2).unwrap();
    }

    #[test]
    fn a_pack_is_walked_record_by_record_past_a_damaged_one() {
        let record = |byte: u8, len: usize| {
            let payload = vec![byte; len];
            let header = ChunkHeader {
                codec: "none".into(),
                codec_hash: Vec::new(),
                raw_len: len as u32,
                payload_len: len as u32,
            };
            let mut out = Vec::new();
            chunk::StoredChunk::write(&mut out, &header, &payload).unwrap();
            out
        };
        let (a, b, c) = (record(1, 100), record(2, 5000), record(3, 7));
        let pack = [a.clone(), b.clone(), c.clone()].concat();
        let found = records(&pack);
        let at: Vec<(u64, u32)> = found.iter().map(|r| (r.offset, r.len)).collect();
        let (a_len, b_len) = (a.len() as u64, b.len() as u64);
        assert_eq!(
            at,
            [
                (0, a_len as u32),
                (a_len, b_len as u32),
                (a_len + b_len, c.len() as u32)
            ]
        );
        assert_eq!(&pack[found[1].payload.clone()], &[2u8; 5000][..]);
        // The second record's magic damaged: the first and the third are
        // still found, where they are.
        let mut bad = pack.clone();
        bad[a.len() + 2] ^= 0xff;
        let found = records(&bad);
        let at: Vec<u64> = found.iter().map(|r| r.offset).collect();
        assert_eq!(at, [0, a_len + b_len]);
        // Its length damaged, to run into the third: that one is found too.
        let mut bad = pack.clone();
        assert!(c.len() > 20);
        let longer = ChunkHeader {
            payload_len: 5000 + 20,
            ..chunk::StoredChunk::parse_prefix(&b).unwrap().unwrap().0
        };
        let mut b_longer = Vec::new();
        chunk::StoredChunk::write(&mut b_longer, &longer, &[]).unwrap();
        assert_eq!(b_longer.len(), b.len() - 5000, "same header length");
        bad[a.len()..a.len() + b_longer.len()].copy_from_slice(&b_longer);
        let at: Vec<u64> = records(&bad).iter().map(|r| r.offset).collect();
        assert_eq!(at, [0, a_len, a_len + b_len]);
        // A record cut by the end of the pack is not one.
        assert_eq!(records(&pack[..pack.len() - 1]).len(), 2);
        assert!(records(&[]).is_empty());
    }

    #[test]
    fn a_dropped_copy_leaves_the_other_copy_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        let (twice, c_twice) = chunk(1);
        let (once, c_once) = chunk(2);
        let w = repo.writer().unwrap();
        w.store(StoreChunks {
            chunks: vec![c_twice, c_once],
        })
        .unwrap();
        commit(&w, &[twice, once]).unwrap();
        drop(w);
        let second_pack = second_copy(&repo, &twice);
        let second_id = second_pack
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let first = repo.chunk_record(&twice).unwrap();
        damage(&repo, &twice);
        damage(&repo, &once);
        assert_ne!(repo.read_chunk(&twice).unwrap().payload, vec![1u8; 4096]);

        let lock = repo.repair_lock().unwrap();
        // A prune (or another repair) meanwhile is refused.
        let busy = RepoLock::exclusive(dir.path(), "prune").err().unwrap();
        assert!(matches!(busy, RepositoryError::Busy { .. }), "{busy}");
        let dropped = repo.drop_copies(&lock, &[twice, once]).unwrap();
        assert_eq!(dropped.len(), 2);
        assert_eq!(dropped[0].file, first.0.display().to_string());
        // The other copy of `twice` is what reads find now; `once` is gone.
        let second = repo.chunk_record(&twice).unwrap();
        assert_ne!(second.0, first.0);
        assert_eq!(repo.read_chunk(&twice).unwrap().payload, vec![1u8; 4096]);
        assert_eq!(repo.missing(&[twice, once]), vec![false, true]);
        // A chunk the repository lacks is skipped.
        assert!(repo.drop_copies(&lock, &[once]).unwrap().is_empty());
        drop(lock);
        // On disk, for other processes: the first pack's index lists
        // neither any more, the second still lists `twice`.
        let listed = |id: &str| -> Vec<ChunkHash> {
            let idx = std::fs::read(packer::index_path(dir.path(), id)).unwrap();
            pack::decode_index(&idx)
                .unwrap()
                .iter()
                .map(|e| e.hash)
                .collect()
        };
        let first_id = first.0.file_stem().unwrap().to_str().unwrap().to_owned();
        assert!(listed(&first_id).is_empty());
        assert_eq!(listed(&second_id), vec![twice]);
    }
}
