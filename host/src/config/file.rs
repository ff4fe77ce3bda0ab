//! The operator's TOML file: parsing, path resolution and validation.
//!
//! Every error names the file, the line and the object, and says what to do.

use super::{
    DEFAULT_BLOCK_SIZE, DiskSettings, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, PipelineSettings,
    PluginSettings, ProxySettings, RepositorySettings, StageSettings, VmSettings, parse_size,
    valid_name,
};
use crate::plugin::StageKind;
use crate::source::qemu_export::DiskFormat;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use toml::Spanned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    repository: Vec<RawRepository>,
    #[serde(default)]
    proxy: Vec<RawProxy>,
    #[serde(default)]
    hypervisor: Vec<RawHypervisor>,
    #[serde(default)]
    vm: Vec<RawVm>,
    #[serde(default)]
    plugin: Vec<RawPlugin>,
    #[serde(default)]
    pipeline: Vec<RawPipeline>,
    #[serde(default)]
    job: Vec<RawJob>,
    #[serde(default)]
    throttle: Vec<RawThrottle>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThrottle {
    name: Spanned<String>,
    source: Option<String>,
    target: Option<String>,
    rate: String,
    window: Option<String>,
}

fn parse_window(w: &str) -> Option<(u16, u16)> {
    let (a, b) = w.split_once('-')?;
    let minute = |t: &str| -> Option<u16> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    };
    Some((minute(a)?, minute(b)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    name: Spanned<String>,
    path: Option<PathBuf>,
    agent: Option<String>,
    fingerprint: Option<String>,
    max_tasks: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    name: Spanned<String>,
    max_tasks: Option<u32>,
    agent: Option<String>,
    fingerprint: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHypervisor {
    name: Spanned<String>,
    qmp: PathBuf,
    nbd: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: Spanned<String>,
    #[serde(default)]
    powered_off: bool,
    hypervisor: Option<Spanned<String>>,
    guest_agent: Option<PathBuf>,
    disks: Vec<RawDisk>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuest {
    mode: super::GuestMode,
    hook: Option<RawStage>,
    #[serde(default)]
    allow_exec: Vec<String>,
    #[serde(default)]
    allow_files: Vec<String>,
    allow_freeze: Option<bool>,
    freeze_timeout_ms: Option<u64>,
    agent_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDisk {
    Path(PathBuf),
    Named {
        name: Option<String>,
        path: Option<PathBuf>,
        format: Option<DiskFormat>,
        node: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: Spanned<String>,
    kind: StageKind,
    path: PathBuf,
    memory_mib: Option<u32>,
    deadline_ms: Option<u64>,
}

#[derive(Deserialize)]
struct RawStage {
    plugin: Spanned<String>,
    #[serde(flatten)]
    settings: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: Spanned<String>,
    change_detection: Option<RawStage>,
    #[serde(default)]
    exclusion: Vec<RawStage>,
    codec: Option<RawStage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: Spanned<String>,
    vms: Vec<Spanned<String>>,
    repository: Spanned<String>,
    pipeline: Option<Spanned<String>>,
    proxies: Option<Vec<Spanned<String>>>,
    block_size: Option<Spanned<toml::Value>>,
    guest: Option<RawGuest>,
    retention: Option<Spanned<crate::repository::retention::Policy>>,
}

/// A job as stored: references by name.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub name: String,
    pub vms: Vec<String>,
    pub repository: String,
    pub pipeline: String,
    /// Empty: any proxy.
    pub proxies: Vec<String>,
    pub block_size: u32,
    pub guest: Option<super::GuestSettings>,
    pub retention: Option<crate::repository::retention::Policy>,
}

/// A parsed and validated file, ready for the database.
#[derive(Debug, Default)]
pub struct ConfigFile {
    pub throttles: Vec<super::ThrottleRule>,
    pub hypervisors: Vec<crate::source::qemu::Hypervisor>,
    /// Per entry of `vms`: the hypervisor it runs on, by name.
    pub vm_hypervisors: Vec<Option<String>>,
    pub repositories: Vec<RepositorySettings>,
    pub proxies: Vec<ProxySettings>,
    pub vms: Vec<VmSettings>,
    pub plugins: Vec<PluginSettings>,
    pub pipelines: Vec<PipelineSettings>,
    pub jobs: Vec<JobRow>,
}

/// Names that already exist (in the database, or built in), for reference checks.
#[derive(Debug, Default)]
pub struct Known {
    pub hypervisors: BTreeSet<String>,
    pub repositories: BTreeSet<String>,
    pub proxies: BTreeSet<String>,
    pub vms: BTreeSet<String>,
    pub pipelines: BTreeSet<String>,
    /// Plugin name → kind (built-ins and third-party).
    pub plugins: std::collections::BTreeMap<String, StageKind>,
}

struct Ctx<'a> {
    path: &'a Path,
    source: &'a str,
}

impl Ctx<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        self.source[..span.start.min(self.source.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn invalid<T>(&self, span: std::ops::Range<usize>, message: String) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            path: self.path.to_owned(),
            line: self.line(span),
            message,
        })
    }

    fn name(&self, what: &str, n: &Spanned<String>) -> Result<String, ConfigError> {
        if !valid_name(n.get_ref()) {
            return self.invalid(
                n.span(),
                format!(
                    "{what} name '{}' is not allowed: use letters, digits, '.', '_' and '-', not starting with '.'",
                    n.get_ref()
                ),
            );
        }
        Ok(n.get_ref().clone())
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            let base = self.path.parent().unwrap_or(Path::new("."));
            let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_owned());
            base.join(p)
        }
    }
}

pub fn load(path: &Path, known: &Known) -> Result<ConfigFile, ConfigError> {
    let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &source, known)
}

pub fn parse(path: &Path, source: &str, known: &Known) -> Result<ConfigFile, ConfigError> {
    let raw: RawFile = toml::from_str(source).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let cx = Ctx { path, source };
    let mut out = ConfigFile::default();

    let mut repositories = known.repositories.clone();
    for r in &raw.repository {
        let name = cx.name("repository", &r.name)?;
        if r.max_tasks == Some(0) {
            return cx.invalid(
                r.name.span(),
                format!("repository '{name}': max_tasks must be at least 1"),
            );
        }
        match (&r.path, &r.agent, &r.fingerprint) {
            (Some(_), None, None) => {}
            (None, Some(a), Some(f)) => {
                if let Some(problem) = agent_problem(a, f) {
                    return cx.invalid(r.name.span(), format!("repository '{name}': {problem}"));
                }
            }
            _ => {
                return cx.invalid(
                    r.name.span(),
                    format!("repository '{name}' needs either `path` (local) or both `agent` and `fingerprint` (served by an arca agent)"),
                );
            }
        }
        repositories.insert(name.clone());
        out.repositories.push(RepositorySettings {
            name,
            path: r.path.as_ref().map(|p| cx.resolve(p)).unwrap_or_default(),
            max_tasks: r.max_tasks.unwrap_or(4),
            agent: r.agent.clone(),
            fingerprint: r.fingerprint.clone(),
        });
    }
    let mut proxies = known.proxies.clone();
    for p in &raw.proxy {
        let name = cx.name("proxy", &p.name)?;
        if p.max_tasks == Some(0) {
            return cx.invalid(
                p.name.span(),
                format!("proxy '{name}': max_tasks must be at least 1"),
            );
        }
        match (&p.agent, &p.fingerprint) {
            (None, None) => {}
            (Some(a), Some(f)) => {
                if let Some(problem) = agent_problem(a, f) {
                    return cx.invalid(p.name.span(), format!("proxy '{name}': {problem}"));
                }
            }
            _ => {
                return cx.invalid(
                    p.name.span(),
                    format!("proxy '{name}' needs both `agent` and `fingerprint` (an arca agent with the proxy role), or neither (runs in the session's process)"),
                );
            }
        }
        proxies.insert(name.clone());
        out.proxies.push(ProxySettings {
            name,
            max_tasks: p.max_tasks.unwrap_or(super::default_proxy().max_tasks),
            agent: p.agent.clone(),
            fingerprint: p.fingerprint.clone(),
        });
    }
    for t in &raw.throttle {
        let name = cx.name("throttle", &t.name)?;
        let net = |what: &str, v: &Option<String>| -> Result<ipnet::IpNet, ConfigError> {
            match v {
                None => Ok("0.0.0.0/0".parse().expect("valid")),
                Some(s) => s.parse().or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)).or_else(|_| {
                    cx.invalid(t.name.span(), format!("throttle '{name}': {what} '{s}' is not a network range like 192.0.2.0/24"))
                }),
            }
        };
        let rate = match parse_size(&t.rate) {
            Ok(r) if r > 0 => r,
            Ok(_) => {
                return cx.invalid(
                    t.name.span(),
                    format!("throttle '{name}': rate must be above 0"),
                );
            }
            Err(e) => {
                return cx.invalid(
                    t.name.span(),
                    format!("throttle '{name}': rate (bytes per second): {e}"),
                );
            }
        };
        let window = match &t.window {
            None => None,
            Some(w) => match parse_window(w) {
                Some(w) => Some(w),
                None => {
                    return cx.invalid(
                        t.name.span(),
                        format!("throttle '{name}': window '{w}' is not like 08:00-18:00"),
                    );
                }
            },
        };
        out.throttles.push(super::ThrottleRule {
            source: net("source", &t.source)?,
            target: net("target", &t.target)?,
            name,
            rate,
            window,
        });
    }
    let mut hypervisors = known.hypervisors.clone();
    for h in &raw.hypervisor {
        let name = cx.name("hypervisor", &h.name)?;
        hypervisors.insert(name.clone());
        out.hypervisors.push(crate::source::qemu::Hypervisor {
            name,
            qmp: cx.resolve(&h.qmp),
            nbd: cx.resolve(&h.nbd),
        });
    }
    let mut vms = known.vms.clone();
    for v in &raw.vm {
        let name = cx.name("vm", &v.name)?;
        if v.disks.is_empty() {
            return cx.invalid(v.name.span(), format!("vm '{name}' has no disks"));
        }
        let mut disks = Vec::new();
        for (i, d) in v.disks.iter().enumerate() {
            let (dname, dpath, format, node) = match d {
                RawDisk::Path(p) => (
                    format!("disk{i}"),
                    Some(p),
                    DiskFormat::from_extension(p),
                    None,
                ),
                RawDisk::Named {
                    name,
                    path,
                    format,
                    node,
                } => (
                    name.clone().unwrap_or_else(|| format!("disk{i}")),
                    path.as_ref(),
                    format.unwrap_or_else(|| {
                        path.as_deref()
                            .map_or(DiskFormat::Raw, DiskFormat::from_extension)
                    }),
                    node.clone(),
                ),
            };
            let on_hypervisor = v.hypervisor.is_some();
            if on_hypervisor != node.is_some() || on_hypervisor == dpath.is_some() {
                return cx.invalid(
                    v.name.span(),
                    format!(
                        "vm '{name}', disk '{dname}': {}",
                        if on_hypervisor {
                            "disks of a hypervisor VM name a block node (`node = \"...\"`), not a path"
                        } else {
                            "disks of an image-file VM name a file (`path`), not a block node"
                        }
                    ),
                );
            }
            if !valid_name(&dname) || disks.iter().any(|x: &DiskSettings| x.name == dname) {
                return cx.invalid(
                    v.name.span(),
                    format!("vm '{name}': disk name '{dname}' is not allowed or used twice"),
                );
            }
            disks.push(DiskSettings {
                name: dname,
                path: dpath.map(|p| cx.resolve(p)).unwrap_or_default(),
                format,
                node,
            });
        }
        let hypervisor = match &v.hypervisor {
            None => None,
            Some(h) if hypervisors.contains(h.get_ref()) => Some(h.get_ref().clone()),
            Some(h) => {
                return cx.invalid(
                    h.span(),
                    format!(
                        "vm '{name}' names hypervisor '{}', which is not defined",
                        h.get_ref()
                    ),
                );
            }
        };
        vms.insert(name.clone());
        out.vm_hypervisors.push(hypervisor);
        out.vms.push(VmSettings {
            name,
            powered_off: v.powered_off,
            disks,
            hypervisor: None,
            guest_agent: v.guest_agent.as_ref().map(|p| cx.resolve(p)),
        });
    }
    let mut plugins = known.plugins.clone();
    for p in &raw.plugin {
        let name = cx.name("plugin", &p.name)?;
        if crate::plugin::builtin::find(&name).is_some() {
            return cx.invalid(
                p.name.span(),
                format!("plugin '{name}' is the name of a built-in plugin; pick another name"),
            );
        }
        plugins.insert(name.clone(), p.kind);
        out.plugins.push(PluginSettings {
            name,
            kind: p.kind,
            path: cx.resolve(&p.path),
            memory_mib: p.memory_mib.unwrap_or(256),
            deadline_ms: p.deadline_ms.unwrap_or(30_000),
        });
    }
    let mut pipelines = known.pipelines.clone();
    for p in &raw.pipeline {
        let name = cx.name("pipeline", &p.name)?;
        let stage = |s: &RawStage, kind: StageKind| -> Result<StageSettings, ConfigError> {
            let plugin = s.plugin.get_ref();
            match plugins.get(plugin) {
                None => cx.invalid(
                    s.plugin.span(),
                    format!(
                        "pipeline '{name}' names plugin '{plugin}', which is not defined (known: {})",
                        plugins.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ),
                Some(k) if *k != kind => cx.invalid(
                    s.plugin.span(),
                    format!("pipeline '{name}' uses plugin '{plugin}' as a {kind} stage, but it is a {k} plugin"),
                ),
                Some(_) => Ok(StageSettings {
                    plugin: plugin.clone(),
                    settings: s.settings.clone(),
                }),
            }
        };
        let default = super::default_pipeline();
        out.pipelines.push(PipelineSettings {
            change_detection: match &p.change_detection {
                Some(s) => stage(s, StageKind::ChangeDetection)?,
                None => default.change_detection,
            },
            exclusions: p
                .exclusion
                .iter()
                .map(|s| stage(s, StageKind::Exclusion))
                .collect::<Result<_, _>>()?,
            codec: match &p.codec {
                Some(s) => stage(s, StageKind::Codec)?,
                None => default.codec,
            },
            name: name.clone(),
        });
        pipelines.insert(name);
    }
    for j in &raw.job {
        let name = cx.name("job", &j.name)?;
        let check = |what: &str,
                     r: &Spanned<String>,
                     set: &BTreeSet<String>|
         -> Result<String, ConfigError> {
            if set.contains(r.get_ref()) {
                Ok(r.get_ref().clone())
            } else {
                cx.invalid(
                    r.span(),
                    format!(
                        "job '{name}' names {what} '{}', which is not defined (defined: {})",
                        r.get_ref(),
                        if set.is_empty() {
                            "none".to_owned()
                        } else {
                            set.iter().cloned().collect::<Vec<_>>().join(", ")
                        }
                    ),
                )
            }
        };
        if j.vms.is_empty() {
            return cx.invalid(j.name.span(), format!("job '{name}' lists no vms"));
        }
        let block_size = match &j.block_size {
            None => DEFAULT_BLOCK_SIZE,
            Some(v) => {
                let parsed = match v.get_ref() {
                    toml::Value::Integer(i) => u64::try_from(*i).map_err(|_| "negative".to_owned()),
                    toml::Value::String(s) => parse_size(s),
                    other => Err(format!("{other} is not a size")),
                };
                match parsed {
                    Ok(b)
                        if (u64::from(MIN_BLOCK_SIZE)..=u64::from(MAX_BLOCK_SIZE)).contains(&b)
                            && b % 4096 == 0 =>
                    {
                        b as u32
                    }
                    Ok(b) => {
                        return cx.invalid(
                            v.span(),
                            format!("job '{name}': block_size {b} must be a multiple of 4 KiB between 64 KiB and 64 MiB"),
                        );
                    }
                    Err(e) => {
                        return cx.invalid(v.span(), format!("job '{name}': block_size: {e}"));
                    }
                }
            }
        };
        let guest = match &j.guest {
            None => None,
            Some(g) => {
                let hook = match &g.hook {
                    Some(s) => {
                        let plugin = s.plugin.get_ref();
                        match plugins.get(plugin) {
                            Some(StageKind::GuestHook) => StageSettings {
                                plugin: plugin.clone(),
                                settings: s.settings.clone(),
                            },
                            Some(k) => {
                                return cx.invalid(
                                    s.plugin.span(),
                                    format!("job '{name}' uses plugin '{plugin}' as its guest hook, but it is a {k} plugin"),
                                );
                            }
                            None => {
                                return cx.invalid(
                                    s.plugin.span(),
                                    format!("job '{name}' names guest hook plugin '{plugin}', which is not defined"),
                                );
                            }
                        }
                    }
                    None => StageSettings {
                        plugin: "guest-scripts".into(),
                        settings: toml::Table::new(),
                    },
                };
                Some(super::GuestSettings {
                    mode: g.mode,
                    hook,
                    policy: crate::guest::GuestPolicy {
                        allow_exec: g.allow_exec.clone(),
                        allow_files: g.allow_files.clone(),
                        allow_freeze: g.allow_freeze.unwrap_or(true),
                        freeze_timeout: std::time::Duration::from_millis(
                            g.freeze_timeout_ms.unwrap_or(20_000),
                        ),
                        agent_timeout: std::time::Duration::from_millis(
                            g.agent_timeout_ms.unwrap_or(10_000),
                        ),
                    },
                })
            }
        };
        let retention = match &j.retention {
            None => None,
            Some(r) => match r.get_ref().check() {
                Ok(()) => Some(*r.get_ref()),
                Err(why) => return cx.invalid(r.span(), format!("job '{name}': {why}")),
            },
        };
        out.jobs.push(JobRow {
            guest,
            retention,
            vms: j
                .vms
                .iter()
                .map(|v| check("vm", v, &vms))
                .collect::<Result<_, _>>()?,
            repository: check("repository", &j.repository, &repositories)?,
            pipeline: match &j.pipeline {
                Some(p) => check("pipeline", p, &pipelines)?,
                None => super::DEFAULT_PIPELINE.to_owned(),
            },
            proxies: j
                .proxies
                .iter()
                .flatten()
                .map(|p| check("proxy", p, &proxies))
                .collect::<Result<_, _>>()?,
            block_size,
            name,
        });
    }
    Ok(out)
}

/// What is wrong with an agent's address and pinned fingerprint, if anything.
fn agent_problem(agent: &str, fingerprint: &str) -> Option<String> {
    if agent.parse::<std::net::SocketAddr>().is_err() {
        return Some(format!(
            "agent '{agent}' is not an address like 192.0.2.7:7700"
        ));
    }
    if !fingerprint.starts_with("sha256:") {
        return Some(
            "fingerprint must be `sha256:...`, as `arca identity` prints on the agent".into(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Known {
        let mut k = Known::default();
        k.pipelines.insert("default".into());
        k.proxies.insert("local".into());
        for b in crate::plugin::builtin::BUILTINS {
            k.plugins.insert(b.name.into(), b.kind);
        }
        k
    }

    #[test]
    fn a_missing_pipeline_is_named_with_its_line() {
        let src = "[[repository]]\nname = \"r\"\npath = \"/tmp/r\"\n\n[[vm]]\nname = \"v\"\ndisks = [\"/d.raw\"]\n\n[[job]]\nname = \"nightly\"\nvms = [\"v\"]\nrepository = \"r\"\npipeline = \"fast\"\n";
        let err = parse(Path::new("c.toml"), src, &known())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:13:"), "{err}");
        assert!(err.contains("job 'nightly' names pipeline 'fast'"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_place() {
        let err = parse(Path::new("c.toml"), "[[job]\nname = 1", &known())
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.toml") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn stage_kinds_must_match() {
        let src = "[[pipeline]]\nname = \"p\"\ncodec = { plugin = \"digest\" }\n";
        let err = parse(Path::new("c.toml"), src, &known())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("as a codec stage, but it is a change-detection plugin"),
            "{err}"
        );
    }

    #[test]
    fn a_full_file_parses_with_settings_and_disk_names() {
        let src = r#"
[[repository]]
name = "main"
path = "repo"
[[vm]]
name = "web01"
disks = ["a.raw", { name = "data", path = "/b.raw" }]
[[pipeline]]
name = "fast"
codec = { plugin = "zstd", level = 1 }
exclusion = [{ plugin = "exclude-ranges", ranges = "0+1MiB" }]
[[job]]
name = "j"
vms = ["web01"]
repository = "main"
pipeline = "fast"
block_size = "256KiB"
"#;
        let f = parse(Path::new("/etc/arca/c.toml"), src, &known()).unwrap();
        assert_eq!(f.repositories[0].path, PathBuf::from("/etc/arca/repo"));
        assert_eq!(f.vms[0].disks[0].name, "disk0");
        assert_eq!(f.vms[0].disks[1].name, "data");
        assert_eq!(
            f.pipelines[0].codec.settings["level"],
            toml::Value::Integer(1)
        );
        assert_eq!(f.pipelines[0].exclusions[0].plugin, "exclude-ranges");
        assert_eq!(f.jobs[0].block_size, 256 << 10);
    }
}
