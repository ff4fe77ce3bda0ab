//! Where a task's restore point goes: a repository in this process (the
//! embedded default, joined by the in-process link), or one served by an
//! `arca agent` over QUIC with pinned certificates.

use super::throttle::{Share, Throttles};
use crate::config::RepositorySettings;
use crate::repository::{Repository, RepositoryError};
use arca_transport::quic::{Identity, OpenTask, QuicLink};
use arca_transport::throttle::ThrottledLink;
use arca_transport::{InProcessLink, Manifest, TargetLink};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// Why a task could not run; `retryable` when the link to the target mover
/// was lost (an agent died, a connection dropped), so a new attempt may work.
#[derive(Debug)]
pub struct TaskFailure {
    pub message: String,
    pub retryable: bool,
}

impl TaskFailure {
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }

    /// Runs one attempt of a task. A panic in it (a bug) becomes this
    /// task's failure instead of a thread that never reports, for which the
    /// session would wait forever, holding the job lock and the snapshots.
    pub fn guard(attempt: impl FnOnce() -> Result<(), Self>) -> Result<(), Self> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(attempt)).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(Self::fatal(format!(
                "internal error, a bug in arca ({what}); the other tasks went on. Please report it"
            )))
        })
    }

    pub fn from_link(e: arca_transport::LinkError) -> Self {
        Self {
            retryable: matches!(e, arca_transport::LinkError::Lost(_)),
            message: e.to_string(),
        }
    }
}

/// This installation's identity and the runtime that drives its QUIC
/// connections: one per session, shared by every link to every agent.
pub struct Network {
    pub identity: Identity,
    pub rt: tokio::runtime::Runtime,
}

impl Network {
    pub fn new(identity_dir: &Path) -> Result<Self, String> {
        let identity = Identity::load_or_create(identity_dir).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("arca-quic")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the network runtime: {e}"))?;
        Ok(Self { identity, rt })
    }
}

/// A task's way to its repository.
pub struct OpenedTask<'a> {
    pub link: Box<dyn TargetLink>,
    /// The disk's newest restore point: the parent of an incremental.
    pub previous: Option<Manifest>,
    /// The task's part of the throttling rules (names for the report).
    pub share: Option<Share<'a>>,
}

pub enum RepoAccess {
    Local(Repository),
    Remote {
        addr: SocketAddr,
        fingerprint: String,
        net: Arc<Network>,
    },
}

impl RepoAccess {
    /// `net` is made on first need: a session without agents never starts
    /// a network runtime.
    pub fn open(
        settings: &RepositorySettings,
        net: &mut dyn FnMut() -> Result<Arc<Network>, String>,
    ) -> Result<Self, String> {
        match (&settings.agent, &settings.fingerprint) {
            (Some(agent), Some(fingerprint)) => {
                let addr = agent.parse().map_err(|_| {
                    format!(
                        "repository '{}': agent '{agent}' is not an address",
                        settings.name
                    )
                })?;
                Ok(RepoAccess::Remote {
                    addr,
                    fingerprint: fingerprint.clone(),
                    net: net()?,
                })
            }
            _ => Repository::open_or_create(&settings.path)
                .map(RepoAccess::Local)
                .map_err(|e: RepositoryError| e.to_string()),
        }
    }

    /// Removes what interrupted sessions left (an agent does this itself).
    pub fn sweep(&self) -> Result<usize, String> {
        match self {
            RepoAccess::Local(r) => r.sweep_staging().map_err(|e| e.to_string()),
            RepoAccess::Remote { .. } => Ok(0),
        }
    }

    /// The newest restore point of a disk without its block list, for its
    /// header fields (an older agent sends the whole point).
    pub fn latest_header(&self, task: &OpenTask) -> Result<Option<Manifest>, String> {
        match self {
            RepoAccess::Local(r) => r
                .latest_header(&task.job, &task.vm, &task.disk)
                .map_err(|e| e.to_string()),
            // A query-only connection: no target mover is opened for it.
            RepoAccess::Remote {
                addr,
                fingerprint,
                net,
            } => QuicLink::connect_only(net.rt.handle(), *addr, fingerprint, &net.identity)
                .and_then(|link| {
                    link.latest(&OpenTask {
                        header_only: true,
                        ..task.clone()
                    })
                })
                .map_err(|e| e.to_string()),
        }
    }

    /// A link to a new target mover for `task`, and the disk's newest restore
    /// point (the parent of an incremental).
    pub fn open_task<'t>(
        &self,
        task: &OpenTask,
        throttles: &'t Throttles,
    ) -> Result<OpenedTask<'t>, TaskFailure> {
        match self {
            RepoAccess::Local(r) => {
                // The writer first: it holds the repository lock, so the
                // parent chosen next keeps its chunks until the commit.
                let writer = r.writer().map_err(|e| TaskFailure::fatal(e.to_string()))?;
                let latest = r
                    .latest_point(&task.job, &task.vm, &task.disk)
                    .map_err(|e| TaskFailure::fatal(e.to_string()))?;
                Ok(OpenedTask {
                    link: Box::new(InProcessLink::new(writer)),
                    previous: latest,
                    share: None,
                })
            }
            RepoAccess::Remote {
                addr,
                fingerprint,
                net,
            } => {
                let link =
                    QuicLink::connect(net.rt.handle(), *addr, fingerprint, &net.identity, task)
                        .map_err(TaskFailure::from_link)?;
                let latest = link.latest(task).map_err(TaskFailure::from_link)?;
                let share = throttles.local(*addr);
                let link: Box<dyn TargetLink> = if share.buckets.is_empty() {
                    Box::new(link)
                } else {
                    Box::new(ThrottledLink::new(Box::new(link), share.buckets.clone()))
                };
                Ok(OpenedTask {
                    link,
                    previous: latest,
                    share: Some(share),
                })
            }
        }
    }

    /// The repository agent's address and fingerprint, for a proxy agent.
    pub fn agent(&self) -> Option<(SocketAddr, &str)> {
        match self {
            RepoAccess::Local(_) => None,
            RepoAccess::Remote {
                addr, fingerprint, ..
            } => Some((*addr, fingerprint.as_str())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_attempt_is_a_failure_not_a_lost_thread() {
        let ok = TaskFailure::guard(|| Ok(()));
        assert!(ok.is_ok());
        let failed = TaskFailure::guard(|| Err(TaskFailure::fatal("plain")));
        assert_eq!(failed.unwrap_err().message, "plain");
        let n: u64 = std::hint::black_box(u64::MAX);
        let e = TaskFailure::guard(|| {
            let _ = n.checked_add(1).expect("an overflow, say");
            Ok(())
        })
        .unwrap_err();
        assert!(!e.retryable);
        assert!(
            e.message.contains("internal error") && e.message.contains("an overflow, say"),
            "{}",
            e.message
        );
        let e = TaskFailure::guard(|| panic!("formatted {}", 7)).unwrap_err();
        assert!(e.message.contains("formatted 7"), "{}", e.message);
    }
}
