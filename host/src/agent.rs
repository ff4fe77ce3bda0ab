//! `arca agent`: the transport service of a repository host (seed step 3).
//! It serves one repository to enrolled peers over QUIC; every connection
//! gets its own target mover, so one failing task never touches another.

use crate::repository::Repository;
use arca_transport::quic::{Identity, OpenTask, TargetService, serve, server_config};
use arca_transport::{Manifest, TargetMover};
use std::net::SocketAddr;
use std::sync::Arc;

struct RepositoryService {
    repo: Repository,
}

impl TargetService for RepositoryService {
    fn open(&self, _task: &OpenTask) -> Result<Box<dyn TargetMover>, String> {
        Ok(Box::new(self.repo.writer().map_err(|e| e.to_string())?))
    }

    fn describe(&self) -> String {
        self.repo.root().display().to_string()
    }

    fn latest(&self, task: &OpenTask) -> Result<Option<Manifest>, String> {
        self.repo
            .latest_point(&task.job, &task.vm, &task.disk)
            .map_err(|e| e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Quic(#[from] arca_transport::quic::QuicError),
    #[error(transparent)]
    Repository(#[from] crate::repository::RepositoryError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the agent until interrupted. `on_ready` gets the bound address.
pub fn run(
    identity: &Identity,
    trusted: Vec<String>,
    repository: Repository,
    listen: SocketAddr,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), AgentError> {
    let swept = repository.sweep_staging()?;
    if swept > 0 {
        tracing::warn!("removed {swept} unfinished restore point(s) left by interrupted tasks");
    }
    let config = server_config(identity, trusted)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| AgentError::Listen {
            addr: listen,
            source,
        })?;
    rt.block_on(async {
        let endpoint =
            quinn::Endpoint::server(config, listen).map_err(|source| AgentError::Listen {
                addr: listen,
                source,
            })?;
        let bound = endpoint.local_addr().map_err(|source| AgentError::Listen {
            addr: listen,
            source,
        })?;
        on_ready(bound);
        let service = Arc::new(RepositoryService { repo: repository });
        tokio::select! {
            _ = serve(endpoint.clone(), service) => {}
            _ = tokio::signal::ctrl_c() => endpoint.close(0u32.into(), b"agent stopping"),
        }
        Ok(())
    })
}
