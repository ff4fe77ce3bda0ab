//! The agent side: accepts connections from enrolled peers and serves the
//! agent's roles. Repository role: a target mover per connection (one task
//! each, isolated from the others), requests answered concurrently, and a
//! connection that ends without a commit aborts its mover, so nothing it
//! stored becomes visible. Proxy role: a task stream per assigned task
//! (`quic::proxy`).

use super::wire::{self, AgentStatus, LatestReply, OpenTask};
use crate::link::TargetMover;
use crate::messages::{ChunkQuery, CommitPoint, Manifest, RegisterCodec, StoreChunks};
use prost::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What an agent serves: target movers and the newest restore points.
pub trait TargetService: Send + Sync + 'static {
    fn open(&self, task: &OpenTask) -> Result<Box<dyn TargetMover>, String>;
    fn latest(&self, task: &OpenTask) -> Result<Option<Manifest>, String>;
    /// Names what is served, for `arca agent status`.
    fn describe(&self) -> String;
}

/// Counters for `arca agent status`.
#[derive(Default)]
struct Counters {
    running: AtomicU64,
    committed: AtomicU64,
    aborted: AtomicU64,
}

/// The roles an agent serves; a request for a role it lacks is refused.
#[derive(Clone)]
pub struct Roles {
    pub repository: Option<Arc<dyn TargetService>>,
    pub proxy: Option<Arc<dyn super::proxy::ProxyService>>,
}

impl Roles {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = &self.repository {
            parts.push(format!("repository {}", r.describe()));
        }
        if let Some(p) = &self.proxy {
            parts.push(format!("proxy {}", p.name()));
        }
        parts.join("; ")
    }
}

struct Shared {
    roles: Roles,
    counters: Counters,
    started: Instant,
}

type Mover = Arc<Mutex<Option<Arc<dyn TargetMover>>>>;

/// Serves until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, roles: Roles) {
    let shared = Arc::new(Shared {
        roles,
        counters: Counters::default(),
        started: Instant::now(),
    });
    while let Some(incoming) = endpoint.accept().await {
        let service = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => connection(conn, service).await,
                // Unenrolled certificates, garbage and scans end here.
                Err(e) => tracing::warn!("refused connection from {remote}: {e}"),
            }
        });
    }
}

async fn connection(conn: quinn::Connection, service: Arc<Shared>) {
    let peer = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().map(|c| super::fingerprint(c)))
        .unwrap_or_default();
    // Logs name a peer by address and certificate.
    let peer = format!("{} ({peer})", conn.remote_address());
    let mover: Mover = Arc::new(Mutex::new(None));
    let task: Arc<Mutex<Option<OpenTask>>> = Arc::new(Mutex::new(None));
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => break,
        };
        let (service, mover, task, peer) =
            (service.clone(), mover.clone(), task.clone(), peer.clone());
        tokio::spawn(async move {
            request(send, recv, service, mover, task, &peer).await;
        });
    }
    // Gone without a commit: whatever the mover staged is dropped.
    let left = mover.lock().expect("mover lock").take();
    if let Some(m) = left {
        service.counters.running.fetch_sub(1, Ordering::Relaxed);
        service.counters.aborted.fetch_add(1, Ordering::Relaxed);
        let t = task.lock().expect("task lock").clone().unwrap_or_default();
        tracing::warn!(
            "session {} task {}/{}: connection from {peer} ended before its commit; aborting",
            t.session_id,
            t.vm,
            t.disk
        );
        tokio::task::spawn_blocking(move || m.abort());
    }
}

async fn request(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    service: Arc<Shared>,
    mover: Mover,
    task: Arc<Mutex<Option<OpenTask>>>,
    peer: &str,
) {
    let mut kind = [0u8; 1];
    if recv.read_exact(&mut kind).await.is_err() {
        return;
    }
    let kind = kind[0];
    if kind == wire::ASSIGN {
        return super::proxy::serve_task(send, recv, service.roles.proxy.clone(), peer.to_owned())
            .await;
    }
    let Ok(payload) = recv.read_to_end(wire::max_request(kind)).await else {
        return;
    };
    let answer = {
        let current = mover.lock().expect("mover lock").clone();
        let t = task.clone();
        let (service, mover2) = (service.clone(), mover.clone());
        let peer = peer.to_owned();
        tokio::task::spawn_blocking(move || {
            dispatch(kind, &payload, service, current, mover2, t, &peer)
        })
        .await
        .unwrap_or_else(|e| Err(format!("request handler failed: {e}")))
    };
    let limit = wire::max_answer(kind);
    let answer = answer.and_then(|bytes| match bytes.len() {
        // The peer would drop it unread.
        n if n > limit => Err(format!(
            "the answer of {n} bytes is over the {limit} bytes the protocol allows; a larger block_size shortens a disk's block list"
        )),
        _ => Ok(bytes),
    });
    // Status and body are written one after the other: an answer to
    // LATEST may be 1 GiB, not to be copied behind a status byte.
    let (status, body) = match answer {
        Ok(bytes) => (wire::OK, bytes),
        Err(e) => {
            let t = task.lock().expect("task lock").clone().unwrap_or_default();
            tracing::warn!(
                "session {} task {}/{} from {peer}: {e}",
                t.session_id,
                t.vm,
                t.disk
            );
            (wire::FAILED, e.into_bytes())
        }
    };
    if send.write_all(&[status]).await.is_ok() {
        let _ = send.write_all(&body).await;
    }
    let _ = send.finish();
}

fn dispatch(
    kind: u8,
    payload: &[u8],
    shared: Arc<Shared>,
    current: Option<Arc<dyn TargetMover>>,
    mover: Mover,
    task: Arc<Mutex<Option<OpenTask>>>,
    peer: &str,
) -> Result<Vec<u8>, String> {
    let bad = |e: prost::DecodeError| format!("malformed request: {e}");
    let repository = || {
        shared
            .roles
            .repository
            .clone()
            .ok_or_else(|| "this agent has no repository role".to_owned())
    };
    let need = || {
        current
            .clone()
            .ok_or_else(|| "no task opened on this connection".to_owned())
    };
    match kind {
        wire::OPEN => {
            let t = OpenTask::decode(payload).map_err(bad)?;
            let m = repository()?.open(&t)?;
            if mover.lock().expect("mover lock").is_none() {
                shared.counters.running.fetch_add(1, Ordering::Relaxed);
            }
            tracing::info!(
                "session {} task {}/{}: target mover started for {peer}",
                t.session_id,
                t.vm,
                t.disk
            );
            *mover.lock().expect("mover lock") = Some(Arc::from(m));
            *task.lock().expect("task lock") = Some(t);
            Ok(Vec::new())
        }
        wire::LATEST => {
            let t = OpenTask::decode(payload).map_err(bad)?;
            let manifest = repository()?.latest(&t)?;
            Ok(LatestReply { manifest }.encode_to_vec())
        }
        wire::QUERY => {
            let q = ChunkQuery::decode(payload).map_err(bad)?;
            need()?
                .query(q)
                .map(|r| r.encode_to_vec())
                .map_err(|e| e.to_string())
        }
        wire::STORE => {
            let s = StoreChunks::decode(payload).map_err(bad)?;
            need()?
                .store(s)
                .map(|()| Vec::new())
                .map_err(|e| e.to_string())
        }
        wire::CODEC => {
            let c = RegisterCodec::decode(payload).map_err(bad)?;
            need()?
                .register_codec(c)
                .map(|()| Vec::new())
                .map_err(|e| e.to_string())
        }
        wire::COMMIT => {
            let c = CommitPoint::decode(payload).map_err(bad)?;
            let reply = need()?.commit(c).map_err(|e| e.to_string())?;
            // Committed: nothing to abort when the connection ends.
            if mover.lock().expect("mover lock").take().is_some() {
                shared.counters.running.fetch_sub(1, Ordering::Relaxed);
                shared.counters.committed.fetch_add(1, Ordering::Relaxed);
            }
            let t = task.lock().expect("task lock").clone().unwrap_or_default();
            tracing::info!(
                "session {} task {}/{}: restore point {} committed",
                t.session_id,
                t.vm,
                t.disk,
                reply.point_id
            );
            Ok(reply.encode_to_vec())
        }
        wire::STATUS => Ok(AgentStatus {
            repository: shared.roles.describe(),
            uptime_seconds: shared.started.elapsed().as_secs(),
            tasks_running: shared.counters.running.load(Ordering::Relaxed),
            tasks_committed: shared.counters.committed.load(Ordering::Relaxed),
            tasks_aborted: shared.counters.aborted.load(Ordering::Relaxed),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
        .encode_to_vec()),
        other => Err(format!("unknown request kind {other}")),
    }
}
