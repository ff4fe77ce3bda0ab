//! One session per job at a time.
//!
//! Two sessions of one job would snapshot the same VMs and rotate the same
//! CBT bitmaps, and the later one could commit the very restore point the
//! earlier one's task then takes as its parent: a restore point that mixes
//! two instants. So `job run` holds an advisory lock (`flock`) on a file
//! per job under the home's `locks/`. The kernel drops it when the process
//! ends, however it ends, so a killed session never leaves its job locked.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "job '{job}' is already running{holder}: one session of a job runs at a time; run it again once that session has ended (or stop it)"
    )]
    Busy { job: String, holder: String },
    #[error("job lock {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Held for the whole session; dropping it (or the process ending) frees
/// the job.
#[derive(Debug)]
pub struct JobLock {
    _file: File,
}

impl JobLock {
    /// Takes the lock of `job` in `dir`, or says which process holds it.
    pub fn acquire(dir: &Path, job: &str) -> Result<JobLock, LockError> {
        let path = dir.join(format!("{}.lock", file_stem(job)));
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {
                // Who holds it, for the message a second session prints.
                file.set_len(0).map_err(io_err)?;
                file.rewind().map_err(io_err)?;
                write!(file, "{}", std::process::id()).map_err(io_err)?;
                Ok(JobLock { _file: file })
            }
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                Err(LockError::Busy {
                    job: job.to_owned(),
                    holder: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (process {pid})")
                    },
                })
            }
            Err(TryLockError::Error(e)) => Err(io_err(e)),
        }
    }
}

/// The job's name when it is a plain file name, else its bytes in hex, so
/// that no name can point outside `dir`.
fn file_stem(job: &str) -> String {
    let plain = !job.is_empty()
        && !job.starts_with('.')
        && job
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if plain {
        job.to_owned()
    } else {
        format!("x-{}", crate::repository::hex(job.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = JobLock::acquire(dir.path(), "nightly").unwrap();
        let e = JobLock::acquire(dir.path(), "nightly")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("job 'nightly' is already running")
                && e.contains(&format!("process {}", std::process::id())),
            "{e}"
        );
        // Another job is not held up.
        let other = JobLock::acquire(dir.path(), "weekly").unwrap();
        drop(first);
        JobLock::acquire(dir.path(), "nightly").unwrap();
        drop(other);
    }

    #[test]
    fn names_stay_inside_the_lock_folder() {
        assert_eq!(file_stem("nightly-db_01.v2"), "nightly-db_01.v2");
        for hostile in ["../x", "a/b", "", ".hidden", "ünï"] {
            let stem = file_stem(hostile);
            assert!(
                stem.starts_with("x-") && stem[2..].chars().all(|c| c.is_ascii_hexdigit()),
                "{hostile:?} -> {stem}"
            );
        }
    }
}
