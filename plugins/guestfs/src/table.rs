//! Finding partitions: an MBR (with logical partitions in an extended one)
//! through `mbrman`, or a GPT when the MBR is protective or absent.

use crate::disk::{Cursor, ReadAt};
use crate::extent::Extent;
use crate::gpt;

/// MBR partition type of the protective entry that covers a GPT disk.
const GPT_PROTECTIVE: u8 = 0xEE;
const MBR_SECTOR: u32 = 512;
/// `mbrman` follows the EBR chain one sector read per link; a crafted chain
/// could ask for billions. Far more links than any real disk has.
const MAX_MBR_SEEKS: u32 = 16 * 1024;

/// What the table says a partition holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionType {
    /// The partition type GUID as stored on disk (mixed endian).
    Gpt([u8; 16]),
    /// The MBR system id byte.
    Mbr(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based: GPT entry slot, or MBR 1-4 primary and 5.. logical.
    pub number: u32,
    pub extent: Extent,
    pub kind: PartitionType,
}

pub struct Table {
    pub scheme: &'static str,
    /// Used partitions only.
    pub partitions: Vec<Partition>,
}

/// Linux swap, GUID 0657FD6D-A4AB-43C4-84E5-0933C84B4F4F in on-disk order.
pub const GPT_LINUX_SWAP: [u8; 16] = [
    0x6D, 0xFD, 0x57, 0x06, 0xAB, 0xA4, 0xC4, 0x43, 0x84, 0xE5, 0x09, 0x33, 0xC8, 0x4B, 0x4F, 0x4F,
];
pub const MBR_LINUX_SWAP: u8 = 0x82;

impl PartitionType {
    pub fn is_linux_swap(&self) -> bool {
        match self {
            PartitionType::Gpt(guid) => *guid == GPT_LINUX_SWAP,
            PartitionType::Mbr(sys) => *sys == MBR_LINUX_SWAP,
        }
    }

    /// MBR containers of logical partitions (CHS, LBA, Linux extended).
    pub fn is_extended(&self) -> bool {
        matches!(self, PartitionType::Mbr(0x05 | 0x0F | 0x85))
    }
}

pub fn read(disk: &(impl ReadAt + ?Sized)) -> Result<Option<Table>, String> {
    let sector0 = disk.read_at(0, MBR_SECTOR)?;
    let has_mbr = sector0.len() == MBR_SECTOR as usize && sector0[510..512] == [0x55, 0xAA];
    let protective = has_mbr && (0..4).any(|i| sector0[446 + 16 * i + 4] == GPT_PROTECTIVE);
    if has_mbr && !protective {
        return read_mbr(disk).map(Some);
    }
    // 512-byte sectors are the norm for virtual disks; 4 KiB-sector disks
    // put the GPT header at byte 4096 instead.
    for sector in [512, 4096] {
        if let Some(partitions) = gpt::read(disk, sector)? {
            return Ok(Some(Table {
                scheme: "GPT",
                partitions,
            }));
        }
    }
    if protective {
        Err("the MBR is protective (type 0xEE) but no GPT header was found".into())
    } else {
        Ok(None)
    }
}

fn read_mbr(disk: &(impl ReadAt + ?Sized)) -> Result<Table, String> {
    let mut cursor = Cursor::new(disk).with_seek_budget(MAX_MBR_SEEKS);
    let mbr = mbrman::MBR::read_from(&mut cursor, MBR_SECTOR)
        .map_err(|e| format!("cannot read the MBR partition table: {e}"))?;
    let sector = u64::from(MBR_SECTOR);
    let partitions = mbr
        .iter()
        .filter(|(_, p)| p.is_used() && p.sectors > 0)
        .map(|(n, p)| Partition {
            number: n as u32,
            extent: Extent {
                offset: u64::from(p.starting_lba) * sector,
                length: u64::from(p.sectors) * sector,
            },
            kind: PartitionType::Mbr(p.sys),
        })
        .collect();
    Ok(Table {
        scheme: "MBR",
        partitions,
    })
}

/// Extents of the requested partitions; every number must exist.
pub fn select(table: &Table, numbers: &[u32]) -> Result<Vec<Extent>, String> {
    numbers
        .iter()
        .map(|&n| {
            table
                .partitions
                .iter()
                .find(|p| p.number == n)
                .map(|p| p.extent)
                .ok_or_else(|| {
                    let existing: Vec<String> = table
                        .partitions
                        .iter()
                        .map(|p| p.number.to_string())
                        .collect();
                    format!(
                        "partition {n} does not exist ({} partitions: {})",
                        table.scheme,
                        if existing.is_empty() {
                            "none".into()
                        } else {
                            existing.join(", ")
                        }
                    )
                })
        })
        .collect()
}

/// The partitions that hold data (extended containers left out), checked to
/// lie inside the disk and not to overlap: a table that breaks either rule is
/// damaged, and nothing on such a disk can be judged.
pub fn volumes(table: &Table, disk_size: u64) -> Result<Vec<Partition>, String> {
    let mut parts: Vec<Partition> = table
        .partitions
        .iter()
        .filter(|p| !p.kind.is_extended())
        .copied()
        .collect();
    parts.sort_by_key(|p| p.extent.offset);
    let mut end = 0u64;
    for p in &parts {
        let p_end = p.extent.offset.checked_add(p.extent.length);
        if p_end.is_none_or(|e| e > disk_size) {
            return Err(format!(
                "{} partition {} ({}+{}) runs past the end of the disk ({disk_size} bytes)",
                table.scheme, p.number, p.extent.offset, p.extent.length
            ));
        }
        if p.extent.offset < end {
            return Err(format!(
                "{} partition {} overlaps another partition",
                table.scheme, p.number
            ));
        }
        end = p_end.unwrap_or(u64::MAX);
    }
    Ok(parts)
}

#[cfg(test)]
mod tests;
