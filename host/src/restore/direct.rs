//! Unbuffered writes of a restored raw disk (`O_DIRECT`).
//!
//! A restore writes gigabytes once and then syncs them. Through the page
//! cache every byte costs the kernel a copy and a page allocation, on the
//! same two cores the decoders need: writing 2.5 GiB and syncing took 2.8 s
//! of system time on the development machine, against 0.2 s with
//! `O_DIRECT` (docs/BENCHMARKS.md). It would also evict the host's working
//! set for data nobody reads back. So whole aligned runs of blocks go to the
//! device directly; the rest (a disk's last partial block, and everything
//! on a filesystem that refuses `O_DIRECT`) goes through the page cache as
//! before. The final `fsync` still makes both durable: it commits the
//! allocation metadata and flushes the device's cache.
//!
//! An `O_DIRECT` write returns only when the device has the data, so the
//! writes run on a thread of their own: a decoder copies its run into an
//! aligned buffer from a small pool and goes back to decoding.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

pub use crate::unbuffered::ALIGN;
use crate::unbuffered::{aligned_start, open_direct, write_piece};
/// Largest single write, and the size of each pooled buffer.
const RUN: usize = 4 << 20;
/// Buffers per decoding worker: one being filled, one being written.
const BUFFERS_PER_WORKER: usize = 2;

/// A run of bytes for the writer thread: `len` bytes of `buf` from its
/// first page-aligned address (`aligned_start`), for disk offset `offset`.
struct Piece {
    buf: Vec<u8>,
    len: usize,
    offset: u64,
}

struct Shared {
    free: Mutex<Vec<Vec<u8>>>,
    freed: Condvar,
    /// The first write error; the writer keeps draining after it so that
    /// no worker waits forever for a buffer.
    failed: Mutex<Option<io::Error>>,
    direct_bytes: AtomicU64,
}

pub struct DirectWriter {
    shared: Arc<Shared>,
    tx: Option<SyncSender<Piece>>,
    thread: Option<JoinHandle<()>>,
}

impl DirectWriter {
    /// Opens `path` a second time for unbuffered writes; `None` where its
    /// filesystem does not allow `O_DIRECT` (tmpfs on older kernels, FUSE).
    /// `buffered` is the file's ordinary descriptor, used should the device
    /// refuse a direct write after all.
    pub fn open(path: &Path, buffered: Arc<File>, workers: usize) -> Option<Self> {
        let direct = open_direct(path)?;
        let count = workers.max(1) * BUFFERS_PER_WORKER;
        let shared = Arc::new(Shared {
            free: Mutex::new(
                (0..count)
                    .map(|_| vec![0u8; RUN + ALIGN as usize])
                    .collect(),
            ),
            freed: Condvar::new(),
            failed: Mutex::new(None),
            direct_bytes: AtomicU64::new(0),
        });
        let (tx, rx) = sync_channel::<Piece>(count);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("arca-restore-writer".into())
            .spawn(move || {
                let mut fallback = false;
                for piece in rx {
                    let at = aligned_start(&piece.buf);
                    let data = &piece.buf[at..at + piece.len];
                    let r = write_piece(&direct, &buffered, data, piece.offset, &mut fallback);
                    match r {
                        Ok(true) => {
                            s.direct_bytes
                                .fetch_add(piece.len as u64, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            s.failed.lock().expect("writer lock").get_or_insert(e);
                        }
                    }
                    s.free.lock().expect("writer lock").push(piece.buf);
                    s.freed.notify_one();
                }
            })
            .ok()?;
        Some(Self {
            shared,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues blocks `(bytes, offset)` in disk order. Each block's offset
    /// and length must be multiples of `ALIGN`; blocks that follow each
    /// other on disk share one write. Returns an earlier write's error.
    pub fn write<'a>(&self, blocks: impl IntoIterator<Item = (&'a [u8], u64)>) -> io::Result<()> {
        let mut current: Option<Piece> = None;
        for (mut bytes, mut offset) in blocks {
            debug_assert!(
                offset.is_multiple_of(ALIGN) && (bytes.len() as u64).is_multiple_of(ALIGN)
            );
            while !bytes.is_empty() {
                if let Some(p) = &current
                    && (p.offset + p.len as u64 != offset || p.len == RUN)
                {
                    self.send(current.take().expect("checked"))?;
                }
                let piece = match &mut current {
                    Some(p) => p,
                    None => current.insert(Piece {
                        buf: self.take_buffer()?,
                        len: 0,
                        offset,
                    }),
                };
                let n = bytes.len().min(RUN - piece.len);
                let at = aligned_start(&piece.buf) + piece.len;
                piece.buf[at..at + n].copy_from_slice(&bytes[..n]);
                piece.len += n;
                bytes = &bytes[n..];
                offset += n as u64;
            }
        }
        match current {
            Some(p) => self.send(p),
            None => Ok(()),
        }
    }

    /// Waits for every queued write; returns the bytes written unbuffered,
    /// or the first write error.
    pub fn finish(mut self) -> io::Result<u64> {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match self.shared.failed.lock().expect("writer lock").take() {
            Some(e) => Err(e),
            None => Ok(self.shared.direct_bytes.load(Ordering::Relaxed)),
        }
    }

    fn take_buffer(&self) -> io::Result<Vec<u8>> {
        let mut free = self.shared.free.lock().expect("writer lock");
        loop {
            self.check()?;
            if let Some(b) = free.pop() {
                return Ok(b);
            }
            free = self.shared.freed.wait(free).expect("writer lock");
        }
    }

    fn send(&self, piece: Piece) -> io::Result<()> {
        self.check()?;
        let tx = self.tx.as_ref().expect("sender lives until finish");
        tx.send(piece)
            .map_err(|_| io::Error::other("the restore writer thread stopped"))
    }

    fn check(&self) -> io::Result<()> {
        match &*self.shared.failed.lock().expect("writer lock") {
            Some(e) => Err(io::Error::new(e.kind(), e.to_string())),
            None => Ok(()),
        }
    }
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn runs_land_where_they_belong_and_count_as_direct() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.raw");
        let file = Arc::new(File::create(&path).unwrap());
        file.set_len(16 << 20).unwrap();
        let Some(w) = DirectWriter::open(&path, file.clone(), 1) else {
            panic!("the test folder's filesystem refuses O_DIRECT");
        };
        let (a, b, c) = (pattern(1 << 20, 1), pattern(5 << 20, 2), pattern(8192, 3));
        // a and b follow each other on disk (one run, split at RUN); c is apart.
        w.write([(&a[..], 0), (&b[..], 1 << 20), (&c[..], 12 << 20)])
            .unwrap();
        assert_eq!(w.finish().unwrap(), (6 << 20) + 8192);
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[..1 << 20], &a[..]);
        assert_eq!(&got[1 << 20..6 << 20], &b[..]);
        assert!(got[6 << 20..12 << 20].iter().all(|&x| x == 0));
        assert_eq!(&got[12 << 20..(12 << 20) + 8192], &c[..]);
    }

    #[test]
    fn a_refused_direct_write_goes_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.raw");
        let buffered = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let direct = open_direct(&path).expect("O_DIRECT where the tests run");
        // An unaligned buffer and offset: O_DIRECT refuses them (EINVAL).
        let data = pattern(1000, 7);
        let mut fallback = false;
        let direct_used = write_piece(&direct, &buffered, &data, 3, &mut fallback).unwrap();
        assert!(!direct_used && fallback);
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[3..1003], &data[..]);
    }

    #[test]
    fn a_failed_write_is_reported_and_nobody_waits_forever() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.raw");
        let file = Arc::new(File::create(&path).unwrap());
        let w = DirectWriter::open(&path, file, 1).unwrap();
        // Far beyond the largest file size ext4 allows: EFBIG, not EINVAL.
        let block = pattern(1 << 20, 9);
        let many: Vec<(&[u8], u64)> = (0..16u64)
            .map(|i| (&block[..], (1u64 << 62) + i * (8 << 20)))
            .collect();
        let _ = w.write(many.iter().copied());
        let e = w.finish().unwrap_err();
        assert_ne!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    }
}
