//! The pipeline's plugins, loaded once per session (or, on a proxy agent,
//! once per assigned task), and the stage instances each task gets.
//!
//! A session sends its stages to a proxy agent as `StageSpec`s carrying the
//! component bytes, so that the proxy runs exactly what the session was
//! configured with; the proxy's compile cache (keyed by the component's
//! hash) makes a repeated component cheap.

use super::Stages;
use crate::config::{GuestMode, JobSettings, StageSettings};
use crate::plugin::codec::Codec;
use crate::plugin::detect::Detector;
use crate::plugin::exclude::Excluder;
use crate::plugin::{Plugin, PluginError, PluginLimits, PluginRuntime, StageKind, builtin};
use arca_transport::control::{Setting, StageSpec};
use std::time::Duration;

type Settings = Vec<(String, String)>;

pub struct LoadedPipeline {
    detect: (Plugin, Settings),
    exclusions: Vec<(Plugin, Settings)>,
    codec: (Plugin, Settings),
    /// The guest hook, when the job's guest processing is on. It runs on the
    /// backup server, so it is never sent to a proxy.
    pub guest: Option<(Plugin, Settings)>,
    /// Whether the codec accepts its settings: checked by the first task,
    /// and the answer reused by the others.
    codec_check: std::sync::OnceLock<Result<(), PluginError>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("plugin '{name}': cannot read {path}: {source}")]
    File {
        name: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("stage '{name}' of kind '{kind}' cannot run on a proxy")]
    Kind { name: String, kind: String },
}

impl LoadedPipeline {
    pub fn load(job: &JobSettings, runtime: &PluginRuntime) -> Result<Self, LoadError> {
        let one = |stage: &StageSettings,
                   kind: StageKind|
         -> Result<(Plugin, Settings), LoadError> {
            let settings = crate::plugin::settings_to_wit(&stage.settings);
            if let Some(b) = builtin::find(&stage.plugin) {
                let p = runtime.load(b.name, b.kind, b.bytes.to_vec(), PluginLimits::default())?;
                return Ok((p, settings));
            }
            let def = job
                .plugins
                .iter()
                .find(|p| p.name == stage.plugin)
                .ok_or_else(|| PluginError::Load {
                    plugin: stage.plugin.clone(),
                    message: "not a built-in plugin and not defined with [[plugin]]".into(),
                })?;
            let bytes = std::fs::read(&def.path).map_err(|source| LoadError::File {
                name: def.name.clone(),
                path: def.path.clone(),
                source,
            })?;
            let limits = PluginLimits {
                memory_bytes: (def.memory_mib as usize) << 20,
                deadline: Duration::from_millis(def.deadline_ms),
            };
            Ok((runtime.load(&def.name, kind, bytes, limits)?, settings))
        };
        let p = &job.pipeline;
        Ok(Self {
            detect: one(&p.change_detection, StageKind::ChangeDetection)?,
            exclusions: p
                .exclusions
                .iter()
                .map(|s| one(s, StageKind::Exclusion))
                .collect::<Result<_, _>>()?,
            codec: one(&p.codec, StageKind::Codec)?,
            guest: match &job.guest {
                Some(g) if g.mode != GuestMode::Off => Some(one(&g.hook, StageKind::GuestHook)?),
                _ => None,
            },
            codec_check: std::sync::OnceLock::new(),
        })
    }

    /// The data stages, as a proxy agent needs them.
    pub fn specs(&self) -> Vec<StageSpec> {
        let spec = |(p, settings): &(Plugin, Settings)| StageSpec {
            kind: p.kind.to_string(),
            name: p.name.clone(),
            component: p.component.as_ref().clone(),
            settings: settings
                .iter()
                .map(|(key, value)| Setting {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            memory_bytes: p.limits.memory_bytes as u64,
            deadline_ms: p.limits.deadline.as_millis() as u64,
        };
        std::iter::once(spec(&self.detect))
            .chain(self.exclusions.iter().map(spec))
            .chain(std::iter::once(spec(&self.codec)))
            .collect()
    }

    /// The data stages a session sent; on a proxy agent.
    pub fn from_specs(specs: &[StageSpec], runtime: &PluginRuntime) -> Result<Self, LoadError> {
        let mut detect = None;
        let mut codec = None;
        let mut exclusions = Vec::new();
        for s in specs {
            let kind = match s.kind.as_str() {
                "change-detection" => StageKind::ChangeDetection,
                "exclusion" => StageKind::Exclusion,
                "codec" => StageKind::Codec,
                _ => {
                    return Err(LoadError::Kind {
                        name: s.name.clone(),
                        kind: s.kind.clone(),
                    });
                }
            };
            let limits = PluginLimits {
                memory_bytes: usize::try_from(s.memory_bytes).unwrap_or(usize::MAX),
                deadline: Duration::from_millis(s.deadline_ms),
            };
            let plugin = runtime.load(&s.name, kind, s.component.clone(), limits)?;
            let settings = s
                .settings
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.clone()))
                .collect();
            match kind {
                StageKind::ChangeDetection => detect = Some((plugin, settings)),
                StageKind::Codec => codec = Some((plugin, settings)),
                _ => exclusions.push((plugin, settings)),
            }
        }
        let missing = |what: &str| PluginError::Load {
            plugin: what.into(),
            message: "the assignment has no such stage".into(),
        };
        Ok(Self {
            detect: detect.ok_or_else(|| missing("change-detection"))?,
            exclusions,
            codec: codec.ok_or_else(|| missing("codec"))?,
            guest: None,
            codec_check: std::sync::OnceLock::new(),
        })
    }

    /// Fresh stage instances for one task. A bad codec setting fails the
    /// task here, before any data is read (it would fail every task: the
    /// codec is instantiated to check it only once per session).
    pub fn instantiate(&self) -> Result<Stages, PluginError> {
        self.codec_check
            .get_or_init(|| Codec::new(&self.codec.0, &self.codec.1).map(drop))
            .clone()?;
        Ok(Stages {
            exclusions: self
                .exclusions
                .iter()
                .map(|(p, s)| Excluder::new(p, s))
                .collect::<Result<_, _>>()?,
            detector: Detector::new(&self.detect.0, &self.detect.1)?,
            codec: self.codec.0.clone(),
            codec_settings: self.codec.1.clone(),
        })
    }
}
