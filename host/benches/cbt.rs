//! CBT benchmark (run with `cargo bench --bench cbt`; size with
//! `ARCA_BENCH_GIB`, default 2).
//!
//! A qemu-storage-daemon serves a qcow2 disk built from this machine's real
//! files; arca backs it up live (fleecing), the "guest" writes 1% of the disk
//! in clustered runs of 64 KiB–1 MiB through the VM's NBD export, and arca
//! runs a CBT incremental. Prints time and bytes read of each and their
//! ratios; never asserts on time. `ARCA_BENCH_BLOCK` sets the job's block
//! size (default: arca's, 256 KiB).

mod common;

use common::{MIB, Vm, arca, clustered_writes, make_disk, timed_job, tool};

fn main() {
    let gib: u64 = std::env::var("ARCA_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let size = gib << 30;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-cbt");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("disk.raw");
    let data = make_disk(&raw, size);
    let img = dir.join("disk.qcow2");
    tool(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
    println!(
        "disk: {} MiB qcow2, {} MiB of real file data",
        size / MIB,
        data / MIB
    );

    let vm = Vm::start(&dir, &img);
    let (qmp, nbd) = (&vm.qmp, &vm.nbd);

    let block = std::env::var("ARCA_BENCH_BLOCK").ok();
    println!(
        "block size {}",
        block.as_deref().unwrap_or("(arca's default)")
    );
    let block = block.map_or(String::new(), |b| format!("block_size = \"{b}\"\n"));
    let home = dir.join("home");
    let cfg = dir.join("arca.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[repository]]\nname = \"bench\"\npath = \"{}\"\n\n[[hypervisor]]\nname = \"q\"\nqmp = \"{}\"\nnbd = \"{}\"\n\n\
             [[vm]]\nname = \"bench\"\nhypervisor = \"q\"\ndisks = [{{ node = \"disk0\" }}]\n\n\
             [[job]]\nname = \"bench\"\nvms = [\"bench\"]\nrepository = \"bench\"\n{block}",
            dir.join("repo").display(),
            qmp.display(),
            nbd.display()
        ),
    )
    .unwrap();
    // Also compiles the plugins, so the full backup measures backup work.
    arca(&home, &["apply", cfg.to_str().unwrap()]);

    let (full_s, full) = timed_job(&home);
    let writes = clustered_writes(size, size / 100, 7);
    vm.qemu_io(&writes);
    let (incr_s, incr) = timed_job(&home);

    let read = |r: &serde_json::Value| r["totals"]["read_bytes"].as_u64().unwrap_or(0);
    println!();
    println!(
        "{:<34} {:>9} {:>12} {:>12}",
        "run", "seconds", "read MiB", "stored MiB"
    );
    for (name, s, r) in [
        ("full backup (live, fleecing)", full_s, &full),
        ("CBT incremental (1% clustered)", incr_s, &incr),
    ] {
        println!(
            "{:<34} {:>9.2} {:>12.1} {:>12.1}",
            name,
            s,
            read(r) as f64 / MIB as f64,
            r["totals"]["stored_bytes"].as_u64().unwrap_or(0) as f64 / MIB as f64
        );
    }
    println!(
        "CBT dirty: {:.1} MiB in {} writes; incremental/full: time {:.3}, bytes read {:.4}",
        incr["totals"]["cbt_dirty_bytes"].as_u64().unwrap_or(0) as f64 / MIB as f64,
        writes.len(),
        incr_s / full_s,
        read(&incr) as f64 / read(&full).max(1) as f64
    );
    drop(vm);
}
