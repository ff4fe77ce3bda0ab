//! The link between a source mover and a target mover.
//!
//! `TargetLink` is what the source mover talks to; `TargetMover` is what the
//! repository side implements. The embedded default joins them in-process;
//! a network link (QUIC) implements `TargetLink` by encoding the same
//! messages. Links count what would cross the wire so that the session report
//! shows transferred bytes the same way for every link.

use crate::messages::{
    ChunkQuery, ChunkQueryReply, CommitPoint, CommitReply, RegisterCodec, StoreChunks,
};
use prost::Message;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The target refused or failed the request; the message says why.
    #[error("target mover: {0}")]
    Target(String),
    /// The link itself broke (connection lost, peer gone).
    #[error("link to target mover lost: {0}")]
    Lost(String),
}

/// Repository side of the protocol. Implementations must be safe to call from
/// several source workers at once.
pub trait TargetMover: Send + Sync {
    fn query(&self, query: ChunkQuery) -> Result<ChunkQueryReply, LinkError>;
    fn store(&self, chunks: StoreChunks) -> Result<(), LinkError>;
    fn register_codec(&self, codec: RegisterCodec) -> Result<(), LinkError>;
    /// Makes everything stored durable, then the manifest visible.
    fn commit(&self, commit: CommitPoint) -> Result<CommitReply, LinkError>;
    /// Ends the mover without a restore point: nothing it stored becomes
    /// part of one (a repository may keep the chunks for a retry to find).
    fn abort(&self);
}

/// Source side of the protocol.
pub trait TargetLink: Send + Sync {
    fn query(&self, query: ChunkQuery) -> Result<ChunkQueryReply, LinkError>;
    fn store(&self, chunks: StoreChunks) -> Result<(), LinkError>;
    fn register_codec(&self, codec: RegisterCodec) -> Result<(), LinkError>;
    fn commit(&self, commit: CommitPoint) -> Result<CommitReply, LinkError>;
    fn abort(&self);
    fn stats(&self) -> LinkStats;
    /// Whether the target mover answers in this process, so a request
    /// costs no round trip: the source mover then keeps no queries in
    /// flight ahead of its coders (each would hold a batch in memory), and
    /// hands its workers small batches.
    fn in_process(&self) -> bool {
        false
    }
}

/// Bytes a link carried, counted as encoded protobuf.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

/// The embedded default: the target mover runs in this process and messages
/// are handed over by value, never encoded.
pub struct InProcessLink<T: TargetMover> {
    target: T,
    sent: AtomicU64,
    received: AtomicU64,
}

impl<T: TargetMover> InProcessLink<T> {
    pub fn new(target: T) -> Self {
        Self {
            target,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    pub fn target(&self) -> &T {
        &self.target
    }

    fn count<M: Message>(&self, counter: &AtomicU64, message: &M) {
        counter.fetch_add(message.encoded_len() as u64, Ordering::Relaxed);
    }
}

impl<T: TargetMover> TargetLink for InProcessLink<T> {
    fn query(&self, query: ChunkQuery) -> Result<ChunkQueryReply, LinkError> {
        self.count(&self.sent, &query);
        let reply = self.target.query(query)?;
        self.count(&self.received, &reply);
        Ok(reply)
    }

    fn store(&self, chunks: StoreChunks) -> Result<(), LinkError> {
        self.count(&self.sent, &chunks);
        self.target.store(chunks)
    }

    fn register_codec(&self, codec: RegisterCodec) -> Result<(), LinkError> {
        self.count(&self.sent, &codec);
        self.target.register_codec(codec)
    }

    fn commit(&self, commit: CommitPoint) -> Result<CommitReply, LinkError> {
        self.count(&self.sent, &commit);
        let reply = self.target.commit(commit)?;
        self.count(&self.received, &reply);
        Ok(reply)
    }

    fn abort(&self) {
        self.target.abort()
    }

    fn stats(&self) -> LinkStats {
        LinkStats {
            sent_bytes: self.sent.load(Ordering::Relaxed),
            received_bytes: self.received.load(Ordering::Relaxed),
        }
    }
    fn in_process(&self) -> bool {
        true
    }
}

/// A link that fails every request once its flag is raised, so that a
/// source mover cancelled by its session stops at its next request and
/// aborts (nothing it stored becomes visible).
pub struct CancellableLink {
    inner: Box<dyn TargetLink>,
    cancelled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CancellableLink {
    pub fn new(
        inner: Box<dyn TargetLink>,
        cancelled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Self { inner, cancelled }
    }

    fn check(&self) -> Result<(), LinkError> {
        if self.cancelled.load(Ordering::Relaxed) {
            Err(LinkError::Target("task cancelled by its session".into()))
        } else {
            Ok(())
        }
    }
}

impl TargetLink for CancellableLink {
    fn query(&self, query: ChunkQuery) -> Result<ChunkQueryReply, LinkError> {
        self.check()?;
        self.inner.query(query)
    }
    fn store(&self, chunks: StoreChunks) -> Result<(), LinkError> {
        self.check()?;
        self.inner.store(chunks)
    }
    fn register_codec(&self, codec: RegisterCodec) -> Result<(), LinkError> {
        self.check()?;
        self.inner.register_codec(codec)
    }
    fn commit(&self, commit: CommitPoint) -> Result<CommitReply, LinkError> {
        self.check()?;
        self.inner.commit(commit)
    }
    fn abort(&self) {
        self.inner.abort()
    }
    fn stats(&self) -> LinkStats {
        self.inner.stats()
    }
    fn in_process(&self) -> bool {
        self.inner.in_process()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::{ThrottledLink, TokenBucket};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    /// A target that refuses everything: only the links' own answers matter.
    struct Refusing;

    impl TargetMover for Refusing {
        fn query(&self, _: ChunkQuery) -> Result<ChunkQueryReply, LinkError> {
            Err(LinkError::Target("refused".into()))
        }
        fn store(&self, _: StoreChunks) -> Result<(), LinkError> {
            Err(LinkError::Target("refused".into()))
        }
        fn register_codec(&self, _: RegisterCodec) -> Result<(), LinkError> {
            Err(LinkError::Target("refused".into()))
        }
        fn commit(&self, _: CommitPoint) -> Result<CommitReply, LinkError> {
            Err(LinkError::Target("refused".into()))
        }
        fn abort(&self) {}
    }

    #[test]
    fn wrappers_say_whether_what_they_wrap_answers_in_process() {
        let local = || Box::new(InProcessLink::new(Refusing)) as Box<dyn TargetLink>;
        assert!(local().in_process());
        let cancellable = CancellableLink::new(local(), Arc::new(AtomicBool::new(false)));
        assert!(cancellable.in_process());
        let bucket = Arc::new(TokenBucket::new(1_000_000, std::time::Instant::now()));
        let throttled = ThrottledLink::new(Box::new(cancellable), vec![bucket]);
        assert!(throttled.in_process());
        // A link that does not say is taken to have round trips.
        let remote = ThrottledLink::new(Box::new(remote()), Vec::new());
        assert!(!remote.in_process());
    }

    /// A link with round trips, as a remote one is: it keeps the default.
    fn remote() -> impl TargetLink {
        struct Remote;
        impl TargetLink for Remote {
            fn query(&self, _: ChunkQuery) -> Result<ChunkQueryReply, LinkError> {
                Err(LinkError::Target("unreachable".into()))
            }
            fn store(&self, _: StoreChunks) -> Result<(), LinkError> {
                Err(LinkError::Target("unreachable".into()))
            }
            fn register_codec(&self, _: RegisterCodec) -> Result<(), LinkError> {
                Err(LinkError::Target("unreachable".into()))
            }
            fn commit(&self, _: CommitPoint) -> Result<CommitReply, LinkError> {
                Err(LinkError::Target("unreachable".into()))
            }
            fn abort(&self) {}
            fn stats(&self) -> LinkStats {
                LinkStats::default()
            }
        }
        Remote
    }
}
