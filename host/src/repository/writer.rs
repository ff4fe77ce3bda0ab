//! The target mover's side of a restore point: stage chunks, then commit.
//!
//! Chunks go to the repository's staging packs (`packer`), shared by every
//! writer of the repository in this process; a commit publishes the staged
//! packs (durable, then indexed), checks that every block of the manifest
//! is in the repository, and only then writes the manifest and renames it
//! into place. A process killed at any moment therefore leaves either no
//! restore point or a complete one, and a staging folder that the next
//! session sweeps.

use super::{Repository, RepositoryError, chunk, hex, io_err, manifest};
use arca_transport::{
    ChunkHash, ChunkQuery, ChunkQueryReply, CommitPoint, CommitReply, HASH_LEN, LinkError,
    RegisterCodec, StoreChunks, TargetMover,
};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

pub struct PointWriter {
    repo: Repository,
    state: Mutex<State>,
    /// Shared, for this writer's life: no prune runs between a dedup
    /// answer and the commit that relies on it.
    _lock: super::lock::RepoLock,
}

#[derive(Default)]
struct State {
    /// Chunks this writer added to the repository, and their bytes.
    new_chunks: u64,
    stored_bytes: u64,
    finished: bool,
}

fn target_err(e: impl std::fmt::Display) -> LinkError {
    LinkError::Target(e.to_string())
}

impl PointWriter {
    pub(super) fn new(repo: &Repository) -> Result<Self, RepositoryError> {
        // Packs other processes published since the repository was opened
        // answer this writer's dedup queries too; after a prune, the index
        // is loaded again.
        Ok(Self {
            repo: repo.clone(),
            state: Mutex::new(State::default()),
            _lock: repo.write_lock()?,
        })
    }

    fn commit_inner(&self, commit: CommitPoint) -> Result<CommitReply, RepositoryError> {
        let repo = &self.repo;
        let staging = repo.root.join("staging");
        let mut m = commit.manifest.ok_or_else(|| RepositoryError::Manifest {
            path: staging.clone(),
            reason: "commit without a manifest".into(),
        })?;
        let mut state = self.state.lock().expect("writer state lock");
        if state.finished {
            return Err(RepositoryError::Manifest {
                path: staging,
                reason: "this writer has already committed or aborted".into(),
            });
        }
        let shape = manifest::check(&m).and_then(|()| manifest::check_names(&m));
        shape.map_err(|reason| RepositoryError::Manifest {
            path: staging.clone(),
            reason: format!("refused commit of {}/{}/{}: {reason}", m.job, m.vm, m.disk),
        })?;
        repo.publish_staged()?;
        // The manifest must not reference anything that is not there.
        // Every block, repeats too: a lookup costs what a set of the
        // distinct ones would, which for a 1 TiB disk held 4 M addresses.
        if let Some(hash) = repo.first_missing(&m.block_hashes) {
            return Err(RepositoryError::DanglingReference {
                point: format!("{}/{}/{}", m.job, m.vm, m.disk),
                hash: hex(&hash),
            });
        }

        let _committing = repo.shared.commit.lock().expect("commit lock");
        let now = jiff::Timestamp::now();
        m.created_unix_ms = now.as_millisecond();
        if let Some(prev) = repo.latest_header(&m.job, &m.vm, &m.disk)? {
            if !m.task_token.is_empty()
                && prev.task_token == m.task_token
                && repo.is_whole(
                    &repo
                        .manifest_dir(&m)
                        .join(format!("{}.manifest", prev.point_id)),
                )?
            {
                // An earlier attempt of this task committed and its answer
                // was lost, after this attempt had looked for its parent:
                // that point is the task's, and a second would duplicate it
                // (its chunks stay for prune to judge). Unless that point
                // has been damaged since: this one replaces it.
                state.finished = true;
                return Ok(CommitReply {
                    point_id: prev.point_id,
                    new_chunks: state.new_chunks,
                    stored_bytes: state.stored_bytes,
                    retention_applied: commit.retention.is_some(),
                    earlier_attempt: true,
                    ..Default::default()
                });
            }
            // Keeps "newest" unambiguous for the next incremental.
            m.created_unix_ms = m
                .created_unix_ms
                .max(prev.created_unix_ms.saturating_add(1));
        }
        m.point_id = format!(
            "{}-{}",
            now.strftime("%Y%m%dT%H%M%SZ"),
            hex(&rand::random::<[u8; 4]>())
        );
        let dir = repo.manifest_dir(&m);
        create_dirs_durably(&dir)?;
        write_atomic(
            &dir.join(format!("{}.manifest", m.point_id)),
            &manifest::encode(&m),
            &staging,
        )?;
        state.finished = true;
        // The new point is durable: the job's retention may now forget
        // older ones (never this one, the newest).
        let retained = commit
            .retention
            .map(|p| repo.retain_after_commit(&m, p.into()))
            .unwrap_or_default();
        Ok(CommitReply {
            point_id: m.point_id,
            new_chunks: state.new_chunks,
            stored_bytes: state.stored_bytes,
            retention_applied: commit.retention.is_some(),
            forgotten: retained.forgotten,
            retention_skipped: retained.skipped,
            retention_error: retained.error,
            earlier_attempt: false,
        })
    }
}

impl TargetMover for PointWriter {
    fn query(&self, query: ChunkQuery) -> Result<ChunkQueryReply, LinkError> {
        if !query.hashes.len().is_multiple_of(HASH_LEN) {
            return Err(target_err("chunk query is not a list of 32-byte addresses"));
        }
        let hashes: Vec<ChunkHash> = query
            .hashes
            .chunks_exact(HASH_LEN)
            .map(|h| h.try_into().expect("32 bytes"))
            .collect();
        Ok(ChunkQueryReply {
            missing: self.repo.missing(&hashes),
        })
    }

    fn store(&self, chunks: StoreChunks) -> Result<(), LinkError> {
        for c in chunks.chunks {
            let hash: ChunkHash = c
                .hash
                .as_slice()
                .try_into()
                .map_err(|_| target_err("chunk address is not 32 bytes"))?;
            let header = chunk::ChunkHeader {
                codec: c.codec,
                codec_hash: c.codec_hash,
                raw_len: c.raw_len,
                payload_len: c.payload.len() as u32,
            };
            if let Some(bytes) = self
                .repo
                .stage_chunk(&hash, &header, &c.payload)
                .map_err(target_err)?
            {
                let mut state = self.state.lock().expect("writer state lock");
                state.new_chunks += 1;
                state.stored_bytes += bytes;
            }
        }
        Ok(())
    }

    fn register_codec(&self, codec: RegisterCodec) -> Result<(), LinkError> {
        if blake3::hash(&codec.component).as_bytes().as_slice() != codec.hash.as_slice() {
            return Err(target_err(format!(
                "codec {} does not match its address",
                codec.name
            )));
        }
        let dest = self.repo.codec_path(&codec.hash);
        if dest.exists() {
            return Ok(());
        }
        // Durable and in place at once: a codec nobody references yet is
        // harmless, and a chunk that names it never lacks it.
        write_atomic(&dest, &codec.component, &self.repo.root.join("staging")).map_err(target_err)
    }

    fn commit(&self, commit: CommitPoint) -> Result<CommitReply, LinkError> {
        self.commit_inner(commit).map_err(target_err)
    }

    /// An aborted task keeps the chunks it sent (no restore point refers to
    /// them yet): a retry after a dropped link finds them by its dedup
    /// queries and resumes instead of sending everything again.
    fn abort(&self) {
        let mut state = self.state.lock().expect("writer state lock");
        if !state.finished {
            state.finished = true;
            match self.repo.publish_staged() {
                Ok(()) if state.new_chunks > 0 => tracing::info!(
                    "aborted task: kept {} chunk(s) it sent, for a retry to find",
                    state.new_chunks
                ),
                Ok(()) => {}
                Err(e) => tracing::warn!("aborted task: could not keep its chunks: {e}"),
            }
        }
    }
}

/// Writes a file so that readers see either nothing or all of it.
pub(super) fn write_atomic(
    dest: &Path,
    body: &[u8],
    tmp_dir: &Path,
) -> Result<(), RepositoryError> {
    let tmp = tmp_dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        hex(&rand::random::<[u8; 6]>())
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(body).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
    sync_dir(dest.parent().expect("destination has a parent"))
}

/// Makes a folder's entries (files renamed or made in it) durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), RepositoryError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

pub(super) fn sweep(staging_root: &Path) -> Result<usize, RepositoryError> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(staging_root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(staging_root)(e)),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            // A temporary file of a killed atomic write.
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let pid = entry
                    .file_name()
                    .to_string_lossy()
                    .split('-')
                    .nth(1)
                    .and_then(|p| p.parse().ok());
                if !pid.is_some_and(crate::source::image_file::process_alive) {
                    let _ = std::fs::remove_file(&path);
                }
            }
            continue;
        }
        if writer_gone(&path) && std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

fn writer_gone(staging: &Path) -> bool {
    let pid = staging
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('-').next())
        .and_then(|p| p.parse().ok());
    // A live process keeps its folder: between making it and locking its
    // `lock` file, the lock alone would say it is gone.
    if pid.is_some_and(crate::source::image_file::process_alive) {
        return false;
    }
    match File::open(staging.join("lock")) {
        // Released when `f` drops.
        Ok(f) => f.try_lock().is_ok(),
        Err(_) => true,
    }
}

/// Makes `dir` and its missing parents, and syncs the folder that holds
/// each one it made, so that a manifest written into it survives a power
/// loss along with the path to it.
fn create_dirs_durably(dir: &Path) -> Result<(), RepositoryError> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.exists() {
        missing.push(at);
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    for made in missing.iter().rev() {
        if let Some(parent) = made.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use arca_transport::{Chunk, Manifest};

    /// A 4 KiB chunk of `byte`, stored without a codec.
    pub(in crate::repository) fn chunk(byte: u8) -> (ChunkHash, Chunk) {
        let raw = vec![byte; 4096];
        let hash = *blake3::hash(&raw).as_bytes();
        let c = Chunk {
            hash: hash.to_vec(),
            codec: "none".into(),
            codec_hash: Vec::new(),
            raw_len: raw.len() as u32,
            payload: raw.into(),
        };
        (hash, c)
    }

    fn ask(w: &PointWriter, hashes: &[ChunkHash]) -> Vec<bool> {
        w.query(ChunkQuery {
            hashes: hashes.concat(),
        })
        .unwrap()
        .missing
    }

    #[test]
    fn an_aborted_task_keeps_its_chunks_but_no_restore_point() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        let (h1, c1) = chunk(1);
        let (h2, _) = chunk(2);
        let first = repo.writer().unwrap();
        first
            .store(StoreChunks {
                chunks: vec![c1.clone()],
            })
            .unwrap();
        first.abort();
        // A retry finds what the aborted attempt sent, and only that.
        let retry = repo.writer().unwrap();
        assert_eq!(ask(&retry, &[h1, h2]), vec![false, true]);
        assert!(repo.points().unwrap().is_empty(), "no restore point");
        // Kept means published: the index files on disk (what another
        // process reads) name it.
        let indexed: Vec<ChunkHash> = walk_files(&dir.path().join("index"))
            .iter()
            .flat_map(|p| super::super::pack::decode_index(&std::fs::read(p).unwrap()).unwrap())
            .map(|e| e.hash)
            .collect();
        assert_eq!(indexed, vec![h1]);
        // The kept chunk is a whole, readable chunk: a commit can use it.
        let reply = commit(&retry, &[h1]).unwrap();
        assert_eq!(reply.new_chunks, 0, "nothing new: the chunk was kept");
        assert_eq!(repo.points().unwrap().len(), 1);
        let kept = repo.read_chunk(&h1).unwrap();
        assert_eq!(kept.payload, c1.payload, "whole and readable");
    }

    /// Stores `c` and commits a restore point of `blocks` with a writer of
    /// its own; returns the point's id.
    pub(in crate::repository) fn store_and_commit(
        repo: &Repository,
        c: &Chunk,
        blocks: &[ChunkHash],
    ) -> String {
        let w = repo.writer().unwrap();
        w.store(StoreChunks {
            chunks: vec![c.clone()],
        })
        .unwrap();
        commit(&w, blocks).unwrap().point_id
    }

    /// Commits a restore point of one 4 KiB block per address.
    pub(in crate::repository) fn commit(
        w: &PointWriter,
        hashes: &[ChunkHash],
    ) -> Result<CommitReply, LinkError> {
        w.commit(CommitPoint {
            manifest: Some(manifest_of(hashes)),
            retention: None,
        })
    }

    fn manifest_of(hashes: &[ChunkHash]) -> Manifest {
        Manifest {
            format_version: arca_transport::MANIFEST_FORMAT_VERSION,
            job: "j".into(),
            vm: "v".into(),
            disk: "d".into(),
            disk_size: 4096 * hashes.len() as u64,
            block_size: 4096,
            block_hashes: hashes.concat(),
            ..Default::default()
        }
    }

    #[test]
    fn writers_side_by_side_store_a_shared_chunk_once() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        let (shared, c) = chunk(7);
        let (own, c_own) = chunk(8);
        let (a, b) = (repo.writer().unwrap(), repo.writer().unwrap());
        // Both ask before either sends, as two tasks on twin disks do.
        assert_eq!(ask(&a, &[shared]), vec![true]);
        assert_eq!(ask(&b, &[shared]), vec![true]);
        a.store(StoreChunks {
            chunks: vec![c.clone()],
        })
        .unwrap();
        // Staged by `a`, not yet published: no longer missing for `b`.
        assert_eq!(ask(&b, &[shared, own]), vec![false, true]);
        b.store(StoreChunks {
            chunks: vec![c, c_own],
        })
        .unwrap();
        // `b` commits first and publishes `a`'s chunk with its own.
        let rb = commit(&b, &[shared, own]).unwrap();
        let ra = commit(&a, &[shared]).unwrap();
        assert_eq!((ra.new_chunks, rb.new_chunks), (1, 1));
        let record = |h: &ChunkHash| repo.chunk_record(h).unwrap().2;
        let packs: u64 = walk_files(&dir.path().join("packs"))
            .iter()
            .map(|p| p.metadata().unwrap().len())
            .sum();
        assert_eq!(packs, record(&shared) + record(&own), "each stored once");
        assert_eq!(packs, ra.stored_bytes + rb.stored_bytes);
        for h in [shared, own] {
            assert_eq!(
                repo.read_chunk(&h).unwrap().payload,
                vec![if h == shared { 7 } else { 8 }; 4096]
            );
        }
    }

    #[test]
    fn a_second_commit_of_one_task_makes_no_second_point() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        let (h1, c1) = chunk(1);
        let (h2, c2) = chunk(2);
        let with_token = |token: &[u8], hashes: &[ChunkHash], c: &Chunk| {
            let w = repo.writer().unwrap();
            w.store(StoreChunks {
                chunks: vec![c.clone()],
            })
            .unwrap();
            w.commit(CommitPoint {
                manifest: Some(Manifest {
                    task_token: token.to_vec(),
                    ..manifest_of(hashes)
                }),
                retention: None,
            })
            .unwrap()
        };
        let first = with_token(b"task-1", &[h1], &c1);
        assert!(!first.earlier_attempt);
        // A retry of that task whose answer never came: it read another
        // state of the disk, but the point committed first is the task's.
        let retry = with_token(b"task-1", &[h2], &c2);
        assert!(retry.earlier_attempt);
        assert_eq!(retry.point_id, first.point_id);
        let points = repo.points().unwrap();
        assert_eq!(points.len(), 1, "no second point");
        // The retry's chunks are published, for prune to judge.
        assert_eq!(repo.missing(&[h2]), vec![false]);
        // Another task, and a task without a token, commit as usual.
        let other = with_token(b"task-2", &[h2], &c2);
        assert!(!other.earlier_attempt);
        let untokened = with_token(b"", &[h1], &c1);
        let again = with_token(b"", &[h1], &c1);
        assert!(!untokened.earlier_attempt && !again.earlier_attempt);
        assert_eq!(repo.points().unwrap().len(), 4);
        // An earlier attempt's point damaged since (its block list): the
        // retry's point replaces it rather than being answered with it.
        // Large enough (over 4 KiB) that its header reads without the
        // block list, as a real disk's does.
        let blocks: Vec<ChunkHash> = [vec![h1; 200], vec![h2]].concat();
        let third = with_token(b"task-3", &blocks, &c1);
        let path = repo
            .points()
            .unwrap()
            .into_iter()
            .find(|p| p.manifest.point_id == third.point_id)
            .unwrap()
            .path;
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(32).position(|w| w == h2).unwrap();
        bytes[at + 5] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let retry = with_token(b"task-3", &blocks, &c1);
        assert!(!retry.earlier_attempt);
        assert_ne!(retry.point_id, third.point_id);
    }

    #[test]
    fn a_commit_that_references_a_chunk_nobody_stored_fails() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        let (h, _) = chunk(3);
        let e = commit(&repo.writer().unwrap(), &[h])
            .unwrap_err()
            .to_string();
        assert!(e.contains("which is not in the repository"), "{e}");
        assert!(repo.points().unwrap().is_empty());
    }

    #[test]
    fn a_commit_of_a_malformed_point_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        let (h, c) = chunk(4);
        let good = manifest_of(&[h]);
        let cases = [
            (
                Manifest {
                    block_hashes: Vec::new(),
                    ..good.clone()
                },
                "block list",
            ),
            (
                Manifest {
                    format_version: arca_transport::MANIFEST_FORMAT_VERSION + 1,
                    ..good.clone()
                },
                "newer than this arca",
            ),
            (
                Manifest {
                    job: "../../elsewhere".into(),
                    ..good.clone()
                },
                "job name",
            ),
            (
                Manifest {
                    vm: "a/b".into(),
                    ..good.clone()
                },
                "vm name",
            ),
            (
                Manifest {
                    disk: String::new(),
                    ..good.clone()
                },
                "disk name",
            ),
            (
                Manifest {
                    disk_size: u64::MAX,
                    block_size: 1,
                    ..good.clone()
                },
                "block list",
            ),
        ];
        for (m, why) in cases {
            let w = repo.writer().unwrap();
            w.store(StoreChunks {
                chunks: vec![c.clone()],
            })
            .unwrap();
            let e = w
                .commit(CommitPoint {
                    manifest: Some(m),
                    retention: None,
                })
                .unwrap_err()
                .to_string();
            assert!(e.contains("refused commit") && e.contains(why), "{e}");
        }
        assert!(repo.points().unwrap().is_empty());
        // `points/../../elsewhere` is beside the repository's folder.
        assert!(!dir.path().parent().unwrap().join("elsewhere").exists());
        assert!(!dir.path().join("points/j/a").exists());
        // The same chunks commit under a well-formed point.
        commit(&repo.writer().unwrap(), &[h]).unwrap();
        assert_eq!(repo.points().unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_header_from_the_future_is_not_the_newest_point() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        let (h, c) = chunk(5);
        let blocks = vec![h; 4096];
        let first = store_and_commit(&repo, &c, &blocks);
        // A point whose header says the end of time and whose checksum
        // fails (a header is read without the checksum).
        let mut m = repo.latest_point("j", "v", "d").unwrap().unwrap();
        m.point_id = "29991231T000000Z-ffffffff".into();
        m.created_unix_ms = i64::MAX;
        let mut bytes = manifest::encode(&m);
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        let bogus = repo
            .manifest_dir(&m)
            .join(format!("{}.manifest", m.point_id));
        std::fs::write(&bogus, &bytes).unwrap();
        assert_eq!(
            manifest::read_header(&bogus).unwrap().created_unix_ms,
            i64::MAX
        );
        let header = |repo: &Repository| repo.latest_header("j", "v", "d").unwrap().unwrap();
        assert_eq!(header(&repo).point_id, first);

        let second = store_and_commit(&repo, &c, &blocks);
        let newest = header(&repo);
        assert_eq!(newest.point_id, second);
        assert!(newest.created_unix_ms < i64::MAX / 2, "{newest:?}");
    }

    #[test]
    fn the_newest_readable_point_is_the_parent_when_the_newest_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        let (h, c) = chunk(4);
        // Block lists longer than `read_header` reads, so that a damaged
        // block list leaves the header readable.
        let blocks = vec![h; 4096];
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(store_and_commit(&repo, &c, &blocks));
        }
        let latest = || repo.latest_point("j", "v", "d").unwrap().unwrap().point_id;
        assert_eq!(latest(), ids[2]);
        // Its block list damaged (its header still reads): the one before.
        let path = repo.find_point(&ids[2]).unwrap().path;
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 40;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(
            manifest::read_header(&path).is_ok(),
            "the header still reads"
        );
        assert_eq!(latest(), ids[1]);
        // A point committed now counts from the damaged one's header, so it
        // is newer than every point on disk, readable or not.
        let newest = store_and_commit(&repo, &c, &blocks);
        assert_eq!(latest(), newest);
        std::fs::remove_file(repo.find_point(&newest).unwrap().path).unwrap();
        let header = || repo.latest_header("j", "v", "d").unwrap().unwrap().point_id;
        assert_eq!(header(), ids[2], "its header reads");
        // Cut short (not even a header): still the one before, for the
        // header too (the header read before is not kept for a file that
        // changed).
        std::fs::write(&path, &bytes[..20]).unwrap();
        assert_eq!(latest(), ids[1]);
        assert_eq!(header(), ids[1]);
    }

    fn walk_files(p: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(p).unwrap().flatten() {
            if e.path().is_dir() {
                out.extend(walk_files(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }
}
