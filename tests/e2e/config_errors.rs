//! Bad configuration gets a clear error naming the place, and changes nothing.

use crate::common::*;

fn apply_err(lab: &Lab, toml: &str) -> String {
    let path = lab.path("bad.toml");
    std::fs::write(&path, toml).unwrap();
    let out = lab.arca(&["apply", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "apply of a bad file must fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn malformed_toml_names_file_and_line() {
    let lab = Lab::new();
    let err = apply_err(&lab, "[[repository]]\nname = \"main\"\npath = \n");
    assert!(err.contains("bad.toml") && err.contains("line 3"), "{err}");
    let err = apply_err(
        &lab,
        "[[repository]]\nname = \"main\"\npath = \"/r\"\ncolour = \"blue\"\n",
    );
    assert!(err.contains("colour"), "unknown keys are named: {err}");
}

#[test]
fn unknown_references_name_the_object_and_line() {
    let lab = Lab::new();
    let disk = lab.path("d.raw");
    make_disk(&disk, MIB, 1);
    let toml = config(
        &lab,
        &[("web01", &[disk.as_path()])],
        "[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\npipeline = \"fast\"\n",
    );
    let line = toml
        .lines()
        .position(|l| l.starts_with("pipeline = \"fast\""))
        .unwrap()
        + 1;
    let err = apply_err(&lab, &toml);
    assert!(
        err.contains(&format!(
            "bad.toml:{line}: job 'nightly' names pipeline 'fast', which is not defined"
        )),
        "{err}"
    );
    let err = apply_err(
        &lab,
        &config(
            &lab,
            &[],
            "[[job]]\nname = \"j\"\nvms = [\"ghost\"]\nrepository = \"main\"\n",
        ),
    );
    assert!(err.contains("job 'j' names vm 'ghost'"), "{err}");
    let err = apply_err(
        &lab,
        "[[pipeline]]\nname = \"p\"\ncodec = { plugin = \"brotli\" }\n",
    );
    assert!(
        err.contains("plugin 'brotli', which is not defined"),
        "{err}"
    );
    // Nothing of a rejected file reaches the database.
    assert_eq!(lab.ok(&["job", "list"]).trim(), "");
}

#[test]
fn missing_job_and_missing_disk_are_clear() {
    let lab = Lab::new();
    let out = lab.arca(&["job", "run", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("job 'nosuch' is not in the configuration database"),
        "{err}"
    );

    let gone = lab.path("gone.raw");
    lab.apply(&config(
        &lab,
        &[("web01", &[gone.as_path()])],
        "[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\n",
    ));
    let (ok, r) = lab.run_job("nightly");
    assert!(!ok);
    let e = r["tasks"][0]["error"].as_str().unwrap();
    assert!(
        e.contains(gone.to_str().unwrap()) && e.contains("No such file"),
        "{e}"
    );
    assert_eq!(r["state"], "failed");
}

#[test]
fn bad_plugin_settings_fail_the_task_with_the_plugin_name() {
    let lab = Lab::new();
    let disk = lab.path("d.raw");
    make_disk(&disk, 2 * MIB, 1);
    lab.apply(&config(
        &lab,
        &[("web01", &[disk.as_path()])],
        "[[pipeline]]\nname = \"p\"\ncodec = { plugin = \"zstd\", level = 99 }\n\n[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\npipeline = \"p\"\n",
    ));
    let (ok, r) = lab.run_job("nightly");
    assert!(!ok);
    let e = r["tasks"][0]["error"].as_str().unwrap();
    assert!(e.contains("plugin 'zstd'") && e.contains("level"), "{e}");
    assert!(
        lab.points().is_empty(),
        "no restore point from a failed task"
    );
}
