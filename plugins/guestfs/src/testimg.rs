//! Test images made by the real tools (e2fsprogs, util-linux, ntfs-3g).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("arca-guestfs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(cmd: &str, args: &[&str]) -> String {
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

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
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

/// A tree for `mkfs.ext4 -d`: a swap file, files under /tmp and
/// /var/cache, files to keep, and /keep/deleted (removed afterwards).
pub fn guest_tree(root: &Path) {
    for d in ["tmp/sub", "var/cache/apt", "keep", "home/ann"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("tmp/a.bin"), noise(300_000, 1)).unwrap();
    std::fs::write(root.join("tmp/sub/b.bin"), noise(70_000, 2)).unwrap();
    std::fs::write(root.join("var/cache/apt/pkg.bin"), noise(500_000, 3)).unwrap();
    std::fs::write(root.join("keep/c.bin"), noise(400_000, 4)).unwrap();
    std::fs::write(root.join("keep/deleted"), noise(600_000, 5)).unwrap();
    std::fs::write(root.join("home/ann/notes.txt"), b"hello".repeat(1000)).unwrap();
    std::fs::write(root.join("tmp/small"), b"x").unwrap();
    let swap = root.join("swapfile");
    std::fs::write(&swap, noise(4 << 20, 6)).unwrap();
    run("mkswap", &[swap.to_str().unwrap()]);
}

/// An ext4 image of `mib` MiB built from `guest_tree`, with /keep/deleted
/// removed by debugfs so its data stays in free blocks.
pub fn ext4_image(dir: &Dir, name: &str, mib: u64, mkfs_args: &[&str]) -> PathBuf {
    let root = dir.path(&format!("{name}.root"));
    guest_tree(&root);
    let img = dir.path(&format!("{name}.img"));
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(mib << 20).unwrap();
    let mut args = vec!["-F", "-q"];
    args.extend_from_slice(mkfs_args);
    args.extend(["-d", root.to_str().unwrap(), img.to_str().unwrap()]);
    run("mkfs.ext4", &args);
    run(
        "debugfs",
        &["-w", "-R", "rm /keep/deleted", img.to_str().unwrap()],
    );
    img
}

/// Physical blocks of a file per `debugfs -R "blocks PATH"`.
pub fn debugfs_blocks(img: &Path, path: &str) -> Vec<u64> {
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

/// Data blocks of a file: `debugfs blocks` less the indirect blocks of an
/// ext2/3 block map (`(IND):N`, `(DIND):N`, `(TIND):N` in `stat`).
pub fn debugfs_data_blocks(img: &Path, path: &str) -> Vec<u64> {
    let stat = run(
        "debugfs",
        &["-R", &format!("stat {path}"), img.to_str().unwrap()],
    );
    let indirect: Vec<u64> = stat
        .split([' ', ','])
        .filter_map(|w| {
            let w = w.trim();
            ["(IND):", "(DIND):", "(TIND):"]
                .iter()
                .find_map(|p| w.strip_prefix(p))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    debugfs_blocks(img, path)
        .into_iter()
        .filter(|b| !indirect.contains(b))
        .collect()
}

/// The physical block of logical block `n` of a file (0 for a hole).
pub fn debugfs_bmap(img: &Path, path: &str, n: u64) -> u64 {
    run(
        "debugfs",
        &["-R", &format!("bmap {path} {n}"), img.to_str().unwrap()],
    )
    .split_whitespace()
    .find_map(|w| w.parse().ok())
    .unwrap()
}

/// `Free blocks:` and `Block size:` per `dumpe2fs -h`.
pub fn dumpe2fs_free(img: &Path) -> (u64, u64) {
    let out = run("dumpe2fs", &["-h", img.to_str().unwrap()]);
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {out}"))
            .trim()
            .parse()
            .unwrap()
    };
    (field("Free blocks:"), field("Block size:"))
}

/// An NTFS image made by mkntfs with a pagefile.sys of random data, files
/// under /tmp, and a file to keep, all copied in with ntfscp.
pub fn ntfs_image(dir: &Dir, name: &str, mib: u64) -> PathBuf {
    let img = dir.path(&format!("{name}.img"));
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(mib << 20).unwrap();
    let i = img.to_str().unwrap();
    run("mkntfs", &["-F", "-Q", "-q", i]);
    let src = dir.path(&format!("{name}.src"));
    for (dest, len, seed) in [
        ("pagefile.sys", 3_000_000, 7),
        ("keep.bin", 200_000, 8),
        ("tmp.bin", 100_000, 9),
    ] {
        std::fs::write(&src, noise(len, seed)).unwrap();
        run("ntfscp", &["-q", i, src.to_str().unwrap(), dest]);
    }
    run("ntfsfix", &["-n", i]);
    img
}

pub fn ntfscluster_free_bytes(img: &Path) -> u64 {
    let out = run("ntfscluster", &["-i", img.to_str().unwrap()]);
    out.lines()
        .find_map(|l| l.strip_prefix("bytes of free space"))
        .and_then(|v| v.trim().trim_start_matches(':').trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"))
}

/// (LCN, length) runs of a file's $DATA per `ntfsinfo -v -F`.
pub fn ntfsinfo_runs(img: &Path, path: &str) -> Vec<(u64, u64)> {
    let out = run("ntfsinfo", &["-v", "-F", path, img.to_str().unwrap()]);
    let mut runs = Vec::new();
    let mut inside = false;
    for line in out.lines() {
        if line.contains("Runlist:") {
            inside = true;
            continue;
        }
        if inside {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.len() == 3 && w.iter().all(|x| x.starts_with("0x")) {
                let h = |s: &str| u64::from_str_radix(&s[2..], 16).unwrap();
                runs.push((h(w[1]), h(w[2])));
            } else {
                inside = false;
            }
        }
    }
    runs
}

/// Seeded byte mutations and truncations of `image`, each handed to
/// `check`, which must return without panicking.
pub fn fuzz(
    image: &[u8],
    hot: &[(usize, usize)],
    rounds: u32,
    seed: u64,
    mut check: impl FnMut(&[u8]),
) {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(seed);
    // Mutated in place and put back after each round: no copy of the image.
    let mut img = image.to_vec();
    for round in 0..rounds {
        let mut undo = Vec::new();
        let flips = rng.random_range(1..=8);
        for _ in 0..flips {
            let &(start, len) = &hot[rng.random_range(0..hot.len())];
            let at = start + rng.random_range(0..len.min(img.len() - start));
            undo.push((at, img[at]));
            img[at] = match rng.random_range(0..4) {
                0 => 0,
                1 => 0xFF,
                2 => img[at] ^ (1 << rng.random_range(0..8)),
                _ => rng.random(),
            };
        }
        let end = if round % 10 == 0 {
            rng.random_range(0..img.len())
        } else {
            img.len()
        };
        check(&img[..end]);
        for (at, b) in undo.into_iter().rev() {
            img[at] = b;
        }
    }
}
