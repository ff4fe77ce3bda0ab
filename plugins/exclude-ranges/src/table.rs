//! Finding partitions: an MBR (with logical partitions in an extended one)
//! through `mbrman`, or a GPT when the MBR is protective or absent.

use crate::disk::{Cursor, ReadAt};
use crate::extent::Extent;
use crate::gpt;

/// MBR partition type of the protective entry that covers a GPT disk.
const GPT_PROTECTIVE: u8 = 0xEE;
const MBR_SECTOR: u32 = 512;

pub struct Table {
    pub scheme: &'static str,
    /// Used partitions only, as (1-based number, extent).
    pub partitions: Vec<(u32, Extent)>,
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
    let mbr = mbrman::MBR::read_from(&mut Cursor::new(disk), MBR_SECTOR)
        .map_err(|e| format!("cannot read the MBR partition table: {e}"))?;
    let sector = u64::from(MBR_SECTOR);
    let partitions = mbr
        .iter()
        .filter(|(_, p)| p.is_used() && p.sectors > 0)
        .map(|(n, p)| {
            let extent = Extent {
                offset: u64::from(p.starting_lba) * sector,
                length: u64::from(p.sectors) * sector,
            };
            (n as u32, extent)
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
                .find(|(m, _)| *m == n)
                .map(|&(_, e)| e)
                .ok_or_else(|| {
                    let existing: Vec<String> = table
                        .partitions
                        .iter()
                        .map(|(m, _)| m.to_string())
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

#[cfg(test)]
mod tests;
