//! Full and incremental backups, restored bit-exact; holes, zeros,
//! exclusions, dedup and a third-party codec.

use crate::common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

const JOB: &str = "[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\n";

#[test]
fn full_then_incremental_restore_each_point_bit_exact() {
    let lab = Lab::new();
    let disk = lab.path("web01.raw");
    make_disk(&disk, 48 * MIB, 1);
    let sha_full = sha256(&disk);
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], JOB));

    let (ok, full) = lab.run_job("nightly");
    assert!(ok, "full backup failed: {full:#}");
    let full_point = full["tasks"][0]["restore_point"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(full["tasks"][0]["parent_point"].is_null());
    assert!(full["totals"]["stored_bytes"].as_u64().unwrap() > 0);
    // A first backup copies every block into the codec anyway: no map.
    assert_eq!(full["tasks"][0]["stats"]["mapped_bytes"].as_u64(), Some(0));

    change_disk(&disk, 8, 64 * 1024, 2);
    let sha_incr = sha256(&disk);
    assert_ne!(sha_full, sha_incr);
    let (ok, incr) = lab.run_job("nightly");
    assert!(ok, "incremental failed: {incr:#}");
    let task = &incr["tasks"][0];
    assert_eq!(task["parent_point"].as_str(), Some(full_point.as_str()));
    let stats = &task["stats"];
    // 8 runs of 64 KiB touch at most 16 blocks of 1 MiB.
    assert!(
        stats["new_bytes"].as_u64().unwrap() <= 16 * MIB,
        "{stats:#}"
    );
    assert!(stats["new_bytes"].as_u64().unwrap() >= MIB, "{stats:#}");
    assert!(
        stats["unchanged_bytes"].as_u64().unwrap() > 10 * MIB,
        "{stats:#}"
    );
    // The incremental hashed the raw image in its map, copying out only
    // the blocks it stored; the restore below shows they were the right ones.
    assert_eq!(stats["mapped_bytes"], stats["read_bytes"], "{stats:#}");
    assert!(
        incr["totals"]["stored_bytes"].as_u64().unwrap()
            < full["totals"]["stored_bytes"].as_u64().unwrap() / 2
    );

    let points = lab.points();
    assert_eq!(point_of(&points, "web01", "disk0").len(), 2);
    let incr_point = task["restore_point"].as_str().unwrap();
    for (point, want) in [(full_point.as_str(), &sha_full), (incr_point, &sha_incr)] {
        let out = lab.path(&format!("{point}.raw"));
        let said = lab.ok(&["restore", point, "--to", out.to_str().unwrap()]);
        assert_eq!(&sha256(&out), want, "restore of {point}");
        // Every block is aligned, so all of it went past the page cache.
        let (written, unbuffered) = written_and_unbuffered(&said);
        assert!(written != "0 B" && written == unbuffered, "{said}");
        // Holes of the source stay holes in the restored file.
        assert!(
            allocated_bytes(&out) < 48 * MIB,
            "restored file is not sparse"
        );
    }
    // A second restore to the same file needs --force.
    let out = lab.path(&format!("{incr_point}.raw"));
    let again = lab.arca(&["restore", incr_point, "--to", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    lab.ok(&["verify"]);
}

#[test]
fn holes_are_not_read_and_zero_blocks_not_stored() {
    let lab = Lab::new();
    let disk = lab.path("sparse.raw");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(32 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    let mut random = vec![0u8; 4 * MIB as usize];
    rand::RngCore::fill_bytes(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5),
        &mut random,
    );
    f.write_all_at(&random, 8 * MIB).unwrap();
    f.write_all_at(&vec![0u8; 4 * MIB as usize], 20 * MIB)
        .unwrap();
    f.sync_all().unwrap();
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], JOB));

    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let s = &r["tasks"][0]["stats"];
    assert_eq!(
        s["read_bytes"].as_u64(),
        Some(8 * MIB),
        "only allocated data is read: {s:#}"
    );
    assert_eq!(s["hole_bytes"].as_u64(), Some(24 * MIB), "{s:#}");
    assert_eq!(s["zero_bytes"].as_u64(), Some(4 * MIB), "{s:#}");
    assert_eq!(
        s["new_chunks"].as_u64(),
        Some(4 * MIB / BLOCK),
        "only the blocks of the 4 MiB of data are stored: {s:#}"
    );
    let point = r["tasks"][0]["restore_point"].as_str().unwrap();
    let out = lab.path("out.raw");
    lab.ok(&["restore", point, "--to", out.to_str().unwrap()]);
    assert_eq!(sha256(&out), sha256(&disk));
    assert!(
        allocated_bytes(&out) <= 5 * MIB,
        "zero blocks come back as holes"
    );
}

#[test]
fn a_database_that_refuses_the_record_does_not_undo_a_backup() {
    let lab = Lab::new();
    let disk = lab.path("d.raw");
    make_disk(&disk, 4 * MIB, 8);
    lab.apply(&config(
        &lab,
        &[("web01", &[disk.as_path()])],
        "[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\n",
    ));
    // The configuration database refuses every task record, as a full disk
    // or a lock held too long would.
    let out = std::process::Command::new("sqlite3")
        .arg(lab.path("home/arca.db"))
        .arg("CREATE TRIGGER refuse BEFORE INSERT ON tasks BEGIN SELECT RAISE(FAIL, 'refused on purpose'); END;")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "the backup succeeded: {r:#}");
    let point = r["tasks"][0]["restore_point"].as_str().unwrap();
    assert!(
        r["notices"].to_string().contains("refused on purpose"),
        "{r:#}"
    );
    restore_matches(&lab, point, &disk);
}

#[test]
fn identical_disks_are_stored_once() {
    let lab = Lab::new();
    let a = lab.path("a.raw");
    let b = lab.path("b.raw");
    make_disk(&a, 24 * MIB, 7);
    std::fs::copy(&a, &b).unwrap();
    let job = "[[job]]\nname = \"twins\"\nvms = [\"vm-a\", \"vm-b\"]\nrepository = \"main\"\n";
    lab.apply(&config(
        &lab,
        &[("vm-a", &[a.as_path()]), ("vm-b", &[b.as_path()])],
        job,
    ));
    let (ok, r) = lab.run_job("twins");
    assert!(ok, "{r:#}");
    // Distinct non-zero blocks of the disk = chunks the repository may hold.
    let data = std::fs::read(&a).unwrap();
    let distinct: std::collections::HashSet<[u8; 32]> = data
        .chunks(BLOCK as usize)
        .filter(|b| b.iter().any(|x| *x != 0))
        .map(|b| *blake3::hash(b).as_bytes())
        .collect();
    let stored: std::collections::HashSet<[u8; 32]> =
        chunk_addresses(&lab.path("repo")).into_iter().collect();
    assert_eq!(stored, distinct);
    assert_eq!(
        r["totals"]["stored_bytes"].as_u64(),
        Some(chunk_bytes(&lab.path("repo")))
    );
    assert!(r["totals"]["stored_bytes"].as_u64().unwrap() < 24 * MIB);
    for vm in ["vm-a", "vm-b"] {
        let points = lab.points();
        let p = point_of(&points, vm, "disk0")[0]["point_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let out = lab.path(&format!("{vm}.out"));
        lab.ok(&["restore", &p, "--to", out.to_str().unwrap()]);
        assert_eq!(sha256(&out), sha256(&a));
    }
}

#[test]
fn excluded_ranges_restore_as_zeros_and_are_reported() {
    let lab = Lab::new();
    let disk = lab.path("d.raw");
    make_disk(&disk, 16 * MIB, 3);
    let extra = "[[pipeline]]\nname = \"skip\"\nexclusion = [{ plugin = \"exclude-ranges\", ranges = \"2MiB+3MiB, 9MiB+100KiB\" }]\n\n[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\npipeline = \"skip\"\n";
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], extra));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let s = &r["tasks"][0]["stats"];
    assert_eq!(
        s["excluded_by_stage"]["exclude-ranges"].as_u64(),
        Some(3 * MIB + 100 * 1024),
        "{s:#}"
    );

    let mut expected = std::fs::read(&disk).unwrap();
    expected[(2 * MIB) as usize..(5 * MIB) as usize].fill(0);
    expected[(9 * MIB) as usize..(9 * MIB + 100 * 1024) as usize].fill(0);
    let point = r["tasks"][0]["restore_point"].as_str().unwrap();
    let out = lab.path("out.raw");
    lab.ok(&["restore", point, "--to", out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "restored image differs from source with exclusions zeroed"
    );
}

#[test]
fn third_party_codec_from_examples_is_kept_in_the_repository() {
    let lab = Lab::new();
    let disk = lab.path("d.raw");
    make_disk(&disk, 16 * MIB, 4);
    let built = Path::new(env!("ARCA_EXAMPLE_PLUGIN_DIR")).join("arca_example_lz4.wasm");
    let plugin = lab.path("lz4.wasm");
    std::fs::copy(&built, &plugin).unwrap();
    let extra = format!(
        "[[plugin]]\nname = \"lz4\"\nkind = \"codec\"\npath = \"{}\"\n\n[[pipeline]]\nname = \"fast\"\ncodec = {{ plugin = \"lz4\" }}\n\n[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\npipeline = \"fast\"\n",
        plugin.display()
    );
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], &extra));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(r["compression_ratio"].as_f64().unwrap() > 1.2, "{r:#}");
    let hash = blake3::hash(&std::fs::read(&plugin).unwrap())
        .to_hex()
        .to_string();
    assert!(
        lab.path(&format!("repo/codecs/{hash}.wasm")).exists(),
        "codec copy kept"
    );
    // Restore decodes with the repository's copy: the configured file may be gone.
    std::fs::remove_file(&plugin).unwrap();
    let point = r["tasks"][0]["restore_point"].as_str().unwrap();
    let out = lab.path("out.raw");
    lab.ok(&["restore", point, "--to", out.to_str().unwrap()]);
    assert_eq!(sha256(&out), sha256(&disk));
}

#[test]
fn an_exclusion_stage_that_cannot_judge_a_disk_keeps_it_whole() {
    let lab = Lab::new();
    let disk = lab.path("d.raw");
    make_disk(&disk, 8 * MIB, 12);
    // No partition table on this disk: the stage says so and excludes nothing.
    let extra = "[[pipeline]]\nname = \"p\"\nexclusion = [{ plugin = \"exclude-ranges\", partitions = \"2\" }]\n\n[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\npipeline = \"p\"\n";
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], extra));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let notices = r["notices"].to_string();
    assert!(
        notices.contains("exclusion stage 'exclude-ranges' excluded nothing")
            && notices.contains("backed up whole"),
        "{notices}"
    );
    assert_eq!(r["tasks"][0]["stats"]["excluded_bytes"].as_u64(), Some(0));
    let out = lab.path("out.raw");
    lab.ok(&[
        "restore",
        r["tasks"][0]["restore_point"].as_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(sha256(&out), sha256(&disk));
}

/// The "X written (Y unbuffered)" figures of a restore's summary line.
fn written_and_unbuffered(said: &str) -> (String, String) {
    let parse = || {
        let tail = said.split(": ").nth(1)?;
        let (written, rest) = tail.split_once(" written (")?;
        let (unbuffered, _) = rest.split_once(" unbuffered)")?;
        Some((written.to_owned(), unbuffered.to_owned()))
    };
    parse().unwrap_or_else(|| panic!("no 'X written (Y unbuffered)' in: {said}"))
}

#[test]
fn a_disk_whose_size_is_not_a_multiple_of_the_block_restores_bit_exact() {
    let lab = Lab::new();
    // With 1 MiB blocks the last block holds 700 KiB and 1000 bytes: it
    // cannot be written past the page cache, the two whole blocks before it
    // are.
    let size = 2 * MIB + 700 * 1024 + 1000;
    let disk = lab.path("odd.raw");
    make_disk(&disk, size, 21);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&[0x5a; 1000], size - 1000)
        .unwrap();
    let job = format!("{JOB}block_size = \"1MiB\"\n");
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], &job));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let point = r["tasks"][0]["restore_point"].as_str().unwrap();
    let out = lab.path("odd.out");
    let said = lab.ok(&["restore", point, "--to", out.to_str().unwrap()]);
    assert_eq!(sha256(&out), sha256(&disk));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    let (written, unbuffered) = written_and_unbuffered(&said);
    assert_eq!(written, "2.7 MiB", "{said}");
    assert_eq!(unbuffered, "2.0 MiB", "{said}");
}
