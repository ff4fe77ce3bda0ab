//! Plugins that ship inside the `arca` binary, built for wasm32-wasip2 by
//! `build.rs` from `plugins/`.

use super::StageKind;

pub struct Builtin {
    pub name: &'static str,
    pub kind: StageKind,
    pub bytes: &'static [u8],
    pub summary: &'static str,
}

pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "zstd",
        kind: StageKind::Codec,
        bytes: include_bytes!(concat!(env!("ARCA_PLUGIN_DIR"), "/arca_plugin_zstd.wasm")),
        summary: "zstd compression, one frame per block (setting: level, default 3)",
    },
    Builtin {
        name: "digest",
        kind: StageKind::ChangeDetection,
        bytes: include_bytes!(concat!(
            env!("ARCA_PLUGIN_DIR"),
            "/arca_plugin_digest_detect.wasm"
        )),
        summary: "incremental by block digests against the previous restore point; honours CBT when present",
    },
    Builtin {
        name: "exclude-ranges",
        kind: StageKind::Exclusion,
        bytes: include_bytes!(concat!(
            env!("ARCA_PLUGIN_DIR"),
            "/arca_plugin_exclude_ranges.wasm"
        )),
        summary: "excludes byte ranges and whole partitions named in config (settings: ranges, partitions)",
    },
    Builtin {
        name: "swap",
        kind: StageKind::Exclusion,
        bytes: include_bytes!(concat!(env!("ARCA_PLUGIN_DIR"), "/arca_plugin_swap.wasm")),
        summary: "excludes Linux swap partitions and swap files (keeping their header page) and Windows pagefile.sys, swapfile.sys, hiberfil.sys (setting: swapfiles, default /swapfile, /swap.img)",
    },
    Builtin {
        name: "free-space",
        kind: StageKind::Exclusion,
        bytes: include_bytes!(concat!(
            env!("ARCA_PLUGIN_DIR"),
            "/arca_plugin_free_space.wasm"
        )),
        summary: "excludes the blocks ext2/3/4 and NTFS filesystems call free, in partitions or on a bare disk",
    },
    Builtin {
        name: "exclude-paths",
        kind: StageKind::Exclusion,
        bytes: include_bytes!(concat!(
            env!("ARCA_PLUGIN_DIR"),
            "/arca_plugin_exclude_paths.wasm"
        )),
        summary: "excludes the data of guest files matching path patterns on ext2/3/4 and NTFS (setting: exclude, e.g. \"/tmp/**, /var/cache/**\")",
    },
    Builtin {
        name: "guest-scripts",
        kind: StageKind::GuestHook,
        bytes: include_bytes!(concat!(
            env!("ARCA_PLUGIN_DIR"),
            "/arca_plugin_guest_scripts.wasm"
        )),
        summary: "runs the job's scripts in the guest and freezes/thaws its filesystems around the snapshot (settings: pre_freeze, post_thaw, post_backup, freeze, timeout_ms)",
    },
];

pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}
