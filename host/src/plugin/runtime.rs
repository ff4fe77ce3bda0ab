//! Engine, component cache, stores and limits.

use super::PluginError;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{Component, InstancePre, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// One epoch tick; deadlines are counted in ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// How much of a plugin's stderr (panic messages) is kept for error reports.
const STDERR_CAPACITY: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageKind {
    Exclusion,
    ChangeDetection,
    Codec,
    GuestHook,
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StageKind::Exclusion => "exclusion",
            StageKind::ChangeDetection => "change-detection",
            StageKind::Codec => "codec",
            StageKind::GuestHook => "guest-hook",
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PluginLimits {
    pub memory_bytes: usize,
    pub deadline: Duration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            deadline: Duration::from_secs(30),
        }
    }
}

/// What a store carries: WASI with nothing granted, the resource table for
/// host resources, the limiter and the captured stderr.
pub struct PluginState {
    wasi: WasiCtx,
    pub(super) table: ResourceTable,
    limiter: MemoryLimiter,
    stderr: MemoryOutputPipe,
    /// The guest channel, for guest-hook plugins only.
    pub(super) guest: Option<std::sync::Arc<crate::guest::GuestChannel>>,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

struct MemoryLimiter {
    limit: usize,
    hit: bool,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            // An error traps at once; returning false would let the plugin
            // go on and fail somewhere less clear.
            wasmtime::bail!("memory limit of {} MiB reached", self.limit >> 20);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// A frozen clock: plugins must not depend on time, and a clock that does
/// not move makes that visible instead of silently non-deterministic.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// A loaded, pre-instantiated plugin. Cheap to clone; instantiate once per
/// task and stage.
#[derive(Clone)]
pub struct Plugin {
    pub name: String,
    pub kind: StageKind,
    /// BLAKE3 of the component bytes: the name under which a repository
    /// keeps a copy of a codec.
    pub hash: [u8; 32],
    pub component: Arc<Vec<u8>>,
    pub limits: PluginLimits,
    pub(super) pre: InstancePre<PluginState>,
    pub(super) engine: Engine,
}

#[derive(Clone)]
pub struct PluginRuntime {
    /// Every call has a deadline, checked at function entries and loop
    /// headers (epoch interruption).
    engine: Engine,
    /// For bounded built-ins only (`builtin::is_bounded`): the same
    /// sandbox and memory cap, without the per-loop checks.
    bounded: Engine,
    cache_dir: Option<PathBuf>,
}

impl PluginRuntime {
    /// `cache_dir` keeps compiled components between processes.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        let engine = new_engine(true)?;
        let bounded = new_engine(false)?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("arca-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .expect("spawn epoch thread");
        Ok(Self {
            engine,
            bounded,
            cache_dir,
        })
    }

    /// Compiles (or loads from the cache) and pre-instantiates a plugin for
    /// the world of `kind`.
    pub fn load(
        &self,
        name: &str,
        kind: StageKind,
        bytes: Vec<u8>,
        limits: PluginLimits,
    ) -> Result<Plugin, PluginError> {
        // wasmtime's own message for this lists the magic bytes one per line.
        if !bytes.starts_with(b"\0asm") {
            return Err(PluginError::Load {
                plugin: name.to_owned(),
                message: "not a WebAssembly component (the file does not start with \\0asm); \
                          check the path of its [[plugin]] entry: a plugin is a component \
                          built for wasm32-wasip2"
                    .into(),
            });
        }
        let hash = *blake3::hash(&bytes).as_bytes();
        let bounded = super::builtin::is_bounded(&hash);
        let engine = if bounded { &self.bounded } else { &self.engine };
        let component = self.compile(engine, name, &bytes, &hash)?;
        let mut linker: Linker<PluginState> = Linker::new(engine);
        let load_err = |e: wasmtime::Error| PluginError::Load {
            plugin: name.to_owned(),
            message: format!("{e:#}"),
        };
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(load_err)?;
        match kind {
            StageKind::Exclusion => super::exclude::add_to_linker(&mut linker).map_err(load_err)?,
            StageKind::ChangeDetection | StageKind::Codec => {}
            StageKind::GuestHook => super::hook::add_to_linker(&mut linker).map_err(load_err)?,
        }
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::WrongWorld {
                plugin: name.to_owned(),
                expected: kind,
                message: format!("{e:#}"),
            })?;
        Ok(Plugin {
            name: name.to_owned(),
            kind,
            hash,
            component: Arc::new(bytes),
            limits,
            pre,
            engine: engine.clone(),
        })
    }

    fn compile(
        &self,
        engine: &Engine,
        name: &str,
        bytes: &[u8],
        hash: &[u8; 32],
    ) -> Result<Component, PluginError> {
        let load_err = |e: wasmtime::Error| PluginError::Load {
            plugin: name.to_owned(),
            message: format!("{e:#}"),
        };
        let Some(dir) = &self.cache_dir else {
            return Component::new(engine, bytes).map_err(load_err);
        };
        // The compatibility hash covers the engine's settings, so code
        // compiled with and without deadline checks never share a file.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let path = dir.join(format!(
            "{}-{:016x}.cwasm",
            crate::repository::hex(hash),
            h.finish()
        ));
        if path.exists() {
            // SAFETY: the file was written by `Component::serialize` of an
            // engine with the same compatibility hash, in a folder only arca
            // writes; a damaged file fails to deserialize and is recompiled.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!("recompiling plugin '{name}': cached code unusable: {e:#}")
                }
            }
        }
        let component = Component::new(engine, bytes).map_err(load_err)?;
        if let Ok(serialized) = component.serialize() {
            let _ = std::fs::create_dir_all(dir);
            let tmp = dir.join(format!(
                ".tmp-{}-{}",
                std::process::id(),
                crate::repository::hex(&hash[..8])
            ));
            if std::fs::write(&tmp, serialized).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
        Ok(component)
    }
}

fn new_engine(deadlines: bool) -> Result<Engine, PluginError> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(deadlines);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    // Linear memories live in a 4 GiB reservation (the default on 64-bit
    // hosts) and never move, so compiled code may keep the base pointer in
    // a register across a loop instead of reloading it at every access.
    config.memory_may_move(false);
    // Plugin authors profile their stages with `perf record`: with this set,
    // wasmtime writes /tmp/perf-PID.map naming the compiled functions.
    if std::env::var_os("ARCA_WASM_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    Engine::new(&config).map_err(|e| PluginError::Load {
        plugin: "(engine)".into(),
        message: format!("{e:#}"),
    })
}

impl Plugin {
    /// Whether `limits.deadline` is enforced: not for bounded built-ins
    /// (`builtin::is_bounded`), which run on the engine without checks.
    pub fn deadline_enforced(&self) -> bool {
        !super::builtin::is_bounded(&self.hash)
    }

    /// A fresh store for one task and stage.
    pub(super) fn new_store(&self) -> Store<PluginState> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut store = Store::new(
            &self.engine,
            PluginState {
                wasi,
                table: ResourceTable::new(),
                limiter: MemoryLimiter {
                    limit: self.limits.memory_bytes,
                    hit: false,
                },
                stderr,
                guest: None,
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store
    }

    pub(super) fn deadline_ticks(&self) -> u64 {
        (self.limits.deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }
}

/// One instance of a plugin with its store; every call goes through `call`
/// so that deadlines, traps and limits are handled the same way.
pub(super) struct Instance<B> {
    pub plugin: Plugin,
    pub store: Store<PluginState>,
    pub bindings: B,
    poisoned: bool,
}

impl<B> Instance<B> {
    pub fn new(
        plugin: &Plugin,
        instantiate: impl FnOnce(&mut Store<PluginState>) -> wasmtime::Result<B>,
    ) -> Result<Self, PluginError> {
        let mut store = plugin.new_store();
        store.set_epoch_deadline(plugin.deadline_ticks());
        let bindings = instantiate(&mut store).map_err(|e| PluginError::Load {
            plugin: plugin.name.clone(),
            message: format!("{e:#}"),
        })?;
        Ok(Self {
            plugin: plugin.clone(),
            store,
            bindings,
            poisoned: false,
        })
    }

    pub fn call<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&B, &mut Store<PluginState>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, PluginError> {
        let plugin = self.plugin.name.clone();
        if self.poisoned {
            return Err(PluginError::Trapped {
                plugin,
                call,
                message: "instance is unusable after an earlier trap".into(),
            });
        }
        self.store.set_epoch_deadline(self.plugin.deadline_ticks());
        match f(&self.bindings, &mut self.store) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(message)) => Err(PluginError::Failed {
                plugin,
                call,
                message,
            }),
            Err(e) => {
                self.poisoned = true;
                Err(self.describe_trap(call, e))
            }
        }
    }

    fn describe_trap(&mut self, call: &'static str, e: wasmtime::Error) -> PluginError {
        let plugin = self.plugin.name.clone();
        if self.store.data().limiter.hit {
            return PluginError::Memory {
                plugin,
                call,
                limit_mib: (self.plugin.limits.memory_bytes >> 20) as u64,
            };
        }
        if matches!(
            e.downcast_ref::<wasmtime::Trap>(),
            Some(wasmtime::Trap::Interrupt)
        ) {
            return PluginError::Deadline {
                plugin,
                call,
                deadline_ms: self.plugin.limits.deadline.as_millis() as u64,
            };
        }
        let stderr = String::from_utf8_lossy(&self.store.data().stderr.contents()).into_owned();
        let said: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let message = if said.is_empty() {
            format!("{e:#}")
        } else {
            format!(
                "{} ({})",
                said[said.len().saturating_sub(3)..].join(" / "),
                root_cause(&e)
            )
        };
        PluginError::Trapped {
            plugin,
            call,
            message,
        }
    }
}

fn root_cause(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(t) => t.to_string(),
        None => format!("{e}"),
    }
}

/// Renders operator settings (a TOML table) as the WIT's key/value list.
pub fn settings_to_wit(table: &toml::Table) -> Vec<(String, String)> {
    table
        .iter()
        .map(|(k, v)| {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(items) => items
                    .iter()
                    .map(|i| match i {
                        toml::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}
