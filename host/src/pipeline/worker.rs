//! The threads of one task's source mover: analysts and coders.
//!
//! Analysts take batches in disk order and read them (several reads in
//! flight: one thread cannot copy a page cache or a fast disk at full
//! speed), zero excluded ranges, test for zeros, hash, classify and ask the
//! target which chunks it lacks. An incremental of a mapped disk hashes
//! the map in place and copies out only the blocks that changed;
//! coders (one codec instance each, so a single disk uses every core)
//! compress what is missing and send it. The dedup query is a round trip to
//! the repository: with analysts ahead of the coders, several queries are in
//! flight while the coders work, so a long link stays busy.

use super::{BlockPlan, StageClock, TaskError, TaskInput};
use crate::extent::{Extent, Geometry, ranges_within};
use crate::plugin::Plugin;
use crate::plugin::codec::{Blocks, Codec, stores_coded};
use crate::plugin::detect::Detector;
use crate::source::mapped::MappedFile;
use arca_transport::{Chunk, ChunkHash, ChunkQuery, HASH_LEN, Manifest, StoreChunks, TargetLink};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

pub(super) struct Shared<'a> {
    pub input: &'a TaskInput,
    pub geometry: Geometry,
    pub excluded: &'a [Extent],
    pub previous: Option<&'a Manifest>,
    pub detector: &'a Mutex<Detector>,
    pub codec: &'a Plugin,
    pub codec_settings: &'a Vec<(String, String)>,
    pub link: &'a dyn TargetLink,
    pub clock: &'a StageClock,
    pub progress: &'a (dyn Fn(u64) + Sync),
}

/// Consecutive blocks to read in one go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BatchSpan {
    first: u64,
    count: u64,
}

#[derive(Debug, Default)]
pub(super) struct Totals {
    pub read_bytes: u64,
    pub mapped_bytes: u64,
    pub zero_bytes: u64,
    pub unchanged_bytes: u64,
    pub new_bytes: u64,
    pub dedup_bytes: u64,
    pub codec_in_bytes: u64,
    pub codec_out_bytes: u64,
    pub unchanged_claims_rejected: u64,
    /// Blocks a codec coded shorter but did not decode back to themselves.
    pub codec_lost_blocks: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.read_bytes += o.read_bytes;
        self.mapped_bytes += o.mapped_bytes;
        self.zero_bytes += o.zero_bytes;
        self.unchanged_bytes += o.unchanged_bytes;
        self.new_bytes += o.new_bytes;
        self.dedup_bytes += o.dedup_bytes;
        self.codec_in_bytes += o.codec_in_bytes;
        self.codec_out_bytes += o.codec_out_bytes;
        self.unchanged_claims_rejected += o.unchanged_claims_rejected;
        self.codec_lost_blocks += o.codec_lost_blocks;
    }
}

struct ReadBatch<'s> {
    first: u64,
    lengths: Vec<u32>,
    data: Vec<u8>,
    /// The batch in the disk's map, not yet copied (`data` is then empty).
    mapped: Option<(&'s MappedFile, &'s [u8])>,
}

impl ReadBatch<'_> {
    /// Bytes of disk the batch covers, whether read, mapped or copied out.
    fn disk_bytes(&self) -> u64 {
        self.lengths.iter().map(|l| u64::from(*l)).sum()
    }
}

/// Batch buffers, handed back by the coders for the analysts' next reads.
/// A fresh buffer per batch would be zeroed (or faulted in page by page) for
/// every batch: 17% of the CPU of an incremental backup on the development
/// machine, which otherwise only reads and hashes.
struct Buffers {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    /// What every new buffer can hold: the task's largest batch.
    size: usize,
}

impl Buffers {
    fn new(capacity: usize, size: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        Self { tx, rx, size }
    }

    /// A buffer of `len` bytes; its contents are whatever the last batch
    /// left (the read overwrites all of them).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self.pooled(len);
        // Only what the last batch did not fill is zeroed.
        b.resize(len, 0);
        b
    }

    /// An empty buffer with room for `len` bytes.
    fn take_empty(&self, len: usize) -> Vec<u8> {
        let mut b = self.pooled(len);
        b.clear();
        b
    }

    /// A pooled buffer with room for `len` bytes, or a new one. Every
    /// buffer is made with room for a whole batch, so that any pooled one
    /// serves any batch: when buffers were made to each batch's length, a
    /// CBT incremental's batches of one to four blocks dropped the pooled
    /// buffers that were too small and made new ones, whose first touch
    /// cost a page fault per 4 KiB.
    fn pooled(&self, len: usize) -> Vec<u8> {
        match self.rx.try_recv() {
            Ok(b) if b.capacity() >= len => b,
            _ => Vec::with_capacity(len.max(self.size)),
        }
    }

    fn give(&self, b: Vec<u8>) {
        let _ = self.tx.try_send(b);
    }
}

/// Queries in flight beyond one per coder over a link with round trips:
/// enough to cover a round trip of a long link while the coders work. Each
/// holds a batch in memory, so an in-process link, which answers at once,
/// keeps none (four disks at once held 2 × 4 × 8 MiB more for nothing).
const QUERIES_AHEAD: usize = 2;

/// Raw bytes per batch where the codec sees every block read (a first
/// backup, or any backup of a disk that is not mapped) and the repository
/// answers in process: large enough that a plugin call costs nothing next
/// to the work, small enough that the copy of a batch into the codec's
/// memory is still in the core's cache when zstd reads it. Against 8 MiB,
/// a whole-disk full of the peers disk took 3% less CPU and a third of the
/// memory, a full of the live VM 16% less time (docs/BENCHMARKS.md, "Batch
/// size").
const BATCH_BYTES: usize = 1 << 20;
/// Everywhere else. Over a link with round trips each analyst's dedup
/// query and each coder's store carry one batch and wait for their answer,
/// so a batch must be large for the link to stay busy. An incremental of a
/// mapped disk hashes the map in place and copies out only changed blocks,
/// and a larger batch fetches more of the map at once: with 1 MiB a cold
/// one took 10% longer.
const LARGE_BATCH_BYTES: usize = 8 << 20;

/// A batch that is hashed and classified, with the blocks the repository
/// lacks: what a coder compresses and sends.
struct AnalyzedBatch<'s> {
    /// Owned: analysis copies out of the map what the coders need.
    batch: ReadBatch<'s>,
    offsets: Vec<usize>,
    digests: Vec<Option<ChunkHash>>,
    missing: Vec<usize>,
}

/// Per block of a batch: its address, or `None` for a zero block.
struct DoneBatch {
    first: u64,
    hashes: Vec<Option<ChunkHash>>,
}

/// Splits the blocks to read into runs of consecutive blocks of at most
/// `max_bytes` (at least one block).
pub(super) fn batches(plan: &[BlockPlan], g: &Geometry, max_bytes: usize) -> Vec<BatchSpan> {
    let per_batch = (max_bytes as u64 / u64::from(g.block_size)).max(1);
    let mut out: Vec<BatchSpan> = Vec::new();
    for (i, p) in plan.iter().enumerate() {
        if *p != BlockPlan::Read {
            continue;
        }
        let i = i as u64;
        match out.last_mut() {
            Some(b) if b.first + b.count == i && b.count < per_batch => b.count += 1,
            _ => out.push(BatchSpan { first: i, count: 1 }),
        }
    }
    out
}

pub(super) fn run_batches(
    sh: &Shared<'_>,
    spans: Vec<BatchSpan>,
    hashes: &mut [u8],
) -> Result<Totals, TaskError> {
    let workers = sh.input.workers.max(1);
    let ahead = if sh.link.in_process() {
        0
    } else {
        QUERIES_AHEAD
    };
    let stop = AtomicBool::new(false);
    // Every batch in flight: one per analyst, one queued per coder, one
    // per coder at work.
    // The largest batch of these spans: any buffer then serves any batch.
    let largest =
        spans.iter().map(|s| s.count).max().unwrap_or(1) as usize * sh.geometry.block_size as usize;
    let buffers = Buffers::new(3 * workers + ahead, largest);
    std::thread::scope(|scope| {
        // Every span up front: analysts take them in order as they go.
        let (work_tx, work_rx) = crossbeam_channel::unbounded::<BatchSpan>();
        for span in spans {
            let _ = work_tx.send(span);
        }
        drop(work_tx);
        let (code_tx, code_rx) = crossbeam_channel::bounded::<AnalyzedBatch>(workers);
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<DoneBatch>();
        let (stop, buffers) = (&stop, &buffers);
        let failing = |r: Result<Totals, TaskError>| {
            if r.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            r
        };
        let mut handles = Vec::new();
        for _ in 0..workers + ahead {
            let (rx, tx, done) = (work_rx.clone(), code_tx.clone(), done_tx.clone());
            handles
                .push(scope.spawn(move || failing(analyst_loop(sh, rx, tx, done, stop, buffers))));
        }
        for _ in 0..workers {
            let rx = code_rx.clone();
            handles.push(scope.spawn(move || failing(coder_loop(sh, rx, stop, buffers))));
        }
        drop((work_rx, code_tx, code_rx, done_tx));
        for done in done_rx {
            for (k, h) in done.hashes.iter().enumerate() {
                if let Some(h) = h {
                    let at = (done.first as usize + k) * HASH_LEN;
                    hashes[at..at + HASH_LEN].copy_from_slice(h);
                }
            }
        }
        let mut totals = Totals::default();
        let mut first_err: Option<TaskError> = None;
        let mut keep = |e: TaskError| {
            // A real cause beats the "cancelled" of the threads it stopped.
            if first_err
                .as_ref()
                .is_none_or(|f| matches!(f, TaskError::Cancelled))
            {
                first_err = Some(e);
            }
        };
        for h in handles {
            match h.join().expect("worker thread does not panic") {
                Ok(t) => totals.add(&t),
                Err(e) => keep(e),
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(totals),
        }
    })
}

/// The disk's map, where reading a span through it pays: in an incremental
/// most blocks are only hashed, which the map allows without a copy. Not in
/// a first backup (every block is copied into the codec anyway), nor for a
/// span an exclusion touches (exclusions are zeroed in place).
fn map_for<'s>(sh: &Shared<'s>, start: u64, length: u64) -> Option<&'s MappedFile> {
    let map = hashing_map(sh)?;
    ranges_within(
        sh.excluded,
        Extent {
            offset: start,
            length,
        },
    )
    .is_empty()
    .then_some(map)
}

/// The disk's map when this task hashes it in place: an incremental
/// (there is a point to compare with) of a mapped disk.
fn hashing_map<'s>(sh: &Shared<'s>) -> Option<&'s MappedFile> {
    sh.previous?;
    sh.input.disk.mapped()
}

/// Raw bytes per batch for this task: `BATCH_BYTES` where the codec sees
/// every block read and the repository answers in process,
/// `LARGE_BATCH_BYTES` elsewhere.
pub(super) fn batch_bytes(sh: &Shared<'_>) -> usize {
    if sh.link.in_process() && hashing_map(sh).is_none() {
        BATCH_BYTES
    } else {
        LARGE_BATCH_BYTES
    }
}

fn read_span<'s>(
    sh: &Shared<'s>,
    span: BatchSpan,
    buffers: &Buffers,
) -> Result<ReadBatch<'s>, TaskError> {
    let start = sh.geometry.block_extent(span.first).offset;
    let lengths: Vec<u32> = (span.first..span.first + span.count)
        .map(|i| sh.geometry.block_extent(i).length as u32)
        .collect();
    let total: usize = lengths.iter().map(|l| *l as usize).sum();
    let read_err = |offset, source| TaskError::Read {
        disk: sh.input.label(),
        offset,
        source,
    };
    if let Some(map) = map_for(sh, start, total as u64) {
        let bytes = sh
            .clock
            .time("read", || map.range(start, total))
            .map_err(|e| read_err(start, e))?;
        return Ok(ReadBatch {
            first: span.first,
            lengths,
            data: Vec::new(),
            mapped: Some((map, bytes)),
        });
    }
    let mut data = buffers.take(total);
    let got = sh
        .clock
        .time("read", || sh.input.disk.read_at(&mut data, start))
        .map_err(|e| read_err(start, e))?;
    if got < total {
        // The disk shrank under us: a snapshot must not do that.
        return Err(read_err(
            start + got as u64,
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "disk ended early"),
        ));
    }
    Ok(ReadBatch {
        first: span.first,
        lengths,
        data,
        mapped: None,
    })
}

fn analyst_loop<'s>(
    sh: &Shared<'s>,
    rx: Receiver<BatchSpan>,
    tx: Sender<AnalyzedBatch<'s>>,
    done: Sender<DoneBatch>,
    stop: &AtomicBool,
    buffers: &Buffers,
) -> Result<Totals, TaskError> {
    let mut totals = Totals::default();
    for span in rx {
        if stop.load(Ordering::Relaxed) {
            return Err(TaskError::Cancelled);
        }
        let batch = read_span(sh, span, buffers)?;
        let bytes = batch.disk_bytes();
        totals.read_bytes += bytes;
        if batch.mapped.is_some() {
            totals.mapped_bytes += bytes;
        }
        let analyzed = analyze(sh, batch, &mut totals, buffers)?;
        let _ = done.send(DoneBatch {
            first: analyzed.batch.first,
            hashes: analyzed.digests.clone(),
        });
        if tx.send(analyzed).is_err() {
            // Every coder is gone; their error says why.
            return Err(TaskError::Cancelled);
        }
    }
    Ok(totals)
}

fn coder_loop(
    sh: &Shared<'_>,
    rx: Receiver<AnalyzedBatch<'_>>,
    stop: &AtomicBool,
    buffers: &Buffers,
) -> Result<Totals, TaskError> {
    let mut codec = Codec::new(sh.codec, sh.codec_settings)?;
    let mut totals = Totals::default();
    for analyzed in rx {
        if stop.load(Ordering::Relaxed) {
            return Err(TaskError::Cancelled);
        }
        let bytes = analyzed.batch.disk_bytes();
        code(sh, &mut codec, analyzed, &mut totals, buffers)?;
        (sh.progress)(bytes);
    }
    Ok(totals)
}

/// Zero test that vectorizes (OR-fold over a page) and still stops at the
/// first page with data, so data blocks cost almost nothing here.
fn is_zero(block: &[u8]) -> bool {
    block
        .chunks(4096)
        .all(|page| page.iter().fold(0u8, |acc, b| acc | b) == 0)
}

fn analyze<'s>(
    sh: &Shared<'s>,
    mut batch: ReadBatch<'s>,
    totals: &mut Totals,
    buffers: &Buffers,
) -> Result<AnalyzedBatch<'s>, TaskError> {
    let n = batch.lengths.len();
    let mut offsets = Vec::with_capacity(n + 1);
    offsets.push(0usize);
    for l in &batch.lengths {
        offsets.push(offsets.last().expect("non-empty") + *l as usize);
    }
    let block = |k: usize| offsets[k]..offsets[k + 1];

    if !sh.excluded.is_empty() {
        for (k, &base) in offsets[..n].iter().enumerate() {
            let ext = sh.geometry.block_extent(batch.first + k as u64);
            for (a, b) in ranges_within(sh.excluded, ext) {
                batch.data[base + a..base + b].fill(0);
            }
        }
    }

    let mut digests: Vec<Option<ChunkHash>> = sh.clock.time("hash", || {
        let bytes = batch.mapped.map_or(&batch.data[..], |(_, b)| b);
        (0..n)
            .map(|k| {
                let b = &bytes[block(k)];
                (!is_zero(b)).then(|| *blake3::hash(b).as_bytes())
            })
            .collect()
    });

    // Classify runs of consecutive non-zero blocks.
    let mut is_new = vec![false; n];
    sh.clock
        .time("change-detection", || -> Result<(), TaskError> {
            let mut det = sh.detector.lock().expect("detector lock");
            let mut k = 0;
            while k < n {
                if digests[k].is_none() {
                    k += 1;
                    continue;
                }
                let start = k;
                let mut flat = Vec::new();
                while k < n
                    && let Some(d) = &digests[k]
                {
                    flat.extend_from_slice(d);
                    k += 1;
                }
                let flags = det.classify(batch.first + start as u64, &flat)?;
                is_new[start..k].copy_from_slice(&flags);
            }
            Ok(())
        })?;

    let mut wanted: Vec<usize> = Vec::new();
    for k in 0..n {
        let len = batch.lengths[k] as u64;
        let Some(d) = &digests[k] else {
            totals.zero_bytes += len;
            continue;
        };
        if !is_new[k] {
            let prev = sh.previous.and_then(|p| p.block(batch.first + k as u64));
            if prev.as_ref() == Some(d) {
                totals.unchanged_bytes += len;
                continue;
            }
            totals.unchanged_claims_rejected += 1;
        }
        totals.new_bytes += len;
        wanted.push(k);
    }
    if let Some(mapped) = batch.mapped.take() {
        offsets = copy_out(
            sh,
            mapped,
            &mut batch,
            &offsets,
            &wanted,
            &mut digests,
            buffers,
        )?;
    }

    let mut missing: Vec<usize> = Vec::new();
    if !wanted.is_empty() {
        let mut query = Vec::with_capacity(wanted.len() * HASH_LEN);
        for &k in &wanted {
            query.extend_from_slice(digests[k].as_ref().expect("wanted blocks have digests"));
        }
        let reply = sh
            .clock
            .time("dedup", || sh.link.query(ChunkQuery { hashes: query }))?;
        if reply.missing.len() != wanted.len() {
            return Err(TaskError::Link(arca_transport::LinkError::Target(format!(
                "asked about {} chunks, got {} answers",
                wanted.len(),
                reply.missing.len()
            ))));
        }
        for (i, &k) in wanted.iter().enumerate() {
            if reply.missing[i] {
                missing.push(k);
            } else {
                totals.dedup_bytes += batch.lengths[k] as u64;
            }
        }
    }

    Ok(AnalyzedBatch {
        batch,
        offsets,
        digests,
        missing,
    })
}

/// Copies the blocks to store out of a mapped batch into `batch.data` and
/// returns their offsets there (blocks left behind take no room). They are
/// hashed again from the copy: a live file may change between the two
/// reads, and a chunk's address must be that of the bytes stored. Fails if
/// the image was truncated while it was read, since what the map gave for
/// the lost pages was zeros, not the disk.
fn copy_out(
    sh: &Shared<'_>,
    (map, mapped): (&MappedFile, &[u8]),
    batch: &mut ReadBatch<'_>,
    offsets: &[usize],
    wanted: &[usize],
    digests: &mut [Option<ChunkHash>],
    buffers: &Buffers,
) -> Result<Vec<usize>, TaskError> {
    let n = batch.lengths.len();
    let mut copied = Vec::with_capacity(n + 1);
    copied.push(0usize);
    let mut w = wanted.iter().peekable();
    for (k, len) in batch.lengths.iter().enumerate() {
        let take = w.next_if_eq(&&k).is_some();
        copied.push(copied[k] + if take { *len as usize } else { 0 });
    }
    let mut data = buffers.take(copied[n]);
    sh.clock.time("hash", || {
        for &k in wanted {
            let to = &mut data[copied[k]..copied[k + 1]];
            to.copy_from_slice(&mapped[offsets[k]..offsets[k + 1]]);
            digests[k] = Some(*blake3::hash(to).as_bytes());
        }
    });
    batch.data = data;
    map.release(sh.geometry.block_extent(batch.first).offset, mapped.len());
    map.check().map_err(|source| TaskError::Shrunk {
        disk: sh.input.label(),
        source,
    })?;
    Ok(copied)
}

/// Compresses and sends a batch's missing blocks; hands the buffers it is
/// done with back to the analysts.
fn code(
    sh: &Shared<'_>,
    codec: &mut Codec,
    analyzed: AnalyzedBatch,
    totals: &mut Totals,
    buffers: &Buffers,
) -> Result<(), TaskError> {
    let AnalyzedBatch {
        batch,
        offsets,
        digests,
        missing,
    } = analyzed;
    let block = |k: usize| offsets[k]..offsets[k + 1];
    if missing.is_empty() {
        buffers.give(batch.data);
        return Ok(());
    }
    // Every block missing (a first backup): the batch is the codec's
    // input as it is; otherwise gather the missing blocks, and the
    // batch's buffer is done with.
    let raw = if missing.len() == batch.lengths.len() {
        Blocks {
            data: batch.data,
            lengths: batch.lengths,
        }
    } else {
        let mut raw = Blocks {
            data: buffers.take_empty(missing.iter().map(|&k| batch.lengths[k] as usize).sum()),
            lengths: Vec::with_capacity(missing.len()),
        };
        for &k in &missing {
            raw.data.extend_from_slice(&batch.data[block(k)]);
            raw.lengths.push(batch.lengths[k]);
        }
        buffers.give(batch.data);
        raw
    };
    let (coded, raw) = sh.clock.time("compression", || codec.compress(raw))?;
    // A codec is believed only where what it coded decodes back to the
    // block: a broken one would otherwise be found at verify or restore,
    // with every later point referencing its chunks through dedup.
    let lost = sh
        .clock
        .time("compression", || codec.lost_blocks(&coded, &raw))?;
    let plugin = codec.plugin();
    // Payloads are slices of the two batches, not copies.
    let coded_data = Bytes::from(coded.data);
    let raw_data = Bytes::from(raw.data);
    let mut chunks = Vec::with_capacity(missing.len());
    let (mut raw_at, mut coded_at) = (0usize, 0usize);
    for (i, &k) in missing.iter().enumerate() {
        let raw_len = raw.lengths[i] as usize;
        let coded_len = coded.lengths[i] as usize;
        let raw_span = raw_at..raw_at + raw_len;
        let coded_span = coded_at..coded_at + coded_len;
        raw_at += raw_len;
        coded_at += coded_len;
        // Incompressible blocks are stored as they are: smaller, and
        // readable without any codec. So are blocks the codec lost.
        totals.codec_lost_blocks += u64::from(lost[i]);
        let chunk = if !stores_coded(coded_len, raw_len) || lost[i] {
            Chunk {
                hash: digests[k].expect("missing blocks have digests").to_vec(),
                codec: "none".into(),
                codec_hash: Vec::new(),
                raw_len: raw_len as u32,
                payload: raw_data.slice(raw_span),
            }
        } else {
            Chunk {
                hash: digests[k].expect("missing blocks have digests").to_vec(),
                codec: plugin.name.clone(),
                codec_hash: plugin.hash.to_vec(),
                raw_len: raw_len as u32,
                payload: coded_data.slice(coded_span),
            }
        };
        totals.codec_in_bytes += raw_len as u64;
        totals.codec_out_bytes += chunk.payload.len() as u64;
        chunks.push(chunk);
    }
    sh.clock
        .time("transfer", || sh.link.store(StoreChunks { chunks }))?;
    // The raw batch's buffer goes back to the analysts unless a link
    // still holds a slice of it (one that sends later). It comes back as
    // the same allocation (its bytes moved onto themselves, which glibc's
    // memmove skips).
    if let Ok(unique) = raw_data.try_into_mut() {
        buffers.give(Vec::from(unique));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pooled_buffer_serves_a_larger_batch_than_the_one_before() {
        let pool = Buffers::new(2, 4 << 10);
        let small = pool.take(1 << 10);
        assert_eq!(small.len(), 1 << 10);
        let at = small.as_ptr();
        pool.give(small);
        // A batch of four blocks after one of one: the same allocation.
        let mut whole = pool.take(4 << 10);
        assert_eq!((whole.len(), whole.as_ptr()), (4 << 10, at));
        assert!(
            whole[1 << 10..].iter().all(|&b| b == 0),
            "zeroed beyond the last batch"
        );
        whole[0] = 7;
        pool.give(whole);
        // Not zeroed where the last batch was: the read overwrites it.
        let again = pool.take(2 << 10);
        assert_eq!((again[0], again.as_ptr()), (7, at));
        pool.give(again);
        let gathered = pool.take_empty(2 << 10);
        assert_eq!((gathered.len(), gathered.as_ptr()), (0, at));
        assert!(gathered.capacity() >= 4 << 10);
        pool.give(gathered);
    }

    #[test]
    fn batches_follow_runs_and_size() {
        let g = Geometry {
            disk_size: 10 * 1024,
            block_size: 1024,
        };
        use BlockPlan::*;
        let plan = [
            Read, Read, Read, Hole, Read, Unchanged, Read, Read, Read, Read,
        ];
        let b = batches(&plan, &g, 2048);
        let spans: Vec<(u64, u64)> = b.iter().map(|s| (s.first, s.count)).collect();
        assert_eq!(spans, vec![(0, 2), (2, 1), (4, 1), (6, 2), (8, 2)]);
    }

    #[test]
    fn zero_test_sees_a_single_set_byte() {
        let mut b = vec![0u8; 4096 + 7];
        assert!(is_zero(&b));
        b[4100] = 1;
        assert!(!is_zero(&b));
        b[4100] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
    }
}
