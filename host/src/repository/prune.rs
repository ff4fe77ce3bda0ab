//! Prune: frees the chunks no restore point references.
//!
//! Under the exclusive repository lock (`lock`), so no session, restore or
//! verify is running:
//! 1. every manifest is read whole; one that does not read refuses the
//!    prune (its chunks cannot be told from garbage);
//! 2. each pack, by its index file, is kept, repacked or deleted: a pack
//!    whose records are all unreferenced is deleted; one whose unreferenced
//!    records are at least `repack_share` of its bytes has its referenced
//!    records copied into new packs; others are kept as they are (their dead
//!    records cost less than rewriting the live ones). A chunk stored in two
//!    packs counts as live in one only: the first (packs in id order) whose
//!    record lies inside its pack file;
//! 3. packs without an index (left by a writer killed before it published
//!    the index) and format-1 chunk files nobody references are deleted.
//!
//! Order, so that a prune killed at any moment loses nothing: the format
//! file says 3 (`PRUNED_FORMAT`: an arca from before the lock refuses the
//! repository), the prune generation changes (processes that loaded the
//! index before will load it again), new packs are published (durable,
//! then indexed) before any old index file goes, and an old pack file goes
//! only after its index file is gone and the index folder is synced. A pack
//! left without its index by a killed prune is an orphan the next prune
//! deletes. Packs whose index is damaged, and everything in `staging/`, are
//! left alone.

use super::index::ChunkSet;
use super::lock::RepoLock;
use super::pack::{self, IndexEntry, PACK_TARGET};
use super::packer::{self, Packer};
use super::{HOLE, Repository, RepositoryError, io_err, manifest, writer::sync_dir};
use arca_transport::{ChunkHash, HASH_LEN};
use serde::Serialize;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Unreferenced bytes, as a share of a pack, from which it is rewritten.
pub const REPACK_SHARE: f64 = 0.2;

#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Say what would be done, do nothing.
    pub dry_run: bool,
    pub repack_share: f64,
    /// Manifests to count as forgotten: what a dry run of `forget` would
    /// remove.
    pub forgotten: std::collections::HashSet<PathBuf>,
}

impl PruneOptions {
    /// Checked before anything is forgotten or pruned.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.repack_share) {
            return Err(format!(
                "the repack share is a share of a pack: 0 to 1 (got {})",
                self.repack_share
            ));
        }
        Ok(())
    }
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            repack_share: REPACK_SHARE,
            forgotten: Default::default(),
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub restore_points: usize,
    pub referenced_chunks: usize,
    pub packs_before: usize,
    pub packs_kept: usize,
    pub packs_deleted: usize,
    pub packs_repacked: usize,
    pub packs_written: usize,
    /// Packs without an index file, deleted.
    pub orphan_packs_deleted: usize,
    /// Packs left alone because their index file is damaged.
    pub packs_with_damaged_index: usize,
    pub chunks_deleted: u64,
    /// Unreferenced bytes left in packs kept (below `repack_share`).
    pub unreferenced_bytes_kept: u64,
    pub loose_chunks_deleted: usize,
    pub bytes_before: u64,
    pub bytes_freed: u64,
}

/// One pack as its index describes it.
struct PackPlan {
    id: String,
    size: u64,
    live: Vec<IndexEntry>,
    live_bytes: u64,
    dead: usize,
}

enum Action {
    Keep,
    Delete,
    Repack,
}

impl PackPlan {
    fn unreferenced_bytes(&self) -> u64 {
        self.size.saturating_sub(self.live_bytes)
    }

    fn action(&self, repack_share: f64) -> Action {
        if self.live.is_empty() {
            Action::Delete
        } else if self.dead > 0
            && self.unreferenced_bytes() as f64 >= repack_share * self.size as f64
        {
            Action::Repack
        } else {
            Action::Keep
        }
    }
}

impl Repository {
    /// Frees what no restore point references (see the module doc).
    pub fn prune(&self, opts: PruneOptions) -> Result<PruneReport, RepositoryError> {
        let lock = RepoLock::exclusive(&self.root, "prune")?;
        let refused = |reason: String| RepositoryError::PruneRefused {
            path: self.root.clone(),
            reason,
        };
        let mut report = PruneReport {
            dry_run: opts.dry_run,
            ..PruneReport::default()
        };

        // 1. What the restore points reference.
        let mut referenced = ChunkSet::default();
        for path in self.manifest_paths()? {
            if opts.forgotten.contains(&path) {
                continue;
            }
            let m = manifest::read(&path).map_err(|e| {
                refused(format!(
                    "{e}; repair or remove that restore point first (its chunks cannot be told from garbage)"
                ))
            })?;
            report.restore_points += 1;
            for h in m.block_hashes.chunks_exact(HASH_LEN) {
                let h: ChunkHash = h.try_into().expect("32 bytes");
                if h != HOLE {
                    referenced.insert(h);
                }
            }
        }
        report.referenced_chunks = referenced.len();

        // 2. Each pack by its index.
        let index_dir = self.root.join("index");
        // A listing error fails the prune rather than leaving a pack out.
        let mut ids: Vec<String> = Vec::new();
        match std::fs::read_dir(&index_dir) {
            Ok(entries) => {
                for e in entries {
                    let name = e.map_err(io_err(&index_dir))?.file_name();
                    let name = name.to_string_lossy();
                    if let Some(id) = name.strip_suffix(".idx")
                        && packer::is_pack_id(id)
                    {
                        ids.push(id.to_owned());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&index_dir)(e)),
        }
        ids.sort();
        let mut scanned: Vec<(String, u64, Vec<IndexEntry>)> = Vec::new();
        for id in &ids {
            let idx = packer::index_path(&self.root, id);
            let entries = match std::fs::read(&idx)
                .map_err(|e| e.to_string())
                .and_then(|b| pack::decode_index(&b))
            {
                Ok(e) => e,
                Err(why) => {
                    tracing::warn!(
                        "prune leaves pack {id} alone: its index {}: {why}",
                        idx.display()
                    );
                    report.packs_with_damaged_index += 1;
                    continue;
                }
            };
            let path = packer::pack_path(&self.root, id);
            let size = match std::fs::metadata(&path) {
                Ok(m) => m.len(),
                // An index without its pack: nothing to free, and verify
                // names the chunks it lost.
                Err(_) => continue,
            };
            scanned.push((id.clone(), size, entries));
        }
        // A chunk stored more than once is kept in one place: its first copy
        // (by pack id) that lies inside its pack file, or, if none does, its
        // first copy at all (a damaged chunk stays for verify to name).
        let mut chosen: foldhash::HashMap<ChunkHash, (usize, u64)> = Default::default();
        for whole in [true, false] {
            for (at, (_, size, entries)) in scanned.iter().enumerate() {
                for e in entries {
                    let inside = e
                        .offset
                        .checked_add(u64::from(e.len))
                        .is_some_and(|end| end <= *size);
                    if inside == whole
                        && referenced.contains(&e.hash)
                        && !chosen.contains_key(&e.hash)
                    {
                        chosen.insert(e.hash, (at, e.offset));
                    }
                }
            }
        }
        let mut plans = Vec::new();
        for (at, (id, size, entries)) in scanned.into_iter().enumerate() {
            let (live, dead): (Vec<IndexEntry>, Vec<IndexEntry>) = entries
                .into_iter()
                .partition(|e| chosen.get(&e.hash) == Some(&(at, e.offset)));
            plans.push(PackPlan {
                id,
                size,
                live_bytes: live.iter().map(|e| u64::from(e.len)).sum(),
                live,
                dead: dead.len(),
            });
        }
        report.packs_before = plans.len();
        report.bytes_before = plans.iter().map(|p| p.size).sum();

        // 3. Orphan packs and unreferenced format-1 chunk files.
        let orphans = self.orphan_packs()?;
        let loose: Vec<(PathBuf, u64)> = self
            .loose_chunks()?
            .into_iter()
            .filter(|(h, _)| !referenced.contains(h))
            .map(|(_, path)| {
                let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
                Ok((path, len))
            })
            .collect::<Result<_, RepositoryError>>()?;

        let mut delete = Vec::new();
        let mut repack = Vec::new();
        for p in &plans {
            match p.action(opts.repack_share) {
                Action::Keep => {
                    report.packs_kept += 1;
                    report.unreferenced_bytes_kept += p.unreferenced_bytes();
                }
                Action::Delete => delete.push(p),
                Action::Repack => repack.push(p),
            }
        }
        report.packs_deleted = delete.len();
        report.packs_repacked = repack.len();
        report.chunks_deleted = delete.iter().chain(&repack).map(|p| p.dead as u64).sum();
        report.orphan_packs_deleted = orphans.len();
        report.loose_chunks_deleted = loose.len();
        report.bytes_freed = delete
            .iter()
            .chain(&repack)
            .map(|p| p.unreferenced_bytes())
            .chain(orphans.iter().chain(&loose).map(|(_, len)| *len))
            .sum();
        if opts.dry_run {
            return Ok(report);
        }

        self.mark_pruned()?;
        lock.bump()?;
        report.packs_written = self.repack(&repack)?;
        // Old index files first, durably; then their packs.
        for p in delete.iter().chain(&repack) {
            let idx = packer::index_path(&self.root, &p.id);
            std::fs::remove_file(&idx).map_err(io_err(&idx))?;
        }
        sync_dir(&index_dir)?;
        for p in delete.iter().chain(&repack) {
            remove_if_there(packer::pack_path(&self.root, &p.id))?;
        }
        for (path, _) in orphans.iter().chain(&loose) {
            remove_if_there(path.clone())?;
        }
        // Nobody loaded the index meanwhile (loads take the shared lock),
        // so the one change of generation above is enough; this process
        // loads it again now.
        self.refresh_locked(&lock)?;
        Ok(report)
    }

    /// Copies the live records of `packs` into new packs and publishes
    /// them; returns how many it wrote.
    fn repack(&self, packs: &[&PackPlan]) -> Result<usize, RepositoryError> {
        if packs.is_empty() {
            return Ok(0);
        }
        let mut packer = Packer::with_target(&self.root.join("staging"), PACK_TARGET)?;
        let mut record = Vec::new();
        for p in packs {
            let path = packer::pack_path(&self.root, &p.id);
            let file = std::fs::File::open(&path).map_err(io_err(&path))?;
            for e in &p.live {
                record.resize(e.len as usize, 0);
                file.read_exact_at(&mut record, e.offset)
                    .map_err(io_err(&path))?;
                // A record is copied as it is: a damaged one stays damaged
                // (verify names it) rather than being dropped unseen.
                if let Some(flushes) = packer.append(&e.hash, &record, &[])? {
                    for f in flushes {
                        f.write()?;
                    }
                }
            }
        }
        let (staged, last_runs) = packer.take();
        for f in last_runs {
            f.write()?;
        }
        let staging = packer.staging().to_owned();
        let (published, failure) = packer::publish(&self.root, &staging, &staged)?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(published.len())
    }

    /// Pack files without an index file, with their sizes.
    fn orphan_packs(&self) -> Result<Vec<(PathBuf, u64)>, RepositoryError> {
        let mut out = Vec::new();
        let top = self.root.join("packs");
        let Ok(fans) = std::fs::read_dir(&top) else {
            return Ok(out);
        };
        for fan in fans {
            let fan = fan.map_err(io_err(&top))?.path();
            let Ok(files) = std::fs::read_dir(&fan) else {
                continue;
            };
            for f in files {
                let f = f.map_err(io_err(&fan))?;
                let name = f.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_suffix(".pack") else {
                    continue;
                };
                // An index that cannot be looked for (EACCES, EIO) is not
                // absent: only a pack whose index file is known absent is
                // an orphan.
                if packer::is_pack_id(id)
                    && packer::index_path(&self.root, id).try_exists().ok() == Some(false)
                {
                    let len = f.metadata().map_err(io_err(&f.path()))?.len();
                    out.push((f.path(), len));
                }
            }
        }
        Ok(out)
    }
}

fn remove_if_there(path: PathBuf) -> Result<(), RepositoryError> {
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::writer::tests::{chunk, commit};
    use super::*;
    use arca_transport::{Chunk, StoreChunks, TargetMover};

    /// A restore point of `chunks` (4 KiB blocks), stored by a writer of
    /// its own.
    fn point(repo: &Repository, chunks: &[(ChunkHash, Chunk)]) {
        let w = repo.writer().unwrap();
        w.store(StoreChunks {
            chunks: chunks.iter().map(|(_, c)| c.clone()).collect(),
        })
        .unwrap();
        let hashes: Vec<ChunkHash> = chunks.iter().map(|(h, _)| *h).collect();
        commit(&w, &hashes).unwrap();
    }

    #[test]
    fn a_live_writer_keeps_prune_out_and_the_first_prune_marks_the_format() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        point(&repo, &[chunk(1)]);
        let writer = repo.writer().unwrap();
        let busy = repo.prune(PruneOptions::default()).unwrap_err();
        assert!(matches!(busy, RepositoryError::Busy { .. }), "{busy}");
        drop(writer);
        let report = repo.prune(PruneOptions::default()).unwrap();
        assert_eq!(report.restore_points, 1);
        // An arca from before the lock would not take it: it must refuse
        // the repository from now on.
        let format: super::super::FormatFile = serde_json::from_slice(
            &std::fs::read(dir.path().join("arca-repository.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(format.version, super::super::PRUNED_FORMAT);
    }

    /// A second pack holding `h`'s record too, as two processes storing one
    /// chunk at once leave; named to sort after the first. Returns its path.
    pub(in crate::repository) fn second_copy(repo: &Repository, h: &ChunkHash) -> PathBuf {
        let (first_pack, offset, len) = repo.chunk_record(h).unwrap();
        let second_id = "f".repeat(32);
        assert!(second_id.as_str() > first_pack.file_stem().unwrap().to_str().unwrap());
        let second_pack = packer::pack_path(&repo.root, &second_id);
        std::fs::create_dir_all(second_pack.parent().unwrap()).unwrap();
        std::fs::copy(&first_pack, &second_pack).unwrap();
        let entry = IndexEntry {
            hash: *h,
            offset,
            len: len as u32,
        };
        std::fs::write(
            packer::index_path(&repo.root, &second_id),
            pack::encode_index(&[entry]),
        )
        .unwrap();
        second_pack
    }

    #[test]
    fn of_a_chunk_stored_twice_the_copy_that_reads_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        let (h, c) = chunk(9);
        point(&repo, &[(h, c)]);
        let (first_pack, offset, len) = repo.chunk_record(&h).unwrap();
        let second_pack = second_copy(&repo, &h);
        // The first copy (by pack id) is cut short.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&first_pack)
            .unwrap();
        f.set_len(offset + len / 2).unwrap();
        drop(f);

        let report = repo.prune(PruneOptions::default()).unwrap();
        assert_eq!(report.packs_deleted, 1, "{report:?}");
        assert!(!first_pack.exists() && second_pack.exists());
        let fresh = Repository::open(dir.path()).unwrap();
        assert_eq!(fresh.read_chunk(&h).unwrap().payload, vec![9u8; 4096]);
    }
}
