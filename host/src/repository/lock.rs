//! The repository lock: `<repository>/lock`, shared by everyone who relies
//! on chunks staying where the index says, exclusive for prune.
//!
//! Holders of the shared lock: a point writer from its creation to its end
//! (its dedup answers and its commit's reference check trust the index), a
//! restore or verify for its whole run, and every load of the index. Prune
//! takes it exclusively, so it never deletes a chunk that a session has
//! been told is stored, nor moves one a restore is reading.
//!
//! The file's content is the prune generation: a random word that prune
//! changes before it deletes anything and again when it is done. A process
//! that finds another word than the one it loaded its index under drops
//! that index (and its open pack files) and loads it again: an agent lives
//! across prunes, and an index that still names a deleted chunk would
//! approve a dedup against it.
//!
//! `flock` locks belong to the open file, so they die with their process:
//! a killed session or prune never leaves the repository locked.

use super::{RepositoryError, hex, io_err};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = "lock";

pub struct RepoLock {
    /// `None` only for a reader of a repository it may not write, which has
    /// no lock file yet: nobody can prune it either.
    file: Option<File>,
    path: PathBuf,
}

impl RepoLock {
    fn open(root: &Path) -> Result<Self, RepositoryError> {
        let path = root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Self {
            file: Some(file),
            path,
        })
    }

    /// Waits while a prune runs.
    pub fn shared(root: &Path) -> Result<Self, RepositoryError> {
        let lock = match Self::open(root) {
            Ok(l) => l,
            // A restore from a read-only copy of a repository.
            Err(RepositoryError::Io { path, source })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                match File::open(&path) {
                    Ok(f) => Self {
                        file: Some(f),
                        path,
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Ok(Self { file: None, path });
                    }
                    Err(e) => return Err(io_err(&path)(e)),
                }
            }
            Err(e) => return Err(e),
        };
        let file = lock.file.as_ref().expect("opened above");
        if file.try_lock_shared().is_err() {
            tracing::info!("repository {}: waiting for a prune to end", root.display());
            file.lock_shared().map_err(io_err(&lock.path))?;
        }
        Ok(lock)
    }

    /// Refuses (with why) while anyone holds the lock: a session may run
    /// for hours, and a prune that waited would hold up every session that
    /// starts after it.
    pub fn exclusive(root: &Path) -> Result<Self, RepositoryError> {
        let lock = Self::open(root)?;
        match lock.file.as_ref().expect("opened read-write").try_lock() {
            Ok(()) => Ok(lock),
            Err(std::fs::TryLockError::WouldBlock) => Err(RepositoryError::Busy {
                path: root.to_owned(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(&lock.path)(e)),
        }
    }

    /// The prune generation (empty in a repository never pruned).
    pub fn generation(&self) -> Result<String, RepositoryError> {
        let mut text = String::new();
        if let Some(mut f) = self.file.as_ref() {
            f.read_to_string(&mut text)
                .and_then(|_| f.rewind())
                .map_err(io_err(&self.path))?;
        }
        Ok(text)
    }

    /// Writes a new generation, durably (exclusive holders only).
    pub(super) fn bump(&self) -> Result<(), RepositoryError> {
        let word = hex(&rand::random::<[u8; 16]>());
        let mut f = self.file.as_ref().expect("an exclusive lock has its file");
        f.set_len(0)
            .and_then(|()| f.write_all(word.as_bytes()))
            .and_then(|()| f.rewind())
            .and_then(|()| f.sync_data())
            .map_err(io_err(&self.path))
    }
}
