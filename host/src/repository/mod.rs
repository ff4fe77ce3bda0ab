//! The repository: content-addressed chunks and restore-point manifests on a
//! local filesystem.
//!
//! Layout (format version 2):
//! ```text
//! arca-repository.json        format, version, id, chunk addressing, encryption
//! packs/ab/<id>.pack          chunk records (header + coded payload), `pack`
//! index/<id>.idx              where each record of pack <id> lies
//! chunks/ab/<hex>             format 1: one chunk per file (still read)
//! codecs/<hex>.wasm           every codec component that coded a chunk
//! points/<job>/<vm>/<disk>/<point>.manifest
//! staging/<process>/          a process's packs until a commit publishes them
//! lock                        the repository lock; its content is the prune generation
//! ```
//! Invariants: a chunk's address is the BLAKE3 of its plaintext, computed by
//! the host; packs, their indexes and codecs are durable before a manifest
//! that references them appears (by atomic rename); an index file never
//! names a pack that is not durable; a staging folder is never read by anyone
//! but its process and is swept when that process is gone. A format-1
//! repository is read as it is and becomes format 2 when a writer first
//! publishes a pack in it (so an older arca refuses it instead of missing
//! chunks).
//!
//! Room for what comes next: `chunk_address` and `encryption` in the format
//! file name the addressing (`blake3`, later `blake3-keyed`) and cipher, and
//! chunk headers carry optional key/nonce fields. Prune (`prune`) takes the
//! repository lock (`lock`, the file `lock`) exclusively while writers and
//! readers hold it shared.

pub mod chunk;
mod index;
pub mod lock;
pub mod manifest;
pub mod pack;
mod packer;
pub mod prune;
pub mod repair;
pub mod retention;
pub mod spans;
pub mod writer;

use arca_transport::{ChunkHash, HASH_LEN, Manifest};
use index::{ChunkIndex, Location};
use packer::Packer;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, RwLock, Weak};

pub use writer::PointWriter;

pub const FORMAT_NAME: &str = "arca-repository";
/// The newest format this arca reads.
pub const FORMAT_VERSION: u32 = PRUNED_FORMAT;
/// Packs and index files; what a repository is made as.
const PACKED_FORMAT: u32 = 2;
/// A repository that has been pruned: arca before the repository lock
/// neither takes it nor knows the generation, and would dedup against
/// chunks a prune deletes, so it must refuse the repository. Set by the
/// first prune, before it deletes anything.
pub(crate) const PRUNED_FORMAT: u32 = 3;
/// Chunk files, one per chunk; read, never written any more.
const LOOSE_FORMAT: u32 = 1;
/// Open pack files kept per repository; beyond this the cache starts over
/// (the process's descriptor limit is shared with sockets and disks).
const OPEN_PACKS: usize = 128;
const FORMAT_FILE: &str = "arca-repository.json";

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("repository {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not an arca repository (no {FORMAT_FILE}); create it with a backup job or pick another path"
    )]
    NotARepository { path: PathBuf },
    #[error(
        "repository {path} has format version {found}; this arca reads up to {FORMAT_VERSION}: upgrade arca"
    )]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("repository {path}: format file is damaged: {reason}")]
    BadFormatFile { path: PathBuf, reason: String },
    #[error("chunk {hash}: {reason}")]
    Chunk { hash: String, reason: String },
    /// A chunk's file or pack is there but could not be read (permissions,
    /// an I/O error): nothing is known about its bytes.
    #[error("chunk {hash}: {source}")]
    ChunkUnreadable { hash: String, source: io::Error },
    #[error("manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error(
        "repository {path} is in use by a session, restore or verify (or a prune or repair): {task} it when that has ended"
    )]
    Busy { path: PathBuf, task: &'static str },
    #[error(
        "cannot open the repository lock {path}: {source}; arca needs to read it (and to create it, the first time) to use the repository: fix its permissions for the user running arca"
    )]
    LockUnavailable { path: PathBuf, source: io::Error },
    #[error("repository {path}: prune refused: {reason}")]
    PruneRefused { path: PathBuf, reason: String },
    #[error("restore point {0} not found")]
    PointNotFound(String),
    #[error("codec component {hash} is not in the repository")]
    CodecMissing { hash: String },
    #[error("restore point {point} references chunk {hash}, which is not in the repository")]
    DanglingReference { point: String, hash: String },
}

fn chunk_io_err(hash: &ChunkHash, e: io::Error) -> RepositoryError {
    if e.kind() == io::ErrorKind::NotFound {
        return RepositoryError::Chunk {
            hash: hex(hash),
            reason: "missing from the repository".into(),
        };
    }
    RepositoryError::ChunkUnreadable {
        hash: hex(hash),
        source: e,
    }
}

/// A failed read of a chunk's record in its pack.
fn pack_read_err(hash: &ChunkHash, e: io::Error) -> RepositoryError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => RepositoryError::Chunk {
            hash: hex(hash),
            reason: "its pack is shorter than its index says (truncated)".into(),
        },
        _ => chunk_io_err(hash, e),
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RepositoryError + '_ {
    move |source| RepositoryError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FormatFile {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub chunk_address: String,
    pub encryption: String,
}

#[derive(Debug, Clone)]
pub struct Repository {
    root: PathBuf,
    pub format: FormatFile,
    shared: Arc<Shared>,
}

/// What every `Repository` of one folder shares in a process: the chunk
/// index and the staging packer (so that tasks side by side store a shared
/// chunk once), and open pack files.
struct Shared {
    root: PathBuf,
    index: RwLock<ChunkIndex>,
    packer: Mutex<Option<Packer>>,
    /// Held while packs are published, so that a commit that finds nothing
    /// left to publish knows every pack taken before it is visible.
    publish: Mutex<()>,
    /// Held from a commit's look at the disk's newest point to its own
    /// manifest, so that two attempts of one task committing at once (an
    /// agent still finishing the first) make one point.
    commit: Mutex<()>,
    files: Mutex<HashMap<u32, Arc<File>>>,
    /// `chunks/` exists: a format-1 repository's chunk files are read too.
    loose: bool,
    /// Restore-point headers read so far, per disk folder, by file name
    /// and identity. A task asks for its disk's points three times (the
    /// snapshot's CBT bitmap, the parent, the commit's "newest"), and each
    /// asking read every point's header. arca never changes a manifest in
    /// place; a file changed or replaced by anyone else has another
    /// identity (inode, length, modification time) and is read again.
    /// Each listing replaces its folder's entries, so removed files leave.
    headers: Mutex<HashMap<PathBuf, HashMap<HeaderKey, Arc<Manifest>>>>,
    /// Manifests found to reference only chunks the repository has, so
    /// that a long-lived agent looks a parent's block list up once, not at
    /// every session. The answer holds while the prune generation does
    /// (a reload clears it).
    complete: Mutex<std::collections::HashSet<PathBuf>>,
    /// The prune generation (`lock`) the index was loaded under.
    generation: Mutex<Option<String>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

type OpenKey = (PathBuf, String);

/// Addresses looked up per hold of the index lock in a commit's check: a
/// publish or refresh waiting for the write lock (which holds up new
/// readers too) then waits for one slice, not for a 1 TiB disk's 4 M.
const LOOKUPS_PER_LOCK: usize = 1 << 16;

/// A manifest file's name and identity: inode, length, modification time.
type HeaderKey = (std::ffi::OsString, u64, u64, i128);
static OPEN: LazyLock<Mutex<HashMap<OpenKey, Weak<Shared>>>> = LazyLock::new(Default::default);

/// The shared state of the repository at `root` whose format file says
/// `id`: a folder removed and made again (a new id) gets a fresh index.
fn shared_for(root: &Path, id: &str) -> Result<Arc<Shared>, RepositoryError> {
    let key = (
        std::fs::canonicalize(root).map_err(io_err(root))?,
        id.to_owned(),
    );
    let mut open = OPEN.lock().expect("open repositories lock");
    open.retain(|_, w| w.strong_count() > 0);
    if let Some(s) = open.get(&key).and_then(Weak::upgrade) {
        return Ok(s);
    }
    let shared = Arc::new(Shared {
        root: root.to_owned(),
        index: RwLock::default(),
        packer: Mutex::new(None),
        publish: Mutex::new(()),
        commit: Mutex::new(()),
        files: Mutex::default(),
        loose: root.join("chunks").is_dir(),
        headers: Mutex::default(),
        complete: Mutex::default(),
        generation: Mutex::default(),
    });
    open.insert(key, Arc::downgrade(&shared));
    Ok(shared)
}

/// A restore point as listed: its manifest and where it lies.
#[derive(Debug, Clone)]
pub struct PointEntry {
    pub manifest: Manifest,
    pub path: PathBuf,
}

/// Appends `len` bytes of `file` from `offset` to `dest`, read straight
/// into its spare capacity: restore moves every payload through here, and
/// zero-filling the room first (what a safe `read_exact_at` needs) cost a
/// pass over all of it.
fn append_at(file: &File, offset: u64, len: usize, dest: &mut Vec<u8>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    dest.reserve(len);
    let start = dest.len();
    let mut done = 0;
    while done < len {
        let spare = &mut dest.spare_capacity_mut()[done..len];
        // SAFETY: pread writes at most `spare.len()` bytes into memory this
        // Vec owns and has reserved; writing to uninitialised bytes through
        // a raw pointer is allowed, and they are counted as initialised
        // (by `set_len` below) only once the kernel reported them written.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += n as usize,
        }
    }
    // SAFETY: the `len` bytes after `start` were written by pread above.
    unsafe { dest.set_len(start + len) };
    Ok(())
}

/// A 64-digit hex name as an address (format-1 chunk file names).
fn parse_hex(name: &str) -> Option<ChunkHash> {
    if name.len() != 2 * HASH_LEN {
        return None;
    }
    let mut out = [0u8; HASH_LEN];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn hex(hash: &[u8]) -> String {
    let mut s = String::with_capacity(hash.len() * 2);
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Repository {
    /// Opens the repository at `path`, creating it when the folder is absent
    /// or empty.
    pub fn open_or_create(path: &Path) -> Result<Self, RepositoryError> {
        let empty = match std::fs::read_dir(path) {
            Ok(mut d) => d.next().is_none(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(io_err(path)(e)),
        };
        if empty {
            Self::create(path)?;
        }
        Self::open(path)
    }

    fn create(path: &Path) -> Result<(), RepositoryError> {
        for sub in ["packs", "index", "codecs", "points", "staging"] {
            std::fs::create_dir_all(path.join(sub)).map_err(io_err(path))?;
        }
        let format = FormatFile {
            format: FORMAT_NAME.into(),
            version: PACKED_FORMAT,
            id: hex(&rand::random::<[u8; 16]>()),
            chunk_address: "blake3".into(),
            encryption: "none".into(),
        };
        let body = serde_json::to_vec_pretty(&format).expect("format file serializes");
        writer::write_atomic(&path.join(FORMAT_FILE), &body, &path.join("staging"))
    }

    pub fn open(path: &Path) -> Result<Self, RepositoryError> {
        let file = path.join(FORMAT_FILE);
        let body = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RepositoryError::NotARepository {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(io_err(&file)(e)),
        };
        let format: FormatFile =
            serde_json::from_slice(&body).map_err(|e| RepositoryError::BadFormatFile {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        if format.format != FORMAT_NAME {
            return Err(RepositoryError::NotARepository {
                path: path.to_owned(),
            });
        }
        if format.version > FORMAT_VERSION {
            return Err(RepositoryError::UnsupportedVersion {
                path: path.to_owned(),
                found: format.version,
            });
        }
        let repo = Self {
            root: path.to_owned(),
            shared: shared_for(path, &format.id)?,
            format,
        };
        repo.refresh()?;
        Ok(repo)
    }

    /// Loads index files published since this process last looked (under
    /// the shared lock: never in the middle of a prune).
    fn refresh(&self) -> Result<(), RepositoryError> {
        self.read_lock().map(drop)
    }

    /// `refresh` for a holder of the shared lock. After a prune (another
    /// generation) what this process knew may be gone: the index, the open
    /// pack files (named by index positions) and the complete-point answers
    /// are dropped and the index is loaded again. The generation's mutex is
    /// held throughout, so no writer of this process starts on a half-loaded
    /// index.
    fn refresh_locked(&self, lock: &lock::RepoLock) -> Result<(), RepositoryError> {
        let generation = lock.generation()?;
        let mut known = self.shared.generation.lock().expect("generation lock");
        if known.as_ref() != Some(&generation) {
            if known.is_some() {
                tracing::info!(
                    "repository {}: pruned or repaired since its index was loaded; loading it again",
                    self.root.display()
                );
                self.shared.files.lock().expect("pack files lock").clear();
                *self.shared.index.write().expect("chunk index lock") = ChunkIndex::default();
                self.shared.complete.lock().expect("complete lock").clear();
            }
            *known = Some(generation);
        }
        let dir = self.root.join("index");
        self.shared
            .index
            .write()
            .expect("chunk index lock")
            .refresh(&dir)
            .map_err(io_err(&dir))
    }

    /// Holds the shared lock for a reader (restore, verify) and brings the
    /// index up to date under it: chunks stay where it says until the
    /// guard is dropped.
    pub fn read_lock(&self) -> Result<lock::RepoLock, RepositoryError> {
        let lock = lock::RepoLock::shared_reading(&self.root)?;
        self.refresh_locked(&lock)?;
        Ok(lock)
    }

    /// `read_lock` for a point writer, which may not go on unlocked.
    fn write_lock(&self) -> Result<lock::RepoLock, RepositoryError> {
        let lock = lock::RepoLock::shared(&self.root)?;
        self.refresh_locked(&lock)?;
        Ok(lock)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a format-1 repository keeps a chunk as a file of its own.
    fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        let h = hex(hash);
        self.root.join("chunks").join(&h[..2]).join(&h)
    }

    pub fn codec_path(&self, hash: &[u8]) -> PathBuf {
        self.root.join("codecs").join(format!("{}.wasm", hex(hash)))
    }

    /// Sessions ask `missing` (per batch) and commits `first_missing`.
    #[cfg(test)]
    fn has_chunk(&self, hash: &ChunkHash) -> bool {
        self.indexed(hash).is_some() || self.is_loose(hash)
    }

    /// The first of a manifest's block addresses (`addresses`, 32 bytes
    /// each, holes skipped) that the repository lacks, if any: a commit's
    /// check of every block it references. The index is read a slice at a
    /// time under its lock; format-1 chunk files are looked for after.
    pub(crate) fn first_missing(&self, addresses: &[u8]) -> Option<ChunkHash> {
        let mut loose_found = index::ChunkSet::default();
        for slice in addresses.chunks(LOOKUPS_PER_LOCK * HASH_LEN) {
            let not_indexed: Vec<ChunkHash> = {
                let index = self.shared.index.read().expect("chunk index lock");
                slice
                    .chunks_exact(HASH_LEN)
                    .map(|b| -> ChunkHash { b.try_into().expect("32 bytes") })
                    .filter(|h| *h != HOLE && index.get(h).is_none())
                    .collect()
            };
            for h in not_indexed {
                if !loose_found.contains(&h) && !self.is_loose(&h) {
                    return Some(h);
                }
                loose_found.insert(h);
            }
        }
        None
    }

    /// A format-1 chunk file (no index entry).
    fn is_loose(&self, hash: &ChunkHash) -> bool {
        self.shared.loose && self.chunk_path(hash).exists()
    }

    fn indexed(&self, hash: &ChunkHash) -> Option<Location> {
        self.shared
            .index
            .read()
            .expect("chunk index lock")
            .get(hash)
    }

    /// The open pack file of a location (opened once, then shared).
    fn pack_file(&self, hash: &ChunkHash, loc: Location) -> Result<Arc<File>, RepositoryError> {
        let mut files = self.shared.files.lock().expect("pack files lock");
        if let Some(f) = files.get(&loc.pack) {
            return Ok(f.clone());
        }
        let file = Arc::new(
            File::open(packer::pack_path(&self.root, &self.pack_id(loc)))
                .map_err(|e| chunk_io_err(hash, e))?,
        );
        if files.len() >= OPEN_PACKS {
            files.clear();
        }
        files.insert(loc.pack, file.clone());
        Ok(file)
    }

    /// The id of the pack a location is in.
    fn pack_id(&self, loc: Location) -> String {
        self.shared
            .index
            .read()
            .expect("chunk index lock")
            .pack_id(loc.pack)
            .to_owned()
    }

    /// Reads `len` bytes of a pack from `offset` into `dest`.
    fn read_record(
        &self,
        hash: &ChunkHash,
        loc: Location,
        offset: u64,
        dest: &mut [u8],
    ) -> Result<(), RepositoryError> {
        self.pack_file(hash, loc)?
            .read_exact_at(dest, offset)
            .map_err(|e| pack_read_err(hash, e))
    }

    /// Every chunk address the repository holds.
    pub fn chunk_addresses(&self) -> Result<Vec<ChunkHash>, RepositoryError> {
        let mut out: Vec<ChunkHash> = self
            .shared
            .index
            .read()
            .expect("chunk index lock")
            .hashes()
            .copied()
            .collect();
        out.extend(self.loose_chunks()?.into_iter().map(|(h, _)| h));
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Format-1 chunk files: each address with its file.
    fn loose_chunks(&self) -> Result<Vec<(ChunkHash, PathBuf)>, RepositoryError> {
        let mut out = Vec::new();
        if !self.shared.loose {
            return Ok(out);
        }
        let top = self.root.join("chunks");
        for sub in std::fs::read_dir(&top).map_err(io_err(&top))? {
            let sub = sub.map_err(io_err(&top))?.path();
            for f in std::fs::read_dir(&sub).map_err(io_err(&sub))? {
                let f = f.map_err(io_err(&sub))?;
                if let Some(h) = parse_hex(&f.file_name().to_string_lossy()) {
                    out.push((h, f.path()));
                }
            }
        }
        Ok(out)
    }

    /// The file, offset and length of a chunk's record, for tools and tests
    /// that look at (or damage) the bytes themselves.
    pub fn chunk_record(&self, hash: &ChunkHash) -> Option<(PathBuf, u64, u64)> {
        if let Some(loc) = self.indexed(hash) {
            let index = self.shared.index.read().expect("chunk index lock");
            let path = packer::pack_path(&self.root, index.pack_id(loc.pack));
            return Some((path, loc.offset, u64::from(loc.len)));
        }
        let path = self.chunk_path(hash);
        let len = std::fs::metadata(&path).ok()?.len();
        Some((path, 0, len))
    }

    /// Index files that could not be read, and why.
    pub fn damaged_indexes(&self) -> Vec<(PathBuf, String)> {
        self.shared
            .index
            .read()
            .expect("chunk index lock")
            .damaged
            .clone()
    }

    /// Stages a chunk for the next publish; returns the bytes it added, or
    /// `None` when the repository or a staged pack already holds it.
    pub(crate) fn stage_chunk(
        &self,
        hash: &ChunkHash,
        header: &chunk::ChunkHeader,
        payload: &[u8],
    ) -> Result<Option<u64>, RepositoryError> {
        let prefix = chunk::StoredChunk::prefix(header);
        let len = (prefix.len() + payload.len()) as u64;
        let (flushes, writer) = {
            let mut packer = self.shared.packer.lock().expect("packer lock");
            // Under the lock, so that a publish cannot index it in between.
            if self.indexed(hash).is_some() {
                return Ok(None);
            }
            if packer.is_none() {
                *packer = Some(Packer::new(&self.root.join("staging"))?);
            }
            let p = packer.as_mut().expect("a packer");
            (p.append(hash, &prefix, payload)?, p.writer())
        };
        let Some(flushes) = flushes else {
            return Ok(None);
        };
        for f in flushes {
            // Only a packer being dropped has no writer thread left.
            if let Err(crossbeam_channel::SendError(f)) = writer.send(f) {
                f.write()?;
            }
        }
        Ok(Some(len))
    }

    /// For each address, whether the repository lacks it: neither indexed
    /// nor staged by a writer of this process. One lock of each kind per
    /// batch rather than per block: the packer's lock is also where the
    /// coders copy their records.
    pub(crate) fn missing(&self, hashes: &[ChunkHash]) -> Vec<bool> {
        let mut missing: Vec<bool> = {
            let index = self.shared.index.read().expect("chunk index lock");
            hashes.iter().map(|h| index.get(h).is_none()).collect()
        };
        for (m, h) in missing.iter_mut().zip(hashes) {
            *m = *m && !self.is_loose(h);
        }
        // Checked after the index: a chunk published in between is then
        // neither, and reads as missing, which costs a store that finds it
        // indexed (`stage_chunk`), never a lost chunk.
        if missing.contains(&true) {
            let packer = self.shared.packer.lock().expect("packer lock");
            if let Some(p) = packer.as_ref() {
                for (m, h) in missing.iter_mut().zip(hashes) {
                    *m = *m && !p.holds(h);
                }
            }
        }
        missing
    }

    /// Publishes every staged pack (see `packer`): when this returns, every
    /// chunk staged before the call is durable and indexed.
    pub(crate) fn publish_staged(&self) -> Result<(), RepositoryError> {
        let _publishing = self.shared.publish.lock().expect("publish lock");
        let ((packs, last_runs), staging) = {
            let mut packer = self.shared.packer.lock().expect("packer lock");
            match packer.as_mut() {
                Some(p) => (p.take(), p.staging().to_owned()),
                None => return Ok(()),
            }
        };
        if packs.is_empty() {
            return Ok(());
        }
        // A run that fails is recorded in its pack, which the publish then
        // leaves out and reports: the failure is the error of whichever
        // commit publishes it, since the pack may hold chunks of any writer
        // in the process (a chunk two tasks share is stored once), and each
        // task's retry sends again what is missing.
        for f in last_runs {
            let _ = f.write();
        }
        let result = self
            .upgrade_format()
            .and_then(|()| packer::publish(&self.root, &staging, &packs));
        if let Ok((published, _)) = &result {
            let mut index = self.shared.index.write().expect("chunk index lock");
            for p in published {
                index.add(&p.id, &p.entries);
            }
        }
        // Packs that were not published are forgotten too, so that their
        // chunks are sent again instead of being taken for stored (and a
        // commit that counted on them fails its reference check).
        if let Some(p) = self.shared.packer.lock().expect("packer lock").as_mut() {
            p.forget(&packs);
        }
        let (_, failed_write) = result?;
        failed_write.map_or(Ok(()), Err)
    }

    /// A repository says format 3 before its first prune deletes anything
    /// (see `PRUNED_FORMAT`).
    pub(crate) fn mark_pruned(&self) -> Result<(), RepositoryError> {
        self.raise_format(PRUNED_FORMAT)
    }

    /// A format-1 repository says format 2 before its first pack appears.
    fn upgrade_format(&self) -> Result<(), RepositoryError> {
        // Opened as format 2: nothing to read again at every publish.
        if self.format.version > LOOSE_FORMAT {
            return Ok(());
        }
        self.raise_format(PACKED_FORMAT)
    }

    /// Rewrites the format file (atomically) to say `version`, unless it
    /// says that or more already. Every format from 2 on has pack folders,
    /// so a format-1 repository gets them first, whatever the step.
    fn raise_format(&self, version: u32) -> Result<(), RepositoryError> {
        let file = self.root.join(FORMAT_FILE);
        let body = std::fs::read(&file).map_err(io_err(&file))?;
        let mut format: FormatFile =
            serde_json::from_slice(&body).map_err(|e| RepositoryError::BadFormatFile {
                path: self.root.clone(),
                reason: e.to_string(),
            })?;
        if format.version >= version {
            return Ok(());
        }
        if format.version < PACKED_FORMAT {
            for sub in ["packs", "index"] {
                let dir = self.root.join(sub);
                std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            }
        }
        format.version = version;
        let body = serde_json::to_vec_pretty(&format).expect("format file serializes");
        writer::write_atomic(&file, &body, &self.root.join("staging"))
    }

    pub fn read_chunk(&self, hash: &ChunkHash) -> Result<chunk::StoredChunk, RepositoryError> {
        let mut bytes = Vec::new();
        let (header, payload) = self.read_chunk_into(hash, &mut bytes)?;
        Ok(chunk::StoredChunk {
            header,
            payload: bytes[payload].to_vec(),
        })
    }

    /// Reads a chunk file into `buf` (replacing what it held, reusing its
    /// memory): its header, and where its payload is in `buf`.
    pub fn read_chunk_into(
        &self,
        hash: &ChunkHash,
        buf: &mut Vec<u8>,
    ) -> Result<(chunk::ChunkHeader, std::ops::Range<usize>), RepositoryError> {
        buf.clear();
        match self.indexed(hash) {
            Some(loc) => append_at(
                &*self.pack_file(hash, loc)?,
                loc.offset,
                loc.len as usize,
                buf,
            )
            .map_err(|e| pack_read_err(hash, e))?,
            None => {
                std::fs::File::open(self.chunk_path(hash))
                    .and_then(|mut f| io::Read::read_to_end(&mut f, buf))
                    .map_err(|e| chunk_io_err(hash, e))?;
            }
        }
        chunk::StoredChunk::parse_in_place(buf).map_err(|reason| RepositoryError::Chunk {
            hash: hex(hash),
            reason,
        })
    }

    /// Reads a chunk's header, then appends its payload to the buffer
    /// `pick` chooses for that header; returns the header and where the
    /// payload is in that buffer. The payload goes from the page cache
    /// straight to where the caller wants it, without passing through
    /// another buffer (a chunk read alone: a format-1 file, or a record of a
    /// span whose read failed, `spans`).
    pub fn read_payload_into<'a>(
        &self,
        hash: &ChunkHash,
        pick: impl FnOnce(&chunk::ChunkHeader) -> &'a mut Vec<u8>,
    ) -> Result<(chunk::ChunkHeader, std::ops::Range<usize>), RepositoryError> {
        use std::io::Read;
        let bad = |reason: String| RepositoryError::Chunk {
            hash: hex(hash),
            reason,
        };
        if let Some(loc) = self.indexed(hash) {
            return self.read_packed_payload(hash, loc, pick);
        }
        let mut file =
            std::fs::File::open(self.chunk_path(hash)).map_err(|e| chunk_io_err(hash, e))?;
        // Headers are tens of bytes; a longer one takes the slow path.
        let mut head = [0u8; 4096];
        let mut got = 0;
        while got < head.len() {
            match file.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(chunk_io_err(hash, e)),
            }
        }
        let (header, start) = match chunk::StoredChunk::parse_prefix(&head[..got]).map_err(bad)? {
            Some(prefix) => prefix,
            None if got == head.len() => return self.read_whole_into(hash, pick),
            None => return Err(bad("chunk header is truncated".into())),
        };
        let dest = pick(&header);
        let at = dest.len();
        dest.extend_from_slice(&head[start..got]);
        let rest = u64::from(header.payload_len).saturating_sub((got - start) as u64);
        dest.reserve(rest as usize);
        // One byte more than expected, so a longer file is noticed.
        (&mut file)
            .take(rest + 1)
            .read_to_end(dest)
            .map_err(|e| chunk_io_err(hash, e))?;
        if let Err(reason) = chunk::check_payload_len(&header, (dest.len() - at) as u64) {
            dest.truncate(at);
            return Err(bad(reason));
        }
        Ok((header, at..dest.len()))
    }

    /// The slow path of `read_payload_into` for a header longer than its
    /// first read: the record is read whole, then its payload copied.
    fn read_whole_into<'a>(
        &self,
        hash: &ChunkHash,
        pick: impl FnOnce(&chunk::ChunkHeader) -> &'a mut Vec<u8>,
    ) -> Result<(chunk::ChunkHeader, std::ops::Range<usize>), RepositoryError> {
        let mut all = Vec::new();
        let (header, payload) = self.read_chunk_into(hash, &mut all)?;
        let dest = pick(&header);
        let at = dest.len();
        dest.extend_from_slice(&all[payload]);
        Ok((header, at..dest.len()))
    }

    /// `read_payload_into` for a chunk in a pack: the first read gets the
    /// header (and the start of the payload), the second the rest of the
    /// payload straight into the buffer `pick` chooses.
    fn read_packed_payload<'a>(
        &self,
        hash: &ChunkHash,
        loc: Location,
        pick: impl FnOnce(&chunk::ChunkHeader) -> &'a mut Vec<u8>,
    ) -> Result<(chunk::ChunkHeader, std::ops::Range<usize>), RepositoryError> {
        let bad = |reason: String| RepositoryError::Chunk {
            hash: hex(hash),
            reason,
        };
        let mut head = [0u8; 4096];
        let got = head.len().min(loc.len as usize);
        self.read_record(hash, loc, loc.offset, &mut head[..got])?;
        let Some((header, start)) = chunk::StoredChunk::parse_prefix(&head[..got]).map_err(bad)?
        else {
            if got < loc.len as usize {
                return self.read_whole_into(hash, pick);
            }
            return Err(bad("chunk header is truncated".into()));
        };
        chunk::check_payload_len(&header, u64::from(loc.len) - start as u64).map_err(bad)?;
        let dest = pick(&header);
        let at = dest.len();
        dest.extend_from_slice(&head[start..got]);
        let rest = at + header.payload_len as usize - dest.len();
        let file = self.pack_file(hash, loc)?;
        if let Err(e) = append_at(&file, loc.offset + got as u64, rest, dest) {
            dest.truncate(at);
            return Err(pack_read_err(hash, e));
        }
        Ok((header, at..dest.len()))
    }

    /// The codec component with this hash, checked against its address.
    pub fn codec_component(&self, hash: &[u8]) -> Result<Vec<u8>, RepositoryError> {
        let bytes = std::fs::read(self.codec_path(hash))
            .map_err(|_| RepositoryError::CodecMissing { hash: hex(hash) })?;
        if blake3::hash(&bytes).as_bytes() != hash {
            return Err(RepositoryError::Chunk {
                hash: hex(hash),
                reason: "codec component does not match its address (damaged)".into(),
            });
        }
        Ok(bytes)
    }

    fn points_dir(&self) -> PathBuf {
        self.root.join("points")
    }

    /// Every readable restore point, oldest first per disk. A damaged
    /// manifest is skipped with a warning, so one bad file never hides the
    /// others; `verify` names it.
    pub fn points(&self) -> Result<Vec<PointEntry>, RepositoryError> {
        let mut out = Vec::new();
        for path in self.manifest_paths()? {
            match manifest::read(&path) {
                Ok(manifest) => out.push(PointEntry { manifest, path }),
                Err(e) => tracing::warn!("skipping restore point: {e}"),
            }
        }
        out.sort_by(|a, b| {
            (
                &a.manifest.job,
                &a.manifest.vm,
                &a.manifest.disk,
                a.manifest.created_unix_ms,
                &a.manifest.point_id,
            )
                .cmp(&(
                    &b.manifest.job,
                    &b.manifest.vm,
                    &b.manifest.disk,
                    b.manifest.created_unix_ms,
                    &b.manifest.point_id,
                ))
        });
        Ok(out)
    }

    /// Every manifest file under `points/<job>/<vm>/<disk>/`. Folders are
    /// followed through symbolic links, as every other reader of a disk's
    /// folder does (prune must see every point a session would), to the
    /// layout's depth only, so a link loop ends.
    pub(crate) fn manifest_paths(&self) -> Result<Vec<PathBuf>, RepositoryError> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        // A folder reached twice (a link that aliases another) is listed
        // once: retention would otherwise see its points twice.
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![(self.points_dir(), 0)];
        while let Some((dir, depth)) = stack.pop() {
            let meta = std::fs::metadata(&dir).map_err(io_err(&dir))?;
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            let entries = std::fs::read_dir(&dir).map_err(io_err(&dir))?;
            for entry in entries {
                let entry = entry.map_err(io_err(&dir))?;
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "manifest") {
                    out.push(path);
                } else if depth < 3 && std::fs::metadata(&path).map_err(io_err(&path))?.is_dir() {
                    stack.push((path, depth + 1));
                }
            }
        }
        Ok(out)
    }

    /// The newest restore point of one disk that reads whole and whose
    /// chunks are all there: the parent of the next incremental.
    pub fn latest_point(
        &self,
        job: &str,
        vm: &str,
        disk: &str,
    ) -> Result<Option<Manifest>, RepositoryError> {
        let mut newest_first = self.point_headers(job, vm, disk)?;
        newest_first.reverse();
        let mut refreshed = false;
        for (path, _) in newest_first {
            // A damaged newest point must not stop backups: the next one is
            // then incremental to the newest readable point.
            match manifest::read(&path) {
                // Nor must a point whose chunks the repository lacks (an
                // index file damaged, say): its addresses would be carried
                // into the new point, and every commit refused.
                Ok(m) => match self.lacks_a_chunk_of(&path, &m, &mut refreshed)? {
                    None => return Ok(Some(m)),
                    Some(hash) => tracing::warn!(
                        "restore point {} is not a parent: it references chunk {} that the repository lacks (`arca verify` names the damage)",
                        m.point_id,
                        hex(&hash)
                    ),
                },
                Err(e) => tracing::warn!("ignoring restore point: {e}"),
            }
        }
        Ok(None)
    }

    /// A chunk `m` (read from `path`) references that the repository
    /// lacks, after a look at the packs other processes published since the
    /// index was loaded (once per search: `refreshed`). Costs a lookup per
    /// block (4 Mi for 1 TiB at 256 KiB blocks, as the commit's own check),
    /// once per manifest and process.
    fn lacks_a_chunk_of(
        &self,
        path: &Path,
        m: &Manifest,
        refreshed: &mut bool,
    ) -> Result<Option<ChunkHash>, RepositoryError> {
        let complete = || self.shared.complete.lock().expect("complete lock");
        if complete().contains(path) {
            return Ok(None);
        }
        let mut missing = self.first_missing(&m.block_hashes);
        if missing.is_some() && !*refreshed {
            self.refresh()?;
            *refreshed = true;
            missing = self.first_missing(&m.block_hashes);
        }
        if missing.is_none() {
            complete().insert(path.to_owned());
        }
        Ok(missing)
    }

    /// The header of the newest restore point of one disk whose header
    /// reads (`manifest::read_header`: no block list, not checked against
    /// the trailer). For what needs no block list: when the newest point was
    /// made (a commit), which CBT bitmap it names (a snapshot). Whoever then
    /// uses a block list takes `latest_point`, which may be an older point if
    /// this one's block list is damaged, and must check which it got.
    pub fn latest_header(
        &self,
        job: &str,
        vm: &str,
        disk: &str,
    ) -> Result<Option<Manifest>, RepositoryError> {
        const DAY_MS: i64 = 86_400_000;
        let now = jiff::Timestamp::now().as_millisecond();
        let mut headers = self.point_headers(job, vm, disk)?;
        while let Some((path, m)) = headers.pop() {
            // A header is not checked against the trailer. One that claims
            // a time over a day ahead of the clock (a flipped bit, say) is
            // believed only if its whole point checks out: it would stay
            // "newest" and push every later point's time after its own. (A
            // clock set back is the case where it does check out.)
            if m.created_unix_ms <= now.saturating_add(DAY_MS) {
                return Ok(Some(Manifest::clone(&m)));
            }
            match manifest::read(&path) {
                // What was just read and checked, not the header before.
                Ok(whole) => return Ok(Some(whole.into_header())),
                Err(e) => tracing::warn!("ignoring restore point: {e}"),
            }
        }
        Ok(None)
    }

    /// The headers (`manifest::read_header`) of one disk's restore points,
    /// oldest first; unreadable ones are left out with a warning.
    fn point_headers(
        &self,
        job: &str,
        vm: &str,
        disk: &str,
    ) -> Result<Vec<(PathBuf, Arc<Manifest>)>, RepositoryError> {
        let dir = self.points_dir().join(job).join(vm).join(disk);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut known = self
            .shared
            .headers
            .lock()
            .expect("headers lock")
            .remove(&dir)
            .unwrap_or_default();
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "manifest") {
                continue;
            }
            // A file that vanished since the listing is simply not a point.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            use std::os::unix::fs::MetadataExt;
            let mtime = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
            let key: HeaderKey = (entry.file_name(), meta.ino(), meta.len(), mtime);
            let header = match known.remove(&key) {
                Some(m) => m,
                None => match manifest::read_header(&path) {
                    Ok(m) => Arc::new(m),
                    Err(e) => {
                        tracing::warn!("ignoring restore point: {e}");
                        continue;
                    }
                },
            };
            seen.insert(key, header.clone());
            out.push((path, header));
        }
        self.shared
            .headers
            .lock()
            .expect("headers lock")
            .insert(dir, seen);
        out.sort_by(|(_, a), (_, b)| {
            (a.created_unix_ms, &a.point_id).cmp(&(b.created_unix_ms, &b.point_id))
        });
        Ok(out)
    }

    /// Whether the manifest at `path` reads whole and every chunk it
    /// references is there: what `latest_point` asks of a parent, with the
    /// same per-process answers (the index is current for the caller, a
    /// writer under its lock, so it is not loaded again).
    pub(crate) fn is_whole(&self, path: &Path) -> Result<bool, RepositoryError> {
        match manifest::read(path) {
            Ok(m) => Ok(self.lacks_a_chunk_of(path, &m, &mut true)?.is_none()),
            Err(_) => Ok(false),
        }
    }

    pub fn find_point(&self, point_id: &str) -> Result<PointEntry, RepositoryError> {
        self.points()?
            .into_iter()
            .find(|p| p.manifest.point_id == point_id)
            .ok_or_else(|| RepositoryError::PointNotFound(point_id.to_owned()))
    }

    /// Starts a writer for one task's restore point.
    pub fn writer(&self) -> Result<PointWriter, RepositoryError> {
        PointWriter::new(self)
    }

    /// Removes staging folders of writers that are gone (a killed session);
    /// returns how many it removed.
    pub fn sweep_staging(&self) -> Result<usize, RepositoryError> {
        writer::sweep(&self.root.join("staging"))
    }

    pub(crate) fn manifest_dir(&self, m: &Manifest) -> PathBuf {
        self.points_dir().join(&m.job).join(&m.vm).join(&m.disk)
    }
}

/// All-zero address: a hole in a manifest.
pub const HOLE: ChunkHash = [0u8; HASH_LEN];

#[cfg(test)]
mod tests {
    use super::*;

    fn header(codec: &str, raw_len: u32, payload_len: u32) -> chunk::ChunkHeader {
        chunk::ChunkHeader {
            codec: codec.into(),
            codec_hash: Vec::new(),
            raw_len,
            payload_len,
        }
    }

    /// Stores a chunk record as a writer does (staged, then published).
    fn put(repo: &Repository, hash: &ChunkHash, codec: &str, payload: &[u8], claimed: u32) {
        repo.stage_chunk(hash, &header(codec, 7, claimed), payload)
            .unwrap();
        repo.publish_staged().unwrap();
    }

    #[test]
    fn payloads_land_where_their_header_says_and_bad_lengths_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        let (mut stored, mut coded) = (b"kept".to_vec(), Vec::new());
        let read = |hash: &ChunkHash, stored: &mut Vec<u8>, coded: &mut Vec<u8>| {
            repo.read_payload_into(hash, |h| if h.codec == "none" { stored } else { coded })
        };

        // A small payload, one of 100 KiB, and one behind a header longer
        // than the first read (a codec with a 5000-character name).
        let big = vec![9u8; 100 << 10];
        let long_name = "z".repeat(5000);
        put(&repo, &[1; 32], "none", b"abc", 3);
        put(&repo, &[2; 32], "zstd", &big, big.len() as u32);
        put(&repo, &[3; 32], &long_name, b"xyz", 3);
        let (h, r) = read(&[1; 32], &mut stored, &mut coded).unwrap();
        assert_eq!((h.codec.as_str(), &stored[r]), ("none", &b"abc"[..]));
        let (_, r) = read(&[2; 32], &mut stored, &mut coded).unwrap();
        assert_eq!(&coded[r], &big[..]);
        let (h, r) = read(&[3; 32], &mut stored, &mut coded).unwrap();
        assert_eq!((h.codec.len(), &coded[r]), (5000, &b"xyz"[..]));
        assert_eq!(stored, b"keptabc", "appended after what the buffer held");

        // Payloads shorter or longer than their header says are refused and
        // leave the buffer as it was.
        put(&repo, &[4; 32], "none", b"ab", 3);
        put(&repo, &[5; 32], "none", b"abcd", 3);
        for (hash, what) in [
            ([4u8; 32], "payload is 2 bytes"),
            ([5; 32], "payload is 4 bytes"),
        ] {
            let e = read(&hash, &mut stored, &mut coded)
                .unwrap_err()
                .to_string();
            assert!(e.contains(what) && e.contains(&hex(&hash)), "{e}");
            assert_eq!(stored, b"keptabc");
        }
        let e = read(&[6; 32], &mut stored, &mut coded)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing from the repository"), "{e}");
    }

    #[test]
    fn a_format_1_repository_is_read_and_says_format_2_once_it_has_a_pack() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for sub in ["chunks", "codecs", "points", "staging"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let format = |version: u32| {
            format!(
                r#"{{"format":"arca-repository","version":{version},"id":"00","chunk_address":"blake3","encryption":"none"}}"#
            )
        };
        std::fs::write(root.join(FORMAT_FILE), format(1)).unwrap();
        let old = b"a chunk file of format 1".to_vec();
        let old_hash = *blake3::hash(&old).as_bytes();
        let h = hex(&old_hash);
        std::fs::create_dir_all(root.join("chunks").join(&h[..2])).unwrap();
        let mut f = std::fs::File::create(root.join("chunks").join(&h[..2]).join(&h)).unwrap();
        chunk::StoredChunk::write(&mut f, &header("none", 24, 24), &old).unwrap();
        drop(f);

        let repo = Repository::open(root).unwrap();
        assert!(repo.has_chunk(&old_hash));
        assert_eq!(repo.read_chunk(&old_hash).unwrap().payload, old);
        assert_eq!(repo.chunk_addresses().unwrap(), vec![old_hash]);

        let new = b"a chunk in a pack".to_vec();
        let new_hash = *blake3::hash(&new).as_bytes();
        put(&repo, &new_hash, "none", &new, new.len() as u32);
        let now: FormatFile =
            serde_json::from_slice(&std::fs::read(root.join(FORMAT_FILE)).unwrap()).unwrap();
        assert_eq!(now.version, PACKED_FORMAT);
        let mut both = vec![old_hash, new_hash];
        both.sort();
        assert_eq!(repo.chunk_addresses().unwrap(), both);
        assert_eq!(repo.read_chunk(&new_hash).unwrap().payload, new);
        assert_eq!(repo.read_chunk(&old_hash).unwrap().payload, old);
    }

    #[test]
    fn a_pruned_format_1_repository_takes_packs_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for sub in ["chunks", "codecs", "points", "staging"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::write(
            root.join(FORMAT_FILE),
            r#"{"format":"arca-repository","version":1,"id":"01","chunk_address":"blake3","encryption":"none"}"#,
        )
        .unwrap();
        let old = b"nobody references this format-1 chunk".to_vec();
        let h = hex(blake3::hash(&old).as_bytes());
        std::fs::create_dir_all(root.join("chunks").join(&h[..2])).unwrap();
        let mut f = std::fs::File::create(root.join("chunks").join(&h[..2]).join(&h)).unwrap();
        chunk::StoredChunk::write(&mut f, &header("none", 37, 37), &old).unwrap();
        drop(f);

        let repo = Repository::open(root).unwrap();
        let report = repo.prune(prune::PruneOptions::default()).unwrap();
        assert_eq!(report.loose_chunks_deleted, 1);
        let now: FormatFile =
            serde_json::from_slice(&std::fs::read(root.join(FORMAT_FILE)).unwrap()).unwrap();
        assert_eq!(now.version, PRUNED_FORMAT);
        // A format-3 repository has its pack folders: a pack publishes.
        let new = b"a chunk in a pack, after the prune".to_vec();
        let new_hash = *blake3::hash(&new).as_bytes();
        put(&repo, &new_hash, "none", &new, new.len() as u32);
        let fresh = Repository::open(root).unwrap();
        assert_eq!(fresh.read_chunk(&new_hash).unwrap().payload, new);
    }

    #[test]
    fn a_damaged_index_is_named_and_its_chunks_read_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let repo = Repository::open_or_create(dir.path()).unwrap();
            put(&repo, &[1; 32], "none", b"abc", 3);
        }
        let idx = std::fs::read_dir(dir.path().join("index"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&idx).unwrap();
        bytes[14] ^= 0xff;
        std::fs::write(&idx, bytes).unwrap();
        // The first repository is gone, so this open reads the files anew.
        let repo = Repository::open(dir.path()).unwrap();
        let damaged = repo.damaged_indexes();
        assert_eq!(damaged.len(), 1);
        assert_eq!(damaged[0].0, idx);
        assert!(damaged[0].1.contains("checksum"), "{}", damaged[0].1);
        let e = repo.read_chunk(&[1; 32]).unwrap_err().to_string();
        assert!(e.contains("missing from the repository"), "{e}");
    }

    #[test]
    fn a_truncated_pack_is_reported_not_read_short() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        put(&repo, &[1; 32], "none", &[5u8; 10000], 10000);
        let (pack, offset, len) = repo.chunk_record(&[1; 32]).unwrap();
        assert_eq!(offset, 0);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&pack)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let mut buf = Vec::new();
        let e = repo
            .read_payload_into(&[1; 32], |_| &mut buf)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        assert!(buf.is_empty(), "nothing partial left in the buffer");
    }

    #[test]
    fn a_repository_made_again_in_the_same_folder_does_not_inherit_the_old_index() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let old = Repository::open_or_create(&root).unwrap();
        put(&old, &[1; 32], "none", b"abc", 3);
        std::fs::remove_dir_all(&root).unwrap();
        // `old` is still open in this process (an agent, say).
        let new = Repository::open_or_create(&root).unwrap();
        assert!(old.has_chunk(&[1; 32]));
        assert!(!new.has_chunk(&[1; 32]), "a new repository holds nothing");
    }
}
