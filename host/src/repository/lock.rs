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
    /// `None` only for a reader of a repository whose lock file is absent
    /// and which it may not create; it goes on unlocked, with a warning.
    file: Option<File>,
    path: PathBuf,
}

impl RepoLock {
    /// For a writer: waits while a prune runs; a lock file that cannot be
    /// opened is an error (a writer without the lock could dedup against
    /// chunks a prune deletes). A shared lock needs only a read-only
    /// descriptor.
    pub fn shared(root: &Path) -> Result<Self, RepositoryError> {
        Self::shared_inner(root, false)
    }

    /// For a reader (restore, verify, index loads): as `shared`, but a
    /// reader of a repository it may not write, with no lock file yet, goes
    /// on unlocked with a warning (nobody could prune that repository
    /// either without making the file).
    pub fn shared_reading(root: &Path) -> Result<Self, RepositoryError> {
        Self::shared_inner(root, true)
    }

    fn shared_inner(root: &Path, reading: bool) -> Result<Self, RepositoryError> {
        let path = root.join(LOCK_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => match create(&path) {
                Ok(f) => f,
                Err(e) if reading && unwritable(&e) => {
                    tracing::warn!(
                        "repository {}: no lock file and none can be made here: reading without the lock",
                        root.display()
                    );
                    return Ok(Self { file: None, path });
                }
                Err(source) => return Err(RepositoryError::LockUnavailable { path, source }),
            },
            Err(source) => return Err(RepositoryError::LockUnavailable { path, source }),
        };
        if file.try_lock_shared().is_err() {
            // Said where an operator sees it: a session that seems to hang
            // is waiting for a prune (or a repair's mending) to end.
            tracing::warn!(
                "repository {}: a prune or repair has it to itself; waiting for that to end",
                root.display()
            );
            let started = std::time::Instant::now();
            file.lock_shared().map_err(io_err(&path))?;
            tracing::warn!(
                "repository {}: waited {:.1} s for a prune or repair",
                root.display(),
                started.elapsed().as_secs_f64()
            );
        }
        Ok(Self {
            file: Some(file),
            path,
        })
    }

    /// Refuses (with why) while anyone holds the lock: a session may run
    /// for hours, and a prune that waited would hold up every session that
    /// starts after it.
    /// `task` ("prune", "repair") names the refused work in the error.
    pub fn exclusive(root: &Path, task: &'static str) -> Result<Self, RepositoryError> {
        let path = root.join(LOCK_FILE);
        let file = match create(&path) {
            Ok(f) => f,
            Err(source) => return Err(RepositoryError::LockUnavailable { path, source }),
        };
        match file.try_lock() {
            Ok(()) => Ok(Self {
                file: Some(file),
                path,
            }),
            Err(std::fs::TryLockError::WouldBlock) => Err(RepositoryError::Busy {
                path: root.to_owned(),
                task,
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
    }

    /// The prune generation (empty in a repository never pruned).
    pub fn generation(&self) -> Result<String, RepositoryError> {
        let mut word = [0u8; WORD];
        // One `pread` of a regular file returns all it has up to the size
        // asked for.
        let n = match &self.file {
            Some(f) => f.read_at(&mut word, 0).map_err(io_err(&self.path))?,
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

/// Opens or makes the lock file, readable by everyone whatever the umask:
/// a session or agent running as another user than the one who pruned
/// first must still be able to take the shared lock.
fn create(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::PermissionsExt;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let meta = file.metadata()?;
    if meta.permissions().mode() & 0o044 != 0o044 {
        use std::os::unix::fs::MetadataExt;
        // Only the owner may change the mode; others just use the file.
        // SAFETY: geteuid has no preconditions.
        if meta.uid() == unsafe { libc::geteuid() } {
            file.set_permissions(std::fs::Permissions::from_mode(
                meta.permissions().mode() | 0o044,
            ))?;
        }
    }
    Ok(file)
}

fn unwritable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem
    )
}
