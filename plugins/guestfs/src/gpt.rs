//! GPT reading.
//!
//! Parsed here rather than with the `gpt` crate: that crate asserts (panics)
//! on any partition entry size other than 128, allocates whatever array size
//! a header declares, and needs a `Write` device and `uuid`'s random source.
//! Guest disks are untrusted input and the structures are small and fixed, so
//! a bounded parser that turns every defect into an error fits better.

use crc::{CRC_32_ISO_HDLC, Crc};

use crate::disk::{ReadAt, read_exact_at};
use crate::extent::Extent;
use crate::table::{Partition, PartitionType};

const SIGNATURE: &[u8; 8] = b"EFI PART";
const HEADER_LEN: usize = 92;
/// Far above the usual 16 KiB; keeps a hostile header from making us read or
/// allocate gigabytes.
const MAX_ARRAY_BYTES: u64 = 1 << 20;
const CRC32: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

struct Header {
    entries_lba: u64,
    entry_count: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

/// The used partitions of a GPT with `sector`-byte sectors; `None` when
/// neither the primary nor the backup header is there.
pub fn read(disk: &(impl ReadAt + ?Sized), sector: u32) -> Result<Option<Vec<Partition>>, String> {
    let sectors = disk.size() / u64::from(sector);
    let mut first_error = None;
    // The backup header at the last sector is only consulted when the
    // primary one is missing or damaged, as firmware does.
    for lba in [1, sectors.saturating_sub(1)] {
        if lba < 1 || lba >= sectors {
            continue;
        }
        match read_at_lba(disk, sector, lba) {
            Ok(Some(partitions)) => return Ok(Some(partitions)),
            Ok(None) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(None), Err)
}

fn read_at_lba(
    disk: &(impl ReadAt + ?Sized),
    sector: u32,
    lba: u64,
) -> Result<Option<Vec<Partition>>, String> {
    let bytes = read_exact_at(disk, lba * u64::from(sector), sector, "GPT header")?;
    let Some(header) = parse_header(&bytes, lba)? else {
        return Ok(None);
    };
    let array_len = u64::from(header.entry_count) * u64::from(header.entry_size);
    if array_len > MAX_ARRAY_BYTES {
        return Err(format!(
            "GPT header at LBA {lba} declares a {array_len}-byte partition array"
        ));
    }
    let offset = header
        .entries_lba
        .checked_mul(u64::from(sector))
        .ok_or_else(|| format!("GPT header at LBA {lba} puts its partition array past 2^64"))?;
    let array = read_exact_at(disk, offset, array_len as u32, "GPT partition array")?;
    if CRC32.checksum(&array) != header.entries_crc {
        return Err(format!(
            "GPT partition array of the header at LBA {lba} fails its CRC check"
        ));
    }
    let mut partitions = Vec::new();
    for (i, entry) in array.chunks_exact(header.entry_size as usize).enumerate() {
        let number = i as u32 + 1;
        if entry[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (u64_at(entry, 32), u64_at(entry, 40));
        let extent = (first <= last)
            .then(|| {
                let offset = first.checked_mul(u64::from(sector))?;
                let length = (last - first + 1).checked_mul(u64::from(sector))?;
                Some(Extent { offset, length })
            })
            .flatten()
            .ok_or_else(|| {
                format!("GPT partition {number} spans invalid sectors {first}..={last}")
            })?;
        let mut guid = [0u8; 16];
        guid.copy_from_slice(&entry[..16]);
        partitions.push(Partition {
            number,
            extent,
            kind: PartitionType::Gpt(guid),
        });
    }
    Ok(Some(partitions))
}

/// `None` when there is no GPT signature; an error when there is one but the
/// header is damaged, so a corrupt table is never mistaken for no table.
fn parse_header(b: &[u8], lba: u64) -> Result<Option<Header>, String> {
    if b.len() < HEADER_LEN || &b[..8] != SIGNATURE {
        return Ok(None);
    }
    let size = u32_at(b, 12) as usize;
    if !(HEADER_LEN..=b.len()).contains(&size) {
        return Err(format!(
            "GPT header at LBA {lba} has an invalid size {size}"
        ));
    }
    let mut copy = b[..size].to_vec();
    copy[16..20].fill(0);
    if CRC32.checksum(&copy) != u32_at(b, 16) {
        return Err(format!("GPT header at LBA {lba} fails its CRC check"));
    }
    if u64_at(b, 24) != lba {
        return Err(format!(
            "GPT header at LBA {lba} says it is at LBA {}",
            u64_at(b, 24)
        ));
    }
    let entry_size = u32_at(b, 84);
    if entry_size < 128 || !entry_size.is_multiple_of(8) {
        return Err(format!(
            "GPT header at LBA {lba} has an invalid entry size {entry_size}"
        ));
    }
    Ok(Some(Header {
        entries_lba: u64_at(b, 72),
        entry_count: u32_at(b, 80),
        entry_size,
        entries_crc: u32_at(b, 88),
    }))
}

#[cfg(test)]
pub mod tests_support {
    pub fn crc32(bytes: &[u8]) -> u32 {
        super::CRC32.checksum(bytes)
    }
}
