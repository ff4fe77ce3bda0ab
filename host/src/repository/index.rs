//! The chunk index in memory: where each chunk of the repository lies.
//!
//! Built from the repository's index files when it is opened and refreshed
//! when a writer starts (other processes may have published packs since), it
//! answers the movers' dedup queries and the commit's reference check without
//! touching the filesystem once per block.

use super::pack::{self, IndexEntry};
use arca_transport::ChunkHash;
use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// A chunk record: which pack (a number in this index), where, how long.
#[derive(Debug, Clone, Copy)]
pub(super) struct Location {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
}

/// A set of chunk addresses. Keys are BLAKE3 outputs, so a fast hasher
/// serves where std's SipHash spent a tenth of an empty session's CPU on
/// loading the index. An agent takes the addresses its clients claim, so
/// keys are not always honest: the hasher's seed is random per process,
/// which keeps crafted addresses from colliding on purpose.
pub(crate) type ChunkSet = foldhash::HashSet<ChunkHash>;

#[derive(Debug, Default)]
pub(super) struct ChunkIndex {
    chunks: foldhash::HashMap<ChunkHash, Location>,
    /// Pack ids; a `Location::pack` is a position here.
    packs: Vec<String>,
    /// Index files that could not be read, with why (verify reports them).
    pub damaged: Vec<(PathBuf, String)>,
    seen: HashSet<String>,
}

impl ChunkIndex {
    pub fn get(&self, hash: &ChunkHash) -> Option<Location> {
        self.chunks.get(hash).copied()
    }

    pub fn pack_id(&self, pack: u32) -> &str {
        &self.packs[pack as usize]
    }

    pub fn hashes(&self) -> impl Iterator<Item = &ChunkHash> {
        self.chunks.keys()
    }

    /// Adds a pack's records. A chunk already indexed keeps its first
    /// location: two writers in different processes may both have stored
    /// it, and either copy is as good.
    pub fn add(&mut self, pack_id: &str, entries: &[IndexEntry]) {
        if !self.seen.insert(pack_id.to_owned()) {
            return;
        }
        let pack = self.packs.len() as u32;
        self.packs.push(pack_id.to_owned());
        for e in entries {
            self.chunks.entry(e.hash).or_insert(Location {
                pack,
                offset: e.offset,
                len: e.len,
            });
        }
    }

    /// Loads the index files in `dir` that it has not seen yet.
    pub fn refresh(&mut self, dir: &Path) -> io::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        // Listed first, so that the map is sized once for everything to
        // load: grown file by file it was rebuilt at every doubling, a third
        // of an empty session's page faults.
        let mut unseen: Vec<(String, PathBuf)> = Vec::new();
        let mut records = 0usize;
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".idx"))
            else {
                continue;
            };
            if self.seen.contains(id) || !super::packer::is_pack_id(id) {
                continue;
            }
            // A size that cannot be read only leaves the map to grow.
            if let Ok(meta) = entry.metadata() {
                records = records.saturating_add(pack::records_in_index_of_len(meta.len()));
            }
            unseen.push((id.to_owned(), path));
        }
        // Only a hint: a damaged size must not end the process.
        let _ = self.chunks.try_reserve(records);
        let mut bytes = Vec::new();
        for (id, path) in unseen {
            bytes.clear();
            if let Err(e) = std::fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)) {
                // Not seen, so the next refresh tries again (a descriptor
                // shortage must not make a healthy pack look damaged).
                tracing::warn!("pack index {}: {e}", path.display());
                continue;
            }
            match pack::decode_index(&bytes) {
                Ok(records) => self.add(&id, &records),
                Err(reason) => {
                    // Its chunks then read as missing, and verify names the
                    // file as well as the restore points that are hurt.
                    tracing::warn!("pack index {}: {reason}", path.display());
                    self.seen.insert(id);
                    self.damaged.push((path, reason));
                }
            }
        }
        Ok(())
    }
}
