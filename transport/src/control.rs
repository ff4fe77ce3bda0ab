//! The control channel between a session (the backup server) and a proxy
//! agent (seed steps 2–5): the session assigns a task, may change its
//! transfer rate or cancel it; the proxy says it started, reports progress,
//! and ends with the task's result.
//!
//! Everything here is sans-IO, as quinn-proto is: messages, a frame decoder
//! that accepts bytes in any split, and one state machine per side that says
//! what a message means and refuses what the protocol does not allow. The
//! QUIC driver (`quic::proxy`) only moves bytes; the tests drive both sides
//! in memory.

use prost::Message;

/// Largest control frame: an assignment carries the pipeline's plugin
/// components.
pub const MAX_FRAME: usize = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("control frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("malformed control message: {0}")]
    Malformed(String),
    #[error("control protocol violated: {0}")]
    Protocol(String),
}

/// Where a proxy reads a snapshot disk.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DiskLocator {
    /// A file (a snapshot clone, or a QEMU FUSE export) the proxy can open.
    #[prost(string, tag = "1")]
    pub path: String,
    /// Or an NBD export: the server's Unix socket, the export name and the
    /// metadata contexts to negotiate.
    #[prost(string, tag = "2")]
    pub nbd_socket: String,
    #[prost(string, tag = "3")]
    pub nbd_export: String,
    #[prost(string, repeated, tag = "4")]
    pub nbd_contexts: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Setting {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// One stage of the pipeline, with its component, so that a proxy runs
/// exactly what the session was configured with.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StageSpec {
    /// `exclusion`, `change-detection`, `codec`.
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(bytes = "vec", tag = "3")]
    pub component: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    pub settings: Vec<Setting>,
    #[prost(uint64, tag = "5")]
    pub memory_bytes: u64,
    #[prost(uint64, tag = "6")]
    pub deadline_ms: u64,
}

/// Session → proxy: run the source mover of one task.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AssignTask {
    #[prost(string, tag = "1")]
    pub job: String,
    #[prost(string, tag = "2")]
    pub vm: String,
    #[prost(string, tag = "3")]
    pub disk: String,
    #[prost(uint64, tag = "4")]
    pub session_id: u64,
    #[prost(message, optional, tag = "5")]
    pub source: Option<DiskLocator>,
    #[prost(uint32, tag = "6")]
    pub block_size: u32,
    #[prost(string, tag = "7")]
    pub pipeline: String,
    #[prost(message, repeated, tag = "8")]
    pub stages: Vec<StageSpec>,
    #[prost(string, tag = "9")]
    pub consistency: String,
    /// Changed block tracking: whether `dirty` is meaningful, and the
    /// changed ranges as (offset, length) pairs.
    #[prost(bool, tag = "10")]
    pub has_dirty: bool,
    #[prost(uint64, repeated, tag = "11")]
    pub dirty: Vec<u64>,
    #[prost(string, tag = "12")]
    pub cbt_bitmap: String,
    /// The repository agent the target mover runs on.
    #[prost(string, tag = "13")]
    pub repository_addr: String,
    #[prost(string, tag = "14")]
    pub repository_fingerprint: String,
    /// Bytes per second this task may send; 0 when no rule applies.
    #[prost(uint64, tag = "15")]
    pub rate: u64,
    #[prost(uint32, tag = "16")]
    pub workers: u32,
    /// The restore point `dirty` counts changes since; the task uses
    /// `dirty` only if that point is its parent.
    #[prost(string, tag = "17")]
    pub dirty_since: String,
    /// The job's retention policy, for the commit (`CommitPoint`).
    #[prost(message, optional, tag = "18")]
    pub retention: Option<crate::messages::RetentionPolicy>,
    /// The task's token (`Manifest::task_token`), the same in each attempt.
    #[prost(bytes = "vec", tag = "19")]
    pub task_token: Vec<u8>,
}

/// Proxy → session: how the task ended.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskResult {
    #[prost(bool, tag = "1")]
    pub ok: bool,
    #[prost(string, tag = "2")]
    pub point_id: String,
    #[prost(string, tag = "3")]
    pub parent_point: String,
    /// The source mover's statistics as JSON (the host's `TaskStats`,
    /// which include the busy time of every stage).
    #[prost(string, tag = "4")]
    pub stats_json: String,
    #[prost(string, repeated, tag = "5")]
    pub notices: Vec<String>,
    #[prost(string, tag = "6")]
    pub error: String,
    /// The failure was a lost link: another attempt may succeed.
    #[prost(bool, tag = "7")]
    pub retryable: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Progress {
    /// Bytes of the disk dealt with so far.
    #[prost(uint64, tag = "1")]
    pub done_bytes: u64,
    #[prost(uint64, tag = "2")]
    pub disk_bytes: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SetRate {
    #[prost(uint64, tag = "1")]
    pub bytes_per_second: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Cancel {
    #[prost(string, tag = "1")]
    pub reason: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Started {
    /// The proxy's name for itself, for the session log.
    #[prost(string, tag = "1")]
    pub proxy: String,
}

// An assignment is sent once per task; boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ToProxyKind {
    #[prost(message, tag = "1")]
    Assign(AssignTask),
    #[prost(message, tag = "2")]
    SetRate(SetRate),
    #[prost(message, tag = "3")]
    Cancel(Cancel),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ToProxy {
    #[prost(oneof = "ToProxyKind", tags = "1, 2, 3")]
    pub kind: Option<ToProxyKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum FromProxyKind {
    #[prost(message, tag = "1")]
    Started(Started),
    #[prost(message, tag = "2")]
    Progress(Progress),
    #[prost(message, tag = "3")]
    Done(TaskResult),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FromProxy {
    #[prost(oneof = "FromProxyKind", tags = "1, 2, 3")]
    pub kind: Option<FromProxyKind>,
}

/// A frame: 4-byte little-endian length, then the message.
pub fn encode_frame(message: &impl Message) -> Vec<u8> {
    let len = message.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    message.encode(&mut out).expect("Vec grows");
    out
}

/// Reassembles frames from bytes that arrive in any split.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one has arrived.
    pub fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>, ControlError> {
        let Some(head) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(ControlError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let m =
            M::decode(&self.buf[4..4 + len]).map_err(|e| ControlError::Malformed(e.to_string()))?;
        self.buf.drain(..4 + len);
        Ok(Some(m))
    }
}

/// What the proxy must do after a message from the session.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyAction {
    Start(Box<AssignTask>),
    SetRate(u64),
    Cancel(String),
    /// The task already ended; the message is moot.
    Nothing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Running,
    Finished,
}

/// The proxy's side of one task.
pub struct ProxyTask {
    phase: Phase,
}

impl Default for ProxyTask {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyTask {
    pub fn new() -> Self {
        Self {
            phase: Phase::Waiting,
        }
    }

    pub fn handle(&mut self, message: ToProxy) -> Result<ProxyAction, ControlError> {
        let protocol = |m: &str| Err(ControlError::Protocol(m.to_owned()));
        match (self.phase, message.kind) {
            (_, None) => protocol("empty message"),
            (Phase::Waiting, Some(ToProxyKind::Assign(a))) => {
                if a.source.is_none() || a.block_size == 0 || a.repository_addr.is_empty() {
                    return protocol("assignment without source, block size or repository");
                }
                self.phase = Phase::Running;
                Ok(ProxyAction::Start(Box::new(a)))
            }
            (Phase::Waiting, Some(_)) => protocol("rate or cancel before the assignment"),
            (_, Some(ToProxyKind::Assign(_))) => protocol("second assignment on one task"),
            (Phase::Running, Some(ToProxyKind::SetRate(r))) => {
                Ok(ProxyAction::SetRate(r.bytes_per_second))
            }
            (Phase::Running, Some(ToProxyKind::Cancel(c))) => Ok(ProxyAction::Cancel(c.reason)),
            (Phase::Finished, Some(_)) => Ok(ProxyAction::Nothing),
        }
    }

    pub fn started(&self, proxy: &str) -> FromProxy {
        FromProxy {
            kind: Some(FromProxyKind::Started(Started {
                proxy: proxy.to_owned(),
            })),
        }
    }

    /// A progress report, unless the task has already ended.
    pub fn progress(&self, done_bytes: u64, disk_bytes: u64) -> Option<FromProxy> {
        (self.phase == Phase::Running).then_some(FromProxy {
            kind: Some(FromProxyKind::Progress(Progress {
                done_bytes,
                disk_bytes,
            })),
        })
    }

    pub fn finish(&mut self, result: TaskResult) -> FromProxy {
        self.phase = Phase::Finished;
        FromProxy {
            kind: Some(FromProxyKind::Done(result)),
        }
    }
}

/// What a message from the proxy means to the session.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    Started(String),
    Progress { done_bytes: u64, disk_bytes: u64 },
    Done(TaskResult),
}

/// The session's side of one task.
pub struct SessionTask {
    phase: Phase,
    started: bool,
}

impl SessionTask {
    /// Starts the exchange with the assignment.
    pub fn assign(task: AssignTask) -> (Self, ToProxy) {
        (
            Self {
                phase: Phase::Running,
                started: false,
            },
            ToProxy {
                kind: Some(ToProxyKind::Assign(task)),
            },
        )
    }

    pub fn set_rate(&self, bytes_per_second: u64) -> Option<ToProxy> {
        (self.phase == Phase::Running).then_some(ToProxy {
            kind: Some(ToProxyKind::SetRate(SetRate { bytes_per_second })),
        })
    }

    pub fn cancel(&self, reason: &str) -> Option<ToProxy> {
        (self.phase == Phase::Running).then(|| ToProxy {
            kind: Some(ToProxyKind::Cancel(Cancel {
                reason: reason.to_owned(),
            })),
        })
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Finished
    }

    pub fn handle(&mut self, message: FromProxy) -> Result<SessionEvent, ControlError> {
        let protocol = |m: &str| Err(ControlError::Protocol(m.to_owned()));
        if self.phase == Phase::Finished {
            return protocol("message after the task's result");
        }
        match message.kind {
            None => protocol("empty message"),
            Some(FromProxyKind::Started(s)) if !self.started => {
                self.started = true;
                Ok(SessionEvent::Started(s.proxy))
            }
            Some(FromProxyKind::Started(_)) => protocol("task started twice"),
            Some(FromProxyKind::Progress(_)) if !self.started => {
                protocol("progress before the task started")
            }
            Some(FromProxyKind::Progress(p)) => {
                if p.done_bytes > p.disk_bytes {
                    return protocol("progress beyond the end of the disk");
                }
                Ok(SessionEvent::Progress {
                    done_bytes: p.done_bytes,
                    disk_bytes: p.disk_bytes,
                })
            }
            // A proxy may fail a task before starting it (a plugin that does
            // not load, a source it cannot open).
            Some(FromProxyKind::Done(r)) => {
                self.phase = Phase::Finished;
                Ok(SessionEvent::Done(r))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment() -> AssignTask {
        AssignTask {
            job: "j".into(),
            vm: "vm".into(),
            disk: "d0".into(),
            session_id: 7,
            source: Some(DiskLocator {
                path: "/snap/d0".into(),
                ..Default::default()
            }),
            block_size: 1 << 20,
            repository_addr: "127.0.0.1:7700".into(),
            stages: vec![StageSpec {
                kind: "codec".into(),
                name: "zstd".into(),
                component: vec![0x42; 100_000],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Moves frames between the two sides in memory, cutting the byte stream
    /// into pieces of `piece` bytes as a network may.
    fn deliver<M: Message + Default>(frames: &[Vec<u8>], piece: usize) -> Vec<M> {
        let bytes: Vec<u8> = frames.concat();
        let mut dec = FrameDecoder::default();
        let mut out = Vec::new();
        for chunk in bytes.chunks(piece) {
            dec.push(chunk);
            while let Some(m) = dec.next_message::<M>().unwrap() {
                out.push(m);
            }
        }
        out
    }

    #[test]
    fn a_task_runs_to_its_result_over_any_split() {
        for piece in [1, 3, 4, 5, 4096, 1 << 20] {
            let (mut session, assign) = SessionTask::assign(assignment());
            let mut proxy = ProxyTask::new();
            let to_proxy = vec![
                encode_frame(&assign),
                encode_frame(&session.set_rate(5_000_000).unwrap()),
            ];
            let received: Vec<ToProxy> = deliver(&to_proxy, piece);
            let actions: Vec<_> = received
                .into_iter()
                .map(|m| proxy.handle(m).unwrap())
                .collect();
            assert_eq!(actions[0], ProxyAction::Start(Box::new(assignment())));
            assert_eq!(actions[1], ProxyAction::SetRate(5_000_000));

            let mut from_proxy = vec![encode_frame(&proxy.started("p1"))];
            for done in [1u64 << 20, 2 << 20] {
                from_proxy.push(encode_frame(&proxy.progress(done, 4 << 20).unwrap()));
            }
            let result = TaskResult {
                ok: true,
                point_id: "p-1".into(),
                ..Default::default()
            };
            from_proxy.push(encode_frame(&proxy.finish(result.clone())));
            assert_eq!(
                proxy.progress(3 << 20, 4 << 20),
                None,
                "nothing after the end"
            );
            let events: Vec<_> = deliver::<FromProxy>(&from_proxy, piece)
                .into_iter()
                .map(|m| session.handle(m).unwrap())
                .collect();
            assert_eq!(events[0], SessionEvent::Started("p1".into()));
            assert_eq!(
                events[2],
                SessionEvent::Progress {
                    done_bytes: 2 << 20,
                    disk_bytes: 4 << 20
                }
            );
            assert_eq!(events[3], SessionEvent::Done(result));
            assert!(session.is_done());
            assert_eq!(session.cancel("late"), None, "no cancel after the result");
        }
    }

    #[test]
    fn cancel_reaches_a_running_task_and_is_moot_after_its_end() {
        let (session, assign) = SessionTask::assign(assignment());
        let mut proxy = ProxyTask::new();
        proxy.handle(assign).unwrap();
        let cancel = session.cancel("session stopped").unwrap();
        assert_eq!(
            proxy.handle(cancel.clone()).unwrap(),
            ProxyAction::Cancel("session stopped".into())
        );
        proxy.finish(TaskResult::default());
        assert_eq!(proxy.handle(cancel).unwrap(), ProxyAction::Nothing);
    }

    #[test]
    fn out_of_order_messages_are_refused() {
        let mut proxy = ProxyTask::new();
        let (session, assign) = SessionTask::assign(assignment());
        assert!(matches!(
            proxy.handle(session.set_rate(1).unwrap()),
            Err(ControlError::Protocol(_))
        ));
        proxy.handle(assign.clone()).unwrap();
        assert!(matches!(
            proxy.handle(assign),
            Err(ControlError::Protocol(_))
        ));
        let mut bare = ProxyTask::new();
        let empty = ToProxy {
            kind: Some(ToProxyKind::Assign(AssignTask::default())),
        };
        assert!(
            bare.handle(empty).is_err(),
            "an assignment must name its source"
        );

        let (mut session, _) = SessionTask::assign(assignment());
        let early = FromProxy {
            kind: Some(FromProxyKind::Progress(Progress {
                done_bytes: 1,
                disk_bytes: 2,
            })),
        };
        assert!(session.handle(early).is_err(), "progress before start");
        let (mut session, _) = SessionTask::assign(assignment());
        session.handle(proxy.started("p")).unwrap();
        let beyond = FromProxy {
            kind: Some(FromProxyKind::Progress(Progress {
                done_bytes: 3,
                disk_bytes: 2,
            })),
        };
        assert!(session.handle(beyond).is_err());
        session.handle(proxy.finish(TaskResult::default())).unwrap();
        assert!(
            session.handle(proxy.started("p")).is_err(),
            "after the result"
        );
    }

    #[test]
    fn garbage_and_oversized_frames_are_errors() {
        let mut dec = FrameDecoder::default();
        dec.push(&u32::MAX.to_le_bytes());
        assert_eq!(
            dec.next_message::<ToProxy>(),
            Err(ControlError::TooLarge(u32::MAX as usize))
        );
        let mut dec = FrameDecoder::default();
        dec.push(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
        assert!(matches!(
            dec.next_message::<ToProxy>(),
            Err(ControlError::Malformed(_))
        ));
    }
}
