//! The repository lock: `<repository>/lock`, shared by everyone who relies
//! on chunks staying where the index says, exclusive for prune.
//!
//! Holders of the shared lock: a point writer from its creation to its end
//! (its dedup answers and its commit's reference check trust the index), a
//! restore or verify for its whole run, and every load of the index. Prune
//! takes it exclusively, so it never deletes a chunk that a session has
//! been told is stored, nor moves one a restore is reading.
//!
//! The file's content is the prune generation: a random word of fixed
//! width that prune writes in place (never truncating, so a torn write
//! cannot bring back an older word) and syncs before it deletes anything.
//! A process that finds another word than the one it loaded its index
//! under drops that index (and its open pack files) and loads it again: an
//! agent lives across prunes, and an index that still names a deleted
//! chunk would approve a dedup against it. Indexes are loaded only under
//! the shared lock, so none is loaded in the middle of a prune.
//!
//! `flock` locks belong to the open file, so they die with their process:
//! a killed session or prune never leaves the repository locked.

use super::{RepositoryError, hex, io_err};
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = "lock";
const WORD: usize = 32;

pub struct RepoLock {
    /// `None` only for a reader that may not create the lock file or read
    /// it; it goes on unlocked, with a warning.
    file: Option<File>,
    path: PathBuf,
}

impl RepoLock {
    /// Waits while a prune runs. A shared lock needs only a read-only
    /// descriptor, so readers without write permission lock too.
    pub fn shared(root: &Path) -> Result<Self, RepositoryError> {
        let path = root.join(LOCK_FILE);
        let file = match File::open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == ErrorKind::NotFound => match create(&path) {
                Ok(f) => Some(f),
                Err(e) if unwritable(&e) => None,
                Err(e) => return Err(io_err(&path)(e)),
            },
            Err(e) if unwritable(&e) => None,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let Some(file) = file else {
            tracing::warn!(
                "repository {}: cannot open its lock file: reading without the lock (a prune now could move what is read)",
                root.display()
            );
            return Ok(Self { file: None, path });
        };
        if file.try_lock_shared().is_err() {
            tracing::info!("repository {}: waiting for a prune to end", root.display());
            file.lock_shared().map_err(io_err(&path))?;
        }
        Ok(Self {
            file: Some(file),
            path,
        })
    }

    /// Refuses (with why) while anyone holds the lock: a session may run
    /// for hours, and a prune that waited would hold up every session that
    /// starts after it.
    pub fn exclusive(root: &Path) -> Result<Self, RepositoryError> {
        let path = root.join(LOCK_FILE);
        let file = create(&path).map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(Self {
                file: Some(file),
                path,
            }),
            Err(std::fs::TryLockError::WouldBlock) => Err(RepositoryError::Busy {
                path: root.to_owned(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
    }

    /// The prune generation (empty in a repository never pruned).
    pub fn generation(&self) -> Result<String, RepositoryError> {
        let mut word = vec![0u8; WORD];
        let n = match &self.file {
            Some(f) => read_at_most(f, &mut word).map_err(io_err(&self.path))?,
            None => 0,
        };
        Ok(String::from_utf8_lossy(&word[..n]).into_owned())
    }

    /// Writes a new generation in place and syncs it (exclusive holders
    /// only).
    pub(super) fn bump(&self) -> Result<(), RepositoryError> {
        let word = hex(&rand::random::<[u8; WORD / 2]>());
        let f = self.file.as_ref().expect("an exclusive lock has its file");
        f.write_all_at(word.as_bytes(), 0)
            .and_then(|()| f.sync_data())
            .map_err(io_err(&self.path))
    }
}

fn create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

fn unwritable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem
    )
}

fn read_at_most(f: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
