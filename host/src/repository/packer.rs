//! Staging packs: the chunks this process's writers send, appended to packs
//! in a staging folder until a commit (or an abort) publishes them.
//!
//! One packer serves every writer of a repository in the process, so that
//! tasks running side by side store a chunk they share once: the second
//! sender finds it staged and skips it. Publishing takes every staged pack,
//! so whichever writer commits first also publishes what the others sent;
//! `Repository::publish_staged` orders this so that no manifest appears
//! before the packs its chunks lie in.
//!
//! Publish order (what makes a killed process harmless): each pack is made
//! durable (`fdatasync`, its write-back started as it was written) and
//! renamed into `packs/`, the directories are synced, then its index file is
//! written, synced and renamed into `index/`. A process killed before the
//! index appears leaves a pack nobody reads (space for a future garbage
//! collection), never an index that points at nothing.

use super::pack::{self, IndexEntry, PACK_TARGET};
use super::{RepositoryError, hex, io_err};
use crate::writeback::WriteBack;
use arca_transport::ChunkHash;
use std::collections::{BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Under its lock only bookkeeping happens (no I/O but creating a pack), so
/// that the workers' dedup queries and reservations never wait for another
/// worker's write: the bytes are written after, by `Reservation::write`.
pub(super) struct Packer {
    staging: PathBuf,
    _lock: File,
    current: Option<StagedPack>,
    sealed: Vec<StagedPack>,
    /// Chunks in staged packs, written or being written, not yet indexed.
    in_flight: HashSet<ChunkHash>,
    write_back: Arc<WriteBack>,
}

pub(super) struct StagedPack {
    pub id: String,
    file: Arc<File>,
    len: u64,
    pub entries: Vec<IndexEntry>,
    writes: Arc<Writes>,
}

/// Writes into one pack that are reserved and not finished, and the first
/// that failed: a pack is published only when the first is zero and there
/// is no second.
#[derive(Default)]
struct Writes {
    outstanding: AtomicUsize,
    failed: Mutex<Option<String>>,
}

/// Room for one record in a staged pack, to be written outside the lock.
pub(super) struct Reservation {
    file: Arc<File>,
    path: PathBuf,
    offset: u64,
    writes: Arc<Writes>,
    write_back: Arc<WriteBack>,
}

impl Reservation {
    pub fn write(self, prefix: &[u8], payload: &[u8]) -> Result<(), RepositoryError> {
        let at = self.offset;
        let result = self
            .file
            .write_all_at(prefix, at)
            .and_then(|()| self.file.write_all_at(payload, at + prefix.len() as u64));
        match result {
            Ok(()) => {
                let len = (prefix.len() + payload.len()) as u64;
                self.write_back.range(&self.file, at, len);
                Ok(())
            }
            Err(e) => {
                let mut failed = self.writes.failed.lock().expect("pack writes lock");
                failed.get_or_insert_with(|| e.to_string());
                Err(io_err(&self.path)(e))
            }
        }
    }
}

impl Drop for Reservation {
    // Also on a panic, so that a publish never waits for a write that died.
    fn drop(&mut self) {
        self.writes.outstanding.fetch_sub(1, Ordering::Release);
    }
}

impl Packer {
    pub fn new(staging_root: &Path) -> Result<Self, RepositoryError> {
        let name = format!("{}-{}", std::process::id(), hex(&rand::random::<[u8; 6]>()));
        let staging = staging_root.join(name);
        std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        let lock_path = staging.join("lock");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        // SAFETY: flock on a descriptor we own. The lock lives as long as
        // this packer, which is how `sweep` tells a live one from a dead one.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io_err(&lock_path)(io::Error::last_os_error()));
        }
        Ok(Self {
            staging,
            _lock: lock,
            current: None,
            sealed: Vec::new(),
            in_flight: HashSet::new(),
            write_back: Arc::new(WriteBack::start()),
        })
    }

    pub fn staging(&self) -> &Path {
        &self.staging
    }

    pub fn holds(&self, hash: &ChunkHash) -> bool {
        self.in_flight.contains(hash)
    }

    /// Reserves room for a chunk record of `len` bytes unless the chunk is
    /// already staged (`None`).
    pub fn reserve(
        &mut self,
        hash: &ChunkHash,
        len: u64,
    ) -> Result<Option<Reservation>, RepositoryError> {
        if self.in_flight.contains(hash) {
            return Ok(None);
        }
        if self.current.is_none() {
            let id = hex(&rand::random::<[u8; 16]>());
            let path = self.staging.join(format!("{id}.pack"));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_err(&path))?;
            self.current = Some(StagedPack {
                id,
                file: Arc::new(file),
                len: 0,
                entries: Vec::new(),
                writes: Arc::default(),
            });
        }
        let pack = self.current.as_mut().expect("a current pack");
        let offset = pack.len;
        pack.len += len;
        pack.entries.push(IndexEntry {
            hash: *hash,
            offset,
            len: len as u32,
        });
        pack.writes.outstanding.fetch_add(1, Ordering::Acquire);
        let reservation = Reservation {
            file: pack.file.clone(),
            path: self.staging.join(format!("{}.pack", pack.id)),
            offset,
            writes: pack.writes.clone(),
            write_back: self.write_back.clone(),
        };
        self.in_flight.insert(*hash);
        if pack.len >= PACK_TARGET {
            self.sealed.extend(self.current.take());
        }
        Ok(Some(reservation))
    }

    /// Every staged pack, for publishing; appends go to a new one after.
    pub fn take(&mut self) -> Vec<StagedPack> {
        self.sealed.extend(self.current.take());
        std::mem::take(&mut self.sealed)
    }

    /// Published (or failed) packs are no longer staged.
    pub fn forget(&mut self, packs: &[StagedPack]) {
        for p in packs {
            for e in &p.entries {
                self.in_flight.remove(&e.hash);
            }
        }
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.staging)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("could not remove staging {}: {e}", self.staging.display());
        }
    }
}

pub(super) fn pack_path(root: &Path, id: &str) -> PathBuf {
    root.join("packs").join(&id[..2]).join(format!("{id}.pack"))
}

pub(super) fn index_path(root: &Path, id: &str) -> PathBuf {
    root.join("index").join(format!("{id}.idx"))
}

/// Makes staged packs durable and visible, in the order the module doc
/// gives.
pub(super) fn publish(
    root: &Path,
    staging: &Path,
    packs: &[StagedPack],
) -> Result<(), RepositoryError> {
    let mut dirs = BTreeSet::new();
    for p in packs {
        let staged = staging.join(format!("{}.pack", p.id));
        // Writes reserved before the pack was taken finish in moments.
        while p.writes.outstanding.load(Ordering::Acquire) > 0 {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        if let Some(e) = p.writes.failed.lock().expect("pack writes lock").as_ref() {
            return Err(io_err(&staged)(io::Error::other(e.clone())));
        }
        p.file.sync_data().map_err(io_err(&staged))?;
        let dest = pack_path(root, &p.id);
        let parent = dest.parent().expect("pack path has a parent");
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            dirs.insert(root.join("packs"));
        }
        std::fs::rename(&staged, &dest).map_err(io_err(&dest))?;
        dirs.insert(parent.to_owned());
    }
    for d in &dirs {
        sync_dir(d)?;
    }
    let index_dir = root.join("index");
    std::fs::create_dir_all(&index_dir).map_err(io_err(&index_dir))?;
    let mut tmps = Vec::with_capacity(packs.len());
    for p in packs {
        let tmp = staging.join(format!("{}.idx", p.id));
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        io::Write::write_all(&mut f, &pack::encode_index(&p.entries))
            .and_then(|()| f.sync_all())
            .map_err(io_err(&tmp))?;
        tmps.push((tmp, index_path(root, &p.id)));
    }
    for (tmp, dest) in &tmps {
        std::fs::rename(tmp, dest).map_err(io_err(dest))?;
    }
    sync_dir(&index_dir)
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), RepositoryError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}
