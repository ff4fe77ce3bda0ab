//! Image-file VMs: a VM is a name with raw disk image files.
//!
//! The snapshot of a raw file is a reflink clone (FICLONE) beside it, which
//! costs no copy and freezes the content at one instant. Where the filesystem
//! cannot clone, the live file is read and the report says the restore point
//! is consistent only if the VM was powered off.

use super::mapped::MappedFile;
use super::qemu_export::{DiskFormat, ExportError, QemuExport};
use super::{Consistency, DiskRead};
use crate::extent::{Extent, normalize};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Marker in the names of snapshot clones, so that orphans can be found.
const SNAPSHOT_MARK: &str = ".arca-snapshot-";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("snapshot of {path}: {source}")]
    Snapshot { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Export(#[from] ExportError),
}

/// A raw image file opened read-only.
pub struct RawImage {
    file: File,
    size: u64,
    map: Option<MappedFile>,
}

impl RawImage {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let open_err = |source| SourceError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(SourceError::NotAFile {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            file,
            size: meta.len(),
            map: None,
        })
    }

    /// Opens and also maps the file, if it can be (see `source::mapped`),
    /// unless it is on FUSE: that is how QEMU exports non-raw images, and a
    /// map there would send every page fault through the export's process.
    pub fn open_mapped(path: &Path) -> Result<Self, SourceError> {
        let mut image = Self::open(path)?;
        if !on_fuse(&image.file) {
            image.map = MappedFile::map(&image.file, image.size);
        }
        Ok(image)
    }
}

impl DiskRead for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn allocation(&self) -> io::Result<Vec<Extent>> {
        data_extents(&self.file, self.size)
    }

    fn mapped(&self) -> Option<&MappedFile> {
        self.map.as_ref()
    }

    fn check_intact(&self) -> io::Result<()> {
        let now = self.file.metadata()?.len();
        if now < self.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the image shrank from {} to {now} bytes while it was read",
                    self.size
                ),
            ));
        }
        self.map.as_ref().map_or(Ok(()), MappedFile::check)
    }
}

fn on_fuse(file: &File) -> bool {
    // SAFETY: fstatfs fills the zeroed struct for an open descriptor.
    unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut fs) == 0
            && fs.f_type == libc::FUSE_SUPER_MAGIC as libc::__fsword_t
    }
}

/// Data ranges of a file by SEEK_DATA/SEEK_HOLE, so that holes of sparse
/// images are never read. A filesystem without hole support reports one
/// data range, which is still correct.
fn data_extents(file: &File, size: u64) -> io::Result<Vec<Extent>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let end = size as i64;
    while pos < end {
        // SAFETY: lseek on a file descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Ok(vec![Extent::new(0, size)]);
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        out.push(Extent::new(data as u64, (hole.min(end) - data) as u64));
        pos = hole;
    }
    Ok(normalize(out, size))
}

/// Whether an image keeps guest data in files other than itself, and which
/// kind: a qcow2 with an external data file (incompatible feature bit 2 of
/// a version 3 header), or a VMDK that is not one of the single-file kinds
/// (magic `KDMV`, sparse and stream-optimized, or `COWD`): a text
/// descriptor, whose extents are separate files. Backing files do not count: the guest
/// writes only the top image. Read from the header, not from `qemu-img`,
/// so that it costs a session one small read per disk.
pub fn data_elsewhere(path: &Path, format: DiskFormat) -> io::Result<Option<&'static str>> {
    use std::io::Read;
    if !matches!(format, DiskFormat::Qcow2 | DiskFormat::Vmdk) {
        return Ok(None);
    }
    let mut head = Vec::with_capacity(80);
    File::open(path)?.take(80).read_to_end(&mut head)?;
    Ok(match format {
        DiskFormat::Qcow2 => {
            let v3 = head.len() >= 80
                && head.starts_with(b"QFI\xfb")
                && u32::from_be_bytes(head[4..8].try_into().expect("4 bytes")) >= 3;
            let incompatible =
                v3.then(|| u64::from_be_bytes(head[72..80].try_into().expect("8 bytes")));
            incompatible
                .is_some_and(|f| f & 0b100 != 0)
                .then_some("a qcow2 external data file")
        }
        DiskFormat::Vmdk => (!head.starts_with(b"KDMV") && !head.starts_with(b"COWD"))
            .then_some("VMDK extent files"),
        _ => None,
    })
}

/// One disk of an image-file VM: its file and format.
#[derive(Debug, Clone)]
pub struct DiskSource {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// The snapshot of one image-file VM: one readable view per disk, and the
/// exports and clones to remove when it is dropped.
pub struct ImageSnapshot {
    pub disks: Vec<Arc<RawImage>>,
    /// The file each disk is read from (a clone, an export, or the live file),
    /// for a proxy agent that reads it itself.
    pub paths: Vec<PathBuf>,
    pub consistency: Consistency,
    /// For the session's report: why the disks are read live.
    pub notices: Vec<String>,
    exports: Vec<QemuExport>,
    clones: Vec<PathBuf>,
}

impl ImageSnapshot {
    /// Clones every disk at (as near as a filesystem allows) one instant, and
    /// exports non-raw formats through QEMU. `tag` makes clone names unique
    /// per session and process; exports live in `export_dir`.
    pub fn take(
        disks: &[DiskSource],
        tag: &str,
        powered_off: bool,
        export_dir: &Path,
    ) -> Result<Self, SourceError> {
        let mut snap = ImageSnapshot {
            disks: Vec::new(),
            paths: Vec::new(),
            consistency: Consistency::CrashConsistent,
            notices: Vec::new(),
            exports: Vec::new(),
            clones: Vec::new(),
        };
        // Opening each source first gives a clear error for a missing disk.
        let mut elsewhere = None;
        for d in disks {
            RawImage::open(&d.path)?;
            if elsewhere.is_none()
                && let Some(what) =
                    data_elsewhere(&d.path, d.format).map_err(|source| SourceError::Snapshot {
                        path: d.path.clone(),
                        source,
                    })?
            {
                elsewhere = Some((d.path.clone(), what));
            }
        }
        let mut read_from: Vec<PathBuf> = disks.iter().map(|d| d.path.clone()).collect();
        if powered_off {
            snap.consistency = Consistency::PoweredOff;
        } else if let Some((path, what)) = elsewhere {
            // A clone of the configured file would still read the guest's
            // data from the live files it names: no instant at all.
            snap.consistency = Consistency::PoweredOffOnly;
            snap.notices.push(format!(
                "{} keeps its data in other files ({what}), which a reflink clone of it does not freeze: the VM's disks are read live, consistent only if it is powered off",
                path.display()
            ));
        } else {
            for d in disks {
                let clone_path = clone_name(&d.path, tag);
                match reflink(&d.path, &clone_path) {
                    Ok(()) => snap.clones.push(clone_path),
                    Err(e) if is_unsupported(&e) => {
                        // A mix of clones and live reads would claim more
                        // consistency than it has: all live, and say so.
                        snap.remove_clones();
                        snap.consistency = Consistency::PoweredOffOnly;
                        break;
                    }
                    Err(source) => {
                        return Err(SourceError::Snapshot {
                            path: d.path.clone(),
                            source,
                        });
                    }
                }
            }
            if snap.consistency == Consistency::CrashConsistent {
                read_from = snap.clones.clone();
            }
        }
        for (d, path) in disks.iter().zip(&read_from) {
            if d.format == DiskFormat::Raw {
                snap.disks.push(Arc::new(RawImage::open_mapped(path)?));
                snap.paths.push(path.clone());
            } else {
                let export = QemuExport::start(path, d.format, false, export_dir)?;
                snap.disks.push(Arc::new(RawImage::open(export.path())?));
                snap.paths.push(export.path().to_owned());
                snap.exports.push(export);
            }
        }
        Ok(snap)
    }

    fn remove_clones(&mut self) {
        for clone in self.clones.drain(..) {
            if let Err(e) = std::fs::remove_file(&clone)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!("could not remove snapshot clone {}: {e}", clone.display());
            }
        }
    }
}

impl Drop for ImageSnapshot {
    fn drop(&mut self) {
        // Readers first, then the exports that serve them, then the clones
        // the exports read.
        self.disks.clear();
        self.exports.clear();
        self.remove_clones();
    }
}

fn clone_name(path: &Path, tag: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{SNAPSHOT_MARK}{tag}-{}", std::process::id()));
    path.with_file_name(name)
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

fn reflink(from: &Path, to: &Path) -> io::Result<()> {
    let src = File::open(from)?;
    let dst = OpenOptions::new().write(true).create_new(true).open(to)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE as _, src.as_raw_fd()) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        drop(dst);
        let _ = std::fs::remove_file(to);
        return Err(err);
    }
    Ok(())
}

/// Removes snapshot clones left beside these disks by processes that no
/// longer run; returns what it removed so the report can say so.
pub fn sweep_orphans(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for path in paths {
        let (Some(dir), Some(base)) = (path.parent(), path.file_name()) else {
            continue;
        };
        let prefix = format!("{}{SNAPSHOT_MARK}", base.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            let pid = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
            if pid.is_some_and(process_alive) {
                continue;
            }
            if std::fs::remove_file(entry.path()).is_ok() {
                removed.push(entry.path());
            }
        }
    }
    removed
}

pub(crate) fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid == std::process::id() as i32
        || unsafe { libc::kill(pid, 0) } == 0
        // It exists but is another user's (an arca running as someone else).
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn allocation_skips_holes_of_sparse_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let mut f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&vec![1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let img = RawImage::open(&path).unwrap();
        let alloc = img.allocation().unwrap();
        let data: u64 = alloc.iter().map(|e| e.length).sum();
        assert!((1 << 20..8 << 20).contains(&data), "allocation {alloc:?}");
        assert!(
            alloc
                .iter()
                .any(|e| e.offset <= 8 << 20 && e.end() >= 9 << 20)
        );
    }

    #[test]
    fn images_that_keep_data_in_other_files_are_told() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, args: &[&str]| {
            let path = dir.path().join(name);
            let ok = std::process::Command::new("qemu-img")
                .arg("create")
                .arg("-q")
                .args(args)
                .arg(&path)
                .arg("8M")
                .status()
                .unwrap();
            assert!(ok.success());
            path
        };
        let data_file = dir.path().join("data.raw");
        let cases = [
            (
                make("plain.qcow2", &["-f", "qcow2"]),
                DiskFormat::Qcow2,
                None,
            ),
            (
                make(
                    "external.qcow2",
                    &[
                        "-f",
                        "qcow2",
                        "-o",
                        &format!("data_file={}", data_file.display()),
                    ],
                ),
                DiskFormat::Qcow2,
                Some("a qcow2 external data file"),
            ),
            (make("sparse.vmdk", &["-f", "vmdk"]), DiskFormat::Vmdk, None),
            (
                make(
                    "stream.vmdk",
                    &["-f", "vmdk", "-o", "subformat=streamOptimized"],
                ),
                DiskFormat::Vmdk,
                None,
            ),
            (
                make(
                    "flat.vmdk",
                    &["-f", "vmdk", "-o", "subformat=monolithicFlat"],
                ),
                DiskFormat::Vmdk,
                Some("VMDK extent files"),
            ),
            (
                make(
                    "split.vmdk",
                    &["-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"],
                ),
                DiskFormat::Vmdk,
                Some("VMDK extent files"),
            ),
            (make("one.vhdx", &["-f", "vhdx"]), DiskFormat::Vhdx, None),
        ];
        for (path, format, want) in cases {
            assert_eq!(
                data_elsewhere(&path, format).unwrap(),
                want,
                "{}",
                path.display()
            );
        }
        // A descriptor that does not start with the usual comment is one too.
        let odd = dir.path().join("odd.vmdk");
        let descriptor = std::fs::read(dir.path().join("flat.vmdk")).unwrap();
        std::fs::write(&odd, [b"\n".as_slice(), &descriptor].concat()).unwrap();
        assert_eq!(
            data_elsewhere(&odd, DiskFormat::Vmdk).unwrap(),
            Some("VMDK extent files")
        );

        // The snapshot says why it reads live, and makes no clone.
        let src = DiskSource {
            path: dir.path().join("external.qcow2"),
            format: DiskFormat::Qcow2,
        };
        let snap = ImageSnapshot::take(&[src], "t2", false, dir.path()).unwrap();
        assert_eq!(snap.consistency, Consistency::PoweredOffOnly);
        assert!(
            snap.notices[0].contains("external data file"),
            "{:?}",
            snap.notices
        );
        assert!(snap.clones.is_empty());
    }

    #[test]
    fn snapshot_is_removed_on_drop_and_orphans_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![5u8; 4096]).unwrap();
        let src = DiskSource {
            path: path.clone(),
            format: DiskFormat::Raw,
        };
        let snap = ImageSnapshot::take(&[src], "t1", false, dir.path()).unwrap();
        assert_eq!(snap.disks.len(), 1);
        drop(snap);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "only the disk remains");

        // An orphan from a process that is gone (pid 0x7fff_fff0 cannot run).
        let orphan = dir
            .path()
            .join(format!("d.raw{SNAPSHOT_MARK}old-{}", 0x7fff_fff0));
        std::fs::write(&orphan, b"x").unwrap();
        assert_eq!(sweep_orphans(&[path]), vec![orphan.clone()]);
        assert!(!orphan.exists());
    }
}
