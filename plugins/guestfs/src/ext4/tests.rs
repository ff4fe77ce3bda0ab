//! ext4 against images made by mkfs.ext4 and debugfs.

use super::*;
use crate::testimg::*;

fn blocks_to_runs(mut b: Vec<u64>) -> Vec<Run> {
    b.sort_unstable();
    let mut out: Vec<Run> = Vec::new();
    for x in b {
        match out.last_mut() {
            Some(r) if r.start + r.len == x => r.len += 1,
            _ => out.push(Run { start: x, len: 1 }),
        }
    }
    out
}

fn total(runs: &[Run]) -> u64 {
    runs.iter().map(|r| r.len).sum()
}

fn check_image(args: &[&str], name: &str) {
    let dir = Dir::new(name);
    let img = ext4_image(&dir, name, 64, args);
    let bytes = std::fs::read(&img).unwrap();
    let fs = Ext4::open(bytes.as_slice()).unwrap();

    // Free blocks: exactly what the superblock's count says.
    let (free_count, block_size) = dumpe2fs_free(&img);
    assert_eq!(fs.block_size(), block_size);
    let free = fs.free_blocks().unwrap();
    assert_eq!(total(&free), free_count, "{name}: free blocks");

    // The swap file: every block debugfs lists but the header page.
    let header: Vec<u64> = (0..4096 / block_size)
        .map(|l| debugfs_bmap(&img, "/swapfile", l))
        .collect();
    let want: Vec<u64> = debugfs_data_blocks(&img, "/swapfile")
        .into_iter()
        .filter(|b| !header.contains(b))
        .collect();
    let got = fs
        .swap_files(&["/swapfile".into(), "/missing".into()])
        .unwrap();
    assert_eq!(got, blocks_to_runs(want), "{name}: swap file");
    // A file without the signature is not swap.
    assert!(fs.swap_files(&["/keep/c.bin".into()]).unwrap().is_empty());

    // Excluded paths: the data blocks of the files below /tmp and /var/cache.
    let patterns = [
        Pattern::parse("/tmp/**").unwrap(),
        Pattern::parse("/var/cache").unwrap(),
    ];
    let mut want = Vec::new();
    for f in [
        "/tmp/a.bin",
        "/tmp/sub/b.bin",
        "/var/cache/apt/pkg.bin",
        "/tmp/small",
    ] {
        want.extend(debugfs_data_blocks(&img, f));
    }
    let got = fs.matching_files(&patterns).unwrap();
    assert_eq!(got, blocks_to_runs(want), "{name}: excluded paths");
    // Nothing excluded is metadata or another file's block.
    for keep in [
        "/keep/c.bin",
        "/home/ann/notes.txt",
        "/tmp",
        "/var/cache/apt",
    ] {
        for b in debugfs_blocks(&img, keep) {
            assert!(
                !got.iter().any(|r| (r.start..r.start + r.len).contains(&b)),
                "{keep}"
            );
            assert!(
                !free.iter().any(|r| (r.start..r.start + r.len).contains(&b)),
                "{keep}"
            );
        }
    }
}

#[test]
fn ext4_default_features() {
    check_image(&[], "ext4");
}

#[test]
fn ext4_1k_blocks_64bit_meta_bg_no_flex() {
    check_image(
        &["-b", "1024", "-O", "64bit,meta_bg,^resize_inode,^flex_bg"],
        "ext4-1k",
    );
}

#[test]
fn ext2_block_maps_without_checksums() {
    check_image(
        &["-t", "ext2", "-O", "^metadata_csum", "-b", "1024"],
        "ext2",
    );
}

#[test]
fn ext3_uninit_groups_with_gdt_csum() {
    check_image(&["-t", "ext3", "-O", "uninit_bg"], "ext3");
}

#[test]
fn journal_with_transactions_is_refused() {
    let dir = Dir::new("busy");
    let img = ext4_image(&dir, "busy", 32, &[]);
    let mut bytes = std::fs::read(&img).unwrap();
    {
        let fs = Ext4::open(bytes.as_slice()).unwrap();
        let inode = fs.inode(8).unwrap();
        let (data, _) = fs.map(&inode).unwrap();
        let jsb = (data[0].physical * fs.block_size()) as usize;
        // s_start: the log starts at block 1; and the superblock says the
        // journal needs recovery.
        bytes[jsb + 0x1C..jsb + 0x20].copy_from_slice(&1u32.to_be_bytes());
    }
    let sb = 1024;
    let incompat = le32(&bytes, sb + 0x60) | INCOMPAT_RECOVER;
    bytes[sb + 0x60..sb + 0x64].copy_from_slice(&incompat.to_le_bytes());
    let csum = crc32c(!0, &bytes[sb..sb + 0x3FC]);
    bytes[sb + 0x3FC..sb + 0x400].copy_from_slice(&csum.to_le_bytes());
    let err = Ext4::open(bytes.as_slice()).err().unwrap();
    assert!(err.contains("journal holds transactions"), "{err}");
}

#[test]
fn damaged_images_give_errors_not_panics() {
    let dir = Dir::new("fuzz");
    for (name, args) in [
        ("csum", &[][..]),
        ("plain", &["-O", "^metadata_csum", "-b", "1024"][..]),
    ] {
        let img = ext4_image(&dir, name, 16, args);
        let bytes = std::fs::read(&img).unwrap();
        let clean = Ext4::open(bytes.as_slice()).unwrap();
        // Superblock, descriptors, bitmaps, inode tables and the first
        // directory blocks all lie in the first MiB.
        let hot = [(1024, 1024), (0, 1 << 20), (0, bytes.len())];
        drop(clean);
        let patterns = [Pattern::parse("/tmp/**").unwrap()];
        let (mut ok, mut err) = (0, 0);
        fuzz(&bytes, &hot, 3000, 42, |img| {
            let r = Ext4::open(img).and_then(|fs| {
                fs.free_blocks()?;
                fs.swap_files(&["/swapfile".into()])?;
                fs.matching_files(&patterns)
            });
            if r.is_ok() { ok += 1 } else { err += 1 }
        });
        assert!(ok > 0 && err > 0, "{name}: {ok} ok, {err} errors");
    }
}

#[test]
fn run_arithmetic() {
    let r = |start, len| Run { start, len };
    assert_eq!(
        merge(vec![r(5, 5), r(0, 3), r(3, 2), r(20, 1)]),
        vec![r(0, 10), r(20, 1)]
    );
    assert_eq!(
        subtract(vec![r(0, 10), r(20, 10)], &[r(2, 2), r(8, 14), r(25, 1)]),
        vec![r(0, 2), r(4, 4), r(22, 3), r(26, 4)]
    );
}
