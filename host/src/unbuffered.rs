//! Unbuffered (`O_DIRECT`) writes, shared by restores and pack files.
//!
//! Bytes written once and not read back soon (a restored disk, a pack of
//! chunks) cost the kernel a page allocation and a copy each when they go
//! through the page cache, and on the virtual machines arca was measured on
//! a page cache page touched for the first time is dear: a buffered write
//! of 1 GiB took 1.6–3.9 s of system time, an unbuffered one 0.12 s
//! (docs/BENCHMARKS.md). An unbuffered write needs its offset, length and
//! buffer address aligned; where a filesystem refuses it, the same bytes go
//! through the page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Offsets, lengths and buffer addresses of direct writes are multiples of
/// this, which satisfies every logical block size up to 4 KiB.
pub const ALIGN: u64 = 4096;

/// Where the first page-aligned byte of `buf` is; a buffer with `ALIGN`
/// bytes to spare holds a whole aligned run after it.
pub fn aligned_start(buf: &[u8]) -> usize {
    buf.as_ptr().align_offset(ALIGN as usize)
}

/// `path` opened again for unbuffered writes; `None` where its filesystem
/// does not allow `O_DIRECT` (tmpfs on older kernels, FUSE), and the
/// caller writes through its ordinary descriptor.
pub fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| tracing::debug!("{}: no O_DIRECT ({e}); writing buffered", path.display()))
        .ok()
}

/// Writes one piece; `Ok(true)` if it went to the device directly. A
/// device or filesystem that refuses the write unbuffered gets this piece
/// and the rest through the page cache.
pub fn write_piece(
    direct: &File,
    buffered: &File,
    data: &[u8],
    offset: u64,
    fallback: &mut bool,
) -> io::Result<bool> {
    if !*fallback {
        match direct.write_all_at(data, offset) {
            Ok(()) => return Ok(true),
            // EINVAL: alignment; EOPNOTSUPP: a filesystem that opens with
            // O_DIRECT and then refuses it (some FUSE and network ones).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                tracing::debug!("O_DIRECT write refused ({e}); writing buffered");
                *fallback = true;
            }
            Err(e) => return Err(e),
        }
    }
    buffered.write_all_at(data, offset)?;
    Ok(false)
}
