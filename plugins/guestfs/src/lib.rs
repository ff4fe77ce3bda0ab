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
