//! Restore: writes a restore point of a disk to a raw file, bit-exact.
//!
//! Every chunk is checked against its address before a byte of it is
//! written; on any failure the partial output is removed, so a restore either
//! produces the disk as it was or nothing. Holes are left unwritten, so the
//! output is sparse where the restore point has holes.

pub mod decoder;
mod direct;

use crate::extent::Geometry;
use crate::source::qemu_export::{DiskFormat, QemuExport};
use arca_transport::{ChunkHash, Manifest};
use decoder::{ChunkError, CodecBank, Decoder};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Chunks fetched per batch by one worker.
const BATCH_BLOCKS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{path} exists; pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("output image {path}: {message}")]
    Image { path: PathBuf, message: String },
    #[error("restore point {point}: {source}; nothing was restored")]
    Chunk { point: String, source: ChunkError },
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RestoreStats {
    pub disk_bytes: u64,
    pub written_bytes: u64,
    /// Of `written_bytes`, those written past the page cache (`direct`).
    pub unbuffered_bytes: u64,
    pub hole_bytes: u64,
    pub seconds: f64,
}

/// Restores into an image of any format arca writes: raw directly; qcow2 and
/// vhdx through a writable QEMU export of a new, empty image (unwritten
/// blocks stay unallocated). On failure the output is removed.
pub fn restore_to_image(
    bank: &CodecBank,
    manifest: &Manifest,
    out: &Path,
    format: DiskFormat,
    force: bool,
    workers: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<RestoreStats, RestoreError> {
    if out.exists() && !force {
        return Err(RestoreError::Exists {
            path: out.to_owned(),
        });
    }
    if format == DiskFormat::Raw {
        return restore_to_file(bank, manifest, out, Output::NewRaw, workers, progress);
    }
    let _ = std::fs::remove_file(out);
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", format.driver()])
        .arg(out)
        .arg(manifest.disk_size.to_string())
        .output()
        .map_err(|e| RestoreError::Image {
            path: out.to_owned(),
            message: format!("cannot run qemu-img: {e} (install qemu-utils)"),
        })?;
    if !created.status.success() {
        return Err(RestoreError::Image {
            path: out.to_owned(),
            message: String::from_utf8_lossy(&created.stderr).trim().to_owned(),
        });
    }
    let export_dir = crate::session::export_dir();
    let result = QemuExport::start(out, format, true, &export_dir)
        .map_err(|e| RestoreError::Image {
            path: out.to_owned(),
            message: e.to_string(),
        })
        .and_then(|export| {
            let r = restore_to_file(
                bank,
                manifest,
                export.path(),
                Output::Existing,
                workers,
                progress,
            );
            drop(export); // flushes the image
            r
        });
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    result
}

/// What `restore_to_file` writes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Create (or replace) a sparse raw file.
    NewRaw,
    /// An existing file of the right size (an export of a new image).
    Existing,
}

pub fn restore_to_file(
    bank: &CodecBank,
    manifest: &Manifest,
    out: &Path,
    mode: Output,
    workers: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<RestoreStats, RestoreError> {
    let started = std::time::Instant::now();
    let write_err = |source| RestoreError::Write {
        path: out.to_owned(),
        source,
    };
    let file = match mode {
        Output::NewRaw => {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(out)
                .map_err(write_err)?;
            f.set_len(manifest.disk_size).map_err(write_err)?;
            f
        }
        Output::Existing => OpenOptions::new()
            .write(true)
            .open(out)
            .map_err(write_err)?,
    };

    // Workers write through the same descriptor the write-back thread
    // starts flushing, so the final sync waits only for the tail. Aligned
    // runs of a new raw file skip the page cache (`direct`).
    let file = std::sync::Arc::new(file);
    let write_back = crate::writeback::WriteBack::start();
    let direct = match mode {
        Output::NewRaw => direct::DirectWriter::open(out, file.clone(), workers),
        // An export of a new image is FUSE, where O_DIRECT means something
        // else.
        Output::Existing => None,
    };
    let geometry = Geometry {
        disk_size: manifest.disk_size,
        block_size: manifest.block_size,
    };
    let mut blocks: Vec<(u64, ChunkHash)> = Vec::new();
    for i in 0..manifest.block_count() {
        match manifest.block(i) {
            Some(h) => blocks.push((i, h)),
            None => progress(geometry.block_extent(i).length),
        }
    }
    let batches: Vec<&[(u64, ChunkHash)]> = blocks.chunks(BATCH_BLOCKS).collect();
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<RestoreError>> = Mutex::new(None);
    let written = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                let mut decoder = Decoder::new(bank.clone());
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if b >= batches.len() || stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let batch = batches[b];
                    let wanted: Vec<(ChunkHash, u32)> = batch
                        .iter()
                        .map(|(i, h)| (*h, geometry.block_extent(*i).length as u32))
                        .collect();
                    let result = decoder
                        .fetch(&wanted)
                        .map_err(|source| RestoreError::Chunk {
                            point: manifest.point_id.clone(),
                            source,
                        })
                        .and_then(|plain| {
                            // Whole aligned blocks of a new raw file go past
                            // the page cache; the rest is written here.
                            let unbuffered = |k: usize, at: u64| {
                                direct.is_some()
                                    && at.is_multiple_of(direct::ALIGN)
                                    && (plain.block(k).len() as u64).is_multiple_of(direct::ALIGN)
                            };
                            let blocks = batch
                                .iter()
                                .enumerate()
                                .map(|(k, (i, _))| (k, geometry.block_extent(*i).offset));
                            if let Some(d) = &direct {
                                d.write(
                                    blocks
                                        .clone()
                                        .filter(|&(k, at)| unbuffered(k, at))
                                        .map(|(k, at)| (plain.block(k), at)),
                                )
                                .map_err(write_err)?;
                            }
                            let mut buffered: Option<(u64, u64)> = None;
                            for (k, at) in blocks {
                                let bytes = plain.block(k);
                                if !unbuffered(k, at) {
                                    file.write_all_at(bytes, at).map_err(write_err)?;
                                    let from = buffered.map_or(at, |(from, _)| from);
                                    buffered = Some((from, at + bytes.len() as u64));
                                }
                                written.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                                progress(bytes.len() as u64);
                            }
                            decoder.recycle(plain);
                            if let Some((from, to)) = buffered {
                                write_back.range(&file, from, to - from);
                            }
                            Ok(())
                        });
                    if let Err(e) = result {
                        stop.store(true, Ordering::Relaxed);
                        failure.lock().expect("failure lock").get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    drop(write_back);
    let mut failure = failure.into_inner().expect("failure lock");
    let unbuffered = match direct.map_or(Ok(0), |d| d.finish()) {
        Ok(n) => n,
        Err(e) => {
            failure.get_or_insert(write_err(e));
            0
        }
    };
    if let Some(e) = failure {
        drop(file);
        if mode == Output::NewRaw {
            let _ = std::fs::remove_file(out);
        }
        return Err(e);
    }
    file.sync_all().map_err(write_err)?;
    let written = written.into_inner();
    Ok(RestoreStats {
        disk_bytes: manifest.disk_size,
        written_bytes: written,
        unbuffered_bytes: unbuffered,
        hole_bytes: manifest.disk_size - written,
        seconds: started.elapsed().as_secs_f64(),
    })
}
