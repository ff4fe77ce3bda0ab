//! Whole disks: a GPT made by sfdisk holding ext4, Linux swap and NTFS
//! partitions made by the real tools; bare filesystems; damaged tables.

use super::*;
use crate::testimg::*;
use std::os::unix::fs::FileExt;

const MIB: u64 = 1 << 20;

/// A 100 MiB GPT disk: ext4 (48 MiB at 1 MiB), swap (16 MiB), NTFS (32 MiB).
fn gpt_disk(dir: &Dir) -> (Vec<u8>, [(u64, std::path::PathBuf); 3]) {
    let ext4 = ext4_image(dir, "p1", 48, &[]);
    let swap = dir.path("p2.img");
    std::fs::write(&swap, noise((16 * MIB) as usize, 11)).unwrap();
    run("mkswap", &[swap.to_str().unwrap()]);
    let ntfs = ntfs_image(dir, "p3", 32);
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(100 * MIB)
        .unwrap();
    let script = "label: gpt\nstart=2048, size=98304, type=L\nstart=100352, size=32768, type=S\nstart=133120, size=65536, type=EBD0A0A2-B9E5-4433-87C0-68B99B26B9C7\n";
    let mut child = std::process::Command::new("/usr/sbin/sfdisk")
        .args(["-q", disk.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let parts = [(MIB, ext4), (49 * MIB, swap), (65 * MIB, ntfs)];
    for (at, img) in &parts {
        f.write_all_at(&std::fs::read(img).unwrap(), *at).unwrap();
    }
    (std::fs::read(&disk).unwrap(), parts)
}

fn bytes(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.length).sum()
}

#[test]
fn gpt_disk_with_ext4_swap_and_ntfs() {
    let dir = Dir::new("gpt");
    let (disk, parts) = gpt_disk(&dir);
    let (ext4_at, ext4_img) = &parts[0];
    let (_, ntfs_img) = &parts[2];

    let swapfiles = vec!["/swapfile".to_owned()];
    let swap = excluded(
        disk.as_slice(),
        &Concern::Swap {
            swapfiles: &swapfiles,
        },
    )
    .unwrap();
    let (_, bs) = dumpe2fs_free(ext4_img);
    let header: Vec<u64> = (0..4096 / bs)
        .map(|l| debugfs_bmap(ext4_img, "/swapfile", l))
        .collect();
    let swapfile_blocks = debugfs_data_blocks(ext4_img, "/swapfile")
        .into_iter()
        .filter(|b| !header.contains(b))
        .count() as u64;
    let pagefile: u64 = ntfsinfo_runs(ntfs_img, "/pagefile.sys")
        .iter()
        .map(|r| r.1)
        .sum();
    assert_eq!(
        bytes(&swap),
        (16 * MIB - 4096) + swapfile_blocks * bs + pagefile * 4096,
        "swap partition body + swap file + pagefile.sys"
    );
    // The swap partition's header page is kept.
    assert!(
        swap.iter()
            .any(|e| e.offset == 49 * MIB + 4096 && e.length == 16 * MIB - 4096)
    );

    let free = excluded(disk.as_slice(), &Concern::Free).unwrap();
    let (ext4_free, _) = dumpe2fs_free(ext4_img);
    assert_eq!(
        bytes(&free),
        ext4_free * bs + ntfscluster_free_bytes(ntfs_img)
    );
    assert!(free.iter().all(|e| e.offset >= *ext4_at));

    let patterns = [
        Pattern::parse("/tmp/**").unwrap(),
        Pattern::parse("/tmp.bin").unwrap(),
    ];
    let paths = excluded(
        disk.as_slice(),
        &Concern::Paths {
            patterns: &patterns,
        },
    )
    .unwrap();
    let mut want = 0;
    for f in ["/tmp/a.bin", "/tmp/sub/b.bin", "/tmp/small"] {
        want += debugfs_data_blocks(ext4_img, f).len() as u64 * bs;
    }
    want += ntfsinfo_runs(ntfs_img, "/tmp.bin")
        .iter()
        .map(|r| r.1 * 4096)
        .sum::<u64>();
    assert_eq!(bytes(&paths), want);
}

#[test]
fn bare_filesystem_and_unknown_disks() {
    let dir = Dir::new("bare");
    let img = ext4_image(&dir, "bare", 32, &[]);
    let disk = std::fs::read(&img).unwrap();
    let free = excluded(disk.as_slice(), &Concern::Free).unwrap();
    let (n, bs) = dumpe2fs_free(&img);
    assert_eq!(bytes(&free), n * bs);

    let blank = vec![0u8; 4 * MIB as usize];
    let err = excluded(blank.as_slice(), &Concern::Free).unwrap_err();
    assert!(
        err.contains("found no Linux swap area, ext2/3/4 or NTFS"),
        "{err}"
    );

    // An MBR whose only partition is Linux swap (type 0x82).
    let mut mbr = vec![0u8; 8 * MIB as usize];
    mbr[446 + 4] = 0x82;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&8192u32.to_le_bytes());
    mbr[510..512].copy_from_slice(&[0x55, 0xAA]);
    let at = MIB as usize + 4086;
    mbr[at..at + 10].copy_from_slice(crate::swap::SIGNATURE);
    let swap = excluded(mbr.as_slice(), &Concern::Swap { swapfiles: &[] }).unwrap();
    assert_eq!(
        swap,
        vec![Extent {
            offset: MIB + 4096,
            length: 4 * MIB - 4096
        }]
    );
    // Free space has nothing to say about swap, but the disk was understood.
    assert_eq!(excluded(mbr.as_slice(), &Concern::Free).unwrap(), vec![]);
}

#[test]
fn damaged_partition_tables_give_errors_not_panics() {
    let dir = Dir::new("gpt-fuzz");
    let (disk, _) = gpt_disk(&dir);
    let end = disk.len();
    // The MBR, the primary GPT header and array, the backup ones.
    let hot = [
        (0, 512),
        (512, 512),
        (1024, 16384),
        (end - 33 * 512, 33 * 512),
    ];
    let swapfiles = vec!["/swapfile".to_owned()];
    let (mut ok, mut err) = (0, 0);
    fuzz(&disk, &hot, 3000, 3, |img| {
        match excluded(
            img,
            &Concern::Swap {
                swapfiles: &swapfiles,
            },
        ) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    });
    assert!(ok > 0 && err > 0, "{ok} ok, {err} errors");
}
