//! SIGKILL of a real backup or prune process at random moments: the
//! repository stays readable, earlier restore points restore bit-exact, the
//! next session (or prune) works.

use crate::common::*;
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use std::time::{Duration, Instant};

#[test]
fn killed_sessions_leave_no_visible_damage() {
    let lab = Lab::new();
    let d0 = lab.path("d0.raw");
    let d1 = lab.path("d1.raw");
    make_disk(&d0, 96 * MIB, 21);
    make_disk(&d1, 96 * MIB, 22);
    lab.apply(&config(
        &lab,
        &[("db01", &[d0.as_path(), d1.as_path()])],
        "[[job]]\nname = \"nightly\"\nvms = [\"db01\"]\nrepository = \"main\"\n",
    ));
    let started = Instant::now();
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let full_run = started.elapsed();
    // What each disk has been: every visible restore point must restore to
    // one of these states, and to the same one every time it is checked.
    let mut states: [Vec<String>; 2] = [vec![sha256(&d0)], vec![sha256(&d1)]];
    let mut seen: std::collections::HashMap<String, String> = Default::default();
    let mut rng = StdRng::seed_from_u64(99);
    let change = |seed: u64, states: &mut [Vec<String>; 2]| {
        // New data each time, so that a killed session has chunks in flight.
        change_disk(&d0, 40, 256 * 1024, seed);
        change_disk(&d1, 40, 256 * 1024, seed + 1);
        states[0].push(sha256(&d0));
        states[1].push(sha256(&d1));
    };
    // The killed sessions are incrementals over fresh changes: time one such
    // session and land the kills between start-up and 80% of it.
    change(23, &mut states);
    let started = Instant::now();
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let incremental_run = started.elapsed();
    let window = (incremental_run.as_millis() as u64 * 8 / 10).max(60);
    let mut killed_mid_session = 0;
    let mut killed_late = 0;
    for trial in 0..8u64 {
        change(100 + 2 * trial, &mut states);
        let mut child = lab
            .command()
            .args(["job", "run", "nightly"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let wait = rng.random_range(20..window);
        std::thread::sleep(Duration::from_millis(wait));
        if child.try_wait().unwrap().is_none() {
            killed_mid_session += 1;
            // Late enough that the session had surely registered itself.
            if wait >= 300 {
                killed_late += 1;
            }
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();

        let v = lab.arca(&["verify"]);
        assert!(
            v.status.success(),
            "trial {trial} (killed after {wait} ms): verify is not clean:\n{}",
            String::from_utf8_lossy(&v.stdout)
        );
        for p in lab.points() {
            let id = p["point_id"].as_str().unwrap().to_owned();
            let disk = if p["disk"] == "disk0" { 0 } else { 1 };
            let out = lab.path("check.raw");
            lab.ok(&["restore", &id, "--to", out.to_str().unwrap(), "--force"]);
            let got = sha256(&out);
            assert!(
                states[disk].contains(&got),
                "trial {trial}: point {id} is none of the states disk{disk} has been in"
            );
            let first = seen.entry(id.clone()).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "trial {trial}: earlier point {id} changed");
        }
    }
    assert!(
        killed_mid_session >= 3,
        "only {killed_mid_session} of 8 kills landed mid-session (an incremental took {incremental_run:?}, full {full_run:?})"
    );

    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "the session after the kills must succeed: {r:#}");
    let staging = std::fs::read_dir(lab.path("repo/staging"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(staging, 0, "interrupted sessions' staging is swept");
    for t in r["tasks"].as_array().unwrap() {
        let out = lab.path("final.raw");
        let latest = t["restore_point"].as_str().unwrap();
        lab.ok(&["restore", latest, "--to", out.to_str().unwrap(), "--force"]);
        let disk = if t["disk"] == "disk0" { 0 } else { 1 };
        assert_eq!(
            &sha256(&out),
            states[disk].last().unwrap(),
            "the last session has the disks' current state"
        );
    }
    let sessions = lab.ok(&["sessions"]);
    assert!(
        sessions.contains("killed") || killed_late == 0,
        "killed sessions are marked: {sessions}"
    );
}

#[test]
fn a_job_runs_one_session_at_a_time_and_a_killed_holder_frees_it() {
    let lab = Lab::new();
    let d0 = lab.path("d0.raw");
    make_disk(&d0, 8 * MIB, 23);
    lab.apply(&config(
        &lab,
        &[("db01", &[d0.as_path()])],
        "[[job]]\nname = \"nightly\"\nvms = [\"db01\"]\nrepository = \"main\"\n",
    ));
    // Another process holds the job's lock, as a running session does.
    let lock = lab.path("home/locks/nightly.lock");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    // `-o`: the lock stays with `flock` itself, not with its `sleep`.
    let mut holder = std::process::Command::new("flock")
        .arg("-o")
        .arg(&lock)
        .args(["sleep", "60"])
        .spawn()
        .expect("flock (util-linux)");
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let out = lab.arca(&["job", "run", "nightly"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            break err;
        }
        // The holder had not taken the lock yet: that session ran.
        assert!(Instant::now() < deadline, "the lock was never taken");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        refused.contains("job 'nightly' is already running"),
        "{refused}"
    );
    let before = lab.points().len();

    // Its `sleep` holds no lock, but would outlive the test: found now,
    // killed after the holder.
    let sleeper = std::process::Command::new("pgrep")
        .args(["-P", &holder.id().to_string()])
        .output()
        .unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    for pid in String::from_utf8_lossy(&sleeper.stdout).split_whitespace() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", pid])
            .status();
    }
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "a killed holder leaves the job free: {r:#}");
    assert_eq!(lab.points().len(), before + 1);
}

/// Copies a repository folder (packs, index, points, lock) as it is.
fn copy_repo(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_dir_all(to);
    let ok = std::process::Command::new("cp")
        .args(["-a", from.to_str().unwrap(), to.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success(), "cp -a {}", from.display());
}

/// The names of a repository's index files: one readdir and no `stat`,
/// so that polling it sees a prune's short last steps.
fn index_names(repo: &std::path::Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(repo.join("index"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// When a trial kills its prune.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// A random moment within an uninterrupted prune's time.
    Random(u64),
    /// As soon as a new index file appears (the rewritten packs being
    /// published).
    Publishing,
    /// As soon as an old index file is gone (old packs being removed).
    Removing,
}

/// SIGKILL of a real prune at random moments, on copies of one repository
/// whose forgotten points leave most packs to rewrite: every kept point
/// still restores bit-exact, verify stays clean, and a prune run again
/// afterwards frees what the uninterrupted prune freed.
#[test]
fn a_prune_killed_at_any_moment_loses_nothing() {
    use std::os::unix::fs::FileExt;
    let lab = Lab::new();
    let disk = lab.path("web01.raw");
    make_disk(&disk, 96 * MIB, 31);
    lab.apply(&config(
        &lab,
        &[("web01", &[disk.as_path()])],
        "[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\n",
    ));
    // Six points, each rewriting a different third of the disk with new
    // random data: the forgotten ones leave some dead bytes in most packs.
    let mut kept = Vec::new();
    let mut rng = StdRng::seed_from_u64(32);
    for state in 0..6u64 {
        if state > 0 {
            let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            let mut data = vec![0u8; (32 * MIB) as usize];
            rng.fill_bytes(&mut data);
            f.write_all_at(&data, (state % 3) * 32 * MIB).unwrap();
            // And scattered small changes, so that packs mix live and dead.
            drop(f);
            change_disk(&disk, 40, 64 * 1024, 40 + state);
        }
        let (ok, r) = lab.run_job("nightly");
        assert!(ok, "{r:#}");
        if state >= 3 {
            let id = r["tasks"][0]["restore_point"].as_str().unwrap().to_owned();
            kept.push((id, sha256(&disk)));
        }
    }
    lab.ok(&["forget", "--keep-last", "3"]);
    let repo = lab.path("repo");
    let template = lab.path("template");
    copy_repo(&repo, &template);

    // The uninterrupted prune: how long it takes and what it leaves.
    let started = Instant::now();
    let report: serde_json::Value =
        serde_json::from_str(&lab.ok(&["prune", "--repack-share", "0", "--json"])).unwrap();
    let report = &report[0]["report"];
    let prune_run = started.elapsed();
    assert!(
        report["packs_repacked"].as_u64().unwrap() >= 3,
        "the test needs a prune with work to interrupt: {report:#}"
    );
    let clean_bytes = chunk_bytes(&repo);

    let window = (prune_run.as_millis() as u64).max(40);
    let old = index_names(&template);
    // Kills that landed while the prune still ran, by when they were aimed.
    let mut landed = [0; 3];
    for trial in 0..12u64 {
        copy_repo(&template, &repo);
        let at = match trial % 3 {
            0 => KillAt::Random(rng.random_range(5..window)),
            1 => KillAt::Publishing,
            _ => KillAt::Removing,
        };
        let mut child = lab
            .command()
            .args(["prune", "--repack-share", "0"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        match at {
            KillAt::Random(ms) => std::thread::sleep(Duration::from_millis(ms)),
            _ => loop {
                let now = index_names(&repo);
                let seen = match at {
                    KillAt::Publishing => !now.is_subset(&old),
                    _ => !old.is_subset(&now),
                };
                if seen || child.try_wait().unwrap().is_some() {
                    break;
                }
            },
        }
        let running = child.try_wait().unwrap().is_none();
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if running {
            landed[(trial % 3) as usize] += 1;
        }

        let v = lab.arca(&["verify"]);
        assert!(
            v.status.success(),
            "trial {trial} (killed {at:?}): verify is not clean:\n{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        for (id, sha) in &kept {
            let out = lab.path("check.raw");
            lab.ok(&["restore", id, "--to", out.to_str().unwrap(), "--force"]);
            assert_eq!(&sha256(&out), sha, "trial {trial} (killed {at:?}): {id}");
        }
        // A prune run again finishes the work: the repository ends as the
        // uninterrupted prune left it, and the next session works on it.
        lab.ok(&["prune", "--repack-share", "0"]);
        assert_eq!(
            chunk_bytes(&repo),
            clean_bytes,
            "trial {trial} (killed {at:?}): the prune run again left other bytes"
        );
        assert!(lab.ok(&["verify"]).contains("clean"));
    }
    // Each kind of kill landed in a running prune at least once: the
    // publish and the removals are short, and a kill aimed at them but
    // landing after the prune ended would test nothing.
    assert!(
        landed.iter().all(|&n| n >= 1),
        "kills that landed in a running prune (random, publishing, removing): {landed:?} of 4 each (a prune took {prune_run:?})"
    );
    change_disk(&disk, 6, 64 * 1024, 99);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    restore_matches(
        &lab,
        r["tasks"][0]["restore_point"].as_str().unwrap(),
        &disk,
    );
}
