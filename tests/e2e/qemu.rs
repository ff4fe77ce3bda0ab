//! QEMU as the hypervisor: a qemu-storage-daemon started here plays a running
//! VM whose guest writes through a writable NBD export. Live snapshots by
//! fleecing, CBT by dirty bitmaps, cleanup, and the fallbacks.

use crate::common::*;
use arca::source::qmp::Qmp;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A qemu-storage-daemon serving `disk.qcow2` as node `disk0`, with the
/// guest's writable export `vm`.
struct Qsd {
    child: Option<Child>,
    dir: PathBuf,
}

impl Qsd {
    fn start(dir: &Path) -> Self {
        let img = dir.join("disk.qcow2");
        let qmp = dir.join("qmp.sock");
        let nbd = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&nbd);
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0",
                img.display()
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,file=file0,node-name=disk0")
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
            .arg("--export")
            .arg("type=nbd,id=vm,node-name=disk0,name=vm,writable=on")
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qmp0",
                qmp.display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp0")
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (qemu-utils)");
        wait_until_listening(&qmp, "qemu-storage-daemon");
        wait_until_listening(&nbd, "qemu-storage-daemon");
        Self {
            child: Some(child),
            dir: dir.to_owned(),
        }
    }

    fn uri(&self) -> String {
        format!(
            "nbd+unix:///vm?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    /// Guest writes through the VM's export.
    fn write(&self, cmds: &[&str]) {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]).arg(self.uri());
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The disk as the guest sees it now.
    fn content_sha(&self, lab: &Lab) -> String {
        let out = lab.path("guest-view.raw");
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(self.uri())
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        let sha = sha256(&out);
        std::fs::remove_file(&out).unwrap();
        sha
    }

    fn qmp(&self) -> Qmp {
        Qmp::connect(&self.dir.join("qmp.sock")).unwrap()
    }

    /// Clean stop: QEMU stores persistent bitmaps.
    fn quit(mut self) {
        let _ = self.qmp().execute("quit", json!({}));
        if let Some(mut c) = self.child.take() {
            c.wait().unwrap();
        }
    }

    fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// What arca left in QEMU: exports, nodes and jobs besides the VM's own,
    /// and the dirty bitmaps of disk0.
    fn leftovers(&self) -> (Vec<String>, Vec<String>) {
        let mut q = self.qmp();
        let mut left = Vec::new();
        for e in q
            .execute("query-block-exports", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
        {
            if e["id"] != "vm" {
                left.push(format!("export {}", e["id"]));
            }
        }
        let nodes = q
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .unwrap();
        let mut bitmaps = Vec::new();
        for n in nodes.as_array().unwrap() {
            let name = n["node-name"].as_str().unwrap_or("");
            if name != "disk0" && name != "file0" && !name.starts_with('#') {
                left.push(format!("node {name}"));
            }
            if name == "disk0" {
                for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
                    bitmaps.push(format!(
                        "{}{}",
                        b["name"].as_str().unwrap(),
                        if b["recording"] == true {
                            ""
                        } else {
                            " (disabled)"
                        }
                    ));
                }
            }
        }
        for j in q
            .execute("query-jobs", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
        {
            left.push(format!("job {}", j["id"]));
        }
        (left, bitmaps)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn qemu_lab(size_mib: u64) -> (Lab, Qsd) {
    let lab = Lab::new();
    let img = lab.path("disk.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(format!("{size_mib}M"))
        .status()
        .unwrap();
    assert!(ok.success());
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 24M",
            "-c",
            "write -P 0x22 32M 8M",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success());
    let qsd = Qsd::start(lab.dir.path());
    apply_qemu_config(&lab, "");
    (lab, qsd)
}

/// The lab's configuration: job `nightly` backs up VM `db01` of hypervisor
/// `kvm01`; `job_extra` is added to the job's table.
fn apply_qemu_config(lab: &Lab, job_extra: &str) {
    lab.apply(&format!(
        "[[repository]]\nname = \"main\"\npath = \"{}\"\n\n[[hypervisor]]\nname = \"kvm01\"\nqmp = \"{}\"\nnbd = \"{}\"\n\n\
         [[vm]]\nname = \"db01\"\nhypervisor = \"kvm01\"\ndisks = [{{ name = \"root\", node = \"disk0\" }}]\n\n\
         [[job]]\nname = \"nightly\"\nvms = [\"db01\"]\nrepository = \"main\"\n{job_extra}",
        lab.path("repo").display(),
        lab.path("qmp.sock").display(),
        lab.path("nbd.sock").display()
    ));
}

/// The lab's configuration with a pipeline that excludes `ranges`.
fn apply_excluding(lab: &Lab, ranges: &str) {
    apply_qemu_config(
        lab,
        &format!(
            "pipeline = \"skip\"\n\n[[pipeline]]\nname = \"skip\"\n\
             exclusion = [{{ plugin = \"exclude-ranges\", ranges = \"{ranges}\" }}]\n"
        ),
    );
}

fn restore_sha(lab: &Lab, point: &str) -> String {
    let out = lab.path("restored.raw");
    lab.ok(&["restore", point, "--to", out.to_str().unwrap(), "--force"]);
    sha256(&out)
}

#[test]
fn full_then_cbt_incremental_reads_only_dirty_extents() {
    let (lab, qsd) = qemu_lab(64);
    let inventory = lab.ok(&["inventory", "kvm01"]);
    assert!(
        inventory.contains("\"disk0\"") && inventory.contains("67108864"),
        "{inventory}"
    );

    let sha_full = qsd.content_sha(&lab);
    let (ok, full) = lab.run_job("nightly");
    assert!(ok, "{full:#}");
    let t = &full["tasks"][0];
    assert_eq!(t["consistency"], "crash-consistent");
    assert!(
        t["stats"]["cbt_dirty_bytes"].is_null(),
        "no CBT for a first backup"
    );
    assert_eq!(
        t["stats"]["read_bytes"].as_u64(),
        Some(32 * MIB),
        "only allocated data is read: {t:#}"
    );
    let (left, bitmaps) = qsd.leftovers();
    assert!(left.is_empty(), "nothing of the snapshot is left: {left:?}");
    assert_eq!(bitmaps, vec!["arca.nightly.1".to_owned()]);

    qsd.write(&[
        "write -P 0x33 1M 64k",
        "write -P 0x44 10M 1M",
        "write -P 0x55 40M 4k",
    ]);
    let sha_incr = qsd.content_sha(&lab);
    let (ok, incr) = lab.run_job("nightly");
    assert!(ok, "{incr:#}");
    let s = &incr["tasks"][0]["stats"];
    let dirty = s["cbt_dirty_bytes"].as_u64().expect("CBT used");
    assert!(
        (MIB + 128 * 1024..=3 * MIB).contains(&dirty),
        "dirty {dirty}: {s:#}"
    );
    // The blocks under 1M+64k, 10M+1M and 40M+4k.
    assert_eq!(
        s["read_bytes"].as_u64(),
        Some(BLOCK + MIB.max(BLOCK) + BLOCK),
        "only the dirty blocks are read: {s:#}"
    );
    assert!(incr["notices"].as_array().unwrap().is_empty(), "{incr:#}");
    let (left, bitmaps) = qsd.leftovers();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(bitmaps, vec!["arca.nightly.2".to_owned()], "rotated");

    assert_eq!(
        restore_sha(&lab, t["restore_point"].as_str().unwrap()),
        sha_full
    );
    assert_eq!(
        restore_sha(&lab, incr["tasks"][0]["restore_point"].as_str().unwrap()),
        sha_incr
    );
}

#[test]
fn continuous_writes_do_not_leak_into_the_restore_point() {
    const REGIONS: u64 = 16;
    const WRITES: u64 = 12_000;
    let (lab, qsd) = qemu_lab(64);
    // Write k puts byte (k % 256) into region k % 16; regions are 4 MiB apart,
    // in different blocks, read at different moments.
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(qsd.uri())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut script = String::new();
    for k in 0..WRITES {
        script.push_str(&format!(
            "write -P {} {} 64k\n",
            k % 256,
            (k % REGIONS) * 4 * MIB
        ));
    }
    script.push_str("quit\n");
    let mut stdin = writer.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(script.as_bytes());
    });
    std::thread::sleep(Duration::from_millis(150));
    let (ok, r) = lab.run_job("nightly");
    feeder.join().unwrap();
    let still_writing = writer.try_wait().unwrap().is_none();
    writer.wait().unwrap();
    assert!(ok, "{r:#}");

    let point = r["tasks"][0]["restore_point"].as_str().unwrap();
    let out = lab.path("pit.raw");
    lab.ok(&["restore", point, "--to", out.to_str().unwrap()]);
    let data = std::fs::read(&out).unwrap();
    let values: Vec<u8> = (0..REGIONS).map(|i| data[(i * 4 * MIB) as usize]).collect();
    for i in 0..REGIONS {
        let at = (i * 4 * MIB) as usize;
        assert!(
            data[at..at + 64 * 1024]
                .iter()
                .all(|b| *b == values[i as usize]),
            "region {i} is torn"
        );
    }
    // What region i holds after the first `k` writes, and before any.
    let before: Vec<u8> = (0..REGIONS)
        .map(|i| {
            if i * 4 < 24 {
                0x11
            } else if (32..40).contains(&(i * 4)) {
                0x22
            } else {
                0
            }
        })
        .collect();
    let state_after = |k: u64| -> Vec<u8> {
        (0..REGIONS)
            // The last write w < k with w % 16 == i.
            .map(|i| {
                if k > i {
                    ((i + (k - 1 - i) / REGIONS * REGIONS) % 256) as u8
                } else {
                    before[i as usize]
                }
            })
            .collect()
    };
    // A point in time is the state after some number of writes, the same
    // for every region; a mix of instants matches none.
    let instants: Vec<u64> = (0..=WRITES).filter(|k| state_after(*k) == values).collect();
    assert!(
        !instants.is_empty(),
        "the restore point mixes instants: {values:?}"
    );
    // The state after k writes repeats every 256 writes, so `instants`
    // lists every k that fits. The state after all of them is one of those
    // aliases whenever the snapshot's instant is WRITES mod 256 away from
    // it; a writer still running when the session ended rules it out.
    assert!(
        !instants.contains(&0)
            && (still_writing || !instants.contains(&WRITES))
            && instants.iter().any(|k| *k > 0 && *k < WRITES),
        "the snapshot was not taken while the guest wrote (after {instants:?} writes; writer still running: {still_writing})"
    );
}

#[test]
fn a_killed_session_leaves_nothing_behind_and_loses_no_change() {
    let (lab, qsd) = qemu_lab(256);
    qsd.write(&["write -P 0x66 64M 128M"]);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    qsd.write(&["write -P 0x77 2M 1M"]);

    let mut child = lab
        .command()
        .args(["job", "run", "nightly", "--workers", "1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Once arca lets go of QMP its snapshot is complete; kill it mid-read.
    let deadline = Instant::now() + Duration::from_secs(30);
    let exports = loop {
        assert!(Instant::now() < deadline, "no snapshot appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "session ended before it could be killed"
        );
        let mut q = qsd.qmp();
        let e = q.execute("query-block-exports", json!({})).unwrap();
        if e.as_array().unwrap().len() > 1 {
            child.kill().unwrap();
            break e;
        }
        drop(q);
        std::thread::sleep(Duration::from_millis(5));
    };
    child.wait().unwrap();
    assert!(exports.to_string().contains("arca-snap-"), "{exports}");
    let (left, bitmaps) = qsd.leftovers();
    assert!(
        !left.is_empty(),
        "the kill left a snapshot behind, as a crash would"
    );
    assert_eq!(bitmaps.len(), 2, "{bitmaps:?}");

    qsd.write(&["write -P 0x78 100M 64k"]);
    let want = qsd.content_sha(&lab);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let notices = r["notices"].to_string();
    assert!(
        notices.contains("left by an interrupted session"),
        "{notices}"
    );
    assert!(notices.contains("rolled CBT bitmaps back"), "{notices}");
    let s = &r["tasks"][0]["stats"];
    assert!(
        s["cbt_dirty_bytes"].as_u64().is_some(),
        "CBT still usable: {s:#}"
    );
    assert!(
        s["read_bytes"].as_u64().unwrap() <= 4 * MIB,
        "only the changes are read: {s:#}"
    );
    let (left, bitmaps) = qsd.leftovers();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    assert_eq!(
        restore_sha(&lab, r["tasks"][0]["restore_point"].as_str().unwrap()),
        want,
        "no change is lost"
    );
}

#[test]
fn a_session_killed_while_making_its_fleece_leaves_nothing_behind() {
    let (lab, qsd) = qemu_lab(64);
    // A process that has exited: its pid names the objects a session
    // killed between `blockdev-create` and `job-dismiss` leaves behind.
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let tag = format!("{pid}-9-0");
    std::fs::create_dir_all(lab.path("exports")).unwrap();
    let file = lab.path(&format!("exports/arca-fleece-{tag}.qcow2"));
    let mut q = qsd.qmp();
    q.run_job(
        "blockdev-create",
        json!({ "job-id": "warm-up", "options": { "driver": "file", "filename": file, "size": 0 } }),
        "warm-up",
        Duration::from_secs(10),
    )
    .unwrap();
    q.execute(
        "blockdev-add",
        json!({ "driver": "file", "node-name": format!("arca-fleecefile-{tag}"), "filename": file }),
    )
    .unwrap();
    // A `blockdev-create` job run to its end and never dismissed, as a
    // session killed before `job-dismiss` leaves it.
    let mut create_and_leave = |tag: &str, options: serde_json::Value| {
        let job = format!("arca-create-{tag}");
        q.execute(
            "blockdev-create",
            json!({ "job-id": job, "options": options }),
        )
        .unwrap();
        q.wait_event(
            "JOB_STATUS_CHANGE",
            |d| d["id"] == job.as_str() && d["status"] == "concluded",
            Duration::from_secs(10),
        )
        .unwrap();
    };
    // Formatting concluded, never dismissed.
    create_and_leave(
        &tag,
        json!({ "driver": "qcow2", "file": format!("arca-fleecefile-{tag}"), "size": 64 * MIB }),
    );
    // Killed earlier: the file made, its create job never dismissed, no node.
    let tag2 = format!("{pid}-9-1");
    let file2 = lab.path(&format!("exports/arca-fleece-{tag2}.qcow2"));
    create_and_leave(
        &tag2,
        json!({ "driver": "file", "filename": file2, "size": 0 }),
    );
    // Killed after dismissing that job, before adding the node: only a file.
    let file3 = lab.path(&format!("exports/arca-fleece-{pid}-9-2.qcow2"));
    std::fs::write(&file3, b"").unwrap();
    drop(q);
    let (left, _) = qsd.leftovers();
    assert_eq!(left.len(), 3, "a file node and two jobs: {left:?}");
    assert!(file.exists() && file2.exists());

    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let notices = r["notices"].to_string();
    assert!(
        notices.contains(&format!(
            "removed snapshot arca-*-{tag} left by an interrupted session"
        )),
        "{notices}"
    );
    assert!(
        notices.contains(&format!(
            "removed snapshot arca-*-{tag2} left by an interrupted session"
        )) && notices.contains("removed fleece file"),
        "{notices}"
    );
    let (left, bitmaps) = qsd.leftovers();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    for f in [&file, &file2, &file3] {
        assert!(!f.exists(), "{} is removed too", f.display());
    }
}

#[test]
fn a_missing_disk_node_fails_the_snapshot_and_undoes_the_others() {
    let (lab, qsd) = qemu_lab(64);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    lab.apply(&format!(
        "[[repository]]\nname = \"main\"\npath = \"{}\"\n\n[[hypervisor]]\nname = \"kvm01\"\nqmp = \"{}\"\nnbd = \"{}\"\n\n\
         [[vm]]\nname = \"db01\"\nhypervisor = \"kvm01\"\ndisks = [{{ name = \"root\", node = \"disk0\" }}, {{ name = \"data\", node = \"nope\" }}]\n\n\
         [[job]]\nname = \"nightly\"\nvms = [\"db01\"]\nrepository = \"main\"\n",
        lab.path("repo").display(),
        lab.path("qmp.sock").display(),
        lab.path("nbd.sock").display()
    ));
    let (ok, r) = lab.run_job("nightly");
    assert!(!ok, "{r:#}");
    let text = r.to_string();
    assert!(
        text.contains("block node 'nope' not found") && text.contains("disk0"),
        "{r:#}"
    );
    // The first disk's fleece node was made before the second failed.
    let (left, bitmaps) = qsd.leftovers();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(bitmaps, vec!["arca.nightly.1".to_owned()], "untouched");
    let fleeces = std::fs::read_dir(lab.path("exports")).unwrap().count();
    assert_eq!(fleeces, 0, "no fleece file is left");
}

#[test]
fn cbt_is_used_only_against_the_point_it_counts_from() {
    // Over 2048 blocks: a block list longer than a header read, so that a
    // damaged block list leaves the header readable.
    let (lab, qsd) = qemu_lab(640);
    let (ok, first) = lab.run_job("nightly");
    assert!(ok, "{first:#}");
    qsd.write(&["write -P 0x31 1M 1M"]);
    let (ok, second) = lab.run_job("nightly");
    assert!(ok, "{second:#}");
    let second_id = second["tasks"][0]["restore_point"].as_str().unwrap();
    // The newest point's block list is damaged; its header still reads, so
    // the snapshot freezes its bitmap, but the task's parent is the point
    // before it: the bitmap's changes are not the changes since the parent.
    let manifest = lab.path(&format!(
        "repo/points/nightly/db01/root/{second_id}.manifest"
    ));
    let mut bytes = std::fs::read(&manifest).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&manifest, &bytes).unwrap();

    qsd.write(&["write -P 0x32 40M 64k"]);
    let want = qsd.content_sha(&lab);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let t = &r["tasks"][0];
    assert_ne!(t["parent_point"].as_str(), Some(second_id), "{t:#}");
    assert!(
        t["stats"]["cbt_dirty_bytes"].is_null(),
        "CBT not used: {t:#}"
    );
    assert!(
        t["notices"]
            .to_string()
            .contains(&format!("counts from restore point {second_id}")),
        "{t:#}"
    );
    assert_eq!(
        restore_sha(&lab, t["restore_point"].as_str().unwrap()),
        want,
        "the changes of the damaged point's interval are in"
    );
}

#[test]
fn lost_and_inconsistent_bitmaps_fall_back_to_digests() {
    let (lab, qsd) = qemu_lab(64);
    let (ok, first) = lab.run_job("nightly");
    assert!(ok, "{first:#}");

    // QEMU killed: a bitmap made at run time was never saved.
    qsd.write(&["write -P 0x31 3M 64k"]);
    qsd.kill();
    let qsd = Qsd::start(lab.dir.path());
    let want = qsd.content_sha(&lab);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(r["notices"].to_string().contains("is gone"), "{r:#}");
    let s = &r["tasks"][0]["stats"];
    assert!(s["cbt_dirty_bytes"].is_null());
    assert_eq!(
        s["read_bytes"].as_u64(),
        Some(32 * MIB),
        "digest path reads all data"
    );
    assert_eq!(
        restore_sha(&lab, r["tasks"][0]["restore_point"].as_str().unwrap()),
        want
    );

    // Saved by a clean stop, reopened, then QEMU killed: left in use, inconsistent.
    qsd.quit();
    let qsd = Qsd::start(lab.dir.path());
    qsd.write(&["write -P 0x32 5M 64k"]);
    qsd.kill();
    let qsd = Qsd::start(lab.dir.path());
    let want = qsd.content_sha(&lab);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(r["notices"].to_string().contains("inconsistent"), "{r:#}");
    assert!(r["tasks"][0]["stats"]["cbt_dirty_bytes"].is_null());
    assert_eq!(
        restore_sha(&lab, r["tasks"][0]["restore_point"].as_str().unwrap()),
        want
    );

    // And CBT is back for the next incremental.
    qsd.write(&["write -P 0x33 7M 64k"]);
    let want = qsd.content_sha(&lab);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(
        r["tasks"][0]["stats"]["cbt_dirty_bytes"].as_u64().is_some(),
        "{r:#}"
    );
    assert_eq!(
        restore_sha(&lab, r["tasks"][0]["restore_point"].as_str().unwrap()),
        want
    );
}

#[test]
fn clean_zero_blocks_are_carried_not_read_again() {
    let (lab, qsd) = qemu_lab(64);
    let (ok, first) = lab.run_job("nightly");
    assert!(ok, "{first:#}");
    // The guest writes blocks of zeros (data, not a discard: QEMU without
    // detect-zeroes keeps them allocated) over data and over never-written
    // space.
    qsd.write(&["write -P 0 8M 1M", "write -P 0 48M 1M"]);
    let (ok, second) = lab.run_job("nightly");
    assert!(ok, "{second:#}");
    let s = &second["tasks"][0]["stats"];
    assert_eq!(s["zero_bytes"].as_u64(), Some(2 * MIB), "{s:#}");

    let want = qsd.content_sha(&lab);
    let (ok, third) = lab.run_job("nightly");
    assert!(ok, "{third:#}");
    let t = &third["tasks"][0];
    assert_eq!(t["stats"]["cbt_dirty_bytes"].as_u64(), Some(0), "{t:#}");
    assert_eq!(
        t["stats"]["read_bytes"].as_u64(),
        Some(0),
        "clean zero blocks are not read: {t:#}"
    );
    assert_eq!(
        restore_sha(&lab, t["restore_point"].as_str().unwrap()),
        want
    );
}

#[test]
fn a_lifted_exclusion_is_read_again_though_clean() {
    let (lab, qsd) = qemu_lab(64);
    // Part of one block and two whole blocks, all holding data.
    apply_excluding(&lab, "1MiB+100KiB, 4MiB+512KiB");
    let (ok, first) = lab.run_job("nightly");
    assert!(ok, "{first:#}");
    assert_eq!(
        first["tasks"][0]["stats"]["excluded_bytes"].as_u64(),
        Some(612 * 1024)
    );
    // Excluded the same way again, through the repository's record: the
    // partly excluded block is carried, nothing is read.
    let (ok, again) = lab.run_job("nightly");
    assert!(ok, "{again:#}");
    let t = &again["tasks"][0];
    assert_eq!(t["stats"]["cbt_dirty_bytes"].as_u64(), Some(0), "{t:#}");
    assert_eq!(t["stats"]["read_bytes"].as_u64(), Some(0), "{t:#}");

    // Nothing is written, but nothing is excluded any more: the excluded
    // bytes were stored as zeros, so their blocks are read, and only they.
    apply_qemu_config(&lab, "");
    let want = qsd.content_sha(&lab);
    let (ok, second) = lab.run_job("nightly");
    assert!(ok, "{second:#}");
    let t = &second["tasks"][0];
    assert_eq!(t["stats"]["cbt_dirty_bytes"].as_u64(), Some(0), "{t:#}");
    assert_eq!(t["stats"]["read_bytes"].as_u64(), Some(3 * BLOCK), "{t:#}");
    assert_eq!(
        restore_sha(&lab, t["restore_point"].as_str().unwrap()),
        want,
        "the bytes no longer excluded are in"
    );

    // Nothing excluded, as in the parent: nothing to read.
    let (ok, third) = lab.run_job("nightly");
    assert!(ok, "{third:#}");
    assert_eq!(
        third["tasks"][0]["stats"]["read_bytes"].as_u64(),
        Some(0),
        "{third:#}"
    );
}

#[test]
fn a_parent_that_does_not_record_its_exclusions_is_compared_by_digest() {
    use arca::repository::manifest;
    let (lab, qsd) = qemu_lab(64);
    // Part of a block excluded: stored with those bytes zeroed.
    apply_excluding(&lab, "1MiB+100KiB");
    let (ok, first) = lab.run_job("nightly");
    assert!(ok, "{first:#}");
    // As an older arca (or agent) wrote it: no record of the excluded ranges.
    let id = first["tasks"][0]["restore_point"].as_str().unwrap();
    let path = lab.path(&format!("repo/points/nightly/db01/root/{id}.manifest"));
    let mut m = manifest::read(&path).unwrap();
    assert!(m.excluded.is_some(), "this arca records them");
    m.excluded = None;
    std::fs::write(&path, manifest::encode(&m)).unwrap();

    // The exclusion is lifted and the block is not written: only digests
    // can tell that its stored bytes are not the disk's.
    apply_qemu_config(&lab, "");
    qsd.write(&["write -P 0x31 2M 64k"]);
    let want = qsd.content_sha(&lab);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let t = &r["tasks"][0];
    assert!(t["stats"]["cbt_dirty_bytes"].is_null(), "{t:#}");
    assert!(
        t["notices"]
            .to_string()
            .contains("does not record the ranges it excluded"),
        "{t:#}"
    );
    assert_eq!(t["stats"]["read_bytes"].as_u64(), Some(32 * MIB), "{t:#}");
    assert_eq!(
        restore_sha(&lab, t["restore_point"].as_str().unwrap()),
        want,
        "the bytes no longer excluded are in"
    );
}
