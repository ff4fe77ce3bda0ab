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
//! Under the exclusive repository lock, like prune. The damaged record's
//! bytes stay in their pack, unindexed, until a prune rewrites the pack.

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

impl Repository {
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
        // As for prune: an arca from before the lock must not write into a
        // repository whose index files change; and every process that has
        // the index loaded loads it again.
        self.mark_pruned()?;
        lock.bump()?;
        let staging = self.root.join("staging");
        let mut dropped = Vec::new();
        for (id, copies) in &by_pack {
            let idx = packer::index_path(&self.root, id);
            let bytes = std::fs::read(&idx).map_err(io_err(&idx))?;
            let entries = pack::decode_index(&bytes).map_err(|reason| RepositoryError::Io {
                path: idx.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
            })?;
            let kept: Vec<IndexEntry> = entries
                .into_iter()
                .filter(|e| !copies.contains(&(e.hash, e.offset)))
                .collect();
            // Atomic and durable: the index says the old list or the new one.
            write_atomic(&idx, &pack::encode_index(&kept), &staging)?;
            let file = packer::pack_path(&self.root, id).display().to_string();
            dropped.extend(copies.iter().map(|(h, _)| DroppedCopy {
                hash: hex(h),
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
