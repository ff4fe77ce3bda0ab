//! Early write-back: asks the kernel to start writing dirty pages to the
//! device while the work that made them goes on.
//!
//! A backup or a restore ends with a sync (`syncfs` before a restore point
//! is published, `fsync` of a restored disk). Left alone, the kernel writes
//! nothing back until far more is dirty than a backup makes, so that sync
//! would start the whole write only at the end: 1.25 s of an 8 s full backup
//! of a 4 GiB disk on the development machine, spent waiting while both
//! cores were idle. With write-back started per file or range as it is
//! written, the device works while the coders do, and the final sync only
//! waits for the tail.
//!
//! Starting write-back can block when the device queue is full, so it runs
//! on a thread of its own, never on a coder's. It is a hint: a request that
//! finds the queue to that thread full is dropped (the final sync still
//! covers its pages), and errors are ignored (filesystems without
//! `sync_file_range` simply write back later). Durability never depends on
//! it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// Requests waiting for the thread; beyond this they are dropped.
const QUEUE: usize = 256;

struct Request {
    file: Arc<File>,
    offset: u64,
    len: u64,
}

pub struct WriteBack {
    tx: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl WriteBack {
    pub fn start() -> Self {
        let (tx, rx) = sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("arca-writeback".into())
            .spawn(move || run(rx))
            .ok();
        Self {
            tx: thread.as_ref().map(|_| tx),
            thread,
        }
    }

    /// Starts writing back `len` bytes of `file` from `offset` (`len` 0:
    /// to the end of the file).
    pub fn range(&self, file: &Arc<File>, offset: u64, len: u64) {
        if let Some(tx) = &self.tx {
            let request = Request {
                file: file.clone(),
                offset,
                len,
            };
            // A full queue drops the request: the final sync covers it.
            let _ = tx.try_send(request);
        }
    }

    /// Starts writing back all of `file`, then closes it.
    pub fn file(&self, file: File) {
        self.range(&Arc::new(file), 0, 0);
    }
}

impl Drop for WriteBack {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(rx: Receiver<Request>) {
    for r in rx {
        // SAFETY: sync_file_range on a descriptor the request keeps open.
        // SYNC_FILE_RANGE_WRITE only starts write-out of dirty pages; it
        // neither waits for it nor changes any data.
        unsafe {
            libc::sync_file_range(
                r.file.as_raw_fd(),
                r.offset as libc::off64_t,
                r.len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Reads the "Dirty:" line of /proc/meminfo, in KiB.
    fn dirty_kib() -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Dirty:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn written_files_are_on_their_way_to_the_device_before_any_sync() {
        // 64 MiB of dirty pages, far under the kernel's own write-back
        // thresholds: without a request they would stay dirty for 30 s.
        // On the disk of the source tree: /tmp may be a tmpfs, whose
        // pages never go to a device.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let before = dirty_kib();
        let wb = WriteBack::start();
        for i in 0..16 {
            let mut f = File::create(dir.path().join(format!("f{i}"))).unwrap();
            f.write_all(&vec![i as u8 + 1; 4 << 20]).unwrap();
            wb.file(f);
        }
        drop(wb); // waits until every request was handed to the kernel
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Dirty memory is shared with everything else on the machine, so
        // the test asks only that most of what it wrote left the dirty set.
        while dirty_kib() > before + 16 * 1024 {
            assert!(
                std::time::Instant::now() < deadline,
                "64 MiB written, {} KiB still dirty (was {before} KiB) after 10 s",
                dirty_kib()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
