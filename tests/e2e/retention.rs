//! Retention and prune: forgetting restore points by policy, freeing what
//! nothing references, and never losing what something does.

use crate::common::*;
use std::path::Path;

const JOB: &str = "[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\n";

fn json(lab: &Lab, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&lab.ok(args)).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap()
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn restores_to(lab: &Lab, point: &str, sha: &str) {
    let out = lab.path("out.raw");
    lab.ok(&["restore", point, "--to", out.to_str().unwrap(), "--force"]);
    assert_eq!(sha256(&out), sha, "restore of {point}");
}

/// A full and three incrementals of one disk; returns each point with the
/// SHA-256 of the disk it was taken of. The first two incrementals rewrite
/// the disk's first 16 MiB, so what the first two points alone reference
/// is a whole pack and a good share of another; the last changes a little.
fn four_points(lab: &Lab, disk: &Path) -> Vec<(String, String)> {
    use std::os::unix::fs::FileExt;
    let mut points = Vec::new();
    for state in 0..4u64 {
        if state == 1 || state == 2 {
            let data =
                std::fs::read(random_disk(lab, "rewrite.raw", 16 * MIB, 500 + state)).unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
            f.write_all_at(&data, 0).unwrap();
        } else if state == 3 {
            change_disk(disk, 6, 64 * 1024, 503);
        }
        let (ok, r) = lab.run_job("nightly");
        assert!(ok, "{r:#}");
        let id = r["tasks"][0]["restore_point"].as_str().unwrap().to_owned();
        points.push((id, sha256(disk)));
    }
    points
}

#[test]
fn forget_and_prune_free_space_and_keep_every_other_point_whole() {
    let lab = Lab::new();
    let disk = lab.path("web01.raw");
    make_disk(&disk, 48 * MIB, 501);
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], JOB));
    let points = four_points(&lab, &disk);
    let repo = lab.path("repo");
    let before = chunk_bytes(&repo);

    // A dry run says what would go and changes nothing.
    let dry = json(
        &lab,
        &[
            "forget",
            "--keep-last",
            "2",
            "--prune",
            "--dry-run",
            "--json",
        ],
    );
    assert_eq!(
        ids(&dry[0]["forgotten"]),
        [points[0].0.clone(), points[1].0.clone()]
    );
    assert_eq!(dry[0]["prune"]["dry_run"], true);
    let would_free = dry[0]["prune"]["bytes_freed"].as_u64().unwrap();
    assert!(would_free > 0, "{dry:#}");
    assert_eq!(lab.points().len(), 4);
    assert_eq!(chunk_bytes(&repo), before);

    let done = json(&lab, &["forget", "--keep-last", "2", "--prune", "--json"]);
    assert_eq!(
        ids(&done[0]["forgotten"]),
        [points[0].0.clone(), points[1].0.clone()]
    );
    assert_eq!(
        ids(&done[0]["kept"]),
        [points[2].0.clone(), points[3].0.clone()]
    );
    let report = &done[0]["prune"];
    assert_eq!(report["restore_points"], 2);
    assert!(report["chunks_deleted"].as_u64().unwrap() > 0, "{report:#}");
    // The first incremental's pack holds only what the second rewrote; the
    // full's first pack lost its first 16 MiB, which it had to be rewritten for.
    assert!(report["packs_deleted"].as_u64().unwrap() >= 1, "{report:#}");
    assert!(
        report["packs_repacked"].as_u64().unwrap() >= 1,
        "{report:#}"
    );
    assert!(report["packs_written"].as_u64().unwrap() >= 1, "{report:#}");
    let after = chunk_bytes(&repo);
    assert!(after < before, "{after} >= {before}");
    assert_eq!(before - after, report["bytes_freed"].as_u64().unwrap());
    assert_eq!(would_free, report["bytes_freed"].as_u64().unwrap());

    // What is left reads whole, and the points kept restore bit-exact.
    let listed: Vec<String> = lab
        .points()
        .iter()
        .map(|p| p["point_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, [points[2].0.clone(), points[3].0.clone()]);
    assert!(lab.ok(&["verify"]).contains("clean"));
    for (id, sha) in &points[2..] {
        restores_to(&lab, id, sha);
    }

    // The next session works on the pruned repository, and a second prune
    // finds nothing to rewrite.
    change_disk(&disk, 6, 64 * 1024, 600);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    restores_to(
        &lab,
        r["tasks"][0]["restore_point"].as_str().unwrap(),
        &sha256(&disk),
    );
    let again = json(&lab, &["prune", "--json"]);
    let again = &again[0]["report"];
    assert_eq!(again["packs_deleted"], 0, "{again:#}");
    assert_eq!(again["packs_repacked"], 0, "{again:#}");
    assert_eq!(again["restore_points"], 3);
    // What packs below the share keep unreferenced is said, and a share of
    // 0 reclaims exactly that. Which chunks share a pack depends on which
    // coder stored them first, so the split between what the default share
    // frees and what it leaves is not fixed; their sum is more than nothing
    // once all but the newest point are forgotten.
    let first = json(&lab, &["forget", "--keep-last", "1", "--prune", "--json"]);
    let first = &first[0]["prune"];
    let left = first["unreferenced_bytes_kept"].as_u64().unwrap();
    assert!(
        first["bytes_freed"].as_u64().unwrap() + left > 0,
        "{first:#}"
    );
    let before_all = chunk_bytes(&repo);
    let all = json(&lab, &["prune", "--repack-share", "0", "--json"]);
    let all = &all[0]["report"];
    assert_eq!(all["bytes_freed"].as_u64().unwrap(), left, "{all:#}");
    assert_eq!(all["unreferenced_bytes_kept"], 0, "{all:#}");
    assert_eq!(before_all - chunk_bytes(&repo), left);
    assert!(lab.ok(&["verify"]).contains("clean"));
    restores_to(
        &lab,
        r["tasks"][0]["restore_point"].as_str().unwrap(),
        &sha256(&disk),
    );
    let bad = lab.arca(&["prune", "--repack-share", "2"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("0 to 1"));
}

#[test]
fn prune_refuses_a_busy_repository_and_one_with_a_damaged_point() {
    let lab = Lab::new();
    let disk = lab.path("web01.raw");
    make_disk(&disk, 16 * MIB, 510);
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], JOB));
    let points = four_points(&lab, &disk);
    lab.ok(&["forget", "--keep-last", "1"]);
    let repo = lab.path("repo");
    let before = chunk_bytes(&repo);

    // Someone (a session, a restore) holds the lock shared.
    let held = std::fs::File::open(repo.join("lock")).unwrap();
    held.lock_shared().unwrap();
    let busy = lab.arca(&["prune"]);
    assert!(!busy.status.success());
    let said = String::from_utf8_lossy(&busy.stderr);
    assert!(said.contains("is in use by a session"), "{said}");
    drop(held);

    // A manifest that does not read: its chunks cannot be told from garbage.
    let dir = repo.join("points/nightly/web01/disk0");
    std::fs::write(
        dir.join("20260101T000000Z-deadbeef.manifest"),
        b"not a manifest",
    )
    .unwrap();
    let damaged = lab.arca(&["prune"]);
    assert!(!damaged.status.success());
    let said = String::from_utf8_lossy(&damaged.stderr);
    assert!(
        said.contains("prune refused") && said.contains("20260101T000000Z-deadbeef"),
        "{said}"
    );
    assert_eq!(
        chunk_bytes(&repo),
        before,
        "a refused prune deletes nothing"
    );

    std::fs::remove_file(dir.join("20260101T000000Z-deadbeef.manifest")).unwrap();
    // A pack without its index, as a writer killed before publishing the
    // index leaves it: nobody can read it, so prune deletes it.
    let a_pack = walk_files(&repo.join("packs"))[0].clone();
    let orphan = a_pack
        .parent()
        .unwrap()
        .join(format!("{}.pack", "ab".repeat(16)));
    std::fs::copy(&a_pack, &orphan).unwrap();
    let pruned = json(&lab, &["prune", "--json"]);
    assert_eq!(pruned[0]["report"]["orphan_packs_deleted"], 1, "{pruned:#}");
    assert!(!orphan.exists());
    assert!(chunk_bytes(&repo) < before);
    restores_to(&lab, &points[3].0, &points[3].1);
    // An empty policy is a mistake, not "forget everything".
    let empty = lab.arca(&["forget"]);
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("keep_last"));
}

/// A repository agent trusting this lab, and a config naming it `remote`
/// (with the same folder as `local-view`, as an operator on the agent's
/// host sees it) and a job `job` of `disk` to it, with `extra` job lines.

#[test]
fn an_agent_loads_its_index_again_after_a_prune() {
    let lab = Lab::new();
    let disk = lab.path("web01.raw");
    make_disk(&disk, 16 * MIB, 520);
    let original = lab.path("original.raw");
    std::fs::copy(&disk, &original).unwrap();
    let agent = agent_lab(&lab, &disk, "nightly", "");
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    // Every block changes: the full's chunks are referenced by it alone.
    std::fs::copy(random_disk(&lab, "random.raw", 16 * MIB, 521), &disk).unwrap();
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    // On the agent's host: forget the full and prune its chunks away,
    // while the agent runs with those chunks in its index.
    let done = json(
        &lab,
        &[
            "forget",
            "--repository",
            "local-view",
            "--keep-last",
            "1",
            "--prune",
            "--json",
        ],
    );
    assert!(
        done[0]["prune"]["chunks_deleted"].as_u64().unwrap() > 0,
        "{done:#}"
    );

    // The disk goes back to what the full held. An agent that still
    // believed its old index would call those chunks stored, and the new
    // point would reference chunks that are gone.
    std::fs::copy(&original, &disk).unwrap();
    run_after_index_change(&lab, &agent, &sha256(&original));
}

#[test]
fn a_jobs_retention_forgets_after_each_commit_locally_and_through_an_agent() {
    let lab = Lab::new();
    let disk = lab.path("web01.raw");
    make_disk(&disk, 16 * MIB, 530);
    // A policy that keeps nothing, or says something else, is refused.
    for (bad, why) in [
        ("retention = {}", "needs at least one of"),
        ("retention = { keep_lats = 2 }", "keep_lats"),
    ] {
        let path = lab.path("bad.toml");
        std::fs::write(
            &path,
            config(
                &lab,
                &[("web01", &[disk.as_path()])],
                &format!("{JOB}{bad}\n"),
            ),
        )
        .unwrap();
        let out = lab.arca(&["apply", path.to_str().unwrap()]);
        assert!(!out.status.success(), "{bad}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains(why), "{bad}: {said}");
    }

    lab.apply(&config(
        &lab,
        &[("web01", &[disk.as_path()])],
        &format!("{JOB}retention = {{ keep_last = 2 }}\n"),
    ));
    let mut made = Vec::new();
    for round in 0..4u64 {
        if round > 0 {
            change_disk(&disk, 4, 64 * 1024, 540 + round);
        }
        let (ok, r) = lab.run_job("nightly");
        assert!(ok, "{r:#}");
        made.push((
            r["tasks"][0]["restore_point"].as_str().unwrap().to_owned(),
            sha256(&disk),
        ));
        let notices = r["notices"].to_string();
        if round >= 2 {
            let gone = &made[round as usize - 2].0;
            assert!(
                notices.contains("retention (keep_last 2) forgot 1 restore point(s)")
                    && notices.contains(gone.as_str()),
                "{notices}"
            );
        } else {
            assert!(!notices.contains("retention"), "{notices}");
        }
        assert_eq!(lab.points().len(), (round as usize + 1).min(2));
    }
    for (id, sha) in &made[2..] {
        restores_to(&lab, id, sha);
    }

    // Through an agent: the agent applies the policy the session sends.
    let _agent = agent_lab(&lab, &disk, "offsite", "retention = { keep_last = 1 }\n");
    let mut last = String::new();
    for round in 0..3u64 {
        change_disk(&disk, 4, 64 * 1024, 550 + round);
        let (ok, r) = lab.run_job("offsite");
        assert!(ok, "{r:#}");
        last = r["tasks"][0]["restore_point"].as_str().unwrap().to_owned();
    }
    let remote: Vec<serde_json::Value> =
        serde_json::from_str(&lab.ok(&["points", "--repository", "local-view", "--json"])).unwrap();
    assert_eq!(remote.len(), 1, "{remote:#?}");
    assert_eq!(remote[0]["point_id"], last.as_str());
    restores_to(&lab, &last, &sha256(&disk));
}

/// A session that starts while a prune has the repository to itself waits
/// for it, says so, and then runs.
#[test]
fn a_session_waits_for_a_prune_and_says_so() {
    let lab = Lab::new();
    let disk = lab.path("web01.raw");
    make_disk(&disk, 8 * MIB, 540);
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], JOB));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    // The lock a prune takes, held here.
    let prune = arca::repository::lock::RepoLock::exclusive(&lab.path("repo"), "prune").unwrap();
    let log = lab.path("session.log");
    let mut session = lab
        .command()
        .args(["job", "run", "nightly", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("waiting for that to end")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the session never said it waits: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(
            session.try_wait().unwrap().is_none(),
            "it must wait, not end"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(session.try_wait().unwrap().is_none(), "still waiting");
    drop(prune);
    let out = session.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{r:#}");
    assert!(std::fs::read_to_string(&log).unwrap().contains("waited"));
    restores_to(
        &lab,
        r["tasks"][0]["restore_point"].as_str().unwrap(),
        &sha256(&disk),
    );
}
