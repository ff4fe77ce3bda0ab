//! Guest-filesystem exclusion stages (`swap`, `free-space`, `exclude-paths`)
//! on disks made by the real tools: sfdisk (GPT), mkfs.ext4 -d, mkswap,
//! debugfs, mkntfs and ntfscp. The excluded bytes are checked against what
//! dumpe2fs, debugfs, ntfscluster and ntfsinfo say; the restored
//! filesystems are checked with e2fsck and ntfsfix, and every kept file
//! against the source.

use crate::common::*;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Where the layout puts things, in bytes.
struct GuestDisk {
    path: PathBuf,
    ext4: (u64, u64),
    swap: (u64, u64),
    ntfs: Option<(u64, u64)>,
    ext4_img: PathBuf,
    ntfs_img: Option<PathBuf>,
}

/// Files of the ext4 root: kept, excluded by path, a swap file, and
/// `keep/deleted` (removed with debugfs so its data stays in free blocks).
fn ext4_tree(root: &Path, scale: usize) {
    for d in ["tmp/sub", "var/cache/apt", "keep", "home/ann", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let files: [(&str, usize, u64); 7] = [
        ("tmp/a.bin", 300_000, 1),
        ("tmp/sub/b.bin", 70_000, 2),
        ("var/cache/apt/pkg.bin", 500_000, 3),
        ("keep/c.bin", 400_000, 4),
        ("keep/deleted", 600_000, 5),
        ("home/ann/photo.raw", 250_000, 6),
        ("etc/fstab", 300, 7),
    ];
    for (f, len, seed) in files {
        std::fs::write(root.join(f), noise(len * scale, seed)).unwrap();
    }
    std::fs::write(root.join("home/ann/notes.txt"), b"hello ".repeat(2000)).unwrap();
    let swap = root.join("swapfile");
    std::fs::write(&swap, noise((4 << 20) * scale, 8)).unwrap();
    run("mkswap", &[swap.to_str().unwrap()]);
}

/// A GPT disk: ext4 (with the tree above), Linux swap and, unless `mib`
/// scaling says otherwise, an NTFS partition with a pagefile.sys.
fn guest_disk(dir: &Path, scale: u64, with_ntfs: bool) -> GuestDisk {
    let (ext4_mib, swap_mib, ntfs_mib) = (48 * scale, 16 * scale, 32);
    let ext4_img = dir.join("p1.img");
    let root = dir.join("p1.root");
    ext4_tree(&root, scale as usize);
    File::create(&ext4_img)
        .unwrap()
        .set_len(ext4_mib * MIB)
        .unwrap();
    run(
        "mkfs.ext4",
        &[
            "-F",
            "-q",
            "-b",
            "4096",
            "-d",
            root.to_str().unwrap(),
            ext4_img.to_str().unwrap(),
        ],
    );
    run(
        "debugfs",
        &["-w", "-R", "rm /keep/deleted", ext4_img.to_str().unwrap()],
    );
    let swap_img = dir.join("p2.img");
    std::fs::write(&swap_img, noise((swap_mib * MIB) as usize, 9)).unwrap();
    run("mkswap", &[swap_img.to_str().unwrap()]);

    let ntfs_img = with_ntfs.then(|| {
        let img = dir.join("p3.img");
        File::create(&img).unwrap().set_len(ntfs_mib * MIB).unwrap();
        let i = img.to_str().unwrap();
        run("mkntfs", &["-F", "-Q", "-q", i]);
        let src = dir.join("p3.src");
        for (dest, len, seed) in [
            ("pagefile.sys", 3_000_000, 10),
            ("keep.bin", 200_000, 11),
            ("scratch.tmp", 100_000, 12),
        ] {
            std::fs::write(&src, noise(len, seed)).unwrap();
            run("ntfscp", &["-q", i, src.to_str().unwrap(), dest]);
        }
        img
    });

    let ext4 = (MIB, ext4_mib * MIB);
    let swap = (ext4.0 + ext4.1, swap_mib * MIB);
    let ntfs = ntfs_img.as_ref().map(|_| (swap.0 + swap.1, ntfs_mib * MIB));
    let end = ntfs.map_or(swap.0 + swap.1, |n| n.0 + n.1);
    let path = dir.join("disk.raw");
    File::create(&path).unwrap().set_len(end + MIB).unwrap();
    let mut script = format!(
        "label: gpt\nstart={}, size={}, type=L\nstart={}, size={}, type=S\n",
        ext4.0 / 512,
        ext4.1 / 512,
        swap.0 / 512,
        swap.1 / 512
    );
    if let Some((at, len)) = ntfs {
        script.push_str(&format!(
            "start={}, size={}, type=EBD0A0A2-B9E5-4433-87C0-68B99B26B9C7\n",
            at / 512,
            len / 512
        ));
    }
    let mut child = Command::new("/usr/sbin/sfdisk")
        .args(["-q", path.to_str().unwrap()])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let mut parts = vec![(ext4.0, &ext4_img), (swap.0, &swap_img)];
    if let (Some((at, _)), Some(img)) = (ntfs, ntfs_img.as_ref()) {
        parts.push((at, img));
    }
    for (at, img) in parts {
        f.write_all_at(&std::fs::read(img).unwrap(), at).unwrap();
    }
    f.sync_all().unwrap();
    GuestDisk {
        path,
        ext4,
        swap,
        ntfs,
        ext4_img,
        ntfs_img,
    }
}

/// Copies `len` bytes at `at` of `from` into a new file.
fn extract(from: &Path, at: u64, len: u64, to: &Path) {
    let data = std::fs::read(from).unwrap();
    std::fs::write(to, &data[at as usize..(at + len) as usize]).unwrap();
}

fn debugfs_blocks(img: &Path, path: &str) -> Vec<u64> {
    run(
        "debugfs",
        &["-R", &format!("blocks {path}"), img.to_str().unwrap()],
    )
    .lines()
    .next()
    .unwrap_or("")
    .split_whitespace()
    .filter_map(|w| w.parse().ok())
    .collect()
}

fn dumpe2fs_free_blocks(img: &Path) -> u64 {
    let out = run("dumpe2fs", &["-h", img.to_str().unwrap()]);
    out.lines()
        .find_map(|l| l.strip_prefix("Free blocks:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn ntfs_free_bytes(img: &Path) -> u64 {
    let out = run("ntfscluster", &["-i", img.to_str().unwrap()]);
    out.lines()
        .find_map(|l| l.strip_prefix("bytes of free space"))
        .and_then(|v| v.trim().trim_start_matches(':').trim().parse().ok())
        .unwrap()
}

fn ntfs_run_clusters(img: &Path, path: &str) -> u64 {
    let out = run("ntfsinfo", &["-v", "-F", path, img.to_str().unwrap()]);
    let mut total = 0;
    let mut inside = false;
    for line in out.lines() {
        if line.contains("Runlist:") {
            inside = true;
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        if inside && w.len() == 3 && w.iter().all(|x| x.starts_with("0x")) {
            total += u64::from_str_radix(&w[2][2..], 16).unwrap();
        } else {
            inside = false;
        }
    }
    total
}

fn dump(img: &Path, path: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    run(
        "debugfs",
        &[
            "-R",
            &format!("dump {path} {}", out.display()),
            img.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

const STAGES: &str = "exclusion = [{ plugin = \"swap\" }, { plugin = \"free-space\" }, { plugin = \"exclude-paths\", exclude = \"/tmp/**, /var/cache/**, /*.tmp\" }]";

fn job(pipeline: &str) -> String {
    format!(
        "[[pipeline]]\nname = \"guest\"\n{pipeline}\n\n[[job]]\nname = \"nightly\"\nvms = [\"vm1\"]\nrepository = \"main\"\npipeline = \"guest\"\n"
    )
}

#[test]
fn guestfs_stages_exclude_what_the_tools_report_and_restore_consistent_filesystems() {
    let lab = Lab::new();
    let g = guest_disk(lab.dir.path(), 1, true);
    let (ntfs_at, ntfs_len) = g.ntfs.unwrap();
    let ntfs_img = g.ntfs_img.clone().unwrap();
    lab.apply(&config(&lab, &[("vm1", &[g.path.as_path()])], &job(STAGES)));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(
        r["notices"].as_array().is_none_or(|n| n.is_empty()),
        "{r:#}"
    );
    let stats = &r["tasks"][0]["stats"];
    let by_stage = &stats["excluded_by_stage"];

    // swap: the swap partition but its header page, the swap file's data
    // blocks but its first page (4 KiB blocks: one block), pagefile.sys.
    let swapfile_blocks = debugfs_blocks(&g.ext4_img, "/swapfile").len() as u64;
    let pagefile = ntfs_run_clusters(&ntfs_img, "/pagefile.sys") * 4096;
    let want_swap = (g.swap.1 - 4096) + (swapfile_blocks - 1) * 4096 + pagefile;
    assert_eq!(by_stage["swap"].as_u64(), Some(want_swap), "{stats:#}");

    // free-space: dumpe2fs's free block count and ntfscluster's free bytes.
    let want_free = dumpe2fs_free_blocks(&g.ext4_img) * 4096 + ntfs_free_bytes(&ntfs_img);
    assert_eq!(
        by_stage["free-space"].as_u64(),
        Some(want_free),
        "{stats:#}"
    );

    // exclude-paths: the files under /tmp and /var/cache, and scratch.tmp.
    let mut want_paths = 0;
    for f in ["/tmp/a.bin", "/tmp/sub/b.bin", "/var/cache/apt/pkg.bin"] {
        want_paths += debugfs_blocks(&g.ext4_img, f).len() as u64 * 4096;
    }
    want_paths += ntfs_run_clusters(&ntfs_img, "/scratch.tmp") * 4096;
    assert_eq!(
        by_stage["exclude-paths"].as_u64(),
        Some(want_paths),
        "{stats:#}"
    );
    eprintln!(
        "guestfs e2e: swap {want_swap} B, free-space {want_free} B, exclude-paths {want_paths} B; excluded {} of {} B",
        stats["excluded_bytes"], stats["disk_bytes"]
    );

    let point = r["tasks"][0]["restore_point"].as_str().unwrap();
    let out = lab.path("restored.raw");
    lab.ok(&["restore", point, "--to", out.to_str().unwrap()]);

    // ext4: consistent, kept files identical, excluded ones there and zero.
    let p1 = lab.path("restored-p1.img");
    extract(&out, g.ext4.0, g.ext4.1, &p1);
    run("e2fsck", &["-fn", p1.to_str().unwrap()]);
    let (a, b) = (lab.path("a.out"), lab.path("b.out"));
    for f in [
        "/keep/c.bin",
        "/home/ann/photo.raw",
        "/home/ann/notes.txt",
        "/etc/fstab",
    ] {
        assert!(
            dump(&g.ext4_img, f, &a) == dump(&p1, f, &b),
            "{f} differs after restore"
        );
    }
    for f in ["/tmp/a.bin", "/tmp/sub/b.bin", "/var/cache/apt/pkg.bin"] {
        let src = dump(&g.ext4_img, f, &a);
        let got = dump(&p1, f, &b);
        assert_eq!(got.len(), src.len(), "{f} keeps its size");
        assert!(got.iter().all(|&x| x == 0), "{f} restores as zeros");
    }
    // The swap file is still a valid swap area (header page kept).
    let swap = dump(&p1, "/swapfile", &b);
    assert_eq!(&swap[4086..4096], b"SWAPSPACE2");
    assert!(swap[4096..].iter().all(|&x| x == 0));
    // The swap partition: header page kept, the rest zeros.
    let restored = std::fs::read(&out).unwrap();
    let source = std::fs::read(&g.path).unwrap();
    let s = g.swap.0 as usize;
    assert_eq!(restored[s..s + 4096], source[s..s + 4096]);
    assert!(
        restored[s + 4096..s + g.swap.1 as usize]
            .iter()
            .all(|&x| x == 0)
    );

    // NTFS: consistent, kept file identical, excluded ones zero.
    let p3 = lab.path("restored-p3.img");
    extract(&out, ntfs_at, ntfs_len, &p3);
    run("ntfsfix", &["-n", p3.to_str().unwrap()]);
    let cat = |img: &Path, f: &str| -> Vec<u8> {
        Command::new("ntfscat")
            .args([img.to_str().unwrap(), f])
            .output()
            .unwrap()
            .stdout
    };
    assert!(cat(&ntfs_img, "keep.bin") == cat(&p3, "keep.bin"));
    for f in ["pagefile.sys", "scratch.tmp"] {
        let (src, got) = (cat(&ntfs_img, f), cat(&p3, f));
        assert_eq!(got.len(), src.len(), "{f}");
        assert!(got.iter().all(|&x| x == 0), "{f} restores as zeros");
    }

    // Everything not excluded restores bit-exact: the disk outside the
    // partitions (tables) and the ext4 metadata region are identical.
    assert_eq!(restored[..MIB as usize], source[..MIB as usize]);
    let tail = source.len() - MIB as usize;
    assert_eq!(restored[tail..], source[tail..]);
}

#[test]
fn a_damaged_partition_table_keeps_the_disk_whole_with_a_notice() {
    let lab = Lab::new();
    let g = guest_disk(lab.dir.path(), 1, false);
    // Both GPT headers damaged: the table cannot be trusted.
    let f = OpenOptions::new().write(true).open(&g.path).unwrap();
    let size = f.metadata().unwrap().len();
    f.write_all_at(&[0x5A; 8], 512 + 24).unwrap();
    f.write_all_at(&[0x5A; 8], size - 512 + 24).unwrap();
    f.sync_all().unwrap();
    drop(f);
    lab.apply(&config(&lab, &[("vm1", &[g.path.as_path()])], &job(STAGES)));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let notices = r["notices"].to_string();
    for stage in ["swap", "free-space", "exclude-paths"] {
        assert!(
            notices.contains(&format!("exclusion stage '{stage}' excluded nothing"))
                && notices.contains("backed up whole"),
            "{notices}"
        );
    }
    assert_eq!(r["tasks"][0]["stats"]["excluded_bytes"].as_u64(), Some(0));
    let out = lab.path("out.raw");
    lab.ok(&[
        "restore",
        r["tasks"][0]["restore_point"].as_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(sha256(&out), sha256(&g.path));
}

/// The numbers of docs/BENCHMARKS.md ("Guest-filesystem exclusion"): a
/// guest disk with a 256 MiB swap partition, a 64 MiB swap file, deleted
/// data and about 40% free space, backed up with and without the stages.
/// Run by `cargo bench --bench guestfs` (host/benches/guestfs.rs), never as
/// a test: it times things.
#[allow(dead_code)]
pub fn bench() {
    let dir = tempfile::tempdir().unwrap();
    let g = guest_disk(dir.path(), 16, false);
    // Fill the kept part of the filesystem with incompressible files so
    // that about 40% of it stays free.
    let fill = dir.path().join("fill");
    std::fs::write(&fill, noise((300 * MIB) as usize, 77)).unwrap();
    let p1 = dir.path().join("p1-filled.img");
    extract(&g.path, g.ext4.0, g.ext4.1, &p1);
    run(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} /keep/fill", fill.display()),
            p1.to_str().unwrap(),
        ],
    );
    let f = OpenOptions::new().write(true).open(&g.path).unwrap();
    f.write_all_at(&std::fs::read(&p1).unwrap(), g.ext4.0)
        .unwrap();
    f.sync_all().unwrap();
    let free = dumpe2fs_free_blocks(&p1) * 4096;
    eprintln!(
        "disk {} MiB; ext4 {} MiB with {} MiB free ({:.0}%); swap partition {} MiB",
        std::fs::metadata(&g.path).unwrap().len() / MIB,
        g.ext4.1 / MIB,
        free / MIB,
        100.0 * free as f64 / g.ext4.1 as f64,
        g.swap.1 / MIB
    );
    for (name, pipeline) in [
        ("without exclusion", "codec = { plugin = \"zstd\" }"),
        (
            "with swap + free-space",
            "exclusion = [{ plugin = \"swap\" }, { plugin = \"free-space\" }]",
        ),
    ] {
        let lab = Lab::new();
        lab.apply(&config(
            &lab,
            &[("vm1", &[g.path.as_path()])],
            &job(pipeline),
        ));
        let t = Instant::now();
        let (ok, r) = lab.run_job("nightly");
        let secs = t.elapsed().as_secs_f64();
        assert!(ok, "{r:#}");
        let s = &r["tasks"][0]["stats"];
        eprintln!(
            "{name}: {secs:.2} s; read {} MiB, excluded {} MiB {}, stored {} MiB; exclusion stage {:.3} s",
            s["read_bytes"].as_u64().unwrap() / MIB,
            s["excluded_bytes"].as_u64().unwrap() / MIB,
            s["excluded_by_stage"],
            s["stored_bytes"].as_u64().unwrap() / MIB,
            s["stage_seconds"]["exclusion"].as_f64().unwrap_or(0.0),
        );
    }
}
