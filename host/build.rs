//! Builds the plugins in `plugins/` (and the example plugin in `examples/`)
//! for wasm32-wasip2, so that the `arca` binary can embed the built-in ones
//! and tests can load the others as bytes — the way wasmtime builds its guest
//! test programs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let target_root = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));

    let plugins = root.join("plugins");
    let plugin_out = build(&plugins, &target_root.join("wasm"));
    // Every example plugin is a workspace of its own, as an outside author's
    // would be; they share one target folder.
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root.join("examples/plugins"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("Cargo.toml").exists())
                .collect()
        })
        .unwrap_or_default();
    examples.sort();
    let mut example_out = target_root.join("wasm-examples/wasm32-wasip2/release");
    for example in &examples {
        example_out = build(example, &target_root.join("wasm-examples"));
    }

    for dir in std::iter::once(&plugins).chain(&examples) {
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.lock").display()
        );
        rerun_for_sources(dir);
    }
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("examples/plugins").display()
    );
    println!("cargo:rustc-env=ARCA_PLUGIN_DIR={}", plugin_out.display());
    println!(
        "cargo:rustc-env=ARCA_EXAMPLE_PLUGIN_DIR={}",
        example_out.display()
    );
}

fn build(dir: &Path, target_dir: &Path) -> PathBuf {
    // Cargo sets variables for the outer build (RUSTFLAGS for the host,
    // profile settings) that must not leak into the wasm build.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dir)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(target_dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo for {}: {e}", dir.display()));
    assert!(
        status.success(),
        "building plugins in {} for wasm32-wasip2 failed; run scripts/setup.sh (it installs the wasm32-wasip2 target, clang, lld and wasi-libc)",
        dir.display()
    );
    target_dir.join("wasm32-wasip2/release")
}

fn rerun_for_sources(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') && name != ".cargo" {
            continue;
        }
        if path.is_dir() {
            rerun_for_sources(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
