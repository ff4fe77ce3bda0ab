//! A repository whose filesystem fills up: a real, small ext4 filesystem
//! mounted under the lab, filled by a backup for real.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A small ext4 filesystem on a loop device, unmounted when dropped.
struct SmallFs {
    mount: PathBuf,
}

impl SmallFs {
    fn new(lab: &Lab, size: u64) -> Self {
        let image = lab.path("fs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        run(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", image.to_str().unwrap()],
        );
        let mount = lab.path("fs");
        std::fs::create_dir_all(&mount).unwrap();
        run(
            "mount",
            &[
                "-o",
                "loop",
                image.to_str().unwrap(),
                mount.to_str().unwrap(),
            ],
        );
        Self { mount }
    }

    fn free_bytes(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.mount)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df gives the free bytes")
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let unmounted = |args: &[&str]| {
            Command::new("umount")
                .args(args)
                .arg(&self.mount)
                .status()
                .is_ok_and(|s| s.success())
        };
        // Lazily if it is busy, so that the lab's folder is not deleted
        // through a live mount and the loop device is let go.
        if !unmounted(&[]) && !unmounted(&["-l"]) {
            eprintln!("could not unmount {}", self.mount.display());
        }
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_repository_that_runs_out_of_space_stays_whole_and_takes_the_backup_once_there_is_room() {
    let lab = Lab::new();
    let fs = SmallFs::new(&lab, 64 * MIB);
    let repo = fs.mount.join("repo");
    let small = random_disk(&lab, "small.raw", 8 * MIB, 1);
    let big = random_disk(&lab, "big.raw", 24 * MIB, 2);
    lab.apply(&format!(
        "[[repository]]\nname = \"main\"\npath = \"{}\"\n\n{}{}\
         [[job]]\nname = \"first\"\nvms = [\"small\"]\nrepository = \"main\"\n\n\
         [[job]]\nname = \"second\"\nvms = [\"big\"]\nrepository = \"main\"\n",
        repo.display(),
        vm_toml("small", &[small.as_path()]),
        vm_toml("big", &[big.as_path()]),
    ));
    let (ok, r) = lab.run_job("first");
    assert!(ok, "{r:#}");
    let first = r["tasks"][0]["restore_point"].as_str().unwrap().to_owned();

    // Leave room for about half of the big disk.
    let room = 12 * MIB;
    let filler = random_disk(&lab, "fs/ballast", fs.free_bytes().saturating_sub(room), 77);
    let (ok, r) = lab.run_job("second");
    assert!(!ok, "the big disk cannot fit: {r:#}");
    let error = r["tasks"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("No space left on device") && error.contains(&repo.display().to_string()),
        "the task says why it failed, and where: {r:#}"
    );
    // What was there is whole: verify is clean and the first point
    // restores; no point of the big disk was made.
    let said = lab.ok(&["verify"]);
    assert!(said.contains("clean"), "{said}");
    restore_matches(&lab, &first, &small);
    assert_eq!(lab.points().len(), 1, "{:#?}", lab.points());
    // The failed session's partial packs are not left taking room (looked
    // at now: the next session would sweep a dead writer's staging).
    assert_eq!(staged(&repo), Vec::<PathBuf>::new());

    // Room again: the same job now backs the big disk up, once.
    std::fs::remove_file(&filler).unwrap();
    let (ok, r) = lab.run_job("second");
    assert!(ok, "{r:#}");
    let second = r["tasks"][0]["restore_point"].as_str().unwrap().to_owned();
    assert_eq!(lab.points().len(), 2);
    let said = lab.ok(&["verify"]);
    assert!(said.contains("clean"), "{said}");
    restore_matches(&lab, &second, &big);
    restore_matches(&lab, &first, &small);
    assert_eq!(staged(&repo), Vec::<PathBuf>::new());
}

/// What is in the repository's staging folder.
fn staged(repo: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(repo.join("staging"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}
