//! What the exclusion plugins share: find the volumes of a disk (the
//! partitions of its MBR or GPT, or the whole disk when it has no table),
//! recognise what each holds (a Linux swap area, ext2/3/4, NTFS) and ask it
//! for one kind of excludable blocks.
//!
//! A volume nothing here recognises is kept whole. A recognised volume that
//! fails to parse, a damaged partition table, or a disk where nothing is
//! recognised at all is an `Err`: the host then keeps the whole disk and
//! says so in the session's notices.

use crate::disk::{ReadAt, Slice};
use crate::extent::{Extent, normalise};
use crate::glob::Pattern;
use crate::{ext4, ntfs, swap, table};

/// Paths of Windows' paging, swap and hibernation files.
pub const WINDOWS_SWAP_FILES: [&str; 3] = ["/pagefile.sys", "/swapfile.sys", "/hiberfil.sys"];

/// One kind of blocks not worth keeping.
pub enum Concern<'c> {
    /// Linux swap partitions (all but their header page), the Linux swap
    /// files named (all but their header page) and Windows' paging, swap
    /// and hibernation files.
    Swap { swapfiles: &'c [String] },
    /// Blocks the filesystems' bitmaps call free.
    Free,
    /// Data of the files matching the patterns.
    Paths { patterns: &'c [Pattern] },
}

enum Kind {
    Swap(u64),
    Ext4,
    Ntfs,
}

/// The excluded byte ranges of `disk` for `concern`, sorted and merged.
pub fn excluded(disk: &(impl ReadAt + ?Sized), concern: &Concern) -> Result<Vec<Extent>, String> {
    let size = disk.size();
    let volumes: Vec<(String, Extent)> = match table::read(disk)? {
        Some(t) => table::volumes(&t, size)?
            .into_iter()
            .map(|p| (format!("{} partition {}", t.scheme, p.number), p.extent))
            .collect(),
        None => vec![(
            "the whole disk".to_owned(),
            Extent {
                offset: 0,
                length: size,
            },
        )],
    };
    let mut out = Vec::new();
    let mut recognised = 0;
    let mut unknown = Vec::new();
    for (label, vol) in &volumes {
        if vol.offset < 512 && volumes.len() > 1 {
            return Err(format!("{label} overlaps the partition table"));
        }
        let view = Slice::new(disk, vol.offset, vol.length);
        let found = one_volume(&view, concern).map_err(|e| format!("{label}: {e}"))?;
        let Some(extents) = found else {
            unknown.push(label.clone());
            continue;
        };
        recognised += 1;
        for e in extents {
            // Never outside the volume it was found in, whatever a parser said.
            let inside = e
                .offset
                .checked_add(e.length)
                .is_some_and(|end| end <= vol.length);
            if !inside {
                return Err(format!(
                    "{label}: range {}+{} lies outside the volume",
                    e.offset, e.length
                ));
            }
            out.push(Extent {
                offset: vol.offset + e.offset,
                length: e.length,
            });
        }
    }
    if recognised == 0 {
        return Err(if volumes.is_empty() {
            "the partition table lists no partitions".into()
        } else {
            format!(
                "found no Linux swap area, ext2/3/4 or NTFS filesystem ({} holds none)",
                unknown.join(", ")
            )
        });
    }
    Ok(normalise(out, size))
}

fn kind(view: &(impl ReadAt + ?Sized)) -> Result<Option<Kind>, String> {
    let swap = swap::page_size(view, 0)?;
    let is_ext4 = ext4::detect(view)?;
    let is_ntfs = ntfs::detect(view)?;
    Ok(match (swap, is_ext4, is_ntfs) {
        (Some(page), false, false) => Some(Kind::Swap(page)),
        (None, true, false) => Some(Kind::Ext4),
        (None, false, true) => Some(Kind::Ntfs),
        (None, false, false) => None,
        _ => return Err("carries the signatures of more than one of swap, ext4 and NTFS".into()),
    })
}

/// `None` when the volume holds nothing recognised.
fn one_volume(
    view: &(impl ReadAt + ?Sized),
    concern: &Concern,
) -> Result<Option<Vec<Extent>>, String> {
    let Some(kind) = kind(view)? else {
        return Ok(None);
    };
    Ok(Some(match kind {
        Kind::Swap(page) => match concern {
            Concern::Swap { .. } => swap::body(0, view.size(), page).into_iter().collect(),
            _ => Vec::new(),
        },
        Kind::Ext4 => {
            let fs = ext4::Ext4::open(view)?;
            let runs = match concern {
                Concern::Swap { swapfiles } => fs.swap_files(swapfiles)?,
                Concern::Free => fs.free_blocks()?,
                Concern::Paths { patterns } => fs.matching_files(patterns)?,
            };
            fs.to_extents(&runs)
        }
        Kind::Ntfs => {
            let mut fs = ntfs::Volume::open(view)?;
            let runs = match concern {
                Concern::Swap { .. } => {
                    let names: Vec<String> =
                        WINDOWS_SWAP_FILES.iter().map(|s| s.to_string()).collect();
                    fs.swap_files(&names)?
                }
                Concern::Free => fs.free_clusters()?,
                Concern::Paths { patterns } => fs.matching_files(patterns)?,
            };
            fs.to_extents(&runs)
        }
    }))
}

#[cfg(test)]
mod tests;
