//! Framing: every request is one bidirectional stream carrying a kind byte
//! and a prost message; the answer is a status byte and a prost message (or
//! an error text).

use crate::messages::Manifest;

pub const OPEN: u8 = 1;
pub const LATEST: u8 = 2;
pub const QUERY: u8 = 3;
pub const STORE: u8 = 4;
pub const CODEC: u8 = 5;
pub const COMMIT: u8 = 6;
pub const STATUS: u8 = 7;
/// A task stream to a proxy: control frames both ways (`quic::proxy`).
pub const ASSIGN: u8 = 8;

pub const OK: u8 = 0;
pub const FAILED: u8 = 1;

/// Largest request or answer: a store of one batch plus headers.
pub const MAX_MESSAGE: usize = 80 << 20;
/// Largest message that carries a whole restore point (a `COMMIT`
/// request, an answer to `LATEST`): its block list takes 32 bytes per
/// block, 128 MiB for a 1 TiB disk at 256 KiB blocks, so `MAX_MESSAGE`
/// would fail every disk over 640 GiB. This bound holds 8 TiB at 256 KiB
/// blocks (32 TiB at 1 MiB); only enrolled peers get to send one.
pub const MAX_POINT_MESSAGE: usize = 1 << 30;

/// The largest request of `kind`.
pub fn max_request(kind: u8) -> usize {
    match kind {
        COMMIT => MAX_POINT_MESSAGE,
        _ => MAX_MESSAGE,
    }
}

/// The largest answer to a request of `kind`.
pub fn max_answer(kind: u8) -> usize {
    match kind {
        LATEST => MAX_POINT_MESSAGE,
        _ => MAX_MESSAGE,
    }
}

/// Which task a connection serves.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OpenTask {
    #[prost(string, tag = "1")]
    pub job: String,
    #[prost(string, tag = "2")]
    pub vm: String,
    #[prost(string, tag = "3")]
    pub disk: String,
    #[prost(uint64, tag = "4")]
    pub session_id: u64,
    /// For `LATEST`: the newest point without its block list (32 bytes per
    /// block, 128 MiB for a 1 TiB disk), for a caller that needs only its
    /// id or CBT bitmap. An older agent ignores it and sends the whole
    /// point, which holds the same fields.
    #[prost(bool, tag = "5")]
    pub header_only: bool,
}

/// The newest restore point of the task's disk, if any.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LatestReply {
    #[prost(message, optional, tag = "1")]
    pub manifest: Option<Manifest>,
}

/// What `arca agent status` shows.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AgentStatus {
    /// The roles served: `repository <path>`, `proxy <name>`.
    #[prost(string, tag = "1")]
    pub repository: String,
    #[prost(uint64, tag = "2")]
    pub uptime_seconds: u64,
    #[prost(uint64, tag = "3")]
    pub tasks_running: u64,
    #[prost(uint64, tag = "4")]
    pub tasks_committed: u64,
    #[prost(uint64, tag = "5")]
    pub tasks_aborted: u64,
    #[prost(string, tag = "6")]
    pub version: String,
}

pub fn frame(kind: u8, body: &impl prost::Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + body.encoded_len());
    out.push(kind);
    body.encode(&mut out).expect("Vec grows");
    out
}
