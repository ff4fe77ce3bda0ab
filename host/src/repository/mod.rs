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
        let path = self.chunk_path(hash);
        let bytes = std::fs::read(&path).map_err(|e| RepositoryError::Chunk {
            hash: hex(hash),
            reason: if e.kind() == io::ErrorKind::NotFound {
                "missing from the repository".into()
            } else {
                e.to_string()
            },
        })?;
        chunk::StoredChunk::parse(&bytes).map_err(|reason| RepositoryError::Chunk {
            hash: hex(hash),
            reason,
        })
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
