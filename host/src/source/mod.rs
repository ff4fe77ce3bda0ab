//! Sources: where VM disks come from, and their point-in-time snapshots
//! (seed steps 6, 8 and 11).
//!
//! A snapshot is released by `Drop`, so it is cleaned up on success, on
//! failure and on panic alike; what a killed process leaves behind is swept
//! by the next session (`sweep_orphans`).

pub mod image_file;
pub mod mapped;
pub mod nbd;
pub mod qemu;
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
    /// The disk as a guarded memory map, where it is a local raw file that
    /// could be mapped: hashing then reads the page cache without a copy.
    fn mapped(&self) -> Option<&mapped::MappedFile> {
        None
    }
    /// Errors if the disk lost data since it was opened: a live image file
    /// truncated while a task read it. Checked before a restore point is
    /// committed, since a shrunk file can read as holes rather than fail.
    fn check_intact(&self) -> io::Result<()> {
        Ok(())
    }
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
    /// A point-in-time copy taken while the guest's applications and
    /// filesystems were quiesced by guest processing.
    ApplicationConsistent,
}

impl Consistency {
    pub fn parse(s: &str) -> Option<Self> {
        [
            Consistency::CrashConsistent,
            Consistency::PoweredOff,
            Consistency::PoweredOffOnly,
            Consistency::ApplicationConsistent,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Consistency::CrashConsistent => "crash-consistent",
            Consistency::PoweredOff => "powered-off",
            Consistency::PoweredOffOnly => "consistent-only-if-powered-off",
            Consistency::ApplicationConsistent => "application-consistent",
        }
    }
}

/// Changed block tracking: the ranges written since the snapshot of one
/// restore point. They stand for "what changed" only against that point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The restore point they count from.
    pub since: String,
    pub extents: Vec<Extent>,
}

/// The snapshot of one VM, whatever its source: what tasks read, and how
/// the source learns which restore points were committed.
pub enum VmSnapshot {
    Image(image_file::ImageSnapshot),
    Qemu(qemu::QemuSnapshot),
}

impl VmSnapshot {
    pub fn disk(&self, i: usize) -> std::sync::Arc<dyn DiskRead> {
        match self {
            VmSnapshot::Image(s) => s.disks[i].clone(),
            VmSnapshot::Qemu(s) => s.disk(i),
        }
    }

    /// Where a proxy agent on this host reads disk `i` of the snapshot.
    pub fn locator(&self, i: usize) -> arca_transport::control::DiskLocator {
        use arca_transport::control::DiskLocator;
        match self {
            VmSnapshot::Image(s) => DiskLocator {
                path: s.paths[i].to_string_lossy().into_owned(),
                ..Default::default()
            },
            VmSnapshot::Qemu(s) => {
                let (socket, export) = s.export(i);
                DiskLocator {
                    nbd_socket: socket.to_string_lossy().into_owned(),
                    nbd_export: export,
                    nbd_contexts: vec!["base:allocation".into()],
                    ..Default::default()
                }
            }
        }
    }

    pub fn consistency(&self) -> Consistency {
        match self {
            VmSnapshot::Image(s) => s.consistency,
            VmSnapshot::Qemu(_) => Consistency::CrashConsistent,
        }
    }

    /// Changed block tracking of disk `i`, if its source has it.
    pub fn changes(&self, i: usize) -> Option<Changes> {
        match self {
            VmSnapshot::Image(_) => None,
            VmSnapshot::Qemu(s) => s.changes(i),
        }
    }

    /// The CBT bitmap that counts from this snapshot (empty without CBT).
    pub fn cbt_bitmap(&self, i: usize) -> String {
        match self {
            VmSnapshot::Image(_) => String::new(),
            VmSnapshot::Qemu(s) => s.started_bitmap(i),
        }
    }

    pub fn task_succeeded(&self, i: usize) {
        if let VmSnapshot::Qemu(s) = self {
            s.task_succeeded(i);
        }
    }

    pub fn notices(&self) -> &[String] {
        match self {
            VmSnapshot::Image(s) => &s.notices,
            VmSnapshot::Qemu(s) => &s.notices,
        }
    }
}
