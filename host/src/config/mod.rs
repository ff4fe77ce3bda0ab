//! Configuration: operators write TOML (`file`), `arca apply` loads it into
//! the configuration database (`db`), and a session reads its job settings
//! from the database only (seed step 1).

pub mod db;
pub mod file;
mod size;

pub use db::{ConfigDb, DbError};
pub use file::ConfigError;
pub use size::parse_size;

use crate::plugin::StageKind;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A stage of a pipeline: which plugin, with which settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSettings {
    pub plugin: String,
    #[serde(default)]
    pub settings: toml::Table,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineSettings {
    pub name: String,
    pub change_detection: StageSettings,
    pub exclusions: Vec<StageSettings>,
    pub codec: StageSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginSettings {
    pub name: String,
    pub kind: StageKind,
    pub path: PathBuf,
    pub memory_mib: u32,
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepositorySettings {
    pub name: String,
    /// Local folder; empty when the repository is served by an agent.
    pub path: PathBuf,
    pub max_tasks: u32,
    /// `host:port` of the `arca agent` that serves it, if remote.
    pub agent: Option<String>,
    /// The agent's pinned certificate fingerprint (`sha256:...`).
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxySettings {
    pub name: String,
    pub max_tasks: u32,
    /// `host:port` of the `arca agent` (proxy role) that runs this proxy's
    /// source movers; `None` for a proxy in the session's own process.
    #[serde(default)]
    pub agent: Option<String>,
    /// The agent's pinned certificate fingerprint (`sha256:...`).
    #[serde(default)]
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskSettings {
    pub name: String,
    pub path: PathBuf,
    pub format: crate::source::qemu_export::DiskFormat,
    /// The block node, for disks of a hypervisor VM (then `path` is empty).
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSettings {
    pub name: String,
    pub powered_off: bool,
    pub disks: Vec<DiskSettings>,
    /// Set for VMs of a QEMU hypervisor; image-file VMs have none.
    pub hypervisor: Option<crate::source::qemu::Hypervisor>,
    /// The socket of the VM's guest agent, for guest processing.
    pub guest_agent: Option<PathBuf>,
}

/// What to do when guest processing fails (the seed vendor's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestMode {
    /// A failure fails the VM: no restore point without application consistency.
    Require,
    /// A failure falls back to a crash-consistent restore point, said in the report.
    Try,
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSettings {
    pub mode: GuestMode,
    pub hook: StageSettings,
    pub policy: crate::guest::GuestPolicy,
}

/// A throttling rule: traffic from `source` to `target` (network ranges) at
/// most `rate` bytes per second, within `window` (`HH:MM-HH:MM`, local
/// time, may wrap midnight) if set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThrottleRule {
    pub name: String,
    pub source: ipnet::IpNet,
    pub target: ipnet::IpNet,
    pub rate: u64,
    pub window: Option<(u16, u16)>,
}

impl ThrottleRule {
    /// Whether the rule is in force at `minute` of the day (0..1440).
    pub fn active_at(&self, minute: u16) -> bool {
        match self.window {
            None => true,
            Some((from, to)) if from <= to => (from..to).contains(&minute),
            Some((from, to)) => minute >= from || minute < to,
        }
    }

    pub fn matches(&self, source: std::net::IpAddr, target: std::net::IpAddr) -> bool {
        self.source.contains(&source) && self.target.contains(&target)
    }
}

/// Everything a session needs, resolved from the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSettings {
    pub name: String,
    pub block_size: u32,
    pub repository: RepositorySettings,
    pub proxies: Vec<ProxySettings>,
    pub pipeline: PipelineSettings,
    pub vms: Vec<VmSettings>,
    /// Third-party plugins the pipeline uses (built-ins are not listed).
    pub plugins: Vec<PluginSettings>,
    pub guest: Option<GuestSettings>,
    /// Every throttling rule; the session applies those that match a link.
    pub throttles: Vec<ThrottleRule>,
    /// Applied to each disk's restore points after each commit.
    pub retention: Option<crate::repository::retention::Policy>,
}

/// Defaults that exist without any configuration: the embedded proxy and
/// the default pipeline.
pub const DEFAULT_PROXY: &str = "local";
pub const DEFAULT_PIPELINE: &str = "default";
/// 256 KiB: guests write in small scattered runs, and every block they touch
/// is read and coded again by an incremental; against 1 MiB blocks this
/// halves a CBT incremental for about 2% more full-backup time and 1.5%
/// more repository (docs/BENCHMARKS.md, "Block size").
pub const DEFAULT_BLOCK_SIZE: u32 = 256 << 10;
/// The block sizes a job may set: no chunk is longer than the largest,
/// coded or not (a coded block longer than its block is stored as it is).
pub const MIN_BLOCK_SIZE: u32 = 64 << 10;
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;

pub fn default_proxy() -> ProxySettings {
    ProxySettings {
        name: DEFAULT_PROXY.into(),
        max_tasks: std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
        agent: None,
        fingerprint: None,
    }
}

/// Digest change detection and the zstd codec at its own default level.
pub fn default_pipeline() -> PipelineSettings {
    PipelineSettings {
        name: DEFAULT_PIPELINE.into(),
        change_detection: StageSettings {
            plugin: "digest".into(),
            settings: toml::Table::new(),
        },
        exclusions: Vec::new(),
        codec: StageSettings {
            plugin: "zstd".into(),
            settings: toml::Table::new(),
        },
    }
}

/// Names become folder names in repositories: keep them plain.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}
