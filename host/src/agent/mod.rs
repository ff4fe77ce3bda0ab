//! `arca agent`: the transport service of a proxy or repository host (seed
//! step 3). One long-running process per host serves its roles to enrolled
//! peers over QUIC:
//! - repository role: a target mover per connection (`repository.rs`);
//! - proxy role: a source mover per task assigned by a session (`proxy.rs`).
//!
//! Movers of different tasks share nothing but the process: one failing
//! mover never touches another.

mod proxy;
mod repository;

pub use proxy::ProxyRole;

use crate::repository::Repository;
use arca_transport::quic::{Identity, Roles, serve, server_config};
use std::net::SocketAddr;
use std::sync::Arc;

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

/// What one agent process serves.
pub struct AgentRoles {
    pub repository: Option<Repository>,
    /// Name of the proxy role and where it caches compiled plugins.
    pub proxy: Option<(String, Option<std::path::PathBuf>)>,
}

/// Runs the agent until interrupted. `on_ready` gets the bound address.
pub fn run(
    identity: Identity,
    trusted: Vec<String>,
    roles: AgentRoles,
    listen: SocketAddr,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), AgentError> {
    if let Some(repo) = &roles.repository {
        let swept = repo.sweep_staging()?;
        if swept > 0 {
            tracing::warn!("removed {swept} unfinished restore point(s) left by interrupted tasks");
        }
    }
    let config = server_config(&identity, trusted)?;
    let listen_err = |source| AgentError::Listen {
        addr: listen,
        source,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(listen_err)?;
    let proxy = match roles.proxy {
        Some((name, cache)) => Some(Arc::new(
            ProxyRole::new(name, identity, cache, rt.handle().clone())
                .map_err(|e| listen_err(std::io::Error::other(e)))?,
        ) as Arc<dyn arca_transport::quic::ProxyService>),
        None => None,
    };
    let served = Roles {
        repository: roles.repository.map(|repo| {
            Arc::new(repository::RepositoryService::new(repo))
                as Arc<dyn arca_transport::quic::TargetService>
        }),
        proxy,
    };
    rt.block_on(async {
        let endpoint = arca_transport::quic::endpoint(listen, Some(config)).map_err(listen_err)?;
        let bound = endpoint.local_addr().map_err(listen_err)?;
        on_ready(bound);
        tokio::select! {
            _ = serve(endpoint.clone(), served) => {}
            _ = tokio::signal::ctrl_c() => endpoint.close(0u32.into(), b"agent stopping"),
        }
        Ok(())
    })
}
