//! arca against the tools a backup administrator would otherwise use, on the
//! same guest disk in the same run (`bash scripts/bench-peers.sh`, which
//! installs restic, borgbackup and b3sum if missing and runs `cargo bench
//! --bench peers`; size with ARCA_BENCH_GIB, default 4).
//!
//! The disk is built with the real tools: a GPT (sfdisk) with an ext4
//! partition (`mkfs.ext4 -d`) filled with this machine's system files, a
//! swap file and a swap partition full of random data (`mkswap`), a deleted
//! file whose data stays in free blocks (`debugfs rm`), and never-written
//! space. Every tool backs up the same four states of it: the full backup,
//! then three incrementals after ~1% clustered changes (runs of 64 KiB to
//! 1 MiB). Then each restores the last one. References: `zstd -1 -T2` of
//! the image (the "just compress it" limit) and `b3sum` (read and hash).
//!
//! arca runs three ways: on the image file with the default pipeline (the
//! whole disk, restored bit-exact), on the image file with the guest
//! filesystem stages an operator adds for a Linux guest (swap and free
//! space excluded), and on the same disk as a live VM (a qcow2 copy served
//! by qemu-storage-daemon) whose incrementals use changed block tracking:
//! the guest's writes reach that VM through its NBD export, byte for byte
//! the writes made to the image file.
//!
//! Prints a table (wall time, CPU time, peak RSS of each run, repository
//! sizes) and the ratios arca/peer, and writes the same as JSON and an SVG
//! chart under `results/peers-<time>/`. Never asserts on time.

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

mod common;

use common::{MIB, Vm, change_clustered, tool};

/// One measured run of one tool.
#[derive(serde::Serialize, Clone)]
struct Run {
    tool: String,
    run: String,
    wall_s: f64,
    cpu_s: f64,
    peak_rss_mib: f64,
}

/// Runs `cmd` to its end and measures it with `wait4` (peak RSS and CPU of
/// the process itself). Its output (arca's JSON session report, with the
/// busy time of every stage) is kept in `logs/<tool>-<run>.log`, so that
/// a figure can be explained after the run. Panics with it if it fails.
// `wait4` reaps the child: `Child::wait` cannot report its resource usage.
#[allow(clippy::zombie_processes)]
fn measure(tool: &str, run: &str, cmd: &mut Command, logs: &Path) -> Run {
    std::fs::create_dir_all(logs).unwrap();
    let name: String = format!("{tool}-{run}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '+' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let log = &logs.join(format!("{name}.log"));
    let out = std::fs::File::create(log).unwrap();
    // Every run starts with nothing left to write back: the image conversion
    // and the previous tool's repository would otherwise still be going to
    // the device while this one runs, slowing whichever tool comes next.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let t = Instant::now();
    let child = cmd
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `usage` are ours.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let wall_s = t.elapsed().as_secs_f64();
    assert!(
        pid > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{tool} {run} failed:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    Run {
        tool: tool.into(),
        run: run.into(),
        wall_s,
        cpu_s: secs(usage.ru_utime) + secs(usage.ru_stime),
        peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
    }
}

fn random_file(path: &Path, len: u64, seed: u64) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < len {
        let n = buf.len().min((len - at) as usize);
        rng.fill_bytes(&mut buf[..n]);
        f.write_all_at(&buf[..n], at).unwrap();
        at += n as u64;
    }
}

/// Copies regular files from `from` into `to` until `budget` bytes are
/// copied; returns what was copied.
fn copy_tree(from: &Path, to: &Path, budget: u64) -> u64 {
    let mut copied = 0;
    let mut stack = vec![from.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            let path = e.path();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                if copied + len > budget {
                    return copied;
                }
                let dest = to.join(path.strip_prefix("/").unwrap());
                std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
                if std::fs::copy(&path, &dest).is_ok() {
                    copied += len;
                }
            }
        }
    }
    copied
}

/// The guest disk (see the module comment); returns its path.
fn build_disk(dir: &Path, size: u64) -> PathBuf {
    let ext4_len = size * 70 / 100 / MIB * MIB;
    let swap_len = size * 8 / 100 / MIB * MIB;
    let root = dir.join("root");
    let mut files = 0;
    for src in ["/usr/share", "/usr/lib", "/usr/include", "/usr/bin"] {
        files += copy_tree(Path::new(src), &root, ext4_len * 45 / 100 - files);
    }
    std::fs::create_dir_all(root.join("var/tmp")).unwrap();
    let swapfile = root.join("swapfile");
    random_file(&swapfile, size * 5 / 100 / MIB * MIB, 1);
    tool("mkswap", &[swapfile.to_str().unwrap()]);
    random_file(&root.join("var/tmp/deleted.bin"), size * 4 / 100, 2);
    let ext4 = dir.join("ext4.img");
    std::fs::File::create(&ext4)
        .unwrap()
        .set_len(ext4_len)
        .unwrap();
    tool(
        "mkfs.ext4",
        &[
            "-F",
            "-q",
            "-b",
            "4096",
            "-d",
            root.to_str().unwrap(),
            ext4.to_str().unwrap(),
        ],
    );
    tool(
        "debugfs",
        &[
            "-w",
            "-R",
            "rm /var/tmp/deleted.bin",
            ext4.to_str().unwrap(),
        ],
    );
    std::fs::remove_dir_all(&root).unwrap();
    let swap = dir.join("swap.img");
    random_file(&swap, swap_len, 3);
    tool("mkswap", &[swap.to_str().unwrap()]);

    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
    let script = format!(
        "label: gpt\nstart=2048, size={}, type=L\nsize={}, type=S\n",
        ext4_len / 512,
        swap_len / 512
    );
    let mut sfdisk = Command::new("/usr/sbin/sfdisk")
        .args(["-q", disk.to_str().unwrap()])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut sfdisk.stdin.take().unwrap(), script.as_bytes()).unwrap();
    assert!(sfdisk.wait().unwrap().success());
    // conv=sparse: the partitions' unwritten space stays never-written.
    for (img, at) in [(&ext4, MIB), (&swap, MIB + ext4_len)] {
        tool(
            "dd",
            &[
                &format!("if={}", img.display()),
                &format!("of={}", disk.display()),
                "bs=1M",
                &format!("seek={}", at / MIB),
                "conv=sparse,notrunc",
                "status=none",
            ],
        );
        std::fs::remove_file(img).unwrap();
    }
    println!(
        "disk: {} MiB; ext4 {} MiB ({} MiB of system files, a {} MiB swap file, {} MiB deleted), swap partition {} MiB, {} MiB never written",
        size / MIB,
        ext4_len / MIB,
        files / MIB,
        size * 5 / 100 / MIB,
        size * 4 / 100 / MIB,
        swap_len / MIB,
        (size - MIB - ext4_len - swap_len) / MIB
    );
    disk
}

/// The guest writes `runs` through the VM's export, byte for byte.
fn write_runs(vm: &Vm, dir: &Path, runs: &[(u64, Vec<u8>)]) {
    let mut cmds = Vec::new();
    for (i, (at, bytes)) in runs.iter().enumerate() {
        let file = dir.join(format!("run{i}.bin"));
        std::fs::write(&file, bytes).unwrap();
        cmds.push(format!("write -s {} {at} {}", file.display(), bytes.len()));
    }
    vm.qemu_io(&cmds);
    for i in 0..runs.len() {
        let _ = std::fs::remove_file(dir.join(format!("run{i}.bin")));
    }
}

/// Reads the whole file so that it is in the page cache. Every backup run
/// starts this way: borg drops the pages of the files it read
/// (`posix_fadvise(DONTNEED)`), so whichever tool ran after it would
/// otherwise read the disk from the device, and the table would measure the
/// order of the runs (it once put arca's incrementals at 2.4 s instead of
/// 1.0 s).
fn warm(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    let mut at = 0;
    loop {
        let n = f.read_at(&mut buf, at).unwrap();
        if n == 0 {
            break;
        }
        at += n as u64;
    }
}

/// Apparent size of everything under `path`.
fn size_of(path: &Path) -> u64 {
    let out = Command::new("du").arg("-sb").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct Tools {
    dir: PathBuf,
    arca: PathBuf,
}

impl Tools {
    fn arca(&self, home: &str) -> Command {
        let mut c = Command::new(&self.arca);
        c.env("ARCA_HOME", self.dir.join(home));
        c
    }

    /// Writes `config` to `<home>.toml` and applies it in arca home `home`,
    /// which also compiles its plugins into the cache before anything is
    /// timed.
    fn configure(&self, home: &str, config: &str) {
        let path = self.dir.join(format!("{home}.toml"));
        std::fs::write(&path, config).unwrap();
        let ok = self
            .arca(home)
            .args(["apply", path.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(ok.success(), "arca apply {}", path.display());
    }

    fn restic(&self) -> Command {
        let mut c = Command::new("restic");
        c.env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_REPOSITORY", self.dir.join("restic"))
            .env("RESTIC_CACHE_DIR", self.dir.join("restic-cache"));
        c
    }

    fn borg(&self) -> Command {
        let mut c = Command::new("borg");
        c.env("BORG_BASE_DIR", self.dir.join("borg-base"))
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes");
        c
    }
}

/// arca on the live VM, with changed block tracking.
const CBT: &str = "arca+cbt";

/// The arca configurations on the image file: the whole disk with the
/// default pipeline, and with the guest-filesystem stages an operator would
/// add.
const ARCA_VARIANTS: [(&str, &str); 2] = [
    ("arca", ""),
    (
        "arca+guestfs",
        "exclusion = [{ plugin = \"swap\" }, { plugin = \"free-space\" }]\n",
    ),
];

fn main() {
    let gib: u64 = std::env::var("ARCA_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let size = gib << 30;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-peers");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let t = Instant::now();
    let disk = build_disk(&dir, size);
    println!("built in {:.1} s", t.elapsed().as_secs_f64());
    let tools = Tools {
        dir: dir.clone(),
        arca: PathBuf::from(env!("CARGO_BIN_EXE_arca")),
    };
    let log = dir.join("logs");
    let mut runs: Vec<Run> = Vec::new();

    // Set-up, not measured: repositories and configurations.
    for (name, stages) in ARCA_VARIANTS {
        tools.configure(
            name,
            &format!(
                "[[repository]]\nname = \"r\"\npath = \"{}\"\n\n[[vm]]\nname = \"guest\"\ndisks = [\"{}\"]\n\n\
                 [[pipeline]]\nname = \"p\"\n{stages}\n[[job]]\nname = \"bench\"\nvms = [\"guest\"]\nrepository = \"r\"\npipeline = \"p\"\n",
                dir.join(format!("{name}-repo")).display(),
                disk.display()
            ),
        );
    }
    let vm_image = dir.join("vm.qcow2");
    tool(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            disk.to_str().unwrap(),
            vm_image.to_str().unwrap(),
        ],
    );
    let vm = Vm::start(&dir, &vm_image);
    tools.configure(
        CBT,
        &format!(
            "[[repository]]\nname = \"r\"\npath = \"{}\"\n\n[[hypervisor]]\nname = \"q\"\nqmp = \"{}\"\nnbd = \"{}\"\n\n\
             [[vm]]\nname = \"guest\"\nhypervisor = \"q\"\ndisks = [{{ node = \"disk0\" }}]\n\n\
             [[job]]\nname = \"bench\"\nvms = [\"guest\"]\nrepository = \"r\"\n",
            dir.join(format!("{CBT}-repo")).display(),
            vm.qmp.display(),
            vm.nbd.display()
        ),
    );
    let ok = tools
        .restic()
        .args(["init", "--repository-version", "2"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let ok = tools
        .borg()
        .args(["init", "-e", "none"])
        .arg(dir.join("borg"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // References on the first state of the image.
    runs.push(measure(
        "zstd -1 -T2",
        "full",
        Command::new("zstd")
            .args(["-1", "-T2", "-q", "-f", "-o"])
            .arg(dir.join("disk.zst"))
            .arg(&disk),
        &log,
    ));
    let zstd_size = std::fs::metadata(dir.join("disk.zst")).unwrap().len();
    warm(&disk);
    runs.push(measure(
        "b3sum",
        "full",
        Command::new("b3sum").arg(&disk),
        &log,
    ));

    let mut sizes: Vec<(String, u64)> = Vec::new();
    for state in 0..4u64 {
        let run = if state == 0 {
            "full".to_owned()
        } else {
            let writes = change_clustered(&disk, size / 100, 100 + state);
            write_runs(&vm, &dir, &writes);
            format!("incremental {state}")
        };
        // The read-and-hash limit of each state, measured right before
        // arca reads that state: this machine's speed drifts over the
        // minutes a run takes (restic's full took 10.9-15.3 s on one day),
        // and the ratio should compare runs made at the same moment.
        if state > 0 {
            warm(&disk);
            runs.push(measure(
                "b3sum",
                &run,
                Command::new("b3sum").arg(&disk),
                &log,
            ));
        }
        for name in ARCA_VARIANTS.map(|(n, _)| n).into_iter().chain([CBT]) {
            let mut c = tools.arca(name);
            c.args(["job", "run", "bench", "--json"]);
            warm(if name == CBT { &vm_image } else { &disk });
            runs.push(measure(name, &run, &mut c, &log));
        }
        let mut c = tools.restic();
        c.args(["backup", "--compression", "auto", "--quiet"])
            .arg(&disk);
        warm(&disk);
        runs.push(measure("restic", &run, &mut c, &log));
        let mut c = tools.borg();
        c.args(["create", "--compression", "zstd,3"])
            .arg(format!("{}::s{state}", dir.join("borg").display()))
            .arg(&disk);
        warm(&disk);
        runs.push(measure("borg", &run, &mut c, &log));
    }
    for name in ARCA_VARIANTS.map(|(n, _)| n).into_iter().chain([CBT]) {
        sizes.push((name.into(), size_of(&dir.join(format!("{name}-repo")))));
    }
    drop(vm);
    sizes.push(("restic".into(), size_of(&dir.join("restic"))));
    sizes.push(("borg".into(), size_of(&dir.join("borg"))));
    sizes.push(("zstd -1 -T2".into(), zstd_size));

    // Full restores of the last state.
    for (name, _) in ARCA_VARIANTS {
        let text = tools
            .arca(name)
            .args(["points", "--json"])
            .output()
            .unwrap()
            .stdout;
        let points: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let last = points
            .as_array()
            .unwrap()
            .iter()
            .max_by_key(|p| p["created"].as_str().unwrap_or("").to_owned())
            .unwrap()["point_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let out = dir.join(format!("{name}-restored.raw"));
        let mut c = tools.arca(name);
        c.args(["restore", &last, "--to"]).arg(&out);
        runs.push(measure(name, "restore", &mut c, &log));
        let _ = std::fs::remove_file(out);
    }
    let target = dir.join("restic-out");
    let mut c = tools.restic();
    c.args(["restore", "latest", "--target"]).arg(&target);
    runs.push(measure("restic", "restore", &mut c, &log));
    let _ = std::fs::remove_dir_all(target);
    let target = dir.join("borg-out");
    std::fs::create_dir_all(&target).unwrap();
    let mut c = tools.borg();
    c.current_dir(&target)
        .arg("extract")
        .arg(format!("{}::s3", dir.join("borg").display()));
    runs.push(measure("borg", "restore", &mut c, &log));
    let _ = std::fs::remove_dir_all(target);

    runs.push(parallel_disks(&tools, &disk));
    report(&runs, &sizes, size);
}

/// Peak memory of one session backing up four copies of the disk at once
/// (one task per disk, all running together).
fn parallel_disks(tools: &Tools, disk: &Path) -> Run {
    let n = 4;
    let mut list = Vec::new();
    for i in 0..n {
        let copy = tools.dir.join(format!("copy{i}.raw"));
        tool(
            "cp",
            &[
                "--sparse=always",
                disk.to_str().unwrap(),
                copy.to_str().unwrap(),
            ],
        );
        list.push(format!("\"{}\"", copy.display()));
    }
    tools.configure(
        "parallel",
        &format!(
            "[[repository]]\nname = \"r\"\npath = \"{}\"\nmax_tasks = {n}\n\n\
             [[proxy]]\nname = \"local\"\nmax_tasks = {n}\n\n\
             [[vm]]\nname = \"four\"\ndisks = [{}]\n\n\
             [[job]]\nname = \"four\"\nvms = [\"four\"]\nrepository = \"r\"\n",
            tools.dir.join("parallel-repo").display(),
            list.join(", ")
        ),
    );
    let mut c = tools.arca("parallel");
    c.args(["job", "run", "four", "--json"]);
    let run = measure(
        "arca",
        &format!("full, {n} disks"),
        &mut c,
        &tools.dir.join("logs"),
    );
    for i in 0..n {
        let _ = std::fs::remove_file(tools.dir.join(format!("copy{i}.raw")));
    }
    run
}

fn find<'a>(runs: &'a [Run], tool: &str, run: &str) -> Option<&'a Run> {
    runs.iter().find(|r| r.tool == tool && r.run == run)
}

/// Mean wall time of a tool's three incrementals.
fn incremental(runs: &[Run], tool: &str) -> f64 {
    (1..=3)
        .filter_map(|i| find(runs, tool, &format!("incremental {i}")))
        .map(|r| r.wall_s)
        .sum::<f64>()
        / 3.0
}

fn report(runs: &[Run], sizes: &[(String, u64)], disk: u64) {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<14} {:<15} {:>9} {:>9} {:>12}",
        "tool", "run", "wall s", "CPU s", "peak RSS MiB"
    );
    for r in runs {
        let _ = writeln!(
            table,
            "{:<14} {:<15} {:>9.2} {:>9.2} {:>12.0}",
            r.tool, r.run, r.wall_s, r.cpu_s, r.peak_rss_mib
        );
    }
    let _ = writeln!(table, "\n{:<14} {:>14}", "repository", "MiB");
    for (tool, bytes) in sizes {
        let _ = writeln!(table, "{tool:<14} {:>14.1}", *bytes as f64 / MIB as f64);
    }
    let wall = |tool: &str, run: &str| find(runs, tool, run).map_or(f64::NAN, |r| r.wall_s);
    let size = |tool: &str| {
        sizes
            .iter()
            .find(|(t, _)| t == tool)
            .map_or(f64::NAN, |(_, b)| *b as f64)
    };
    let mut ratios = serde_json::Map::new();
    if let Some(r) = runs.iter().find(|r| r.run.ends_with("disks")) {
        let _ = writeln!(
            table,
            "\npeak RSS, {}: {:.0} MiB [goal ≤ 512]",
            r.run, r.peak_rss_mib
        );
    }
    let _ = writeln!(table, "\nratios (goal in brackets)");
    for arca in ARCA_VARIANTS.map(|(n, _)| n).into_iter().chain([CBT]) {
        let cbt = arca == CBT;
        let mut lines: Vec<(&str, f64, &str)> = vec![
            (
                "full / zstd -1 -T2",
                wall(arca, "full") / wall("zstd -1 -T2", "full"),
                "≤ 1.0",
            ),
            (
                "full / restic",
                wall(arca, "full") / wall("restic", "full"),
                "≤ 0.25",
            ),
            (
                "full / borg",
                wall(arca, "full") / wall("borg", "full"),
                "≤ 0.2",
            ),
        ];
        if cbt {
            lines.push((
                "incremental (CBT) / full",
                incremental(runs, arca) / wall(arca, "full"),
                "≤ 0.03",
            ));
        } else {
            lines.push((
                "incremental (no CBT) / b3sum",
                incremental(runs, arca) / incremental(runs, "b3sum"),
                "≤ 1.2",
            ));
            lines.push((
                "incremental / full",
                incremental(runs, arca) / wall(arca, "full"),
                "-",
            ));
        }
        lines.push(("repository / restic", size(arca) / size("restic"), "≤ 1.0"));
        lines.push(("repository / borg", size(arca) / size("borg"), "≤ 1.0"));
        // The live VM's restore points restore exactly as the image
        // file's do: one restore is measured, of the image file's.
        if !cbt {
            lines.push((
                "restore / restic restore",
                wall(arca, "restore") / wall("restic", "restore"),
                "≤ 0.3",
            ));
            lines.push((
                "restore / borg restore",
                wall(arca, "restore") / wall("borg", "restore"),
                "-",
            ));
        }
        for (what, v, goal) in lines {
            let _ = writeln!(table, "{arca:<14} {what:<32} {v:>7.3}  [{goal}]");
            ratios.insert(format!("{arca}: {what}"), serde_json::json!(v));
        }
    }
    print!("\n{table}");

    let stamp = jiff::Timestamp::now()
        .strftime("%Y%m%dT%H%M%SZ")
        .to_string();
    let out = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../results")
        .join(format!("peers-{stamp}"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("table.txt"), &table).unwrap();
    let json = serde_json::json!({
        "disk_bytes": disk,
        "runs": runs,
        "repository_bytes": sizes.iter().map(|(t, b)| (t.clone(), *b)).collect::<std::collections::BTreeMap<_, _>>(),
        "ratios": ratios,
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    std::fs::write(out.join("wall.svg"), svg(runs)).unwrap();
    println!("\nresults: {}", out.canonicalize().unwrap().display());
}

/// A horizontal bar chart of wall times, one group per run. Written by hand:
/// a dozen rectangles do not justify a plotting library.
fn svg(runs: &[Run]) -> String {
    let colors = [
        "#2b6cb0", "#63b3ed", "#c05621", "#6b46c1", "#718096", "#a0aec0",
    ];
    let tools: Vec<&str> = runs.iter().fold(Vec::new(), |mut v, r| {
        if !v.contains(&r.tool.as_str()) {
            v.push(&r.tool);
        }
        v
    });
    let max = runs.iter().map(|r| r.wall_s).fold(0.0, f64::max).max(1e-9);
    let (bar, label_w, width) = (14.0, 210.0, 520.0);
    let mut y = 30.0;
    let mut body = String::new();
    let mut group = "";
    for r in runs {
        if r.run != group {
            group = &r.run;
            y += 10.0;
            let _ = write!(
                body,
                r#"<text x="4" y="{:.0}" font-weight="bold">{}</text>"#,
                y + 11.0,
                group
            );
            y += bar + 2.0;
        }
        let color = colors[tools.iter().position(|t| *t == r.tool).unwrap_or(0) % colors.len()];
        let w = width * r.wall_s / max;
        let _ = write!(
            body,
            r#"<text x="14" y="{:.0}">{}</text><rect x="{label_w}" y="{:.0}" width="{w:.1}" height="{bar}" fill="{color}"/><text x="{:.0}" y="{:.0}">{:.2} s</text>"#,
            y + 11.0,
            r.tool,
            y,
            label_w + w + 4.0,
            y + 11.0,
            r.wall_s
        );
        y += bar + 2.0;
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{:.0}" height="{:.0}" font-family="sans-serif" font-size="11"><text x="4" y="16" font-size="13">Wall time per run (shorter is better)</text>{body}</svg>"#,
        label_w + width + 80.0,
        y + 10.0
    )
}
