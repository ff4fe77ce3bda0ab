//! Protobuf messages exchanged by data movers, and the restore-point manifest.
//!
//! Messages are declared with `prost` derives instead of `.proto` files so
//! that building arca needs no `protoc`; the tags are the wire contract and
//! must never be reused.

/// Length of a chunk address: BLAKE3 of the plaintext block.
pub const HASH_LEN: usize = 32;

/// Version of the `Manifest` layout written by this build.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

pub type ChunkHash = [u8; HASH_LEN];

/// Source → target: which of these chunks do you lack? Sent once per batch so
/// that blocks the repository already has are neither compressed nor sent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChunkQuery {
    /// Concatenated 32-byte addresses.
    #[prost(bytes = "vec", tag = "1")]
    pub hashes: Vec<u8>,
}

/// Target → source: one flag per queried address, true when it is missing.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChunkQueryReply {
    #[prost(bool, repeated, tag = "1")]
    pub missing: Vec<bool>,
}

/// One stored block: its address, how it is coded, and the coded bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Chunk {
    #[prost(bytes = "vec", tag = "1")]
    pub hash: Vec<u8>,
    /// Codec name (`none` for blocks stored as they are).
    #[prost(string, tag = "2")]
    pub codec: String,
    /// BLAKE3 of the codec component that coded the payload; empty for `none`.
    #[prost(bytes = "vec", tag = "3")]
    pub codec_hash: Vec<u8>,
    #[prost(uint32, tag = "4")]
    pub raw_len: u32,
    /// On the source side, a slice of the coded batch it came from (or of
    /// the raw batch, for `none`): building a store message copies no
    /// payload. Same encoding as `bytes`.
    #[prost(bytes = "bytes", tag = "5")]
    pub payload: bytes::Bytes,
}

/// Source → target: chunks to store. Fire and forget: the commit is the
/// barrier that says whether they all arrived and became durable.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoreChunks {
    #[prost(message, repeated, tag = "1")]
    pub chunks: Vec<Chunk>,
}

/// Source → target: keep a copy of the codec component so that chunks coded
/// with it can be decoded years later.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RegisterCodec {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub hash: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub component: Vec<u8>,
}

/// A restore point of one disk: every block, by address. Every restore point
/// is a logical full; holes (zero or excluded blocks) have an all-zero address.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Manifest {
    #[prost(uint32, tag = "1")]
    pub format_version: u32,
    #[prost(string, tag = "2")]
    pub job: String,
    #[prost(string, tag = "3")]
    pub vm: String,
    #[prost(string, tag = "4")]
    pub disk: String,
    /// Assigned by the repository at commit.
    #[prost(string, tag = "5")]
    pub point_id: String,
    #[prost(int64, tag = "6")]
    pub created_unix_ms: i64,
    #[prost(uint64, tag = "7")]
    pub disk_size: u64,
    #[prost(uint32, tag = "8")]
    pub block_size: u32,
    /// The restore point this one was made incremental to, if any.
    #[prost(string, tag = "9")]
    pub parent_point: String,
    /// 32 bytes per block, in block order.
    #[prost(bytes = "vec", tag = "10")]
    pub block_hashes: Vec<u8>,
    /// How consistent the snapshot was (`crash-consistent`, `powered-off-only`, ...).
    #[prost(string, tag = "11")]
    pub consistency: String,
    #[prost(uint64, tag = "12")]
    pub session_id: u64,
    #[prost(string, tag = "13")]
    pub pipeline: String,
    /// The hypervisor's dirty bitmap that counts changes from this restore
    /// point's snapshot on (empty without CBT).
    #[prost(string, tag = "14")]
    pub cbt_bitmap: String,
    /// The byte ranges the exclusion stages left out of this point (they
    /// restore as zeros); `None` in points made by an arca that did not
    /// record them. A block's stored bytes are its disk bytes with these
    /// ranges zeroed, so a later backup may carry the block unread only where
    /// it excludes the same bytes of it. Not a header field: a header read
    /// skips it unread (a fragmented filesystem's free space is many ranges).
    #[prost(message, optional, tag = "15")]
    pub excluded: Option<ExcludedRanges>,
    /// A random token the session gave the task, the same in each of its
    /// attempts (empty from an arca without it). An attempt that finds its
    /// token on the disk's newest point knows an earlier attempt committed,
    /// although its answer was lost, and makes no second point.
    #[prost(bytes = "vec", tag = "16")]
    pub task_token: Vec<u8>,
}

/// Sorted, disjoint byte ranges, delta-coded so that the varints stay short:
/// for each range, its distance from the end of the one before (from 0 for
/// the first), then its length.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExcludedRanges {
    #[prost(uint64, repeated, tag = "1")]
    pub gaps_and_lengths: Vec<u64>,
}

impl ExcludedRanges {
    /// From `(offset, length)` ranges, sorted and disjoint.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut end = 0u64;
        let mut gaps_and_lengths = Vec::new();
        for (offset, length) in ranges {
            debug_assert!(offset >= end, "ranges must be sorted and disjoint");
            gaps_and_lengths.extend([offset - end, length]);
            end = offset + length;
        }
        Self { gaps_and_lengths }
    }

    /// The `(offset, length)` ranges, or what is wrong with the list.
    pub fn ranges(&self) -> Result<Vec<(u64, u64)>, String> {
        if !self.gaps_and_lengths.len().is_multiple_of(2) {
            return Err("an odd count of range numbers".into());
        }
        let mut end = 0u64;
        let mut out = Vec::with_capacity(self.gaps_and_lengths.len() / 2);
        for pair in self.gaps_and_lengths.chunks_exact(2) {
            let offset = end.checked_add(pair[0]);
            let next = offset.and_then(|o| o.checked_add(pair[1]));
            let (Some(offset), Some(next)) = (offset, next) else {
                return Err("a range runs past 2^64".into());
            };
            out.push((offset, pair[1]));
            end = next;
        }
        Ok(out)
    }
}

impl Manifest {
    pub fn block_count(&self) -> u64 {
        if self.block_size == 0 {
            return 0;
        }
        self.disk_size.div_ceil(u64::from(self.block_size))
    }

    /// This point without its per-block parts (block list and excluded
    /// ranges): what a scan of a disk's many points keeps of each. Its
    /// `excluded` says nothing about the point.
    pub fn into_header(self) -> Manifest {
        Manifest {
            block_hashes: Vec::new(),
            excluded: None,
            ..self
        }
    }

    /// Address of block `index`, or `None` for a hole.
    pub fn block(&self, index: u64) -> Option<ChunkHash> {
        let start = usize::try_from(index).ok()?.checked_mul(HASH_LEN)?;
        let raw: ChunkHash = self
            .block_hashes
            .get(start..start + HASH_LEN)?
            .try_into()
            .ok()?;
        (raw != [0u8; HASH_LEN]).then_some(raw)
    }
}

/// Source → target: all blocks are sent; make the restore point visible.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommitPoint {
    #[prost(message, optional, tag = "1")]
    pub manifest: Option<Manifest>,
    /// The job's retention policy, applied to the disk's restore points
    /// once this one is durable (an older target ignores it).
    #[prost(message, optional, tag = "2")]
    pub retention: Option<RetentionPolicy>,
}

/// How many restore points of a disk to keep: the newest `keep_last`, and
/// the newest of each of the newest `keep_daily` days, `keep_weekly` ISO
/// weeks and `keep_monthly` months (UTC).
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct RetentionPolicy {
    #[prost(uint32, tag = "1")]
    pub keep_last: u32,
    #[prost(uint32, tag = "2")]
    pub keep_daily: u32,
    #[prost(uint32, tag = "3")]
    pub keep_weekly: u32,
    #[prost(uint32, tag = "4")]
    pub keep_monthly: u32,
}

/// Target → source: the restore point is durable and visible.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommitReply {
    #[prost(string, tag = "1")]
    pub point_id: String,
    /// Chunks that this commit added to the repository.
    #[prost(uint64, tag = "2")]
    pub new_chunks: u64,
    /// Bytes those chunks occupy on the repository.
    #[prost(uint64, tag = "3")]
    pub stored_bytes: u64,
    /// Restore points the retention policy forgot after the commit.
    #[prost(string, repeated, tag = "4")]
    pub forgotten: Vec<String>,
    /// Why the retention policy could not be applied (the point is
    /// committed all the same).
    #[prost(string, tag = "5")]
    pub retention_error: String,
    /// The target read the retention policy (false from a target older
    /// than retention, which ignores it).
    #[prost(bool, tag = "6")]
    pub retention_applied: bool,
    /// Restore points retention left alone: dated over a day ahead.
    #[prost(string, repeated, tag = "7")]
    pub retention_skipped: Vec<String>,
    /// `point_id` was committed earlier by another attempt of the same task
    /// (same `Manifest::task_token`); this commit made no new point.
    #[prost(bool, tag = "8")]
    pub earlier_attempt: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn manifest_round_trips_and_reads_holes() {
        let mut hashes = vec![0u8; 3 * HASH_LEN];
        hashes[HASH_LEN..2 * HASH_LEN].fill(7);
        let m = Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            job: "j".into(),
            disk_size: 2 * 1024 + 1,
            block_size: 1024,
            block_hashes: hashes,
            ..Default::default()
        };
        let decoded = Manifest::decode(m.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, m);
        assert_eq!(decoded.block_count(), 3);
        assert_eq!(decoded.block(0), None);
        assert_eq!(decoded.block(1), Some([7u8; HASH_LEN]));
        assert_eq!(decoded.block(3), None);
        assert_eq!(decoded.excluded, None, "not recorded");
    }

    #[test]
    fn excluded_ranges_round_trip_and_refuse_overflow() {
        let ranges = vec![(0, 10), (4096, 1 << 40), (u64::MAX - 5, 5)];
        let coded = ExcludedRanges::from_ranges(ranges.iter().copied());
        let m = Manifest {
            excluded: Some(coded.clone()),
            ..Default::default()
        };
        let decoded = Manifest::decode(m.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.excluded.as_ref().unwrap().ranges(), Ok(ranges));

        // Recorded but empty is not the same as not recorded.
        let none = Manifest {
            excluded: Some(ExcludedRanges::default()),
            ..Default::default()
        };
        let decoded = Manifest::decode(none.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.excluded.unwrap().ranges(), Ok(vec![]));

        let past = ExcludedRanges {
            gaps_and_lengths: vec![u64::MAX, 1, 1, 1],
        };
        assert!(past.ranges().unwrap_err().contains("past 2^64"));
        let odd = ExcludedRanges {
            gaps_and_lengths: vec![1, 2, 3],
        };
        assert!(odd.ranges().is_err());
    }
}
