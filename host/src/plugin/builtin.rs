//! Plugins that ship inside the `arca` binary, built for wasm32-wasip2 by
//! `build.rs` from `plugins/`.

use super::StageKind;

pub struct Builtin {
    pub name: &'static str,
    pub kind: StageKind,
    pub bytes: &'static [u8],
    pub summary: &'static str,
    /// The stage's work is bounded by the size of its input (it parses no
    /// guest-controlled structure that could make it loop), so it runs
    /// without per-loop deadline checks: they cost the zstd codec 20% of its
    /// speed (`cargo bench --bench codec`). Stages that walk guest
    /// filesystems keep the deadline, as does every plugin that is not
    /// built in.
    pub bounded: bool,
}

pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "zstd",
        kind: StageKind::Codec,
        bytes: include_bytes!(concat!(env!("ARCA_PLUGIN_DIR"), "/arca_plugin_zstd.wasm")),
        summary: "zstd compression, one frame per block (setting: level, default 1)",
        bounded: true,
    },
    Builtin {
        name: "digest",
        kind: StageKind::ChangeDetection,
        bytes: include_bytes!(concat!(
            env!("ARCA_PLUGIN_DIR"),
            "/arca_plugin_digest_detect.wasm"
        )),
        summary: "incremental by block digests against the previous restore point; honours CBT when present",
        bounded: true,
    },
    Builtin {
        name: "exclude-ranges",
        kind: StageKind::Exclusion,
        bytes: include_bytes!(concat!(
            env!("ARCA_PLUGIN_DIR"),
            "/arca_plugin_exclude_ranges.wasm"
        )),
        summary: "excludes byte ranges and whole partitions named in config (settings: ranges, partitions)",
        bounded: false,
    },
    Builtin {
        name: "swap",
        kind: StageKind::Exclusion,
        bytes: include_bytes!(concat!(env!("ARCA_PLUGIN_DIR"), "/arca_plugin_swap.wasm")),
        summary: "excludes Linux swap partitions and swap files (keeping their header page) and Windows pagefile.sys, swapfile.sys, hiberfil.sys (setting: swapfiles, default /swapfile, /swap.img)",
        bounded: false,
    },
    Builtin {
        name: "free-space",
        kind: StageKind::Exclusion,
        bytes: include_bytes!(concat!(
            env!("ARCA_PLUGIN_DIR"),
            "/arca_plugin_free_space.wasm"
        )),
        summary: "excludes the blocks ext2/3/4 and NTFS filesystems call free, in partitions or on a bare disk",
        bounded: false,
    },
    Builtin {
        name: "exclude-paths",
        kind: StageKind::Exclusion,
        bytes: include_bytes!(concat!(
            env!("ARCA_PLUGIN_DIR"),
            "/arca_plugin_exclude_paths.wasm"
        )),
        summary: "excludes the data of guest files matching path patterns on ext2/3/4 and NTFS (setting: exclude, e.g. \"/tmp/**, /var/cache/**\")",
        bounded: false,
    },
    Builtin {
        name: "guest-scripts",
        kind: StageKind::GuestHook,
        bytes: include_bytes!(concat!(
            env!("ARCA_PLUGIN_DIR"),
            "/arca_plugin_guest_scripts.wasm"
        )),
        summary: "runs the job's scripts in the guest and freezes/thaws its filesystems around the snapshot (settings: pre_freeze, post_thaw, post_backup, freeze, timeout_ms)",
        bounded: false,
    },
];

pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

/// Whether the component with BLAKE3 `hash` is a bounded built-in. Matching
/// by hash (not name) means a codec read back from a repository gets the
/// same treatment exactly when it is byte-for-byte the built-in one.
pub fn is_bounded(hash: &[u8; 32]) -> bool {
    static HASHES: std::sync::OnceLock<Vec<[u8; 32]>> = std::sync::OnceLock::new();
    HASHES
        .get_or_init(|| {
            BUILTINS
                .iter()
                .filter(|b| b.bounded)
                .map(|b| *blake3::hash(b.bytes).as_bytes())
                .collect()
        })
        .contains(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{PluginLimits, PluginRuntime};

    fn load(runtime: &PluginRuntime, name: &str, kind: StageKind, bytes: Vec<u8>) -> bool {
        runtime
            .load(name, kind, bytes, PluginLimits::default())
            .unwrap()
            .deadline_enforced()
    }

    #[test]
    fn only_bounded_built_ins_run_without_deadline_checks() {
        let runtime = PluginRuntime::new(None).unwrap();
        for name in ["zstd", "digest", "swap"] {
            let b = find(name).unwrap();
            assert_eq!(
                load(&runtime, b.name, b.kind, b.bytes.to_vec()),
                !b.bounded,
                "{name}"
            );
        }
        assert!(find("zstd").unwrap().bounded);
        assert!(!find("free-space").unwrap().bounded);
        assert!(!find("exclude-paths").unwrap().bounded);

        // The built-in codec with one custom section appended is a valid,
        // different component: it is not the built-in, so it keeps its
        // deadline, whatever it is called.
        let mut changed = find("zstd").unwrap().bytes.to_vec();
        changed.extend_from_slice(&[0, 5, 4, b'a', b'r', b'c', b'a']);
        assert!(load(&runtime, "zstd", StageKind::Codec, changed));
    }
}
