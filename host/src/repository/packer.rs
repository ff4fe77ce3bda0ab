//! Staging packs: the chunks this process's writers send, appended to packs
//! in a staging folder until a commit (or an abort) publishes them.
//!
//! One packer serves every writer of a repository in the process, so that
//! tasks running side by side store a chunk they share once: the second
//! sender finds it staged and skips it. Publishing takes every staged pack,
//! so whichever writer commits first also publishes what the others sent;
//! `Repository::publish_staged` orders this so that no manifest appears
//! before the packs its chunks lie in.
//!
//! Records are gathered in memory and written in runs of 2 MiB past the
//! page cache (`crate::unbuffered`) by the packer's writer thread; a pack's
//! last run is written when it is sealed or taken for a publish.
//!
//! Publish order (what makes a killed process harmless): each pack is made
//! durable (`fdatasync`, after its runs are written) and
//! renamed into `packs/`, the directories are synced, then its index file is
//! written, synced and renamed into `index/`. A process killed before the
//! index appears leaves a pack nobody reads (space for a future garbage
//! collection), never an index that points at nothing.

use super::index::ChunkSet;
use super::pack::{self, IndexEntry, PACK_TARGET};
use super::writer::sync_dir;
use super::{RepositoryError, hex, io_err};
use crate::unbuffered::{ALIGN, aligned_start, open_direct, write_piece};
use crate::writeback::WriteBack;
use arca_transport::ChunkHash;
use crossbeam_channel::Sender;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Packs open for appending at once: one per worker a task has by default.
const LANES: usize = 2;

/// Bytes a pack gathers in memory before one unbuffered write (a multiple
/// of `ALIGN`). Records are copied into it under the packer's lock, which
/// costs microseconds; a write into the page cache cost far more on the
/// machines measured (see `crate::unbuffered`), which is why packs are
/// written past it.
const RUN: usize = 2 << 20;

/// Full runs waiting for the writer thread; a coder that finds the queue
/// full waits (the device is then what bounds the backup).
const QUEUED_RUNS: usize = 4;

/// Spare run buffers kept for the next runs (each is `RUN + ALIGN` bytes):
/// a fresh one is faulted in page by page.
const SPARE_RUNS: usize = LANES + QUEUED_RUNS + 1;

/// Under its lock only bookkeeping and copies into memory happen (no I/O
/// but creating a pack), so that the workers' dedup queries never wait for
/// a write: a run that fills is written after, on the writer thread.
pub(super) struct Packer {
    staging: PathBuf,
    _lock: File,
    /// Size at which a pack is sealed (`PACK_TARGET`; smaller in tests).
    target: u64,
    /// Packs taking records. More than one, because the kernel writes to
    /// one file under its inode lock, so two workers writing into the same
    /// pack take turns: with one pack the transfer stage's busy time in a
    /// full backup was up to 1.7× that of a file per chunk, and kernel
    /// profiles showed the writers spinning on the lock.
    lanes: [Option<StagedPack>; LANES],
    sealed: Vec<StagedPack>,
    /// Chunks in staged packs, written or being written, not yet indexed.
    in_flight: ChunkSet,
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
    write_back: Arc<WriteBack>,
    /// Full runs go to a thread of their own: an unbuffered write returns
    /// only when the device has the bytes, and a coder that waited for it
    /// left its core idle (a fifth of its time in a full backup).
    writer: Option<(Sender<Flush>, JoinHandle<()>)>,
}

pub(super) struct StagedPack {
    pub id: String,
    /// Open while the pack takes records; a sealed pack lets it go (once
    /// its last write is done), so that a long session between commits
    /// does not hold descriptors per pack, and its publish opens it again.
    file: Option<Arc<PackFile>>,
    len: u64,
    /// The records after the last full run, not written yet: the pack's
    /// bytes from `len - run.len` (a multiple of `RUN`) to `len`.
    run: Option<Run>,
    pub entries: Vec<IndexEntry>,
    writes: Arc<Writes>,
}

/// A staged pack's descriptors: one unbuffered where the filesystem allows
/// it, and an ordinary one for what it refuses.
struct PackFile {
    path: PathBuf,
    direct: Option<File>,
    buffered: Arc<File>,
    /// Set once the filesystem refused an unbuffered write into it.
    refused: AtomicBool,
}

impl PackFile {
    fn create(path: PathBuf) -> io::Result<Self> {
        let buffered = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let direct = open_direct(&path);
        Ok(Self {
            path,
            direct,
            buffered: Arc::new(buffered),
            refused: AtomicBool::new(false),
        })
    }
}

/// Bytes gathered for one write, from the first aligned byte of `buf`.
struct Run {
    buf: Vec<u8>,
    len: usize,
}

impl Run {
    fn bytes_mut(&mut self) -> &mut [u8] {
        let at = aligned_start(&self.buf);
        &mut self.buf[at..at + RUN]
    }
}

/// Writes into one pack that are due and not finished, and the first that
/// failed: a pack is published only when the first is zero and there is no
/// second.
#[derive(Default)]
struct Writes {
    outstanding: AtomicUsize,
    failed: Mutex<Option<String>>,
}

impl Writes {
    fn has_failed(&self) -> bool {
        self.failed.lock().expect("pack writes lock").is_some()
    }
}

/// A run of a staged pack to write, outside the packer's lock.
pub(super) struct Flush {
    file: Arc<PackFile>,
    run: Option<Run>,
    offset: u64,
    writes: Arc<Writes>,
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
    write_back: Arc<WriteBack>,
}

impl Flush {
    /// Writes the run. A pack's last run is written padded with zeros to
    /// `ALIGN` (its publish cuts the file to its records' end).
    pub fn write(mut self) -> Result<(), RepositoryError> {
        let mut run = self.run.take().expect("a flush writes once");
        let len = run.len;
        let padded = len.next_multiple_of(ALIGN as usize);
        let bytes = run.bytes_mut();
        bytes[len..padded].fill(0);
        let f = &self.file;
        // Without an unbuffered descriptor, the ordinary one serves as both
        // and `write_piece` goes straight to it.
        let mut refused = f.direct.is_none() || f.refused.load(Ordering::Relaxed);
        let direct = f.direct.as_ref().unwrap_or(&f.buffered);
        let result = write_piece(
            direct,
            &f.buffered,
            &bytes[..padded],
            self.offset,
            &mut refused,
        );
        f.refused.store(refused, Ordering::Relaxed);
        self.give_back(run);
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.write_back
                    .range(&f.buffered, self.offset, padded as u64);
                Ok(())
            }
            Err(e) => {
                let mut failed = self.writes.failed.lock().expect("pack writes lock");
                failed.get_or_insert_with(|| e.to_string());
                Err(io_err(&f.path)(e))
            }
        }
    }

    fn give_back(&self, run: Run) {
        let mut spare = self.spare.lock().expect("spare runs lock");
        if spare.len() < SPARE_RUNS {
            spare.push(run.buf);
        }
    }
}

impl Drop for Flush {
    // Also when never written (a panic, an error before), so that a
    // publish never waits for a write that will not come; the pack then
    // counts as failed.
    fn drop(&mut self) {
        if self.run.take().is_some() {
            let mut failed = self.writes.failed.lock().expect("pack writes lock");
            failed.get_or_insert_with(|| "a run was never written".into());
        }
        self.writes.outstanding.fetch_sub(1, Ordering::Release);
    }
}

impl Packer {
    pub fn new(staging_root: &Path) -> Result<Self, RepositoryError> {
        Self::with_target(staging_root, PACK_TARGET)
    }

    pub fn with_target(staging_root: &Path, target: u64) -> Result<Self, RepositoryError> {
        let name = format!("{}-{}", std::process::id(), hex(&rand::random::<[u8; 6]>()));
        let staging = staging_root.join(name);
        std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        let lock_path = staging.join("lock");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        // The lock (`flock`) lives as long as this packer, which is how
        // `sweep` tells a live one from a dead one.
        lock.try_lock()
            .map_err(|e| io_err(&lock_path)(io::Error::from(e)))?;
        let (tx, rx) = crossbeam_channel::bounded::<Flush>(QUEUED_RUNS);
        let thread = std::thread::Builder::new()
            .name("arca-pack-writer".into())
            .spawn(move || {
                for f in rx {
                    // A failure is recorded in its pack, and its publish
                    // reports it.
                    let _ = f.write();
                }
            })
            .map_err(io_err(&staging))?;
        Ok(Self {
            staging,
            _lock: lock,
            target,
            lanes: Default::default(),
            sealed: Vec::new(),
            in_flight: ChunkSet::default(),
            spare: Arc::default(),
            write_back: Arc::new(WriteBack::start()),
            writer: Some((tx, thread)),
        })
    }

    /// Where full runs go to be written (see `writer`).
    pub fn writer(&self) -> Sender<Flush> {
        self.writer
            .as_ref()
            .expect("writer lives as long as the packer")
            .0
            .clone()
    }

    pub fn staging(&self) -> &Path {
        &self.staging
    }

    pub fn holds(&self, hash: &ChunkHash) -> bool {
        self.in_flight.contains(hash)
    }

    /// Appends a chunk record (`prefix` then `payload`) unless the chunk is
    /// already staged (`None`); returns the runs it filled, for the caller
    /// to write once it has let the lock go.
    pub fn append(
        &mut self,
        hash: &ChunkHash,
        prefix: &[u8],
        payload: &[u8],
    ) -> Result<Option<Vec<Flush>>, RepositoryError> {
        if self.in_flight.contains(hash) {
            return Ok(None);
        }
        let len = (prefix.len() + payload.len()) as u64;
        let record_len = u32::try_from(len).map_err(|_| RepositoryError::Chunk {
            hash: hex(hash),
            reason: format!(
                "a record of {len} bytes does not fit a pack index entry (4 GiB at most)"
            ),
        })?;
        let mut flushes = Vec::new();
        // A pack whose write failed takes nothing more: it will not be
        // published, and what it holds is forgotten (sent again) then.
        for lane in 0..LANES {
            if self.lanes[lane]
                .as_ref()
                .is_some_and(|p| p.writes.has_failed())
            {
                flushes.extend(self.seal(lane));
            }
        }
        // A lane whose pack nobody is writing, else the least busy.
        let lane = (0..LANES)
            .min_by_key(|&l| {
                self.lanes[l]
                    .as_ref()
                    .map_or(0, |p| p.writes.outstanding.load(Ordering::Relaxed))
            })
            .expect("at least one lane");
        if self.lanes[lane].is_none() {
            let id = hex(&rand::random::<[u8; 16]>());
            let path = staged_path(&self.staging, &id);
            let file = PackFile::create(path.clone()).map_err(io_err(&path))?;
            self.lanes[lane] = Some(StagedPack {
                id,
                file: Some(Arc::new(file)),
                len: 0,
                run: None,
                entries: Vec::new(),
                writes: Arc::default(),
            });
        }
        let pack = self.lanes[lane].as_mut().expect("an open pack");
        pack.entries.push(IndexEntry {
            hash: *hash,
            offset: pack.len,
            len: record_len,
        });
        for mut bytes in [prefix, payload] {
            while !bytes.is_empty() {
                let run = pack.run.get_or_insert_with(|| Run {
                    buf: take_spare(&self.spare),
                    len: 0,
                });
                let n = bytes.len().min(RUN - run.len);
                let at = run.len;
                run.bytes_mut()[at..at + n].copy_from_slice(&bytes[..n]);
                run.len += n;
                pack.len += n as u64;
                bytes = &bytes[n..];
                if run.len == RUN {
                    let full = pack.run.take().expect("the run just filled");
                    flushes.push(flush(pack, full, &self.spare, &self.write_back));
                }
            }
        }
        self.in_flight.insert(*hash);
        if pack.len >= self.target {
            flushes.extend(self.seal(lane));
        }
        Ok(Some(flushes))
    }

    /// Moves a lane's pack to the sealed ones; returns the write of its
    /// last run.
    fn seal(&mut self, lane: usize) -> Option<Flush> {
        let mut pack = self.lanes[lane].take()?;
        // A failed pack is never published: its last run is not worth a write.
        let last = pack
            .run
            .take()
            .filter(|_| !pack.writes.has_failed())
            .map(|run| flush(&pack, run, &self.spare, &self.write_back));
        pack.file = None;
        self.sealed.push(pack);
        last
    }

    /// Every staged pack, for publishing, and the writes of their last
    /// runs, to be done before; appends go to new packs after.
    pub fn take(&mut self) -> (Vec<StagedPack>, Vec<Flush>) {
        let flushes = (0..LANES).filter_map(|lane| self.seal(lane)).collect();
        (std::mem::take(&mut self.sealed), flushes)
    }

    /// Published (or failed) packs are no longer staged.
    pub fn forget(&mut self, packs: &[StagedPack]) {
        for p in packs {
            for e in &p.entries {
                self.in_flight.remove(&e.hash);
            }
        }
    }
}

/// The write of `run`, the pack's bytes that end at its current length.
fn flush(
    pack: &StagedPack,
    run: Run,
    spare: &Arc<Mutex<Vec<Vec<u8>>>>,
    write_back: &Arc<WriteBack>,
) -> Flush {
    pack.writes.outstanding.fetch_add(1, Ordering::Relaxed);
    Flush {
        file: pack.file.clone().expect("an open pack has its file"),
        offset: pack.len - run.len as u64,
        run: Some(run),
        writes: pack.writes.clone(),
        spare: spare.clone(),
        write_back: write_back.clone(),
    }
}

fn take_spare(spare: &Mutex<Vec<Vec<u8>>>) -> Vec<u8> {
    spare
        .lock()
        .expect("spare runs lock")
        .pop()
        .unwrap_or_else(|| vec![0u8; RUN + ALIGN as usize])
}

impl Drop for Packer {
    fn drop(&mut self) {
        if let Some((tx, thread)) = self.writer.take() {
            drop(tx);
            let _ = thread.join();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.staging)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("could not remove staging {}: {e}", self.staging.display());
        }
    }
}

/// Where a pack lies until its publish.
fn staged_path(staging: &Path, id: &str) -> PathBuf {
    staging.join(format!("{id}.pack"))
}

pub(super) fn pack_path(root: &Path, id: &str) -> PathBuf {
    root.join("packs").join(&id[..2]).join(format!("{id}.pack"))
}

pub(super) fn index_path(root: &Path, id: &str) -> PathBuf {
    root.join("index").join(format!("{id}.idx"))
}

/// Makes staged packs durable and visible, in the order the module doc
/// gives; returns the ones it published and, if a write into one of the
/// others failed, that failure. A pack one of whose writes failed is left
/// out (its chunks are then sent again), so that one failed write does not
/// keep every other pack from its publish.
pub(super) fn publish<'p>(
    root: &Path,
    staging: &Path,
    packs: &'p [StagedPack],
) -> Result<(Vec<&'p StagedPack>, Option<RepositoryError>), RepositoryError> {
    // Runs due before the packs were taken are written in moments.
    for p in packs {
        while p.writes.outstanding.load(Ordering::Acquire) > 0 {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
    let (healthy, failed): (Vec<&StagedPack>, Vec<&StagedPack>) =
        packs.iter().partition(|p| !p.writes.has_failed());
    let mut failure = None;
    for p in failed {
        let staged = staged_path(staging, &p.id);
        let why = p.writes.failed.lock().expect("pack writes lock").clone();
        let why = why.unwrap_or_default();
        tracing::warn!(
            "staged pack {} not published, a write into it failed: {why}",
            staged.display(),
        );
        let _ = std::fs::remove_file(&staged);
        failure.get_or_insert(RepositoryError::Io {
            path: staged,
            source: io::Error::other(format!("writing a staged pack: {why}")),
        });
    }
    // `packs/` itself too: another process may have made a fan-out folder
    // this one uses and not synced it yet.
    let mut dirs = BTreeSet::from([root.join("packs")]);
    for p in &healthy {
        let staged = staged_path(staging, &p.id);
        // The last run was written padded to `ALIGN`: cut it to the end of
        // the last record, so that a pack holds its records and nothing else.
        // Shorter than its records would mean a run never written (which
        // the write count rules out): cutting would then fill it with zeros.
        OpenOptions::new()
            .write(true)
            .open(&staged)
            .and_then(|f| {
                let on_disk = f.metadata()?.len();
                if on_disk < p.len {
                    return Err(io::Error::other(format!(
                        "holds {on_disk} bytes, its records end at {}",
                        p.len
                    )));
                }
                f.set_len(p.len)?;
                f.sync_data()
            })
            .map_err(io_err(&staged))?;
        let dest = pack_path(root, &p.id);
        let parent = dest.parent().expect("pack path has a parent");
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        std::fs::rename(&staged, &dest).map_err(io_err(&dest))?;
        dirs.insert(parent.to_owned());
    }
    for d in &dirs {
        sync_dir(d)?;
    }
    let index_dir = root.join("index");
    let mut tmps = Vec::with_capacity(healthy.len());
    for p in &healthy {
        let tmp = staging.join(format!("{}.idx", p.id));
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        io::Write::write_all(&mut f, &pack::encode_index(&p.entries))
            .and_then(|()| f.sync_all())
            .map_err(io_err(&tmp))?;
        tmps.push((tmp, index_path(root, &p.id)));
    }
    for (tmp, dest) in &tmps {
        std::fs::rename(tmp, dest).map_err(io_err(dest))?;
    }
    sync_dir(&index_dir)?;
    Ok((healthy, failure))
}

/// A pack id as arca makes them: 32 lowercase hex digits (anything else in
/// `index/` is not arca's and is left alone).
pub(super) fn is_pack_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::super::chunk::{ChunkHeader, StoredChunk};
    use super::*;

    fn record(byte: u8) -> (ChunkHash, Vec<u8>, Vec<u8>) {
        let payload = vec![byte; 3000 + usize::from(byte)];
        let hash = *blake3::hash(&payload).as_bytes();
        let prefix = StoredChunk::prefix(&ChunkHeader {
            codec: "none".into(),
            codec_hash: Vec::new(),
            raw_len: payload.len() as u32,
            payload_len: payload.len() as u32,
        });
        (hash, prefix, payload)
    }

    fn stage(p: &mut Packer, byte: u8) -> ChunkHash {
        let (hash, prefix, payload) = record(byte);
        append(p, &hash, &prefix, &payload);
        hash
    }

    /// Appends a record and writes the runs it filled, as `stage_chunk`
    /// does (here on the caller's thread).
    fn append(p: &mut Packer, hash: &ChunkHash, prefix: &[u8], payload: &[u8]) {
        for f in p
            .append(hash, prefix, payload)
            .unwrap()
            .expect("not staged yet")
        {
            f.write().unwrap();
        }
    }

    /// A repository folder and a packer that seals packs at `target`.
    fn packer(target: u64) -> (tempfile::TempDir, Packer) {
        let dir = tempfile::tempdir().unwrap();
        repository(dir.path());
        let p = Packer::with_target(&dir.path().join("staging"), target).unwrap();
        (dir, p)
    }

    /// As a publish does: the packs, with their last runs written.
    fn take(p: &mut Packer) -> Vec<StagedPack> {
        let (packs, last_runs) = p.take();
        for f in last_runs {
            let _ = f.write();
        }
        packs
    }

    fn repository(dir: &Path) {
        for sub in ["packs", "index", "staging"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
    }

    #[test]
    fn small_packs_are_sealed_and_each_is_published_with_its_index() {
        let (dir, mut p) = packer(10_000);
        let root = dir.path();
        let hashes: Vec<ChunkHash> = (0..10).map(|i| stage(&mut p, i)).collect();
        assert!(
            p.append(&hashes[0], b"", b"x").unwrap().is_none(),
            "staged once"
        );
        assert!(p.holds(&hashes[9]));
        let packs = take(&mut p);
        assert!(packs.len() >= 3, "{} packs", packs.len());
        let (published, failure) = publish(root, p.staging(), &packs).unwrap();
        assert!(failure.is_none());
        assert_eq!(published.len(), packs.len());
        let mut found = Vec::new();
        for pack in &packs {
            let bytes = std::fs::read(pack_path(root, &pack.id)).unwrap();
            let entries =
                pack::decode_index(&std::fs::read(index_path(root, &pack.id)).unwrap()).unwrap();
            assert_eq!(entries, pack.entries);
            let end = entries.last().map_or(0, |e| e.offset + u64::from(e.len));
            assert_eq!(
                bytes.len() as u64,
                end,
                "records back to back, nothing else"
            );
            for e in entries {
                let rec = &bytes[e.offset as usize..][..e.len as usize];
                let (_, payload) = StoredChunk::parse_in_place(rec).unwrap();
                assert_eq!(blake3::hash(&rec[payload]).as_bytes(), &e.hash);
                found.push(e.hash);
            }
        }
        found.sort();
        let mut want = hashes.clone();
        want.sort();
        assert_eq!(found, want);
        p.forget(&packs);
        assert!(!p.holds(&hashes[9]));
    }

    #[test]
    fn a_pack_with_a_failed_write_is_left_out_and_the_others_are_published() {
        let (dir, mut p) = packer(u64::MAX);
        let root = dir.path();
        let lost = stage(&mut p, 1);
        let failing = p.lanes[0].as_ref().unwrap();
        let failed_id = failing.id.clone();
        // As `Flush::write` records an I/O error (no space, ...).
        *failing.writes.failed.lock().unwrap() = Some("injected".into());
        // With no write outstanding the first lane would take the next
        // record: it must not, having failed.
        let kept = stage(&mut p, 2);
        let packs = take(&mut p);
        assert_eq!(packs.len(), 2, "the failed pack took nothing more");
        assert_eq!(packs.iter().map(|p| p.entries.len()).sum::<usize>(), 2);
        let (published, failure) = publish(root, p.staging(), &packs).unwrap();
        assert_eq!(published.len(), 1);
        let failure = failure.expect("the failed write is reported").to_string();
        assert!(failure.contains("injected"), "{failure}");
        assert_eq!(published[0].entries[0].hash, kept);
        assert!(pack_path(root, &published[0].id).exists());
        assert!(!pack_path(root, &failed_id).exists());
        assert!(!index_path(root, &failed_id).exists());
        assert!(!p.staging().join(format!("{failed_id}.pack")).exists());
        p.forget(&packs);
        assert!(!p.holds(&lost), "sent again by whoever needs it");
    }

    #[test]
    fn records_that_cross_runs_come_back_whole_and_the_pack_ends_at_the_last() {
        let (dir, mut p) = packer(u64::MAX);
        let root = dir.path();
        // Odd sizes, so that records straddle runs at every offset; about
        // 3.5 runs in all, so that the last one is partial.
        let mut want = Vec::new();
        for i in 0..10u32 {
            let payload: Vec<u8> = (0..700_001 + i * 13)
                .map(|j| (j.wrapping_mul(2_654_435_761) >> (i % 7)) as u8)
                .collect();
            let hash = *blake3::hash(&payload).as_bytes();
            let prefix = format!("record {i}").into_bytes();
            append(&mut p, &hash, &prefix, &payload);
            want.push((hash, [prefix, payload].concat()));
        }
        let packs = take(&mut p);
        let (published, failure) = publish(root, p.staging(), &packs).unwrap();
        assert!(failure.is_none());
        assert_eq!(published.len(), packs.len());
        let mut seen = 0;
        for pack in &packs {
            let bytes = std::fs::read(pack_path(root, &pack.id)).unwrap();
            assert_eq!(bytes.len() as u64, pack.len, "padding cut at publish");
            for e in &pack.entries {
                let (_, record) = want.iter().find(|(h, _)| *h == e.hash).unwrap();
                assert_eq!(
                    &bytes[e.offset as usize..][..e.len as usize],
                    &record[..],
                    "record at {}",
                    e.offset
                );
                seen += 1;
            }
        }
        assert_eq!(seen, want.len());
        assert!(packs.iter().any(|p| p.len > 3 * RUN as u64), "crossed runs");
    }

    #[test]
    fn a_pack_without_unbuffered_writes_goes_through_the_page_cache_the_same() {
        let (dir, mut p) = packer(u64::MAX);
        let root = dir.path();
        let first = stage(&mut p, 1);
        // As on a filesystem that refuses O_DIRECT at open (FUSE, say).
        let lane = p.lanes[0].as_mut().unwrap();
        let path = staged_path(p.staging.as_path(), &lane.id);
        lane.file = Some(Arc::new(PackFile {
            direct: None,
            buffered: Arc::new(OpenOptions::new().write(true).open(&path).unwrap()),
            refused: AtomicBool::new(false),
            path,
        }));
        let big: Vec<u8> = (0..3 * RUN as u32 + 5).map(|j| (j % 251) as u8).collect();
        let hash = *blake3::hash(&big).as_bytes();
        append(&mut p, &hash, b"big", &big);
        let packs = take(&mut p);
        assert_eq!(packs.len(), 1);
        let (published, failure) = publish(root, p.staging(), &packs).unwrap();
        assert!(failure.is_none());
        assert_eq!(published.len(), 1);
        let bytes = std::fs::read(pack_path(root, &packs[0].id)).unwrap();
        assert_eq!(bytes.len() as u64, packs[0].len);
        let e = &packs[0].entries;
        assert_eq!((e[0].hash, e[1].hash), (first, hash));
        let rec = &bytes[e[1].offset as usize..][..e[1].len as usize];
        assert_eq!(&rec[..3], b"big");
        assert!(rec[3..] == big[..], "the record that crossed runs");
    }
}
