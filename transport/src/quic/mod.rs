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

/// Socket buffers asked for every endpoint: a long fat link delivers
/// datagrams in bursts, and a default buffer (about 200 KiB) overflows in a
/// few milliseconds of a busy mover, which QUIC takes for congestion. The
/// kernel caps the request at `net.core.rmem_max` / `wmem_max`.
const SOCKET_BUFFER: usize = 8 << 20;

/// A QUIC endpoint on `addr` with large socket buffers; a server when
/// `server` is given. Must be called within a tokio runtime.
pub fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer than asked is still a working endpoint.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    let got = socket.recv_buffer_size().unwrap_or(0);
    if got < SOCKET_BUFFER {
        tracing::debug!(
            "UDP receive buffer is {got} bytes (asked {SOCKET_BUFFER}); raise net.core.rmem_max for long fast links"
        );
    }
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket.into(),
        runtime,
    )
}

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
