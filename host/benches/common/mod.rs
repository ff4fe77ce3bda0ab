//! Shared by the benchmarks: a disk built from this machine's real files,
//! and clustered changes.

#![allow(dead_code)]

use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// Fills ~60% of the disk with real files (tar streams of system folders),
/// leaving ~40% as holes and written zeros.
pub fn make_disk(path: &Path, size: u64) -> u64 {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let target = size * 6 / 10;
    let mut written = 0u64;
    let mut off = 0u64;
    let mut rng = StdRng::seed_from_u64(1);
    'outer: for src in [
        "/usr/lib",
        "/usr/share",
        "/usr/bin",
        "/usr/include",
        "/var/lib/dpkg",
        "/usr",
    ] {
        let mut child = Command::new("tar")
            .args(["-cf", "-", src])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut buf = vec![0u8; 4 * MIB as usize];
        loop {
            let mut got = 0;
            while got < buf.len() {
                match std::io::Read::read(&mut stdout, &mut buf[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(_) => break,
                }
            }
            if got == 0 {
                break;
            }
            f.write_all_at(&buf[..got], off).unwrap();
            written += got as u64;
            off += got as u64;
            // Now and then a gap of zeros written or never written.
            if rng.random_range(0..4) == 0 {
                let gap = rng.random_range(1..8) * MIB;
                if rng.random_bool(0.5) {
                    f.write_all_at(&vec![0u8; gap as usize], off).unwrap();
                }
                off += gap;
            }
            if written >= target || off >= size - 16 * MIB {
                let _ = child.kill();
                let _ = child.wait();
                break 'outer;
            }
        }
        let _ = child.wait();
    }
    f.sync_all().unwrap();
    written
}

/// Overwrites `total` bytes in runs of 64 KiB to 1 MiB with random data;
/// returns the runs (offset, bytes) so that a hypervisor's disk can be
/// given the same writes.
pub fn change_clustered(path: &Path, total: u64, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut done = 0;
    let mut runs = Vec::new();
    while done < total {
        let run = rng.random_range(1..=16) * 64 * 1024;
        let at = rng.random_range(0..(size - run) / 4096) * 4096;
        let mut buf = vec![0u8; run as usize];
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, at).unwrap();
        runs.push((at, buf));
        done += run;
    }
    f.sync_all().unwrap();
    runs
}

/// The same clustered changes as `change_clustered`, as qemu-io commands
/// (for writes through a hypervisor).
pub fn clustered_writes(size: u64, total: u64, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut done = 0;
    while done < total {
        let run = rng.random_range(1..=16) * 64 * 1024;
        let at = rng.random_range(0..(size - run) / 4096) * 4096;
        out.push(format!(
            "write -P {} {at} {run}",
            rng.random_range(1..=255u8)
        ));
        done += run;
    }
    out
}

/// Runs a system tool (sbin included in its PATH); insists it succeeds.
pub fn tool(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the real `arca` binary with its state in `home`; insists it succeeds.
pub fn arca(home: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_arca"))
        .args(args)
        .env("ARCA_HOME", home)
        .output()
        .expect("run arca");
    assert!(
        out.status.success(),
        "arca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the benchmark's job `bench` and times it; returns the JSON report.
pub fn timed_job(home: &Path) -> (f64, serde_json::Value) {
    timed_named_job(home, "bench")
}

pub fn timed_named_job(home: &Path, job: &str) -> (f64, serde_json::Value) {
    let t = Instant::now();
    let text = arca(home, &["job", "run", job, "--json"]);
    (
        t.elapsed().as_secs_f64(),
        serde_json::from_str(&text).unwrap(),
    )
}

/// A live VM for arca's QEMU source: a qemu-storage-daemon serving a qcow2
/// image as block node `disk0`, with a QMP monitor (fleecing snapshots,
/// dirty bitmaps) and a writable NBD export `vm` (the guest). Stopped when
/// dropped.
pub struct Vm {
    qsd: Child,
    pub qmp: std::path::PathBuf,
    pub nbd: std::path::PathBuf,
}

impl Vm {
    pub fn start(dir: &Path, img: &Path) -> Vm {
        let (qmp, nbd) = (dir.join("qmp.sock"), dir.join("nbd.sock"));
        let qsd = Command::new("qemu-storage-daemon")
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
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (qemu-utils)");
        let vm = Vm { qsd, qmp, nbd };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(vm.qmp.exists() && vm.nbd.exists()) {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        vm
    }

    /// The guest runs qemu-io commands (`write ...`) on its disk.
    pub fn qemu_io(&self, cmds: &[String]) {
        let mut io = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(format!("nbd+unix:///vm?socket={}", self.nbd.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-io");
        let mut stdin = io.stdin.take().unwrap();
        for c in cmds {
            writeln!(stdin, "{c}").unwrap();
        }
        writeln!(stdin, "quit").unwrap();
        drop(stdin);
        assert!(io.wait().unwrap().success(), "qemu-io");
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qsd.kill();
        let _ = self.qsd.wait();
    }
}
