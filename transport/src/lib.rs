//! The arca data-mover protocol.
//!
//! A source mover (on a proxy) sends blocks of one disk to a target mover (on
//! a repository). The messages are prost types so that every link carries the
//! same bytes: the in-process link of the embedded default passes them by
//! value, the QUIC link encodes them. Nothing here does I/O.

pub mod control;
pub mod link;
pub mod messages;
pub mod quic;
pub mod throttle;

pub use link::{CancellableLink, InProcessLink, LinkError, LinkStats, TargetLink, TargetMover};
pub use messages::{
    Chunk, ChunkHash, ChunkQuery, ChunkQueryReply, CommitPoint, CommitReply, ExcludedRanges,
    HASH_LEN, MANIFEST_FORMAT_VERSION, Manifest, RegisterCodec, RetentionPolicy, StoreChunks,
};
