//! Sources: where VM disks come from, and their point-in-time snapshots
//! (seed steps 6, 8 and 11).
//!
//! A snapshot is released by `Drop`, so it is cleaned up on success, on
//! failure and on panic alike; what a killed process leaves behind is swept
//! by the next session (`sweep_orphans`).

pub mod image_file;
pub mod nbd;
pub mod qemu_export;
pub mod qmp;

use crate::extent::Extent;
use std::io;

/// Read access to one disk of a snapshot. Shared by the pipeline's reader,
/// the exclusion plugins' disk resource and tests.
pub trait DiskRead: Send + Sync {
    fn size(&self) -> u64;
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Ranges that may hold data; everything else reads as zeros and is
    /// never read.
    fn allocation(&self) -> io::Result<Vec<Extent>>;
}

/// How far the restore point can be trusted to be consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// A point-in-time copy of the disk (a reflink clone): crash-consistent.
    CrashConsistent,
    /// Read from the live file because no snapshot was possible; consistent
    /// only because the operator declared the VM powered off.
    PoweredOff,
    /// Read from the live file of a VM that may be running: consistent only if
    /// it was in fact powered off.
    PoweredOffOnly,
}

impl Consistency {
    pub fn as_str(&self) -> &'static str {
        match self {
            Consistency::CrashConsistent => "crash-consistent",
            Consistency::PoweredOff => "powered-off",
            Consistency::PoweredOffOnly => "consistent-only-if-powered-off",
        }
    }
}
