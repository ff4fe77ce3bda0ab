//! Hostile plugins fail only their own task, with the plugin's name and a
//! clear message, and the process and the repository carry on.

use crate::common::*;

fn hostile_codec_lab(behaviour: &str) -> (Lab, serde_json::Value, bool) {
    hostile_codec_lab_with(behaviour, |_| {})
}

/// The lab, with `prepare` run on the disk before the session.
fn hostile_codec_lab_with(
    behaviour: &str,
    prepare: impl Fn(&std::path::Path),
) -> (Lab, serde_json::Value, bool) {
    let lab = Lab::new();
    let disk = lab.path("d.raw");
    make_disk(&disk, 4 * MIB, 5);
    prepare(&disk);
    let extra = format!(
        "[[plugin]]\nname = \"hostile\"\nkind = \"codec\"\npath = \"{}\"\nmemory_mib = 64\ndeadline_ms = 1500\n\n\
         [[pipeline]]\nname = \"bad\"\ncodec = {{ plugin = \"hostile\", behaviour = \"{behaviour}\" }}\n\n\
         [[job]]\nname = \"bad\"\nvms = [\"web01\"]\nrepository = \"main\"\npipeline = \"bad\"\n\n\
         [[job]]\nname = \"good\"\nvms = [\"web01\"]\nrepository = \"main\"\n",
        plugin_path("arca_plugin_hostile.wasm").display()
    );
    lab.apply(&config(&lab, &[("web01", &[disk.as_path()])], &extra));
    let (ok, report) = lab.run_job("bad");
    (lab, report, ok)
}

fn assert_contained(behaviour: &str, expect: &[&str]) {
    let (lab, report, ok) = hostile_codec_lab(behaviour);
    assert!(!ok, "{behaviour}: the session must fail");
    let err = report["tasks"][0]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("plugin 'hostile'"),
        "{behaviour}: error names the plugin: {err}"
    );
    for e in expect {
        assert!(err.contains(e), "{behaviour}: expected '{e}' in: {err}");
    }
    assert!(
        lab.points().is_empty(),
        "{behaviour}: no restore point from a failed task"
    );
    // The same installation goes on working with a sane pipeline.
    let (ok, good) = lab.run_job("good");
    assert!(ok, "{behaviour}: next session failed: {good:#}");
    lab.ok(&["verify"]);
}

#[test]
fn endless_loop_is_stopped_at_the_deadline() {
    assert_contained("loop", &["deadline of 1500 ms"]);
}

#[test]
fn memory_bomb_is_stopped_at_the_limit() {
    assert_contained("memory-bomb", &["memory limit of 64 MiB"]);
}

#[test]
fn a_trap_carries_the_plugin_message() {
    assert_contained("trap", &["trapped", "hostile plugin panics on purpose"]);
}

#[test]
fn a_malformed_answer_is_refused() {
    assert_contained("wrong-shape", &["malformed answer"]);
}

#[test]
fn plugins_cannot_open_host_files() {
    assert_contained("open-file", &["open-file:"]);
}

#[test]
fn a_codec_that_loses_bytes_is_caught_before_its_chunks_are_stored() {
    // The codec drops each block's last byte and decodes a zero there:
    // shorter, so it looks like compression, and wrong for a block that
    // did not end in zero. Half of the 16 blocks do.
    let (lab, report, ok) = hostile_codec_lab_with("lossy", |disk| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
        for i in 0..4 * MIB / BLOCK {
            // Each block unique (its number after the marker): two equal
            // blocks in different batches would be stored once, and
            // coded once, depending on which batch's query came first.
            f.write_all_at(&[0x5a], i * BLOCK).unwrap();
            f.write_all_at(&i.to_le_bytes(), i * BLOCK + 1).unwrap();
            let last = if i % 2 == 0 { 0 } else { 0xab };
            f.write_all_at(&[last], (i + 1) * BLOCK - 1).unwrap();
        }
    });
    assert!(ok, "{report:#}");
    let t = &report["tasks"][0];
    assert!(
        t["notices"]
            .to_string()
            .contains("codec 'hostile' decoded 8 of the blocks"),
        "{t:#}"
    );
    // Block by block: the eight that came back were stored coded, one
    // byte shorter each.
    let s = &t["stats"];
    assert_eq!(
        s["codec_in_bytes"].as_u64().unwrap() - s["codec_out_bytes"].as_u64().unwrap(),
        8,
        "{s:#}"
    );
    // Nothing it lost was stored coded: verify finds nothing, and the
    // point restores to the disk.
    lab.ok(&["verify"]);
    restore_matches(
        &lab,
        t["restore_point"].as_str().unwrap(),
        &lab.path("d.raw"),
    );
}

#[test]
fn a_bad_exclusion_plugin_fails_only_its_own_task() {
    for behaviour in ["trap", "loop", "out-of-range"] {
        let lab = Lab::new();
        let good = lab.path("good.raw");
        let bad = lab.path("bad.raw");
        make_disk(&good, 4 * MIB, 6);
        make_disk(&bad, 4 * MIB, 7);
        let extra = format!(
            "[[plugin]]\nname = \"picky\"\nkind = \"exclusion\"\npath = \"{}\"\ndeadline_ms = 1500\n\n\
             [[pipeline]]\nname = \"p\"\nexclusion = [{{ plugin = \"picky\", behaviour = \"{behaviour}\", disk = \"vm-bad/disk0\" }}]\n\n\
             [[job]]\nname = \"both\"\nvms = [\"vm-good\", \"vm-bad\"]\nrepository = \"main\"\npipeline = \"p\"\n",
            plugin_path("arca_plugin_hostile_exclusion.wasm").display()
        );
        lab.apply(&config(
            &lab,
            &[("vm-good", &[good.as_path()]), ("vm-bad", &[bad.as_path()])],
            &extra,
        ));
        let (ok, r) = lab.run_job("both");
        assert!(!ok);
        assert_eq!(r["state"], "partial", "{behaviour}: {r:#}");
        let tasks = r["tasks"].as_array().unwrap();
        let bad_task = tasks.iter().find(|t| t["vm"] == "vm-bad").unwrap();
        let good_task = tasks.iter().find(|t| t["vm"] == "vm-good").unwrap();
        assert_eq!(good_task["state"], "success", "{behaviour}: {r:#}");
        let err = bad_task["error"].as_str().unwrap();
        assert!(err.contains("plugin 'picky'"), "{behaviour}: {err}");
        let point = good_task["restore_point"].as_str().unwrap();
        let out = lab.path("good.out");
        lab.ok(&["restore", point, "--to", out.to_str().unwrap()]);
        assert_eq!(sha256(&out), sha256(&good));
    }
}
