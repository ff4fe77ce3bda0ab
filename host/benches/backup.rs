//! Backup benchmark (run with `cargo bench --bench backup`; size with
//! `ARCA_BENCH_GIB`, default 2).
//!
//! Builds a disk from real files of this machine (~40% zeros and holes),
//! runs the real `arca` binary: full backup, 1% clustered change,
//! incremental, restore (the WASM codec against native zstd has its own
//! benchmark: `cargo bench --bench codec`). Prints MB/s and ratios; never
//! asserts on time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod common;

use common::{MIB, arca, change_clustered, make_disk, timed_job, timed_named_job};

fn main() {
    let gib: u64 = std::env::var("ARCA_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let size = gib << 30;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-backup");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.raw");
    let t = Instant::now();
    let data_bytes = make_disk(&disk, size);
    println!(
        "disk: {} MiB, {} MiB of real file data, rest zeros and holes (built in {:.1} s)",
        size / MIB,
        data_bytes / MIB,
        t.elapsed().as_secs_f64()
    );

    let home = dir.join("home");
    let cfg = dir.join("arca.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[repository]]\nname = \"bench\"\npath = \"{}\"\n\n[[vm]]\nname = \"bench\"\ndisks = [\"{}\"]\n\n[[job]]\nname = \"bench\"\nvms = [\"bench\"]\nrepository = \"bench\"\n",
            dir.join("repo").display(),
            disk.display()
        ),
    )
    .unwrap();
    // Also compiles the plugins, so the full backup measures backup work.
    arca(&home, &["apply", cfg.to_str().unwrap()]);

    drop_caches_hint(&disk);
    let (full_s, full) = timed_job(&home);
    change_clustered(&disk, size / 100, 7);
    let (incr_s, incr) = timed_job(&home);
    let point = incr["tasks"][0]["restore_point"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = dir.join("restored.raw");
    let t = Instant::now();
    arca(&home, &["restore", &point, "--to", out.to_str().unwrap()]);
    let restore_s = t.elapsed().as_secs_f64();

    let mb = size as f64 / 1e6;
    println!();
    println!(
        "{:<28} {:>9} {:>10} {:>12} {:>12}",
        "run", "seconds", "MB/s", "stored MiB", "bottleneck"
    );
    for (name, s, r) in [
        ("full backup", full_s, &full),
        ("incremental (1% changed)", incr_s, &incr),
    ] {
        println!(
            "{:<28} {:>9.2} {:>10.0} {:>12.1} {:>12}",
            name,
            s,
            mb / s,
            r["totals"]["stored_bytes"].as_u64().unwrap_or(0) as f64 / MIB as f64,
            r["bottleneck"]["stage"].as_str().unwrap_or("-")
        );
    }
    println!(
        "{:<28} {:>9.2} {:>10.0}",
        "restore",
        restore_s,
        mb / restore_s
    );
    println!(
        "full: compression {:.2}x; incremental/full time {:.3}",
        full["compression_ratio"].as_f64().unwrap_or(0.0),
        incr_s / full_s
    );

    quic_ratio(&dir, &home, &disk, full_s);

    // The "just compress it" limit from the product goals, same image, same run.
    let t = Instant::now();
    let status = Command::new("zstd")
        .args(["-1", "-T2", "-q", "-f", "-c"])
        .arg(&disk)
        .stdout(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {
            let z = t.elapsed().as_secs_f64();
            println!(
                "zstd -1 -T2 of the image: {z:.2} s; arca full backup / zstd = {:.2}",
                full_s / z
            );
        }
        _ => println!("zstd CLI not found: no reference run"),
    }
}

/// Evicts the disk from the page cache so the full backup reads from disk as a
/// first backup would (best effort; needs no privileges for our own file).
fn drop_caches_hint(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        use std::os::fd::AsRawFd;
        // SAFETY: advisory call on our own descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// The same full backup to an `arca agent` on loopback (QUIC, mutual TLS)
/// into a fresh repository, against the in-process full backup above. The
/// ratio is the link's whole cost: over a link with round trips a session
/// also uses 8 MiB batches where an in-process one uses 1 MiB
/// (`pipeline/worker.rs`, `batch_bytes`).
fn quic_ratio(dir: &Path, home: &Path, disk: &Path, in_process_s: f64) {
    use std::io::BufRead;
    let me = arca(home, &["identity"]).trim().to_owned();
    let agent_home = dir.join("agent-home");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_arca"))
        .env("ARCA_HOME", &agent_home)
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--trust",
            &me,
            "--repository",
        ])
        .arg(dir.join("agent-repo"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("arca agent");
    let mut line = String::new();
    std::io::BufReader::new(agent.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let (addr, fp) = (words[4], words[6].trim_end_matches(')'));
    let cfg = dir.join("quic.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[repository]]\nname = \"over-quic\"\nagent = \"{addr}\"\nfingerprint = \"{fp}\"\n\n\
             [[vm]]\nname = \"bench-q\"\ndisks = [\"{}\"]\n\n[[job]]\nname = \"bench-quic\"\nvms = [\"bench-q\"]\nrepository = \"over-quic\"\n",
            disk.display()
        ),
    )
    .unwrap();
    arca(home, &["apply", cfg.to_str().unwrap()]);
    let (quic_s, r) = timed_named_job(home, "bench-quic");
    let _ = agent.kill();
    let _ = agent.wait();
    println!(
        "full backup to an agent over QUIC (loopback): {quic_s:.2} s, {:.0} MiB sent; QUIC/in-process speed {:.2}",
        r["totals"]["transferred_bytes"].as_u64().unwrap_or(0) as f64 / MIB as f64,
        in_process_s / quic_s
    );
}
