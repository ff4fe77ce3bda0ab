//! NTFS against images made by mkntfs and ntfscp.

use super::*;
use crate::testimg::*;

fn total(runs: &[Run]) -> u64 {
    runs.iter().map(|r| r.len).sum()
}

#[test]
fn free_clusters_and_pagefile_match_ntfs_3g() {
    let dir = Dir::new("ntfs");
    let img = ntfs_image(&dir, "n", 64);
    let bytes = std::fs::read(&img).unwrap();
    let mut v = Volume::open(bytes.as_slice()).unwrap();
    let cluster = v.cluster_size();

    let free = v.free_clusters().unwrap();
    assert_eq!(total(&free) * cluster, ntfscluster_free_bytes(&img));

    let want: Vec<Run> = ntfsinfo_runs(&img, "/pagefile.sys")
        .into_iter()
        .map(|(start, len)| Run { start, len })
        .collect();
    assert!(!want.is_empty());
    let got = v
        .swap_files(&["/PageFile.sys".into(), "/hiberfil.sys".into()])
        .unwrap();
    assert_eq!(got, merge(want));

    let patterns = [Pattern::parse("/tmp.*").unwrap()];
    let got = v.matching_files(&patterns).unwrap();
    let want: Vec<Run> = ntfsinfo_runs(&img, "/tmp.bin")
        .into_iter()
        .map(|(start, len)| Run { start, len })
        .collect();
    assert_eq!(got, merge(want));
    // Nothing of what is kept is free or excluded.
    for (start, len) in ntfsinfo_runs(&img, "/keep.bin") {
        for r in free.iter().chain(&got) {
            assert!(r.start + r.len <= start || start + len <= r.start);
        }
    }
}

#[test]
fn a_log_in_use_is_refused() {
    let dir = Dir::new("ntfs-log");
    let img = ntfs_image(&dir, "n", 16);
    let mut bytes = std::fs::read(&img).unwrap();
    let log = {
        let v = Volume::open(bytes.as_slice()).unwrap();
        let file = v.ntfs.file(&mut Cursor::new(bytes.as_slice()), 2).unwrap();
        let runs = runs_of(
            &v.ntfs,
            &mut State {
                fs: Cursor::new(bytes.as_slice()),
                cluster: v.st.cluster,
                clusters: v.st.clusters,
                entries: 0,
            },
            &file,
            true,
        )
        .unwrap();
        (runs[0].start * v.st.cluster) as usize
    };
    // A restart page whose area lists a client in use, without the clean flag.
    let page = &mut bytes[log..log + 4096];
    page.fill(0);
    page[..4].copy_from_slice(b"RSTR");
    page[0x18] = 0x30;
    page[0x30 + 12] = 0;
    page[0x30 + 13] = 0;
    let err = Volume::open(bytes.as_slice()).err().unwrap();
    assert!(err.contains("not cleanly dismounted"), "{err}");
    // The same page with the clean flag is accepted.
    bytes[log + 0x30 + 14] = 2;
    assert!(Volume::open(bytes.as_slice()).is_ok());
}

#[test]
fn damaged_images_give_errors_not_panics() {
    let dir = Dir::new("ntfs-fuzz");
    let img = ntfs_image(&dir, "n", 16);
    let bytes = std::fs::read(&img).unwrap();
    let mft = {
        let v = Volume::open(bytes.as_slice()).unwrap();
        v.ntfs.mft_position().value().unwrap().get() as usize
    };
    // Boot sector, the MFT's first records, and anywhere.
    let hot = [(0, 512), (mft, 64 << 10), (0, bytes.len())];
    let patterns = [Pattern::parse("/**/*.bin").unwrap()];
    let (mut ok, mut err) = (0, 0);
    fuzz(&bytes, &hot, 3000, 7, |img| {
        let r = Volume::open(img).and_then(|mut v| {
            v.free_clusters()?;
            v.swap_files(&["/pagefile.sys".into()])?;
            v.matching_files(&patterns)
        });
        if r.is_ok() { ok += 1 } else { err += 1 }
    });
    assert!(ok > 0 && err > 0, "{ok} ok, {err} errors");
}
