//! The plugin runtime: WASM components for every processing stage.
//!
//! Components are compiled once per engine build (cached on disk, keyed by
//! the component's BLAKE3 and the engine's compatibility hash) and
//! pre-instantiated once per plugin; each task and stage gets its own store
//! with a memory cap, and each call a deadline (epoch interruption). A trap
//! or a timeout poisons only that store: the task fails with the plugin's
//! name and message, and the process goes on.
//!
//! Plugins see no files, sockets, environment variables, arguments or real
//! clocks: WASI is linked because Rust's std needs it, but with nothing
//! granted. What a plugin may touch is what the arca WIT imports give it.

mod bindings;
pub mod builtin;
pub mod codec;
pub mod detect;
pub mod exclude;
pub mod hook;
mod runtime;

pub use runtime::{Plugin, PluginLimits, PluginRuntime, StageKind, settings_to_wit};

/// Why a plugin call failed. Every variant names the plugin.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    #[error("plugin '{plugin}': cannot load component: {message}")]
    Load { plugin: String, message: String },
    #[error("plugin '{plugin}' is not a {expected} plugin: {message}")]
    WrongWorld {
        plugin: String,
        expected: StageKind,
        message: String,
    },
    #[error("plugin '{plugin}' {call} failed: {message}")]
    Failed {
        plugin: String,
        call: &'static str,
        message: String,
    },
    #[error("plugin '{plugin}' {call} trapped: {message}")]
    Trapped {
        plugin: String,
        call: &'static str,
        message: String,
    },
    #[error("plugin '{plugin}' {call} exceeded its deadline of {deadline_ms} ms and was stopped")]
    Deadline {
        plugin: String,
        call: &'static str,
        deadline_ms: u64,
    },
    #[error(
        "plugin '{plugin}' {call} exceeded its memory limit of {limit_mib} MiB and was stopped"
    )]
    Memory {
        plugin: String,
        call: &'static str,
        limit_mib: u64,
    },
    #[error("plugin '{plugin}' {call} returned a malformed answer: {message}")]
    BadOutput {
        plugin: String,
        call: &'static str,
        message: String,
    },
}
