//! The data-mover protocol over QUIC (seed step 5): mutual TLS with pinned
//! certificates, one bidirectional stream per request so that many requests
//! are in flight at once, and the same prost messages as the in-process
//! link. The commit is the only barrier: the client waits for every store to
//! be acknowledged before it asks for the commit.

mod client;
mod identity;
mod proxy;
mod server;
mod tls;
mod wire;

pub use client::QuicLink;
pub use identity::{Identity, fingerprint};
pub use proxy::{ProxyService, RemoteControl, TaskControl, run_remote_task};
pub use server::{Roles, TargetService, serve};
pub use tls::{client_config, server_config};
pub use wire::{AgentStatus, OpenTask};

/// Application protocol name; a peer that speaks anything else is refused.
pub const ALPN: &[u8] = b"arca-mover/1";

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("identity in {path}: {message}")]
    Identity { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("QUIC endpoint on {addr}: {message}")]
    Endpoint { addr: String, message: String },
}
