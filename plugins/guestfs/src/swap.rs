//! Linux swap areas (partitions and swap files).
//!
//! `mkswap` writes its header in the first page of the area and ends that
//! page with the ten bytes `SWAPSPACE2`; the page size is the one of the
//! machine that made it (4 KiB on x86 and most arm64, up to 64 KiB
//! elsewhere). Everything after the first page is swapped-out memory, which
//! is worthless once the machine is off. The first page is kept: a restored
//! swap area stays a valid one (`swapon` takes it without `mkswap`), and only
//! the pages after it restore as zeros.

use crate::disk::ReadAt;
use crate::extent::Extent;

pub const SIGNATURE: &[u8; 10] = b"SWAPSPACE2";
const PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];

/// The page size of the swap area that starts at `offset` of `disk`, if one
/// does (signature at the end of its first page).
pub fn page_size(disk: &(impl ReadAt + ?Sized), offset: u64) -> Result<Option<u64>, String> {
    for page in PAGE_SIZES {
        let Some(at) = offset.checked_add(page - SIGNATURE.len() as u64) else {
            continue;
        };
        let bytes = disk.read_at(at, SIGNATURE.len() as u32)?;
        if bytes == SIGNATURE {
            return Ok(Some(page));
        }
    }
    Ok(None)
}

/// What to exclude of a swap area of `length` bytes at `offset` with the
/// given page size: all but the header page.
pub fn body(offset: u64, length: u64, page: u64) -> Option<Extent> {
    (length > page).then(|| Extent {
        offset: offset + page,
        length: length - page,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_signature_at_the_end_of_the_first_page() {
        let mut disk = vec![0u8; 1 << 20];
        assert_eq!(page_size(disk.as_slice(), 0).unwrap(), None);
        disk[8192 + 16384 - 10..8192 + 16384].copy_from_slice(SIGNATURE);
        assert_eq!(page_size(disk.as_slice(), 8192).unwrap(), Some(16384));
        assert_eq!(page_size(disk.as_slice(), u64::MAX - 3).unwrap(), None);
        assert_eq!(
            body(8192, 65536, 16384),
            Some(Extent {
                offset: 8192 + 16384,
                length: 65536 - 16384
            })
        );
        assert_eq!(body(0, 4096, 4096), None);
    }
}
