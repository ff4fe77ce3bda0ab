//! The target mover's side of a restore point: stage chunks, then commit.
//!
//! Chunks are written to a private staging folder without a sync each (their
//! write-back starts at once, `crate::writeback`), then one `syncfs` makes
//! them all durable, they are linked into `chunks/`, a
//! second `syncfs` makes the links durable, and only then the manifest is
//! written and renamed into place. A process killed at any moment therefore
//! leaves either no restore point or a complete one, and a staging folder
//! that the next session sweeps.

use super::{Repository, RepositoryError, chunk, hex, io_err, manifest};
use crate::writeback::WriteBack;
use arca_transport::{
    ChunkHash, ChunkQuery, ChunkQueryReply, CommitPoint, CommitReply, HASH_LEN, LinkError,
    RegisterCodec, StoreChunks, TargetMover,
};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct PointWriter {
    repo: Repository,
    staging: PathBuf,
    _lock: File,
    state: Mutex<State>,
    write_back: WriteBack,
}

#[derive(Default)]
struct State {
    chunks: HashSet<ChunkHash>,
    codecs: Vec<Vec<u8>>,
    finished: bool,
}

fn target_err(e: impl std::fmt::Display) -> LinkError {
    LinkError::Target(e.to_string())
}

impl PointWriter {
    pub(super) fn new(repo: &Repository) -> Result<Self, RepositoryError> {
        let name = format!("{}-{}", std::process::id(), hex(&rand::random::<[u8; 6]>()));
        let staging = repo.root.join("staging").join(name);
        std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        let lock_path = staging.join("lock");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        // SAFETY: flock on a descriptor we own. The lock lives as long as this
        // writer, which is how `sweep` tells a live writer from a dead one.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io_err(&lock_path)(io::Error::last_os_error()));
        }
        Ok(Self {
            repo: repo.clone(),
            staging,
            _lock: lock,
            state: Mutex::new(State::default()),
            write_back: WriteBack::start(),
        })
    }

    fn staged_chunk(&self, hash: &ChunkHash) -> PathBuf {
        self.staging.join(hex(hash))
    }

    fn commit_inner(&self, commit: CommitPoint) -> Result<CommitReply, RepositoryError> {
        let repo = &self.repo;
        let mut m = commit.manifest.ok_or_else(|| RepositoryError::Manifest {
            path: self.staging.clone(),
            reason: "commit without a manifest".into(),
        })?;
        let mut state = self.state.lock().expect("writer state lock");
        if state.finished {
            return Err(RepositoryError::Manifest {
                path: self.staging.clone(),
                reason: "this writer has already committed or aborted".into(),
            });
        }
        sync_filesystem(&self.staging)?;

        for hash in &state.codecs {
            let staged = self.staging.join(format!("codec-{}.wasm", hex(hash)));
            let dest = repo.codec_path(hash);
            match std::fs::hard_link(&staged, &dest) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&dest)(e)),
            }
        }
        let (new_chunks, stored_bytes) = self.publish_chunks(&state.chunks)?;
        // The manifest must not reference anything that is not there.
        for block in m.block_hashes.chunks_exact(HASH_LEN) {
            let hash: ChunkHash = block.try_into().expect("32 bytes");
            if hash != super::HOLE && !repo.has_chunk(&hash) {
                return Err(RepositoryError::DanglingReference {
                    point: format!("{}/{}/{}", m.job, m.vm, m.disk),
                    hash: hex(&hash),
                });
            }
        }
        sync_filesystem(&self.staging)?;

        let now = jiff::Timestamp::now();
        m.created_unix_ms = now.as_millisecond();
        if let Some(prev) = repo.latest_point(&m.job, &m.vm, &m.disk)? {
            // Keeps "newest" unambiguous for the next incremental.
            m.created_unix_ms = m.created_unix_ms.max(prev.created_unix_ms + 1);
        }
        m.point_id = format!(
            "{}-{}",
            now.strftime("%Y%m%dT%H%M%SZ"),
            hex(&rand::random::<[u8; 4]>())
        );
        let dir = repo.manifest_dir(&m);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        write_atomic(
            &dir.join(format!("{}.manifest", m.point_id)),
            &manifest::encode(&m),
            &self.staging,
        )?;
        state.finished = true;
        drop(state);
        self.remove_staging();
        Ok(CommitReply {
            point_id: m.point_id,
            new_chunks,
            stored_bytes,
        })
    }

    /// Publishes durable staged chunks; returns how many were new and the
    /// bytes they occupy.
    fn publish_chunks(&self, chunks: &HashSet<ChunkHash>) -> Result<(u64, u64), RepositoryError> {
        let (mut new_chunks, mut stored_bytes) = (0u64, 0u64);
        for hash in chunks {
            let staged = self.staged_chunk(hash);
            let dest = self.repo.chunk_path(hash);
            let parent = dest.parent().expect("chunk path has a parent");
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            // A hard link publishes the chunk only if no other writer did:
            // the check and the creation are one atomic step, so concurrent
            // commits of the same chunk count it once.
            match std::fs::hard_link(&staged, &dest) {
                Ok(()) => {
                    stored_bytes += std::fs::metadata(&dest).map_err(io_err(&dest))?.len();
                    new_chunks += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&dest)(e)),
            }
        }
        Ok((new_chunks, stored_bytes))
    }

    /// An aborted task keeps the chunks it sent (no restore point refers to
    /// them yet): a retry after a dropped link finds them by its dedup
    /// queries and resumes instead of sending everything again.
    fn keep_sent_chunks(&self, chunks: &HashSet<ChunkHash>) -> Result<u64, RepositoryError> {
        if chunks.is_empty() {
            return Ok(0);
        }
        // Durable before visible, as at a commit.
        sync_filesystem(&self.staging)?;
        let (new_chunks, _) = self.publish_chunks(chunks)?;
        sync_filesystem(&self.staging)?;
        Ok(new_chunks)
    }

    fn remove_staging(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.staging)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("could not remove staging {}: {e}", self.staging.display());
        }
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
        // Staged chunks under the lock; the published ones by stat, outside
        // it, so that the workers' queries do not wait on each other's I/O.
        let staged: Vec<bool> = {
            let state = self.state.lock().expect("writer state lock");
            hashes.iter().map(|h| state.chunks.contains(h)).collect()
        };
        let missing = hashes
            .iter()
            .zip(staged)
            .map(|(h, staged)| !staged && !self.repo.has_chunk(h))
            .collect();
        Ok(ChunkQueryReply { missing })
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
            let path = self.staged_chunk(&hash);
            let mut f = File::create(&path).map_err(target_err)?;
            chunk::StoredChunk::write(&mut f, &header, &c.payload).map_err(target_err)?;
            self.write_back.file(f);
            self.state
                .lock()
                .expect("writer state lock")
                .chunks
                .insert(hash);
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
        let staged = self
            .staging
            .join(format!("codec-{}.wasm", hex(&codec.hash)));
        std::fs::write(&staged, &codec.component).map_err(target_err)?;
        self.state
            .lock()
            .expect("writer state lock")
            .codecs
            .push(codec.hash);
        Ok(())
    }

    fn commit(&self, commit: CommitPoint) -> Result<CommitReply, LinkError> {
        self.commit_inner(commit).map_err(target_err)
    }

    fn abort(&self) {
        let mut state = self.state.lock().expect("writer state lock");
        if !state.finished {
            state.finished = true;
            match self.keep_sent_chunks(&state.chunks) {
                Ok(n) if n > 0 => {
                    tracing::info!("aborted task: kept {n} chunk(s) it sent, for a retry to find")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("aborted task: could not keep its chunks: {e}"),
            }
        }
        drop(state);
        self.remove_staging();
    }
}

impl Drop for PointWriter {
    fn drop(&mut self) {
        self.remove_staging();
    }
}

fn sync_filesystem(path: &Path) -> Result<(), RepositoryError> {
    let dir = File::open(path).map_err(io_err(path))?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io_err(path)(io::Error::last_os_error()));
    }
    Ok(())
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
    let parent = dest.parent().expect("destination has a parent");
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err(parent))
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
    match File::open(staging.join("lock")) {
        // SAFETY: flock on a descriptor we own; released when `f` drops.
        Ok(f) => unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 },
        Err(_) => {
            let pid = staging
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse().ok());
            !pid.is_some_and(crate::source::image_file::process_alive)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_transport::{Chunk, Manifest};

    fn chunk(byte: u8) -> (ChunkHash, Chunk) {
        let raw = vec![byte; 4096];
        let hash = *blake3::hash(&raw).as_bytes();
        let c = Chunk {
            hash: hash.to_vec(),
            codec: "none".into(),
            codec_hash: Vec::new(),
            raw_len: raw.len() as u32,
            payload: raw,
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
        assert_eq!(
            std::fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .count(),
            1,
            "only the retry's staging is left"
        );
        // The kept chunk is a whole, readable chunk: a commit can use it.
        let mut hashes = vec![0u8; HASH_LEN];
        hashes.copy_from_slice(&h1);
        let reply = retry
            .commit(CommitPoint {
                manifest: Some(Manifest {
                    format_version: arca_transport::MANIFEST_FORMAT_VERSION,
                    job: "j".into(),
                    vm: "v".into(),
                    disk: "d".into(),
                    disk_size: 4096,
                    block_size: 4096,
                    block_hashes: hashes,
                    ..Default::default()
                }),
            })
            .unwrap();
        assert_eq!(reply.new_chunks, 0, "nothing new: the chunk was kept");
        assert_eq!(repo.points().unwrap().len(), 1);
        let kept = repo.read_chunk(&h1).unwrap();
        assert_eq!(kept.payload, c1.payload, "whole and readable");
    }
}
