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
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut byte = [0u8];
    let at = offset + len - 10;
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    drop(f);

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
