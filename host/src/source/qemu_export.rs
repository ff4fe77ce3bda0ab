//! Disk formats through QEMU's block layer: a `qemu-storage-daemon` child
//! exports an image (qcow2, vhdx, vmdk, ...) as a raw file over FUSE, so the
//! rest of arca reads every format the same way, holes included (the FUSE
//! export answers SEEK_DATA/SEEK_HOLE from the format's allocation map).
//! No format is parsed here.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for an export to appear.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Image formats arca reads and writes through QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
    Vhdx,
    Vmdk,
}

impl DiskFormat {
    /// The format named by a file's extension; raw otherwise. The format is
    /// never probed from content: a guest can write any header into a raw
    /// disk.
    pub fn from_extension(path: &Path) -> Self {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("qcow2") => DiskFormat::Qcow2,
            Some("vhdx") => DiskFormat::Vhdx,
            Some("vmdk") => DiskFormat::Vmdk,
            _ => DiskFormat::Raw,
        }
    }

    pub fn driver(&self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vhdx => "vhdx",
            DiskFormat::Vmdk => "vmdk",
        }
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            "vhdx" => Ok(DiskFormat::Vhdx),
            "vmdk" => Ok(DiskFormat::Vmdk),
            other => Err(format!(
                "unknown disk format '{other}' (raw, qcow2, vhdx, vmdk)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot start qemu-storage-daemon for {image}: {source} (install qemu-utils)")]
    Spawn {
        image: PathBuf,
        source: std::io::Error,
    },
    #[error("qemu-storage-daemon could not export {image} as {format}: {message}")]
    Failed {
        image: PathBuf,
        format: &'static str,
        message: String,
    },
}

/// A running export; stopped and unmounted on drop.
pub struct QemuExport {
    child: Child,
    mountpoint: PathBuf,
}

impl QemuExport {
    /// Exports `image` (of `format`) at a new file in `dir`.
    pub fn start(
        image: &Path,
        format: DiskFormat,
        writable: bool,
        dir: &Path,
    ) -> Result<Self, ExportError> {
        let failed = |message: String| ExportError::Failed {
            image: image.to_owned(),
            format: format.driver(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        let mountpoint = dir.join(format!(
            "export-{}-{}",
            std::process::id(),
            crate::repository::hex(&rand::random::<[u8; 6]>())
        ));
        File::create(&mountpoint).map_err(|e| failed(format!("{}: {e}", mountpoint.display())))?;
        let ro = if writable { "off" } else { "on" };
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0,read-only={ro}",
                qemu_escape(image)
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver={},file=file0,node-name=disk0,read-only={ro}",
                format.driver()
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=exp0,node-name=disk0,mountpoint={},writable={}",
                qemu_escape(&mountpoint),
                if writable { "on" } else { "off" }
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl in the child between fork and exec only sets the
        // signal it gets when arca dies, so a killed arca never leaves an
        // export (and its FUSE mount) behind; qemu unmounts on SIGTERM.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| {
            let _ = std::fs::remove_file(&mountpoint);
            ExportError::Spawn {
                image: image.to_owned(),
                source,
            }
        })?;
        let mut export = QemuExport { child, mountpoint };
        let parent_dev = std::fs::metadata(dir).map(|m| m.dev()).unwrap_or(0);
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = export.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = export.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(failed(format!("{status}: {}", err.trim())));
            }
            if std::fs::metadata(&export.mountpoint).is_ok_and(|m| m.dev() != parent_dev) {
                return Ok(export);
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(failed(format!(
                    "the export did not appear within {READY_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for QemuExport {
    fn drop(&mut self) {
        // SIGTERM lets qemu flush and unmount; kill only if it does not stop.
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
        let _ = std::fs::remove_file(&self.mountpoint);
    }
}

/// QEMU option values separate fields with commas; a literal comma is doubled.
fn qemu_escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// Removes export files left by processes that are gone (their daemon died
/// with them, by PDEATHSIG); returns what it removed.
pub fn sweep_exports(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("export-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        if super::image_file::process_alive(pid) {
            continue;
        }
        let _ = Command::new("umount").arg("-l").arg(e.path()).status();
        if std::fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}
