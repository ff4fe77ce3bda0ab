//! qcow2, vhdx and vmdk disks are read through QEMU's block layer and
//! restore to the same content as raw; restore writes qcow2 and vhdx too.

use crate::common::*;
use std::path::Path;
use std::process::Command;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Content of any image as raw, by QEMU.
fn raw_sha(lab: &Lab, image: &Path) -> String {
    let raw = lab.path("convert.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let sha = sha256(&raw);
    std::fs::remove_file(&raw).unwrap();
    sha
}

fn no_export_mounted(lab: &Lab) -> bool {
    let exports = lab.path("exports");
    !std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(exports.to_str().unwrap())
}

#[test]
fn every_format_backs_up_and_restores_to_the_same_content() {
    let lab = Lab::new();
    let raw = lab.path("src.raw");
    make_disk(&raw, 24 * MIB, 41);
    // 8 MiB never written: whole blocks that no format may make us read.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let want = sha256(&raw);
    let mut disks = vec![raw.clone()];
    for fmt in ["qcow2", "vhdx", "vmdk"] {
        let out = lab.path(&format!("src.{fmt}"));
        qemu_img(&[
            "convert",
            "-O",
            fmt,
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        disks.push(out);
    }
    let refs: Vec<&Path> = disks.iter().map(|p| p.as_path()).collect();
    lab.apply(&config(
        &lab,
        &[("multi", &refs)],
        "[[job]]\nname = \"nightly\"\nvms = [\"multi\"]\nrepository = \"main\"\n",
    ));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(
        no_export_mounted(&lab),
        "exports are unmounted after the session"
    );
    let tasks = r["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 4);
    for t in tasks {
        let stats = &t["stats"];
        if t["disk"] == "disk2" {
            // QEMU's vhdx driver reports no allocation (`qemu-img map` shows
            // all data), so its holes are read, found zero and not stored.
            assert!(stats["zero_bytes"].as_u64().unwrap() >= 8 * MIB, "{t:#}");
        } else {
            // Holes are seen through the export and never read.
            assert!(stats["hole_bytes"].as_u64().unwrap() >= 8 * MIB, "{t:#}");
        }
        let point = t["restore_point"].as_str().unwrap();
        let out = lab.path(&format!("{}.raw", t["disk"].as_str().unwrap()));
        lab.ok(&["restore", point, "--to", out.to_str().unwrap()]);
        assert_eq!(sha256(&out), want, "disk {} restored", t["disk"]);
    }
    // Identical content in four formats is stored once.
    assert_eq!(
        r["totals"]["stored_bytes"].as_u64(),
        Some(chunk_bytes(&lab.path("repo")))
    );
    let stored: u64 = tasks
        .iter()
        .map(|t| t["stats"]["new_chunks"].as_u64().unwrap())
        .sum();
    let distinct = {
        let data = std::fs::read(&raw).unwrap();
        data.chunks(BLOCK as usize)
            .filter(|b| b.iter().any(|x| *x != 0))
            .map(|b| *blake3::hash(b).as_bytes())
            .collect::<std::collections::HashSet<_>>()
            .len() as u64
    };
    assert_eq!(
        stored, distinct,
        "four copies of one disk store each block once"
    );

    // Writes through QEMU to the qcow2 disk, then an incremental.
    let qcow2 = &disks[1];
    qemu_img(&["info", qcow2.to_str().unwrap()]);
    let io = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 3M 1M",
            "-c",
            "write -P 0x17 20M 64k",
        ])
        .arg(qcow2)
        .output()
        .unwrap();
    assert!(
        io.status.success(),
        "{}",
        String::from_utf8_lossy(&io.stderr)
    );
    let changed = raw_sha(&lab, qcow2);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let t = r["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["disk"] == "disk1")
        .unwrap();
    assert!(t["parent_point"].is_string());
    let point = t["restore_point"].as_str().unwrap().to_owned();

    for fmt in ["qcow2", "vhdx", "raw"] {
        let out = lab.path(&format!("restored.{fmt}"));
        lab.ok(&["restore", &point, "--to", out.to_str().unwrap()]);
        let info = qemu_img(&["info", "--output=json", out.to_str().unwrap()]);
        assert!(info.contains(&format!("\"format\": \"{fmt}\"")), "{info}");
        assert_eq!(raw_sha(&lab, &out), changed, "restore to {fmt}");
    }
    assert!(no_export_mounted(&lab), "restore exports are unmounted");
}

#[test]
fn a_killed_session_leaves_no_export_behind() {
    let lab = Lab::new();
    let raw = lab.path("big.raw");
    make_disk(&raw, 160 * MIB, 43);
    let qcow2 = lab.path("big.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qcow2.to_str().unwrap(),
    ]);
    lab.apply(&config(
        &lab,
        &[("vm", &[qcow2.as_path()])],
        "[[job]]\nname = \"nightly\"\nvms = [\"vm\"]\nrepository = \"main\"\n",
    ));
    let mut child = lab
        .command()
        .args(["job", "run", "nightly", "--workers", "1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while no_export_mounted(&lab) {
        assert!(std::time::Instant::now() < deadline, "no export appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "session ended before its export was seen"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL: no destructor runs in arca
    child.wait().unwrap();
    // The daemon gets SIGTERM from the kernel (parent-death signal) and unmounts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !no_export_mounted(&lab) {
        assert!(
            std::time::Instant::now() < deadline,
            "export still mounted 10 s after arca died"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let notices = r["notices"].to_string();
    assert!(
        notices.contains("removed disk export"),
        "the leftover export file is swept and reported: {notices}"
    );
    let out = lab.path("out.raw");
    lab.ok(&[
        "restore",
        r["tasks"][0]["restore_point"].as_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(sha256(&out), sha256(&raw));
}
