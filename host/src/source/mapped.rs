//! Read-only memory maps of raw disk images that a shrinking file cannot kill.
//!
//! An incremental backup without changed block tracking reads the whole disk
//! only to hash it; copying it out of the page cache first was 29% of its CPU
//! on the development machine. A map lets the hash read the page cache
//! directly, as `b3sum` does.
//!
//! A map has one hazard a `pread` does not: touching a page past the end of
//! a file that was truncated after mapping raises SIGBUS, which would kill
//! the process. A process-wide SIGBUS handler covers every live map: for a
//! fault inside one it maps a page of zeros over the faulting page and marks
//! the map torn, so the read completes and [`MappedFile::check`] reports the
//! truncation as an error. Faults anywhere else go to the handler that was
//! installed before (or the default action), as if this one did not exist.
//!
//! Written here because no maintained crate does it: `memmap2` leaves
//! SIGBUS to the caller.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Live maps the handler knows. A map that finds no free slot is not made
/// (the caller reads with `pread` instead), so this bounds nothing but speed.
const SLOTS: usize = 64;

struct Slot {
    /// Claimed by a map; set before `start` is published, cleared after.
    used: AtomicBool,
    /// Mapped address range; `start == 0` means none.
    start: AtomicUsize,
    end: AtomicUsize,
    torn: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to fill SLOTS
const EMPTY: Slot = Slot {
    used: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    torn: AtomicBool::new(false),
};
static GUARDED: [Slot; SLOTS] = [EMPTY; SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
/// Whether the handler is in place (tried once per process).
static INSTALLED: OnceLock<bool> = OnceLock::new();
/// The SIGBUS action before ours, written once before ours is installed.
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();

/// A read-only map of a whole file, guarded against truncation.
pub struct MappedFile {
    ptr: *const u8,
    len: usize,
    slot: usize,
}

// SAFETY: the map is read-only and lives until drop; sharing reads of it
// across threads is what it is for.
unsafe impl Send for MappedFile {}
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps the first `len` bytes of `file`; `None` when the map cannot be
    /// guarded or made (the caller then reads with `pread`).
    pub fn map(file: &File, len: u64) -> Option<Self> {
        let len = usize::try_from(len).ok().filter(|l| *l > 0)?;
        if !install_handler() {
            return None;
        }
        let slot = (0..SLOTS).find(|&i| {
            GUARDED[i]
                .used
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        // SAFETY: a fresh read-only shared map of an open descriptor; the
        // kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            GUARDED[slot].used.store(false, Ordering::Release);
            return None;
        }
        let s = &GUARDED[slot];
        s.torn.store(false, Ordering::Relaxed);
        s.end.store(ptr as usize + len, Ordering::Relaxed);
        s.start.store(ptr as usize, Ordering::Release);
        Some(Self {
            ptr: ptr as *const u8,
            len,
            slot,
        })
    }

    /// `len` bytes at `offset`, faulted in with one call so that a cold
    /// range is read with large requests rather than page by page. Errors
    /// if the range is outside the map or the file no longer holds it.
    pub fn range(&self, offset: u64, len: usize) -> io::Result<&[u8]> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|s| s.checked_add(len).is_some_and(|e| e <= self.len))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{len} bytes at {offset} are past the end of the map"),
                )
            })?;
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        let from = start / page * page;
        // SAFETY: [from, start + len) lies inside the map.
        let rc = unsafe {
            libc::madvise(
                self.ptr.add(from) as *mut libc::c_void,
                start + len - from,
                libc::MADV_POPULATE_READ,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // Kernels before 5.14 lack it: the pages then fault one by one.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(if e.raw_os_error() == Some(libc::EFAULT) {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "the image shrank")
                } else {
                    e
                });
            }
        }
        // SAFETY: inside the map, which lives as long as `self`; a page
        // truncated away reads as zeros (and `check` says so), never faults.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.add(start), len) })
    }

    /// Drops the page-table entries of a range read through (the pages stay
    /// in the page cache). Without this a pass over a disk keeps one entry
    /// per 4 KiB page: 2 GiB of page tables for a 1 TiB disk, and a
    /// resident size that counts the whole disk.
    pub fn release(&self, offset: u64, len: usize) {
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        let Some(start) = usize::try_from(offset).ok().filter(|s| *s < self.len) else {
            return;
        };
        let from = start / page * page;
        let to = start.saturating_add(len).min(self.len);
        // SAFETY: inside the map; MADV_DONTNEED on a shared file map only
        // unmaps pages, and a later read maps them again from the file.
        unsafe {
            libc::madvise(
                self.ptr.add(from) as *mut libc::c_void,
                to - from,
                libc::MADV_DONTNEED,
            )
        };
    }

    /// Errors if any read of this map touched a page the file no longer
    /// has: what was read from it since is not the disk's content.
    pub fn check(&self) -> io::Result<()> {
        if GUARDED[self.slot].torn.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image was truncated while it was read",
            ));
        }
        Ok(())
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        let s = &GUARDED[self.slot];
        s.start.store(0, Ordering::Release);
        // SAFETY: the map made in `map`, unmapped once; no slice of it
        // outlives `self`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        s.used.store(false, Ordering::Release);
    }
}

/// Installs the SIGBUS handler once; false if it could not be.
fn install_handler() -> bool {
    *INSTALLED.get_or_init(|| {
        // SAFETY: plain libc calls; PREVIOUS is written here, before the
        // handler that reads it exists.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE_SIZE.store(page as usize, Ordering::Relaxed);
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let previous = &raw mut PREVIOUS;
            libc::sigaction(libc::SIGBUS, &action, (*previous).as_mut_ptr()) == 0
        }
    })
}

/// Async-signal-safe: atomics, `mmap` and `sigaction` only.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &GUARDED {
        let start = s.start.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= s.end.load(Ordering::Relaxed) {
            continue;
        }
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        // SAFETY: replaces one page of our own read-only map with zeros;
        // MAP_FIXED over a mapping we own is what it is for.
        let zero = unsafe {
            libc::mmap(
                (addr / page * page) as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if zero != libc::MAP_FAILED {
            s.torn.store(true, Ordering::Release);
            return; // the faulting read runs again and sees zeros
        }
        break;
    }
    // Not ours: what would have happened without this handler.
    // SAFETY: PREVIOUS was written before this handler was installed.
    unsafe {
        let previous: &libc::sigaction = &*(&raw const PREVIOUS).cast::<libc::sigaction>();
        let target = previous.sa_sigaction;
        if previous.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(target);
            f(sig, info, ctx);
        } else if target != libc::SIG_DFL && target != libc::SIG_IGN {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(target);
            f(sig);
        } else {
            // Default action: restore it, and the fault, run again, takes it.
            libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_the_file_and_survives_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let page = PAGE_SIZE.load(Ordering::Relaxed).max(4096);
        let content: Vec<u8> = (0..4 * page).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&content)
            .unwrap();
        let file = File::open(&path).unwrap();
        let map = MappedFile::map(&file, content.len() as u64).expect("mapped");
        assert_eq!(map.range(0, content.len()).unwrap(), &content[..]);
        assert_eq!(
            map.range(page as u64, 10).unwrap(),
            &content[page..page + 10]
        );
        // Released pages read again from the file.
        map.release(0, 2 * page);
        assert_eq!(map.range(0, content.len()).unwrap(), &content[..]);
        map.check().unwrap();
        assert!(map.range(content.len() as u64 - 1, 2).is_err());

        // Another handle shrinks the file to one page under the map.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(page as u64)
            .unwrap();
        // Populating the lost range says so without a signal...
        assert!(map.range(2 * page as u64, page).is_err());
        // ...and touching it directly (as a read racing the truncation
        // would) raises SIGBUS, which reads zeros and tears the map instead
        // of killing the test.
        // SAFETY: inside the map; the handler makes the page readable.
        let lost = unsafe { std::ptr::read_volatile(map.ptr.add(3 * page + 5)) };
        assert_eq!(lost, 0);
        let err = map.check().unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        // The page still in the file reads as it was.
        // SAFETY: inside the map and inside the file.
        let kept = unsafe { std::ptr::read_volatile(map.ptr.add(7)) };
        assert_eq!(kept, content[7]);
        drop(map);

        // A fresh map of the shrunk file is sound again.
        let map = MappedFile::map(&file, page as u64).expect("mapped");
        map.check().unwrap();
        assert_eq!(map.range(0, page).unwrap(), &content[..page]);
    }

    /// Set in the child process of the test below.
    const CHILD: &str = "ARCA_TEST_FOREIGN_SIGBUS";

    /// A SIGBUS outside every guarded map is not swallowed: it still ends
    /// the process as it would without the handler. Runs in a child process
    /// (this test binary, filtered to this test), which must die of it.
    #[test]
    fn a_fault_outside_the_guarded_maps_still_kills() {
        let page = 4096;
        if let Some(dir) = std::env::var_os(CHILD) {
            let dir = std::path::Path::new(&dir);
            let guarded = dir.join("guarded.raw");
            std::fs::write(&guarded, vec![1u8; page]).unwrap();
            let _map = MappedFile::map(&File::open(&guarded).unwrap(), page as u64).unwrap();
            // A map of someone else's, unguarded, truncated under it.
            let other = dir.join("other.raw");
            std::fs::write(&other, vec![1u8; 2 * page]).unwrap();
            let f = File::open(&other).unwrap();
            // SAFETY: a plain read-only map; touching its lost page is the
            // point of the test.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    2 * page,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                ) as *const u8;
                assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&other)
                    .unwrap()
                    .set_len(0)
                    .unwrap();
                std::ptr::read_volatile(p.add(page + 1));
            }
            std::process::exit(0); // not reached if the signal is delivered
        }
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "source::mapped::tests::a_fault_outside_the_guarded_maps_still_kills",
            ])
            .env(CHILD, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // A handler that swallowed the signal would leave the child faulting
        // forever: that is a failure too, not a hang.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the child neither died of SIGBUS nor exited in 30 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    }
}
