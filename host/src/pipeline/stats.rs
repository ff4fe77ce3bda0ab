//! Task statistics and per-stage busy time (the session report's bottleneck).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Busy time per stage, summed over all threads of a task.
#[derive(Default)]
pub struct StageClock {
    nanos: Mutex<BTreeMap<&'static str, u128>>,
}

impl StageClock {
    pub fn time<R>(&self, stage: &'static str, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let r = f();
        self.add(stage, start.elapsed());
        r
    }

    pub fn add(&self, stage: &'static str, d: Duration) {
        *self
            .nanos
            .lock()
            .expect("clock lock")
            .entry(stage)
            .or_default() += d.as_nanos();
    }

    pub fn seconds(&self) -> BTreeMap<String, f64> {
        self.nanos
            .lock()
            .expect("clock lock")
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v as f64 / 1e9))
            .collect()
    }
}

/// What one task did, in bytes unless named otherwise.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskStats {
    /// Size of the disk (all of it is accounted for by the restore point).
    pub disk_bytes: u64,
    /// Read from the snapshot.
    pub read_bytes: u64,
    /// Of those, hashed in place in the disk's memory map, without a copy.
    #[serde(default)]
    pub mapped_bytes: u64,
    /// Never read: unallocated in the source.
    pub hole_bytes: u64,
    /// Read, found to be all zeros, not stored.
    pub zero_bytes: u64,
    /// Named by exclusion stages (restored as zeros).
    pub excluded_bytes: u64,
    pub excluded_by_stage: BTreeMap<String, u64>,
    /// Carried from the previous restore point (blocks of zeros included,
    /// when changed block tracking says they are clean).
    pub unchanged_bytes: u64,
    /// New compared with the previous restore point.
    pub new_bytes: u64,
    /// New blocks the repository already had (dedup).
    pub dedup_bytes: u64,
    /// Raw bytes of the chunks sent, and what they took after the codec.
    pub codec_in_bytes: u64,
    pub codec_out_bytes: u64,
    /// Encoded protocol bytes sent to the target mover.
    pub transferred_bytes: u64,
    /// Bytes this task added to the repository.
    pub stored_bytes: u64,
    pub new_chunks: u64,
    /// Bytes changed block tracking reported as written, when it was used.
    pub cbt_dirty_bytes: Option<u64>,
    /// Busy seconds per stage, summed over the task's threads.
    pub stage_seconds: BTreeMap<String, f64>,
}

impl TaskStats {
    pub fn add_exclusion(&mut self, stage: &str, bytes: u64) {
        *self.excluded_by_stage.entry(stage.to_owned()).or_default() += bytes;
    }

    pub(super) fn absorb(&mut self, t: &super::worker::Totals) {
        self.read_bytes += t.read_bytes;
        self.mapped_bytes += t.mapped_bytes;
        self.zero_bytes += t.zero_bytes;
        self.unchanged_bytes += t.unchanged_bytes;
        self.new_bytes += t.new_bytes;
        self.dedup_bytes += t.dedup_bytes;
        self.codec_in_bytes += t.codec_in_bytes;
        self.codec_out_bytes += t.codec_out_bytes;
    }

    /// Adds another task's figures (session totals).
    pub fn merge(&mut self, o: &TaskStats) {
        self.disk_bytes += o.disk_bytes;
        self.read_bytes += o.read_bytes;
        self.mapped_bytes += o.mapped_bytes;
        self.hole_bytes += o.hole_bytes;
        self.zero_bytes += o.zero_bytes;
        self.excluded_bytes += o.excluded_bytes;
        for (k, v) in &o.excluded_by_stage {
            *self.excluded_by_stage.entry(k.clone()).or_default() += v;
        }
        self.unchanged_bytes += o.unchanged_bytes;
        self.new_bytes += o.new_bytes;
        self.dedup_bytes += o.dedup_bytes;
        self.codec_in_bytes += o.codec_in_bytes;
        self.codec_out_bytes += o.codec_out_bytes;
        self.transferred_bytes += o.transferred_bytes;
        self.stored_bytes += o.stored_bytes;
        self.new_chunks += o.new_chunks;
        if let Some(d) = o.cbt_dirty_bytes {
            *self.cbt_dirty_bytes.get_or_insert(0) += d;
        }
        for (k, v) in &o.stage_seconds {
            *self.stage_seconds.entry(k.clone()).or_default() += v;
        }
    }

    /// Raw bytes per coded byte of what was sent.
    pub fn compression_ratio(&self) -> f64 {
        ratio(self.codec_in_bytes, self.codec_out_bytes)
    }

    /// New bytes per byte that had to be sent because the repository lacked it.
    pub fn dedup_ratio(&self) -> f64 {
        ratio(
            self.new_bytes,
            self.new_bytes - self.dedup_bytes.min(self.new_bytes),
        )
    }

    /// The stage that was busy longest.
    pub fn bottleneck(&self) -> Option<(String, f64)> {
        self.stage_seconds
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(k, v)| (k.clone(), *v))
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 1.0 } else { a as f64 / b as f64 }
}
