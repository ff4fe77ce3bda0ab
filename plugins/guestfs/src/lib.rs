//! Guest disk structures for arca's exclusion plugins: partition tables,
//! Linux swap areas, ext2/3/4 and NTFS, all read through a [`disk::ReadAt`]
//! (the host's read-only disk resource in a plugin, a byte vector in tests).
//! Every parser turns damage into `Err`, never a panic: plugins run with
//! `panic = "abort"`, where a panic is a trap that fails the task.

pub mod crc32c;
pub mod disk;
pub mod ext4;
pub mod extent;
pub mod glob;
pub mod gpt;
pub mod guest;
pub mod ntfs;
pub mod settings;
pub mod swap;
pub mod table;
#[cfg(test)]
mod testimg;

/// The glue every exclusion plugin over this library needs, written once.
/// Invoked in a plugin crate after `wit_bindgen::generate!` (whose
/// `DiskReader`, `DiskInfo` and `Extent` must be in scope): defines `Disk`,
/// the host's disk resource as a [`disk::ReadAt`], and
/// `excluded(plugin, disk, reader, concern)`, which runs
/// [`guest::excluded`] and answers in WIT extents, with errors that name the
/// plugin and the disk. A macro because the WIT types are generated in each
/// plugin crate, so this library cannot name them.
#[macro_export]
macro_rules! exclusion_glue {
    () => {
        /// The disk resource as the parsers' reader.
        struct Disk<'a>(&'a DiskReader);

        impl $crate::disk::ReadAt for Disk<'_> {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn read_at(&self, offset: u64, length: u32) -> Result<Vec<u8>, String> {
                self.0.read(offset, length)
            }
        }

        /// What `concern` excludes on the disk, as WIT extents.
        fn excluded(
            plugin: &str,
            disk: &DiskInfo,
            reader: &DiskReader,
            concern: &$crate::guest::Concern<'_>,
        ) -> Result<Vec<Extent>, String> {
            let found = $crate::guest::excluded(&Disk(reader), concern)
                .map_err(|e| format!("{plugin}: disk `{}`: {e}", disk.name))?;
            Ok(found
                .into_iter()
                .map(|e| Extent {
                    offset: e.offset,
                    length: e.length,
                })
                .collect())
        }
    };
}
