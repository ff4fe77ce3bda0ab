//! Reflink snapshots on a filesystem that has them (XFS on a loop device,
//! made by the test): the restore point is the disk at the snapshot instant
//! even while the source is rewritten during the backup, and the snapshot is
//! removed afterwards. Live reads where there is no reflink: an image
//! truncated under the backup fails it cleanly.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// An XFS filesystem in a file, loop-mounted; unmounted on drop.
pub struct XfsMount {
    pub dir: PathBuf,
}

impl XfsMount {
    pub fn new(lab: &Lab) -> Self {
        let image = lab.path("xfs.img");
        let dir = lab.path("xfs");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        run(
            "mkfs.xfs",
            &["-q", "-m", "reflink=1", image.to_str().unwrap()],
        );
        run(
            "mount",
            &["-o", "loop", image.to_str().unwrap(), dir.to_str().unwrap()],
        );
        Self { dir }
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (scripts/setup.sh installs xfsprogs)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed (this test needs root and loop devices): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn snapshot_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".arca-snapshot-"))
        .collect()
}

#[test]
fn reflink_snapshot_freezes_the_disk_while_it_is_rewritten() {
    let lab = Lab::new();
    let fs = XfsMount::new(&lab);
    let disk = fs.dir.join("vm.raw");
    make_disk(&disk, 256 * MIB, 31);
    let before = sha256(&disk);
    lab.apply(&config(
        &lab,
        &[("web01", &[disk.as_path()])],
        "[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\n",
    ));
    let mut child = lab
        .command()
        .args(["job", "run", "nightly", "--json", "--workers", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // As soon as the snapshot exists, rewrite the source while it is read.
    let deadline = Instant::now() + Duration::from_secs(60);
    // The clone file exists a moment before FICLONE fills it; the snapshot
    // instant has passed once it has the disk's full size.
    let full = std::fs::metadata(&disk).unwrap().len();
    while !snapshot_files(&fs.dir)
        .iter()
        .any(|f| std::fs::metadata(f).is_ok_and(|m| m.len() == full))
    {
        assert!(Instant::now() < deadline, "no snapshot appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "session ended before a snapshot was seen"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    change_disk(&disk, 64, 1 << 20, 32);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup finished before the rewrite, so this run proves nothing; use a larger disk"
    );
    let after = sha256(&disk);
    assert_ne!(before, after);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tasks"][0]["consistency"], "crash-consistent");
    assert!(
        snapshot_files(&fs.dir).is_empty(),
        "snapshot removed after the session"
    );

    let point = report["tasks"][0]["restore_point"].as_str().unwrap();
    let restored = lab.path("restored.raw");
    lab.ok(&["restore", point, "--to", restored.to_str().unwrap()]);
    assert_eq!(
        sha256(&restored),
        before,
        "the restore point is the disk at the snapshot instant"
    );
}

/// Without reflink (the lab is on ext4) the image is read live, through a
/// memory map in an incremental. Truncated while the incremental reads it,
/// the task fails with a clear error instead of the process dying of
/// SIGBUS or the lost tail being stored as holes; nothing is committed,
/// and the repository and the earlier restore point stay whole.
#[test]
fn a_live_image_truncated_during_an_incremental_fails_it_cleanly() {
    let lab = Lab::new();
    let disk = lab.path("web01.raw");
    make_disk(&disk, 96 * MIB, 41);
    let sha_full = sha256(&disk);
    let job = |level: i32| {
        format!(
            "[[pipeline]]\nname = \"p\"\ncodec = {{ plugin = \"zstd\", level = {level} }}\n\n\
             [[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\npipeline = \"p\"\n"
        )
    };
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], &job(1)));
    let (ok, full) = lab.run_job("nightly");
    assert!(ok, "full backup failed: {full:#}");
    let full_point = full["tasks"][0]["restore_point"]
        .as_str()
        .unwrap()
        .to_owned();

    // Every block changes and the codec is slow, so the incremental's reads
    // run only a few batches ahead of its coders.
    make_disk(&disk, 96 * MIB, 42);
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], &job(19)));
    let child = lab
        .command()
        .args(["job", "run", "nightly", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the session has mapped the image, cut it to a third.
    let maps = format!("/proc/{}/maps", child.id());
    let name = disk.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&maps).is_ok_and(|m| m.contains(name)) {
        assert!(
            Instant::now() < deadline,
            "the session never mapped the image"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();

    let out = child.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!out.status.success(), "{report:#}");
    let task = &report["tasks"][0];
    assert_eq!(task["parent_point"].as_str(), Some(full_point.as_str()));
    let err = task["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("shrank") || err.contains("truncated"),
        "the error says what happened: {err}"
    );
    assert_eq!(point_of(&lab.points(), "web01", "disk0").len(), 1);
    lab.ok(&["verify"]);
    let restored = lab.path("restored.raw");
    lab.ok(&["restore", &full_point, "--to", restored.to_str().unwrap()]);
    assert_eq!(sha256(&restored), sha_full);
}
