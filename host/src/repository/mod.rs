//! The repository: content-addressed chunks and restore-point manifests on a
//! local filesystem.
//!
//! Layout (format version 1):
//! ```text
//! arca-repository.json        format, version, id, chunk addressing, encryption
//! chunks/ab/<hex>             one chunk per file: header + coded payload
//! codecs/<hex>.wasm           every codec component that coded a chunk
//! points/<job>/<vm>/<disk>/<point>.manifest
//! staging/<writer>/           a writer's chunks until its commit
//! ```
//! Invariants: a chunk's address is the BLAKE3 of its plaintext, computed by
//! the host; chunks and codecs are durable before the manifest that references
//! them appears (by atomic rename); a staging folder is never read by anyone
//! but its writer and is swept when its writer is gone.
//!
//! Room for what comes next: `chunk_address` and `encryption` in the format
//! file name the addressing (`blake3`, later `blake3-keyed`) and cipher, and
//! chunk headers carry optional key/nonce fields; retention and GC take the
//! repository lock exclusively while writers hold it shared.

pub mod chunk;
pub mod manifest;
pub mod writer;

use arca_transport::{ChunkHash, HASH_LEN, Manifest};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

pub use writer::PointWriter;

pub const FORMAT_NAME: &str = "arca-repository";
pub const FORMAT_VERSION: u32 = 1;
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
    #[error("manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("restore point {0} not found")]
    PointNotFound(String),
    #[error("codec component {hash} is not in the repository")]
    CodecMissing { hash: String },
    #[error("restore point {point} references chunk {hash}, which is not in the repository")]
    DanglingReference { point: String, hash: String },
}

fn chunk_io_err(hash: &ChunkHash, e: io::Error) -> RepositoryError {
    RepositoryError::Chunk {
        hash: hex(hash),
        reason: if e.kind() == io::ErrorKind::NotFound {
            "missing from the repository".into()
        } else {
            e.to_string()
        },
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
}

/// A restore point as listed: its manifest and where it lies.
#[derive(Debug, Clone)]
pub struct PointEntry {
    pub manifest: Manifest,
    pub path: PathBuf,
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
        for sub in ["chunks", "codecs", "points", "staging"] {
            std::fs::create_dir_all(path.join(sub)).map_err(io_err(path))?;
        }
        let format = FormatFile {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
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
        Ok(Self {
            root: path.to_owned(),
            format,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        let h = hex(hash);
        self.root.join("chunks").join(&h[..2]).join(&h)
    }

    pub fn codec_path(&self, hash: &[u8]) -> PathBuf {
        self.root.join("codecs").join(format!("{}.wasm", hex(hash)))
    }

    pub fn has_chunk(&self, hash: &ChunkHash) -> bool {
        self.chunk_path(hash).exists()
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
        let path = self.chunk_path(hash);
        buf.clear();
        std::fs::File::open(&path)
            .and_then(|mut f| io::Read::read_to_end(&mut f, buf))
            .map_err(|e| chunk_io_err(hash, e))?;
        chunk::StoredChunk::parse_in_place(buf).map_err(|reason| RepositoryError::Chunk {
            hash: hex(hash),
            reason,
        })
    }

    /// Reads a chunk's header, then appends its payload to the buffer
    /// `pick` chooses for that header; returns the header and where the
    /// payload is in that buffer. The payload goes from the page cache
    /// straight to where the caller wants it (restore gathers each codec's
    /// input this way), without passing through another buffer.
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
            None if got == head.len() => {
                let mut all = Vec::new();
                let (header, payload) = self.read_chunk_into(hash, &mut all)?;
                let dest = pick(&header);
                let at = dest.len();
                dest.extend_from_slice(&all[payload]);
                return Ok((header, at..dest.len()));
            }
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

    pub(crate) fn manifest_paths(&self) -> Result<Vec<PathBuf>, RepositoryError> {
        let mut out = Vec::new();
        let mut stack = vec![self.points_dir()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(io_err(&dir))?;
            for entry in entries {
                let entry = entry.map_err(io_err(&dir))?;
                let path = entry.path();
                if entry.file_type().map_err(io_err(&path))?.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "manifest") {
                    out.push(path);
                }
            }
        }
        Ok(out)
    }

    /// The newest restore point of one disk, the parent of the next incremental.
    pub fn latest_point(
        &self,
        job: &str,
        vm: &str,
        disk: &str,
    ) -> Result<Option<Manifest>, RepositoryError> {
        let dir = self.points_dir().join(job).join(vm).join(disk);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut best: Option<Manifest> = None;
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            if path.extension().is_none_or(|e| e != "manifest") {
                continue;
            }
            // A damaged newest point must not stop backups: the next one is
            // then incremental to the newest readable point.
            let m = match manifest::read(&path) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("ignoring restore point: {e}");
                    continue;
                }
            };
            if best
                .as_ref()
                .is_none_or(|b| (m.created_unix_ms, &m.point_id) > (b.created_unix_ms, &b.point_id))
            {
                best = Some(m);
            }
        }
        Ok(best)
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

    fn put(repo: &Repository, hash: &ChunkHash, codec: &str, payload: &[u8], claimed: u32) {
        let path = repo.chunk_path(hash);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let header = chunk::ChunkHeader {
            codec: codec.into(),
            codec_hash: Vec::new(),
            raw_len: 7,
            payload_len: claimed,
        };
        let mut f = std::fs::File::create(path).unwrap();
        chunk::StoredChunk::write(&mut f, &header, payload).unwrap();
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
}
