//! Verify: reads every manifest and every chunk they reference, decodes each
//! chunk and checks it against its address, and names what is damaged and
//! which restore points it hurts. Repair takes the damaged copies out of the
//! repository, so that the next backup stores those chunks again.

use crate::repository::lock::RepoLock;
use crate::repository::pack::IndexEntry;
use crate::repository::repair::DroppedCopy;
use crate::repository::{Repository, hex, manifest};
use crate::restore::decoder::{CodecBank, Decoder, RecordError};
use arca_transport::{ChunkHash, HASH_LEN};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub restore_points: usize,
    pub chunks_checked: usize,
    pub damaged_manifests: Vec<DamagedFile>,
    /// Pack index files that cannot be read (their chunks then show as
    /// missing in `damaged_chunks`).
    pub damaged_indexes: Vec<DamagedFile>,
    pub damaged_chunks: Vec<DamagedChunk>,
}

/// A manifest or pack index that cannot be read, and why.
#[derive(Debug, Serialize)]
pub struct DamagedFile {
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct DamagedChunk {
    /// Its address (reports spell it in hex, as `hash`).
    #[serde(rename = "hash", serialize_with = "in_hex")]
    pub address: ChunkHash,
    pub reason: String,
    /// Restore points (`job/vm/disk@point`) that reference the chunk.
    pub restore_points: Vec<String>,
    /// Its stored bytes are absent or wrong (`ChunkError::damaged`): what
    /// repair may take out. Not so when they could not be judged.
    #[serde(skip)]
    pub judged: bool,
}

fn in_hex<S: serde::Serializer>(address: &ChunkHash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(address))
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damaged_manifests.is_empty()
            && self.damaged_indexes.is_empty()
            && self.damaged_chunks.is_empty()
    }
}

pub fn verify(
    repo: &Repository,
    bank: &CodecBank,
    workers: usize,
) -> Result<VerifyReport, crate::repository::RepositoryError> {
    let (mut report, items) = references(repo)?;
    report.damaged_chunks = check(bank, workers, &items);
    Ok(report)
}

/// What `repair` did, and the verify report of the repository after it.
#[derive(Debug, Serialize)]
pub struct RepairReport {
    /// Damaged pack index files written anew from their packs.
    pub rebuilt: Vec<RebuiltIndex>,
    /// Damaged copies taken out of the repository.
    pub dropped: Vec<DroppedCopy>,
    /// Why nothing was mended although verify found something to mend
    /// (the repository was in use).
    pub not_repaired: Option<String>,
    /// Verify after the repair: the chunks dropped read as missing here
    /// until a backup stores them again.
    pub after: VerifyReport,
}

/// A pack index file written anew from the records of its pack.
#[derive(Debug, Serialize)]
pub struct RebuiltIndex {
    pub file: String,
    /// Records that decode to their address: now indexed.
    pub chunks: usize,
    /// Places that looked like records but are not whole chunks.
    pub skipped: usize,
}

/// Writes every damaged pack index anew from its pack: each record found
/// there (`Repository::scan_pack`) that decodes is indexed under the
/// address of what it decodes to. A pack that cannot be read keeps its
/// damaged index (verify goes on naming it).
fn rebuild_indexes(
    repo: &Repository,
    bank: &CodecBank,
    lock: &RepoLock,
) -> Result<Vec<RebuiltIndex>, crate::repository::RepositoryError> {
    let mut decoder = Decoder::new(bank.clone());
    let mut rebuilt = Vec::new();
    let mut written = Vec::new();
    for (file, _) in repo.damaged_indexes() {
        let Some(id) = file.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let pack = match repo.scan_pack(id) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot rebuild {}: {e}", file.display());
                continue;
            }
        };
        let mut entries: Vec<IndexEntry> = Vec::new();
        let mut skipped = 0;
        let mut no_codec = None;
        // Every candidate that decodes is indexed, under the address of what
        // it decodes to: one that is not really a record of this pack (arca
        // bytes inside a block stored as it is) is still those bytes, so
        // indexing it is harmless, while skipping a real one would lose it.
        for r in &pack.records {
            match decoder.record_address(&r.header, pack.payload(r)) {
                Ok(hash) => entries.push(IndexEntry {
                    hash,
                    offset: r.offset,
                    len: r.len,
                }),
                Err(RecordError::Damaged(_)) => skipped += 1,
                Err(e @ RecordError::NoCodec(_)) => no_codec = Some(e),
            }
        }
        // Records left out of an index are dead bytes to prune: none may
        // be left out only because its codec is missing (which a candidate
        // inside a stored block, naming another repository's codec, can
        // also cause: the index then stays as it is, and verify names it).
        if let Some(e) = no_codec {
            tracing::warn!("not rebuilding {}: a record {e}", file.display());
            continue;
        }
        rebuilt.push(RebuiltIndex {
            file: file.display().to_string(),
            chunks: entries.len(),
            skipped,
        });
        written.push((id.to_owned(), entries));
    }
    repo.rewrite_indexes(lock, &written)?;
    Ok(rebuilt)
}

/// Verify, then mend what it found: damaged pack index files are written
/// anew from their packs, and every damaged chunk copy that reads find is
/// taken out of the repository (`Repository::drop_copies`) and the chunk
/// checked again, until none of them reads damaged: each is then whole
/// (another copy) or missing, which the next backup of a disk that still
/// holds its data mends.
///
/// The verify, which reads every chunk and may take hours, runs under the
/// shared lock, beside sessions; only the mending takes the exclusive lock
/// (`Busy` while a session runs), and checks what it acts on again under
/// it, since sessions may have stored chunks meanwhile.
pub fn repair(
    repo: &Repository,
    bank: &CodecBank,
    workers: usize,
) -> Result<RepairReport, crate::repository::RepositoryError> {
    let (mut after, items) = {
        let _reading = repo.read_lock()?;
        let (mut report, items) = references(repo)?;
        report.damaged_chunks = check(bank, workers, &items);
        (report, items)
    };
    let mut done = RepairReport {
        rebuilt: Vec::new(),
        dropped: Vec::new(),
        not_repaired: None,
        after: VerifyReport::default(),
    };
    // Something to mend: an index to write anew, or a damaged copy that is
    // there to take out (a chunk that is missing already is not).
    let to_mend = !after.damaged_indexes.is_empty()
        || after
            .damaged_chunks
            .iter()
            .any(|c| c.judged && repo.chunk_record(&c.address).is_some());
    if !to_mend {
        done.after = after;
        return Ok(done);
    }
    let lock = match repo.repair_lock() {
        Ok(lock) => lock,
        // What verify found is still worth its report (the repository is
        // in use, or its lock cannot be taken for writing).
        Err(e) => {
            done.not_repaired = Some(e.to_string());
            done.after = after;
            return Ok(done);
        }
    };
    done.rebuilt = rebuild_indexes(repo, bank, &lock)?;
    after.damaged_indexes = damaged_index_files(repo);
    let found: std::collections::HashSet<ChunkHash> =
        after.damaged_chunks.iter().map(|c| c.address).collect();
    let suspects: Vec<Item> = items
        .into_iter()
        .filter(|(h, _, _)| found.contains(h))
        .collect();
    after.damaged_chunks = check(bank, workers, &suspects);
    loop {
        let damaged: Vec<ChunkHash> = after
            .damaged_chunks
            .iter()
            .filter(|c| c.judged)
            .map(|c| c.address)
            .collect();
        let now = repo.drop_copies(&lock, &damaged)?;
        // Each round takes at least one copy out, so this ends.
        if now.is_empty() {
            break;
        }
        done.dropped.extend(now);
        let damaged: std::collections::HashSet<ChunkHash> = damaged.into_iter().collect();
        let again: Vec<_> = suspects
            .iter()
            .filter(|(h, _, _)| damaged.contains(h))
            .cloned()
            .collect();
        after.damaged_chunks = check(bank, workers, &again);
    }
    done.after = after;
    Ok(done)
}

/// Pack index files the repository's index could not read, and why.
fn damaged_index_files(repo: &Repository) -> Vec<DamagedFile> {
    repo.damaged_indexes()
        .into_iter()
        .map(|(path, reason)| DamagedFile {
            path: path.display().to_string(),
            reason,
        })
        .collect()
}

/// A referenced chunk: its address, raw length and the points using it.
type Item = (ChunkHash, u32, Vec<String>);

/// Reads every manifest: the report so far (points, damaged manifests and
/// index files) and every chunk they reference.
fn references(
    repo: &Repository,
) -> Result<(VerifyReport, Vec<Item>), crate::repository::RepositoryError> {
    let mut report = VerifyReport {
        damaged_indexes: damaged_index_files(repo),
        ..Default::default()
    };
    // chunk -> (raw length, restore points that use it)
    let mut refs: BTreeMap<ChunkHash, (u32, Vec<String>)> = BTreeMap::new();
    for path in repo.manifest_paths()? {
        let m = match manifest::read(&path) {
            Ok(m) => m,
            Err(e) => {
                report.damaged_manifests.push(DamagedFile {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        report.restore_points += 1;
        let name = format!("{}/{}/{}@{}", m.job, m.vm, m.disk, m.point_id);
        let geometry = crate::extent::Geometry {
            disk_size: m.disk_size,
            block_size: m.block_size,
        };
        for (i, h) in m.block_hashes.chunks_exact(HASH_LEN).enumerate() {
            let hash: ChunkHash = h.try_into().expect("32 bytes");
            if hash == crate::repository::HOLE {
                continue;
            }
            let len = geometry.block_extent(i as u64).length as u32;
            let entry = refs.entry(hash).or_insert_with(|| (len, Vec::new()));
            if entry.1.last() != Some(&name) {
                entry.1.push(name.clone());
            }
        }
    }
    let items: Vec<Item> = refs
        .into_iter()
        .map(|(h, (len, pts))| (h, len, pts))
        .collect();
    report.chunks_checked = items.len();
    Ok((report, items))
}

/// Decodes each chunk of `items` and checks it against its address, on
/// `workers` threads; returns those that fail, sorted.
fn check(bank: &CodecBank, workers: usize, items: &[Item]) -> Vec<DamagedChunk> {
    let next = AtomicUsize::new(0);
    let damaged = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                let mut decoder = Decoder::new(bank.clone());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((hash, len, points)) = items.get(i) else {
                        return;
                    };
                    match decoder.fetch(&[(*hash, *len)]) {
                        Ok(plain) => decoder.recycle(plain),
                        Err(e) => damaged.lock().expect("damaged lock").push(DamagedChunk {
                            address: *hash,
                            reason: e.reason,
                            restore_points: points.clone(),
                            judged: e.damaged,
                        }),
                    }
                }
            });
        }
    });
    let mut damaged = damaged.into_inner().expect("damaged lock");
    damaged.sort_by_key(|c| c.address);
    damaged
}
