//! SIGKILL of a real backup process at random moments: the repository stays
//! readable, earlier restore points restore bit-exact, the next session works.

use crate::common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
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
    let expected: Vec<(String, String)> = lab
        .points()
        .iter()
        .map(|p| {
            (
                p["point_id"].as_str().unwrap().to_owned(),
                p["disk"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let sha_before = [sha256(&d0), sha256(&d1)];

    // New data so that killed sessions have chunks in flight.
    change_disk(&d0, 40, 256 * 1024, 23);
    change_disk(&d1, 40, 256 * 1024, 24);
    let sha_after = [sha256(&d0), sha256(&d1)];

    let mut rng = StdRng::seed_from_u64(99);
    let mut killed_mid_session = 0;
    let mut killed_late = 0;
    // The killed sessions are incrementals: time one (its restore point is
    // of the changed state, which the checks below accept), and land the
    // kills between start-up and 80% of that.
    let started = Instant::now();
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let incremental_run = started.elapsed();
    let window = (incremental_run.as_millis() as u64 * 8 / 10).max(60);
    for trial in 0..8 {
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
        // Every visible restore point restores bit-exact to one of the two
        // states the disks have been in.
        for p in lab.points() {
            let id = p["point_id"].as_str().unwrap();
            let disk = if p["disk"] == "disk0" { 0 } else { 1 };
            let out = lab.path("check.raw");
            lab.ok(&["restore", id, "--to", out.to_str().unwrap(), "--force"]);
            let got = sha256(&out);
            let earlier = expected.iter().any(|(e, _)| e == id);
            if earlier {
                assert_eq!(
                    got, sha_before[disk],
                    "trial {trial}: earlier point {id} changed"
                );
            } else {
                assert_eq!(
                    got, sha_after[disk],
                    "trial {trial}: point {id} is neither state"
                );
            }
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
    let latest = r["tasks"][0]["restore_point"].as_str().unwrap();
    let out = lab.path("final.raw");
    lab.ok(&["restore", latest, "--to", out.to_str().unwrap()]);
    assert_eq!(
        sha256(&out),
        sha_after[if r["tasks"][0]["disk"] == "disk0" {
            0
        } else {
            1
        }]
    );
    let sessions = lab.ok(&["sessions"]);
    assert!(
        sessions.contains("killed") || killed_late == 0,
        "killed sessions are marked: {sessions}"
    );
}
