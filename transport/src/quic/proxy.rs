//! The control channel over QUIC: one bidirectional stream per task, opened
//! by the session with an `ASSIGN` kind byte, then control frames both ways
//! until the proxy's result. The meaning of each frame is decided by the
//! sans-IO state machines in `crate::control`; this module only moves bytes,
//! runs the proxy's source mover on a blocking thread, and turns a vanished
//! session into a cancel.

use super::client::QuicLink;
use super::identity::Identity;
use super::wire;
use crate::control::{
    AssignTask, ControlError, FrameDecoder, FromProxy, ProxyAction, ProxyTask, SessionEvent,
    SessionTask, TaskResult, ToProxy, encode_frame,
};
use crate::link::LinkError;
use crate::throttle::TokenBucket;
use prost::Message;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio::runtime::Handle;
use tokio::sync::watch;

/// What a proxy agent runs: the source mover of one task, to its end.
pub trait ProxyService: Send + Sync + 'static {
    /// Called on a blocking thread; must return when `control` says the
    /// task is cancelled (promptly, leaving nothing visible behind).
    fn run_task(&self, task: AssignTask, control: &TaskControl) -> TaskResult;
    /// The proxy's name for itself.
    fn name(&self) -> String;
}

/// The running task's view of its control stream.
pub struct TaskControl {
    cancelled: Arc<AtomicBool>,
    progress: watch::Sender<(u64, u64)>,
    bucket: Option<Arc<TokenBucket>>,
}

impl TaskControl {
    pub fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// The flag itself, for a `CancellableLink`.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancelled.clone()
    }

    /// Reports progress; reports that come faster than they can be sent are
    /// merged, so calling this often costs nothing.
    pub fn progress(&self, done_bytes: u64, disk_bytes: u64) {
        self.progress.send_replace((done_bytes, disk_bytes));
    }

    /// The bucket of this task's transfer rate, when a throttling rule
    /// applies; the session changes its rate while the task runs.
    pub fn bucket(&self) -> Option<Arc<TokenBucket>> {
        self.bucket.clone()
    }
}

async fn write(send: &mut quinn::SendStream, message: &FromProxy) -> bool {
    send.write_all(&encode_frame(message)).await.is_ok()
}

/// Serves one task stream on a proxy agent; the kind byte is already read.
pub(super) async fn serve_task(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    service: Option<Arc<dyn ProxyService>>,
    peer: String,
) {
    let mut decoder = FrameDecoder::default();
    let mut state = ProxyTask::new();
    let Some(service) = service else {
        let e = ControlError::Protocol("this agent has no proxy role".into());
        return refuse(&mut send, &mut state, &peer, e).await;
    };
    let mut buf = vec![0u8; 64 << 10];
    // Wait for the assignment.
    let assign = loop {
        match decoder.next_message::<ToProxy>() {
            Ok(Some(m)) => match state.handle(m) {
                Ok(ProxyAction::Start(a)) => break *a,
                Ok(_) => continue,
                Err(e) => return refuse(&mut send, &mut state, &peer, e).await,
            },
            Ok(None) => {}
            Err(e) => return refuse(&mut send, &mut state, &peer, e).await,
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.push(&buf[..n]),
            _ => return,
        }
    };
    let label = format!(
        "session {} task {}/{}",
        assign.session_id, assign.vm, assign.disk
    );
    tracing::info!("{label}: source mover started for {peer}");
    let cancelled = Arc::new(AtomicBool::new(false));
    let (progress_tx, mut progress_rx) = watch::channel((0u64, 0u64));
    let bucket = (assign.rate > 0).then(|| Arc::new(TokenBucket::new(assign.rate, Instant::now())));
    let control = TaskControl {
        cancelled: cancelled.clone(),
        progress: progress_tx,
        bucket: bucket.clone(),
    };
    if !write(&mut send, &state.started(&service.name())).await {
        return;
    }
    let worker = {
        let service = service.clone();
        tokio::task::spawn_blocking(move || service.run_task(assign, &control))
    };
    tokio::pin!(worker);
    // Frames that arrived with the assignment (a rate, a cancel) count too.
    let control_view = (bucket.clone(), cancelled.clone());
    let mut reading = apply_control(&mut decoder, &mut state, &control_view, &label);
    let result = loop {
        tokio::select! {
            done = &mut worker => {
                break done.unwrap_or_else(|e| TaskResult {
                    error: format!("source mover failed: {e}"),
                    ..Default::default()
                });
            }
            changed = progress_rx.changed() => {
                if changed.is_ok() {
                    let (done, total) = *progress_rx.borrow_and_update();
                    if let Some(m) = state.progress(done, total)
                        && !write(&mut send, &m).await
                    {
                        cancelled.store(true, Ordering::Relaxed);
                    }
                }
            }
            read = recv.read(&mut buf), if reading => match read {
                Ok(Some(n)) => {
                    decoder.push(&buf[..n]);
                    reading = apply_control(&mut decoder, &mut state, &control_view, &label);
                }
                Ok(None) => reading = false,
                // The session is gone: nobody wants the result.
                Err(_) => {
                    tracing::warn!("{label}: the session's connection ended; cancelling");
                    cancelled.store(true, Ordering::Relaxed);
                    reading = false;
                }
            },
        }
    };
    tracing::info!(
        "{label}: source mover ended: {}",
        if result.ok { "success" } else { &result.error }
    );
    let last = state.finish(result);
    if write(&mut send, &last).await {
        let _ = send.finish();
        // Keep the stream until the session has read the result.
        let _ = send.stopped().await;
    }
}

/// Applies every whole control frame the decoder holds to the running task;
/// false when the stream broke the protocol (the task is then cancelled and
/// the stream no longer read).
fn apply_control(
    decoder: &mut FrameDecoder,
    state: &mut ProxyTask,
    (bucket, cancelled): &(Option<Arc<TokenBucket>>, Arc<AtomicBool>),
    label: &str,
) -> bool {
    loop {
        let action = decoder
            .next_message::<ToProxy>()
            .and_then(|m| m.map(|m| state.handle(m)).transpose());
        match action {
            Ok(Some(ProxyAction::SetRate(r))) => {
                if let Some(b) = bucket {
                    b.set_rate(r);
                }
                tracing::info!("{label}: rate set to {r} bytes/s");
            }
            Ok(Some(ProxyAction::Cancel(reason))) => {
                tracing::warn!("{label}: cancelled by the session: {reason}");
                cancelled.store(true, Ordering::Relaxed);
            }
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(e) => {
                tracing::warn!("{label}: {e}; cancelling");
                cancelled.store(true, Ordering::Relaxed);
                return false;
            }
        }
    }
}

async fn refuse(send: &mut quinn::SendStream, state: &mut ProxyTask, peer: &str, e: ControlError) {
    tracing::warn!("task stream from {peer}: {e}");
    let last = state.finish(TaskResult {
        error: e.to_string(),
        ..Default::default()
    });
    if write(send, &last).await {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

/// What the session can change while a remote task runs.
pub struct RemoteControl {
    pub rate: watch::Receiver<u64>,
    pub cancel: watch::Receiver<Option<String>>,
}

/// Runs `task` on the proxy agent at `addr` and waits for its result.
/// `on_event` sees the proxy's start and progress. A lost connection is
/// `LinkError::Lost` (the task may be retried elsewhere); a proxy that
/// breaks the protocol is `LinkError::Target`.
pub fn run_remote_task(
    rt: &Handle,
    addr: SocketAddr,
    fingerprint: &str,
    identity: &Identity,
    task: AssignTask,
    mut control: RemoteControl,
    on_event: &mut dyn FnMut(SessionEvent),
) -> Result<TaskResult, LinkError> {
    let (mut state, assign) = SessionTask::assign(task);
    // The proxy's frame decoder would refuse it unread, and so every retry.
    let len = assign.encoded_len();
    if len > crate::control::MAX_FRAME {
        return Err(LinkError::Target(format!(
            "the task's assignment takes {len} bytes, over the control channel's {} (its stages' components and changed ranges)",
            crate::control::MAX_FRAME
        )));
    }
    let link = QuicLink::connect_only(rt, addr, fingerprint, identity)?;
    let conn = link.connection();
    rt.block_on(async {
        let lost = |e: &dyn std::fmt::Display| match super::client::closed(&conn, e) {
            LinkError::Lost(m) => LinkError::Lost(format!("control stream to proxy {addr}: {m}")),
            refused => refused,
        };
        let protocol = |e: ControlError| LinkError::Target(format!("proxy {addr}: {e}"));
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        let mut first = vec![wire::ASSIGN];
        first.extend(encode_frame(&assign));
        send.write_all(&first).await.map_err(|e| lost(&e))?;
        let mut decoder = FrameDecoder::default();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            while let Some(m) = decoder.next_message::<FromProxy>().map_err(protocol)? {
                match state.handle(m).map_err(protocol)? {
                    SessionEvent::Done(result) => {
                        let _ = send.finish();
                        return Ok(result);
                    }
                    event => on_event(event),
                }
            }
            tokio::select! {
                read = recv.read(&mut buf) => match read {
                    Ok(Some(n)) => decoder.push(&buf[..n]),
                    Ok(None) => return Err(lost(&"the proxy ended the stream without a result")),
                    Err(e) => return Err(lost(&e)),
                },
                Ok(()) = control.rate.changed() => {
                    let rate = *control.rate.borrow_and_update();
                    if let Some(m) = state.set_rate(rate) {
                        send.write_all(&encode_frame(&m)).await.map_err(|e| lost(&e))?;
                    }
                }
                Ok(()) = control.cancel.changed() => {
                    let reason = control.cancel.borrow_and_update().clone();
                    if let Some(m) = reason.and_then(|r| state.cancel(&r)) {
                        send.write_all(&encode_frame(&m)).await.map_err(|e| lost(&e))?;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Identity, fingerprint, serve, server_config};
    use super::*;
    use crate::control::DiskLocator;
    use std::time::Duration;

    /// A proxy whose "source mover" reports progress in steps and waits to
    /// be told its rate or to be cancelled.
    struct Stepper;

    impl ProxyService for Stepper {
        fn run_task(&self, task: AssignTask, control: &TaskControl) -> TaskResult {
            for i in 1..=4u64 {
                control.progress(i * 10, 40);
                std::thread::sleep(Duration::from_millis(20));
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if control.cancelled() {
                    return TaskResult {
                        error: "cancelled".into(),
                        ..Default::default()
                    };
                }
                if let Some(b) = control.bucket()
                    && b.rate() != task.rate
                {
                    return TaskResult {
                        ok: true,
                        point_id: format!("rate-{}", b.rate()),
                        ..Default::default()
                    };
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            TaskResult {
                error: "never told anything".into(),
                ..Default::default()
            }
        }

        fn name(&self) -> String {
            "stepper".into()
        }
    }

    fn identity(tag: &str) -> Identity {
        let dir = std::env::temp_dir().join(format!("arca-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let identity = Identity::load_or_create(&dir).unwrap();
        // Held in memory from here on; the folder would pile up in /tmp.
        std::fs::remove_dir_all(&dir).unwrap();
        identity
    }

    #[test]
    fn an_assignment_over_the_frame_bound_is_refused_before_any_connection() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Ten bytes per range number: 80 MiB.
        let task = AssignTask {
            dirty: vec![u64::MAX; crate::control::MAX_FRAME / 8 + 1],
            ..Default::default()
        };
        let (_rate_tx, rate) = watch::channel(1u64);
        let (_cancel_tx, cancel) = watch::channel(None);
        // Nobody listens there: the refusal comes before any connection.
        let e = run_remote_task(
            rt.handle(),
            "127.0.0.1:9".parse().unwrap(),
            "sha256:00",
            &identity("big"),
            task,
            RemoteControl { rate, cancel },
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(&e, LinkError::Target(m) if m.contains("over the control channel's")),
            "{e}"
        );
    }

    #[test]
    fn a_remote_task_reports_progress_takes_a_new_rate_and_can_be_cancelled() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (agent, session) = (identity("agent"), identity("session"));
        let config = server_config(&agent, vec![fingerprint(&session.cert)]).unwrap();
        let endpoint = rt
            .block_on(async { quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()) })
            .unwrap();
        let addr = endpoint.local_addr().unwrap();
        rt.spawn(serve(
            endpoint,
            super::super::Roles {
                repository: None,
                proxy: Some(Arc::new(Stepper)),
            },
        ));
        let task = AssignTask {
            vm: "vm".into(),
            disk: "d".into(),
            source: Some(DiskLocator {
                path: "/nowhere".into(),
                ..Default::default()
            }),
            block_size: 4096,
            repository_addr: "127.0.0.1:1".into(),
            rate: 1000,
            ..Default::default()
        };
        let agent_fp = fingerprint(&agent.cert);
        let run = |who: &Identity,
                   task: AssignTask,
                   rate: watch::Receiver<u64>,
                   cancel: watch::Receiver<Option<String>>,
                   on_event: &mut dyn FnMut(SessionEvent)| {
            run_remote_task(
                rt.handle(),
                addr,
                &agent_fp,
                who,
                task,
                RemoteControl { rate, cancel },
                on_event,
            )
        };

        // New rate: the proxy sees it and ends with it.
        let (rate_tx, rate) = watch::channel(1000u64);
        let (_cancel_tx, cancel) = watch::channel(None);
        let mut events = Vec::new();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            rate_tx.send(2500).unwrap();
            rate_tx
        });
        let result = run(&session, task.clone(), rate, cancel, &mut |e| {
            events.push(e)
        })
        .unwrap();
        drop(setter.join());
        assert_eq!(result.point_id, "rate-2500", "{result:?}");
        assert_eq!(events[0], SessionEvent::Started("stepper".into()));
        assert!(
            events.contains(&SessionEvent::Progress {
                done_bytes: 40,
                disk_bytes: 40
            }),
            "{events:?}"
        );

        // A rate changed before the task started travels with the
        // assignment, in the same datagram: it still reaches the task.
        let (rate_tx, rate) = watch::channel(1000u64);
        rate_tx.send(3000).unwrap();
        let (_cancel_tx, cancel) = watch::channel(None);
        let result = run(&session, task.clone(), rate, cancel, &mut |_| {}).unwrap();
        assert_eq!(result.point_id, "rate-3000", "{result:?}");

        // Cancel: the proxy stops and says so.
        let (_rate_tx, rate) = watch::channel(1000u64);
        let (cancel_tx, cancel) = watch::channel(None);
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            cancel_tx
                .send(Some("operator stopped the session".into()))
                .unwrap();
            cancel_tx
        });
        let result = run(&session, task, rate, cancel, &mut |_| {}).unwrap();
        drop(canceller.join());
        assert!(!result.ok);
        assert_eq!(result.error, "cancelled");

        // A session the proxy does not know is refused before any task.
        let stranger = identity("stranger");
        let (_r, rate) = watch::channel(0u64);
        let (_c, cancel) = watch::channel(None);
        let err = run(&stranger, AssignTask::default(), rate, cancel, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
    }
}
