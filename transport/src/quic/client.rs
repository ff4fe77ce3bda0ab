//! The source side: a `TargetLink` over one QUIC connection per task.
//!
//! Stores are pipelined: each is sent on its own stream and acknowledged in
//! the background, up to `IN_FLIGHT` at once; `commit` first waits for every
//! acknowledgement. No request waits for the one before it.

use super::identity::Identity;
use super::tls::client_config;
use super::wire::{self, AgentStatus, LatestReply, OpenTask};
use crate::link::{LinkError, LinkStats, TargetLink};
use crate::messages::{
    ChunkQuery, ChunkQueryReply, CommitPoint, CommitReply, Manifest, RegisterCodec, StoreChunks,
};
use prost::Message;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Stores in flight per task.
const IN_FLIGHT: usize = 32;
/// Longest wait for an agent to answer a new connection.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct QuicLink {
    rt: Handle,
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    pending: Mutex<Vec<JoinHandle<Result<(), LinkError>>>>,
    window: Arc<Semaphore>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
}

fn lost(e: impl std::fmt::Display) -> LinkError {
    LinkError::Lost(e.to_string())
}

/// Whether a connection error is a certificate refused by either side (a
/// pin that does not match, a peer not enrolled): a decision, which a retry
/// does not change, not a lost link.
fn is_refusal(text: &str) -> bool {
    [
        "cryptographic handshake failed",
        "certificate",
        "not enrolled",
    ]
    .iter()
    .any(|s| text.contains(s))
}

/// Says why a connection ended: with TLS 1.3 a client learns that the agent
/// refused its certificate only when the connection closes.
pub(super) fn closed(conn: &quinn::Connection, e: impl std::fmt::Display) -> LinkError {
    match conn.close_reason() {
        Some(reason) => {
            let text = reason.to_string();
            if is_refusal(&text) {
                // A refusal is a decision, not a lost link: retrying changes nothing.
                LinkError::Target(format!(
                    "the agent refused this server ({text}); enrol it there: `arca identity` here, `arca agent --trust` there"
                ))
            } else {
                LinkError::Lost(text)
            }
        }
        None => lost(e),
    }
}

async fn request(conn: quinn::Connection, framed: Vec<u8>) -> Result<bytes::Bytes, LinkError> {
    let kind = framed.first().copied().unwrap_or_default();
    let limit = wire::max_request(kind);
    // The agent would drop it unread: say why instead, for good (a retry
    // sends the same).
    if framed.len() > limit {
        let hint = if kind == wire::COMMIT {
            "; the disk's block list is too long (a larger block_size shortens it)"
        } else {
            ""
        };
        return Err(LinkError::Target(format!(
            "a request of {} bytes is over the {limit} bytes the protocol allows{hint}",
            framed.len()
        )));
    }
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| closed(&conn, e))?;
    send.write_all(&framed)
        .await
        .map_err(|e| closed(&conn, e))?;
    send.finish().map_err(|e| closed(&conn, e))?;
    let answer = recv
        .read_to_end(1 + wire::max_answer(kind))
        .await
        .map_err(|e| closed(&conn, e))?;
    match answer.split_first() {
        // The body without a copy: an answer to LATEST may be 1 GiB.
        Some((&wire::OK, _)) => Ok(bytes::Bytes::from(answer).slice(1..)),
        Some((_, msg)) => Err(LinkError::Target(String::from_utf8_lossy(msg).into_owned())),
        None => Err(LinkError::Lost("empty answer".into())),
    }
}

impl QuicLink {
    /// Connects to the agent at `addr`, accepting only `agent_fingerprint`,
    /// and opens a target mover for `task`.
    pub fn connect(
        rt: &Handle,
        addr: SocketAddr,
        agent_fingerprint: &str,
        identity: &Identity,
        task: &OpenTask,
    ) -> Result<Self, LinkError> {
        let link = Self::connect_only(rt, addr, agent_fingerprint, identity)?;
        link.call(wire::OPEN, task)?;
        Ok(link)
    }

    /// Asks an agent how it is doing (`arca agent status`).
    pub fn status(
        rt: &Handle,
        addr: SocketAddr,
        agent_fingerprint: &str,
        identity: &Identity,
    ) -> Result<AgentStatus, LinkError> {
        let link = Self::connect_only(rt, addr, agent_fingerprint, identity)?;
        let body = link.call(wire::STATUS, &OpenTask::default())?;
        AgentStatus::decode(body.as_ref()).map_err(|e| LinkError::Lost(e.to_string()))
    }

    /// Connects without opening a target mover: for `latest`, `status` and
    /// task streams to a proxy.
    pub fn connect_only(
        rt: &Handle,
        addr: SocketAddr,
        agent_fingerprint: &str,
        identity: &Identity,
    ) -> Result<Self, LinkError> {
        let config = client_config(identity, agent_fingerprint)
            .map_err(|e| LinkError::Lost(e.to_string()))?;
        let (endpoint, conn) = rt.block_on(async {
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .expect("valid");
            let mut endpoint = super::endpoint(bind, None).map_err(lost)?;
            endpoint.set_default_client_config(config);
            // A dead agent sends nothing back; do not wait out the idle timeout.
            let connecting = endpoint.connect(addr, "arca").map_err(lost)?;
            let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                .await
                .map_err(|_| {
                    LinkError::Lost(format!(
                        "cannot reach agent {addr}: no answer within {CONNECT_TIMEOUT:?}"
                    ))
                })?
                .map_err(|e| {
                    let text = e.to_string();
                    // While connecting, the agent's certificate is the one
                    // judged: another than the pinned one.
                    if is_refusal(&text) {
                        LinkError::Target(format!(
                            "agent {addr} is not the one this configuration pins ({text}); check its fingerprint (`arca identity` on the agent's host)"
                        ))
                    } else {
                        LinkError::Lost(format!("cannot reach agent {addr}: {text}"))
                    }
                })?;
            Ok::<_, LinkError>((endpoint, conn))
        })?;
        let link = Self {
            rt: rt.clone(),
            _endpoint: endpoint,
            conn,
            pending: Mutex::new(Vec::new()),
            window: Arc::new(Semaphore::new(IN_FLIGHT)),
            sent: Arc::new(AtomicU64::new(0)),
            received: Arc::new(AtomicU64::new(0)),
        };
        Ok(link)
    }

    pub(super) fn connection(&self) -> quinn::Connection {
        self.conn.clone()
    }

    fn call(&self, kind: u8, body: &impl Message) -> Result<bytes::Bytes, LinkError> {
        let framed = wire::frame(kind, body);
        self.sent.fetch_add(framed.len() as u64, Ordering::Relaxed);
        let answer = self.rt.block_on(request(self.conn.clone(), framed))?;
        self.received
            .fetch_add(answer.len() as u64 + 1, Ordering::Relaxed);
        Ok(answer)
    }

    /// The newest restore point of a disk on this agent's repository.
    pub fn latest(&self, task: &OpenTask) -> Result<Option<Manifest>, LinkError> {
        let body = self.call(wire::LATEST, task)?;
        Ok(LatestReply::decode(body.as_ref())
            .map_err(|e| LinkError::Lost(e.to_string()))?
            .manifest)
    }
}

impl TargetLink for QuicLink {
    fn query(&self, query: ChunkQuery) -> Result<ChunkQueryReply, LinkError> {
        let body = self.call(wire::QUERY, &query)?;
        ChunkQueryReply::decode(body.as_ref()).map_err(|e| LinkError::Lost(e.to_string()))
    }

    fn store(&self, chunks: StoreChunks) -> Result<(), LinkError> {
        let framed = wire::frame(wire::STORE, &chunks);
        self.sent.fetch_add(framed.len() as u64, Ordering::Relaxed);
        let permit = self
            .rt
            .block_on(self.window.clone().acquire_owned())
            .map_err(lost)?;
        let conn = self.conn.clone();
        let received = self.received.clone();
        let handle = self.rt.spawn(async move {
            let r = request(conn, framed).await;
            received.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            r.map(|_| ())
        });
        let mut pending = self.pending.lock().expect("pending lock");
        // Reap finished stores so a failure surfaces early.
        let mut still = Vec::with_capacity(pending.len() + 1);
        for h in pending.drain(..) {
            if h.is_finished() {
                self.rt.block_on(h).map_err(lost)??;
            } else {
                still.push(h);
            }
        }
        still.push(handle);
        *pending = still;
        Ok(())
    }

    fn register_codec(&self, codec: RegisterCodec) -> Result<(), LinkError> {
        self.call(wire::CODEC, &codec).map(|_| ())
    }

    fn commit(&self, commit: CommitPoint) -> Result<CommitReply, LinkError> {
        let pending: Vec<_> = self
            .pending
            .lock()
            .expect("pending lock")
            .drain(..)
            .collect();
        for h in pending {
            self.rt.block_on(h).map_err(lost)??;
        }
        let body = self.call(wire::COMMIT, &commit)?;
        CommitReply::decode(body.as_ref()).map_err(|e| LinkError::Lost(e.to_string()))
    }

    fn abort(&self) {
        // The agent aborts a mover whose connection ends without a commit.
        self.conn.close(0u32.into(), b"aborted");
    }

    fn stats(&self) -> LinkStats {
        LinkStats {
            sent_bytes: self.sent.load(Ordering::Relaxed),
            received_bytes: self.received.load(Ordering::Relaxed),
        }
    }
}

impl Drop for QuicLink {
    fn drop(&mut self) {
        // For tuning long links: `ARCA_LOG=arca_transport=debug`. The stats
        // are gathered only when someone reads them.
        if tracing::enabled!(tracing::Level::DEBUG) {
            let st = self.conn.stats();
            tracing::debug!(
                "QUIC link to {}: rtt {:?}, cwnd {} bytes, {} congestion events, {} of {} packets lost",
                self.conn.remote_address(),
                st.path.rtt,
                st.path.cwnd,
                st.path.congestion_events,
                st.path.lost_packets,
                st.path.sent_packets
            );
        }
        self.conn.close(0u32.into(), b"done");
    }
}
