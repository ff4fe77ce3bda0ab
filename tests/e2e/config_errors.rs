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

#[test]
fn apply_compiles_the_pipelines_and_warns_about_a_plugin_that_cannot_load() {
    let lab = Lab::new();
    let disk = lab.path("d.raw");
    make_disk(&disk, 2 * MIB, 1);
    let junk = lab.path("junk.wasm");
    std::fs::write(&junk, b"not a component").unwrap();
    let cache = lab.path("cache");
    let toml = config(
        &lab,
        &[("web01", &[disk.as_path()])],
        &format!(
            "[[plugin]]\nname = \"junk\"\nkind = \"codec\"\npath = \"{}\"\n\n\
             [[pipeline]]\nname = \"p\"\ncodec = {{ plugin = \"junk\" }}\n\n\
             [[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"main\"\n\n\
             [[job]]\nname = \"broken\"\nvms = [\"web01\"]\nrepository = \"main\"\npipeline = \"p\"\n",
            junk.display()
        ),
    );
    let path = lab.path("arca.toml");
    std::fs::write(&path, toml).unwrap();
    let out = lab
        .command()
        .env("ARCA_CACHE", &cache)
        .args(["apply", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("job 'broken' cannot load its pipeline")
            && err.contains("plugin 'junk'")
            && err.contains("not a WebAssembly component"),
        "{err}"
    );
    assert!(!err.contains("job 'nightly'"), "{err}");
    // The default pipeline's digest and zstd stages are compiled now, each
    // for the engine it runs on.
    let compiled = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("cwasm".as_ref()))
        .count();
    assert_eq!(compiled, 2, "compiled plugins in {}", cache.display());
    // The configuration is applied all the same: the good job runs, and
    // the broken one fails with the same error.
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let out = lab.arca(&["job", "run", "broken"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plugin 'junk'") && err.contains("not a WebAssembly component"),
        "{err}"
    );
}
