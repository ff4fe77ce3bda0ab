//! Throttling rules (seed step 4): a rate for traffic between network
//! ranges, optionally only within a daily time window. All tasks whose
//! traffic matches a rule share one token bucket, however many streams they
//! open. Plain logic with the clock passed in, so it is tested without
//! sleeping.

use crate::link::{LinkError, LinkStats, TargetLink};
use crate::messages::{
    ChunkQuery, ChunkQueryReply, CommitPoint, CommitReply, RegisterCodec, StoreChunks,
};
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket: `rate` bytes per second, at most `burst` bytes at once.
#[derive(Debug)]
pub struct TokenBucket {
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

/// The burst is a tenth of a second of traffic: enough to keep a link busy,
/// small enough that the rate holds over any second.
fn burst(rate: f64) -> f64 {
    (rate / 10.0).max(64.0 * 1024.0)
}

impl TokenBucket {
    pub fn new(rate_bytes_per_s: u64, now: Instant) -> Self {
        let rate = rate_bytes_per_s.max(1) as f64;
        Self {
            state: Mutex::new(BucketState {
                rate,
                burst: burst(rate),
                tokens: 0.0,
                last: now,
            }),
        }
    }

    pub fn rate(&self) -> u64 {
        self.state.lock().expect("bucket lock").rate as u64
    }

    /// Changes the rate from now on (a session sharing one rule's rate
    /// among tasks on several agents rebalances as tasks start and end).
    pub fn set_rate(&self, rate_bytes_per_s: u64) {
        let mut st = self.state.lock().expect("bucket lock");
        st.rate = rate_bytes_per_s.max(1) as f64;
        st.burst = burst(st.rate);
        st.tokens = st.tokens.min(st.burst);
    }

    /// Takes `bytes` and says how long the caller must wait before sending
    /// them. Debt is allowed, so a message larger than the burst waits its
    /// fair time instead of never passing.
    pub fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let mut st = self.state.lock().expect("bucket lock");
        let refill = now.saturating_duration_since(st.last).as_secs_f64() * st.rate;
        let available = (st.tokens + refill).min(st.burst) - bytes as f64;
        st.tokens = available;
        st.last = now.max(st.last);
        if available >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-available / st.rate)
        }
    }
}

/// A link whose stores pass through the buckets of the rules that match it.
pub struct ThrottledLink {
    inner: Box<dyn TargetLink>,
    buckets: Vec<Arc<TokenBucket>>,
}

impl ThrottledLink {
    pub fn new(inner: Box<dyn TargetLink>, buckets: Vec<Arc<TokenBucket>>) -> Self {
        Self { inner, buckets }
    }

    fn wait(&self, bytes: u64) {
        let now = Instant::now();
        let delay = self
            .buckets
            .iter()
            .map(|b| b.reserve(bytes, now))
            .max()
            .unwrap_or_default();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    }
}

impl TargetLink for ThrottledLink {
    fn query(&self, query: ChunkQuery) -> Result<ChunkQueryReply, LinkError> {
        self.inner.query(query)
    }
    fn store(&self, chunks: StoreChunks) -> Result<(), LinkError> {
        self.wait(chunks.encoded_len() as u64);
        self.inner.store(chunks)
    }
    fn register_codec(&self, codec: RegisterCodec) -> Result<(), LinkError> {
        self.wait(codec.encoded_len() as u64);
        self.inner.register_codec(codec)
    }
    fn commit(&self, commit: CommitPoint) -> Result<CommitReply, LinkError> {
        // The block list: 128 MiB for a 1 TiB disk, under the rule too.
        self.wait(commit.encoded_len() as u64);
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

    #[test]
    fn the_rate_holds_for_many_takers() {
        let t0 = Instant::now();
        let b = TokenBucket::new(20_000_000, t0);
        // Three takers asking 1 MB each, 60 times, all at t0, on an empty
        // bucket: the last may go only when 180 MB at 20 MB/s have drained.
        let mut last = Duration::ZERO;
        for _ in 0..180 {
            last = b.reserve(1_000_000, t0);
        }
        let expect = 180.0 * 1e6 / 20e6;
        assert!(
            (last.as_secs_f64() - expect).abs() < 0.01,
            "{last:?} vs {expect}"
        );
    }

    /// A target that takes everything and keeps nothing.
    struct Sink;

    impl crate::link::TargetMover for Sink {
        fn query(&self, q: ChunkQuery) -> Result<ChunkQueryReply, LinkError> {
            Ok(ChunkQueryReply {
                missing: vec![true; q.hashes.len() / 32],
            })
        }
        fn store(&self, _: StoreChunks) -> Result<(), LinkError> {
            Ok(())
        }
        fn register_codec(&self, _: RegisterCodec) -> Result<(), LinkError> {
            Ok(())
        }
        fn commit(&self, _: CommitPoint) -> Result<CommitReply, LinkError> {
            Ok(CommitReply::default())
        }
        fn abort(&self) {}
    }

    #[test]
    fn a_commit_counts_against_the_rule_like_a_store() {
        let t0 = Instant::now();
        let b = Arc::new(TokenBucket::new(10_000_000, t0));
        let link = ThrottledLink::new(
            Box::new(crate::link::InProcessLink::new(Sink)),
            vec![b.clone()],
        );
        let commit = CommitPoint {
            manifest: Some(crate::messages::Manifest {
                block_hashes: vec![7; 20_000],
                ..Default::default()
            }),
            retention: None,
        };
        let len = commit.encoded_len() as u64;
        link.commit(commit).unwrap();
        // What the commit took is owed at t0: the next byte waits behind it.
        let owed = b.reserve(1, t0).as_secs_f64();
        let expect = (len + 1) as f64 / 10e6;
        assert!((owed - expect).abs() < 1e-4, "{owed} vs {expect}");
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let t0 = Instant::now();
        let b = TokenBucket::new(1_000_000, t0);
        assert!(b.reserve(1_000, t0) > Duration::ZERO, "starts empty");
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            b.reserve(100_000, later),
            Duration::ZERO,
            "a burst passes after idling"
        );
        assert!(
            b.reserve(100_000, later) > Duration::from_millis(90),
            "but not two"
        );
    }
}
