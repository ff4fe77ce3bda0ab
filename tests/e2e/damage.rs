//! Damage in the repository is found by verify and stops restore from
//! writing anything.

use crate::common::*;
use std::os::unix::fs::FileExt;

fn backed_up_lab() -> (Lab, String) {
    let lab = Lab::new();
    let disk = lab.path("d.raw");
    make_disk(&disk, 16 * MIB, 9);
    lab.apply(&config(
        &lab,
        &[("web01", &[disk.as_path()])],
        "[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\n",
    ));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let point = r["tasks"][0]["restore_point"].as_str().unwrap().to_owned();
    (lab, point)
}

/// A chunk in the middle of the repository: its address, and the file,
/// offset and length of its record.
fn some_chunk(lab: &Lab) -> (String, std::path::PathBuf, u64, u64) {
    let repo = arca::repository::Repository::open(&lab.path("repo")).unwrap();
    let all = repo.chunk_addresses().unwrap();
    let hash = all[all.len() / 2];
    let (file, offset, len) = repo.chunk_record(&hash).unwrap();
    (arca::repository::hex(&hash), file, offset, len)
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// Flips bits of the byte at `at` of `file`.
fn flip(file: &std::path::Path, at: u64, bits: u8) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ bits], at).unwrap();
}

/// A restore of `point` fails and leaves no output behind.
fn restore_fails(lab: &Lab, point: &str) {
    let target = lab.path("o.raw");
    let r = lab.arca(&["restore", point, "--to", target.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1));
    assert!(!target.exists(), "no partial output is left behind");
}

#[test]
fn a_corrupt_chunk_is_named_by_verify_and_fails_restore() {
    let (lab, point) = backed_up_lab();
    let (hash, pack, offset, len) = some_chunk(&lab);
    flip(&pack, offset + len - 10, 0x40);

    let out = lab.arca(&["verify"]);
    assert_eq!(out.status.code(), Some(1), "verify must fail on damage");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("damaged chunk {hash}")), "{text}");
    assert!(
        text.contains(&point),
        "verify names the restore point hurt: {text}"
    );

    let target = lab.path("out.raw");
    let r = lab.arca(&["restore", &point, "--to", target.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains(&hash) && err.contains("nothing was restored"),
        "{err}"
    );
    assert!(!target.exists(), "no partial output is left behind");
}

#[test]
fn a_damaged_pack_index_is_named_by_verify_and_fails_restore() {
    let (lab, point) = backed_up_lab();
    let index = walk(&lab.path("repo/index")).pop().unwrap();
    let mut bytes = std::fs::read(&index).unwrap();
    bytes[20] ^= 0x01;
    std::fs::write(&index, bytes).unwrap();
    let out = lab.arca(&["verify"]);
    assert_eq!(out.status.code(), Some(1), "verify must fail on damage");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("damaged pack index {}", index.display()))
            && text.contains("checksum")
            && text.contains(&point),
        "{text}"
    );
    restore_fails(&lab, &point);
}

#[test]
fn a_point_whose_chunks_are_lost_is_not_a_parent_and_backups_go_on() {
    let (lab, point) = backed_up_lab();
    // Every pack index damaged: the point's chunks are gone for the
    // repository. An incremental to it would carry their addresses, and
    // the commit would refuse it, in this session and every later one.
    for index in walk(&lab.path("repo/index")) {
        let mut bytes = std::fs::read(&index).unwrap();
        bytes[20] ^= 0x01;
        std::fs::write(&index, bytes).unwrap();
    }
    let disk = lab.path("d.raw");
    change_disk(&disk, 2, 64 * 1024, 10);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let t = &r["tasks"][0];
    assert!(
        t["parent_point"].is_null(),
        "not incremental to {point}: {t:#}"
    );
    restore_matches(&lab, t["restore_point"].as_str().unwrap(), &disk);
    // And the next one is incremental to it.
    let (ok, r2) = lab.run_job("nightly");
    assert!(ok, "{r2:#}");
    assert_eq!(r2["tasks"][0]["parent_point"], t["restore_point"]);
}

#[test]
fn a_missing_chunk_and_a_damaged_manifest_are_reported() {
    let (lab, point) = backed_up_lab();
    let (hash, pack, _, _) = some_chunk(&lab);
    std::fs::remove_file(&pack).unwrap();
    let out = lab.arca(&["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "damaged chunk {hash}: missing from the repository"
        )),
        "{text}"
    );

    let manifest = walk(&lab.path("repo/points")).pop().unwrap();
    let bytes = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &bytes[..bytes.len() / 2]).unwrap();
    let out = lab.arca(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let damaged = &report[0]["report"]["damaged_manifests"];
    assert_eq!(damaged.as_array().unwrap().len(), 1, "{report:#}");
    assert!(
        damaged[0]["reason"].as_str().unwrap().contains("damaged")
            || damaged[0]["reason"].as_str().unwrap().contains("truncated")
    );
    restore_fails(&lab, &point);
}

/// `verify --repair` takes a damaged chunk out of the repository; the next
/// backup of a disk that still holds its data stores it again, and every
/// restore point that referenced it restores bit-exact again.
#[test]
fn repair_takes_a_damaged_chunk_out_and_the_next_backup_mends_every_point() {
    let (lab, first) = backed_up_lab();
    let disk = lab.path("d.raw");
    let first_sha = sha256(&disk);
    change_disk(&disk, 2, 64 * 1024, 11);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let second = r["tasks"][0]["restore_point"].as_str().unwrap().to_owned();
    let second_sha = sha256(&disk);
    let (hash, pack, offset, len) = some_chunk(&lab);
    flip(&pack, offset + len / 2, 0x5a);
    let text = String::from_utf8_lossy(&lab.arca(&["verify"]).stdout).into_owned();
    assert!(
        text.contains(&hash) && text.contains(&first) && text.contains(&second),
        "the chunk hurts both points: {text}"
    );

    // The check runs beside a session (the shared lock held here, as a
    // session's writer holds it); the mending needs the repository to
    // itself, refuses, and changes nothing.
    let session = arca::repository::lock::RepoLock::shared(&lab.path("repo")).unwrap();
    let busy = lab.arca(&["verify", "--repair"]);
    assert_eq!(busy.status.code(), Some(1));
    let why = String::from_utf8_lossy(&busy.stderr);
    assert!(
        why.contains("nothing mended") && why.contains("repair it"),
        "{why}"
    );
    let report = String::from_utf8_lossy(&busy.stdout);
    assert!(
        report.contains(&hash),
        "verify's findings are reported: {report}"
    );
    let text = String::from_utf8_lossy(&lab.arca(&["verify"]).stdout).into_owned();
    assert!(
        text.contains(&hash) && !text.contains("missing from the repository"),
        "still there, damaged: {text}"
    );
    drop(session);

    let out = lab.arca(&["verify", "--repair", "--json"]);
    assert_eq!(out.status.code(), Some(1), "still lacking the chunk");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["dropped"].as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(v[0]["dropped"][0]["hash"], hash.as_str());
    assert_eq!(v[0]["dropped"][0]["file"], pack.to_str().unwrap());
    let left = &v[0]["report"]["damaged_chunks"];
    assert_eq!(left.as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(left[0]["hash"], hash.as_str());
    let text = String::from_utf8_lossy(&lab.arca(&["verify", "--repair"]).stdout).into_owned();
    assert!(
        !text.contains("repair: took"),
        "nothing more to take: {text}"
    );
    restore_fails(&lab, &first);

    // The disk still holds the chunk's data (the change missed it): the
    // next backup stores it again, and both points are whole.
    change_disk(&disk, 1, 64 * 1024, 12);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(
        r["tasks"][0]["parent_point"].is_null(),
        "no point lacking a chunk is a parent: {r:#}"
    );
    assert!(lab.ok(&["verify"]).contains("clean"));
    // A clean repository is checked beside a running session.
    let session = arca::repository::lock::RepoLock::shared(&lab.path("repo")).unwrap();
    assert!(lab.ok(&["verify", "--repair"]).contains("clean"));
    drop(session);
    for (point, sha) in [(&first, &first_sha), (&second, &second_sha)] {
        let out = lab.path("check.raw");
        lab.ok(&["restore", point, "--to", out.to_str().unwrap(), "--force"]);
        assert_eq!(&sha256(&out), sha, "{point}");
    }
    // A prune drops the damaged record's bytes, and all stays whole.
    lab.ok(&["prune", "--repack-share", "0"]);
    assert!(lab.ok(&["verify"]).contains("clean"));
    restore_matches(
        &lab,
        r["tasks"][0]["restore_point"].as_str().unwrap(),
        &disk,
    );
}

/// A damaged pack index costs nothing for good: `verify --repair` writes it
/// anew from its pack's records, leaving out the one record that is
/// damaged too, which the next backup then stores again.
#[test]
fn repair_writes_a_damaged_pack_index_anew_from_its_pack() {
    let (lab, point) = backed_up_lab();
    let disk = lab.path("d.raw");
    let (hash, pack, offset, len) = some_chunk(&lab);
    flip(&pack, offset + len / 2, 0x5a);
    let id = pack.file_stem().unwrap().to_str().unwrap();
    let index = lab.path("repo/index").join(format!("{id}.idx"));
    flip(&index, 20, 0x01);
    let text = String::from_utf8_lossy(&lab.arca(&["verify"]).stdout).into_owned();
    assert!(text.contains("damaged pack index"), "{text}");

    // Without the codec that coded them, whole records cannot be told
    // from damaged ones: the index is left as it is, not rebuilt short,
    // and the other pack's chunks, which nobody can decode now, stay.
    let codecs = lab.path("repo/codecs");
    let aside = lab.path("codecs-aside");
    std::fs::rename(&codecs, &aside).unwrap();
    let damaged = std::fs::read(&index).unwrap();
    let out = lab.arca(&["verify", "--repair", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["rebuilt"], serde_json::json!([]), "{v:#}");
    assert_eq!(v[0]["dropped"], serde_json::json!([]), "{v:#}");
    assert_eq!(std::fs::read(&index).unwrap(), damaged);
    std::fs::rename(&aside, &codecs).unwrap();

    let out = lab.arca(&["verify", "--repair", "--json"]);
    assert_eq!(out.status.code(), Some(1), "still lacking one chunk");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rebuilt = &v[0]["rebuilt"];
    assert_eq!(rebuilt.as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(rebuilt[0]["file"], index.to_str().unwrap());
    assert_eq!(rebuilt[0]["skipped"], 1, "{v:#}");
    assert!(rebuilt[0]["chunks"].as_u64().unwrap() > 1, "{v:#}");
    let report = &v[0]["report"];
    assert_eq!(report["damaged_indexes"], serde_json::json!([]), "{v:#}");
    let left = report["damaged_chunks"].as_array().unwrap();
    assert_eq!(left.len(), 1, "only the damaged record's chunk: {v:#}");
    assert_eq!(left[0]["hash"], hash.as_str());

    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(lab.ok(&["verify"]).contains("clean"));
    restore_matches(&lab, &point, &disk);
}

/// An agent that had the damaged chunk in its index when repair took it
/// out loads its index again: the next session through it stores the chunk
/// again instead of referencing a chunk the repository no longer lists.
#[test]
fn an_agent_loads_its_index_again_after_a_repair() {
    let lab = Lab::new();
    let disk = lab.path("web01.raw");
    make_disk(&disk, 16 * MIB, 530);
    let agent = agent_lab(&lab, &disk, "nightly", "");
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let point = r["tasks"][0]["restore_point"].as_str().unwrap().to_owned();
    let repo = arca::repository::Repository::open(&lab.path("agent-repo")).unwrap();
    let all = repo.chunk_addresses().unwrap();
    let hash = all[all.len() / 2];
    let (pack, offset, len) = repo.chunk_record(&hash).unwrap();
    drop(repo);
    flip(&pack, offset + len / 2, 0x5a);
    let out = lab.arca(&["verify", "--repository", "local-view", "--repair", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["dropped"].as_array().unwrap().len(), 1, "{v:#}");

    // The disk unchanged: the chunk's data is still on it, and the old
    // point is whole again too.
    run_after_index_change(&lab, &agent, &sha256(&disk));
    restore_matches(&lab, &point, &disk);
}
