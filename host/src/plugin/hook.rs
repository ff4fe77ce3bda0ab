//! Guest-hook stage: makes a snapshot application-consistent by working
//! inside the guest through the host's guest channel.

use super::bindings::guest_hook::arca::pipeline::guest::{ExecOutput as WitExecOutput, Host};
use super::bindings::guest_hook::{GuestHook as Bindings, GuestHookPre};
use super::runtime::{Instance, PluginState};
use super::{Plugin, PluginError};
use crate::guest::GuestChannel;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{HasSelf, Linker};

pub(super) fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    Bindings::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)
}

impl super::bindings::guest_hook::arca::pipeline::types::Host for PluginState {}

impl PluginState {
    fn channel(&self) -> Result<&Arc<GuestChannel>, String> {
        self.guest
            .as_ref()
            .ok_or_else(|| "no guest channel".to_owned())
    }
}

impl Host for PluginState {
    fn ping(&mut self) -> wasmtime::Result<Result<(), String>> {
        Ok(self.channel().and_then(|c| c.ping()))
    }

    fn exec(
        &mut self,
        path: String,
        args: Vec<String>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<WitExecOutput, String>> {
        Ok(self.channel().and_then(|c| {
            c.exec(&path, &args, Duration::from_millis(u64::from(timeout_ms)))
                .map(|o| WitExecOutput {
                    exit_code: o.exit_code,
                    stdout: o.stdout,
                    stderr: o.stderr,
                })
        }))
    }

    fn fs_freeze(&mut self) -> wasmtime::Result<Result<u32, String>> {
        Ok(self.channel().and_then(|c| c.freeze()))
    }

    fn fs_thaw(&mut self) -> wasmtime::Result<Result<u32, String>> {
        Ok(self.channel().and_then(|c| c.thaw()))
    }

    fn fs_status(&mut self) -> wasmtime::Result<Result<String, String>> {
        Ok(self.channel().and_then(|c| c.fs_status()))
    }

    fn file_read(
        &mut self,
        path: String,
        max_bytes: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        // Bounded by the host too: a plugin's memory is capped anyway.
        let max = (max_bytes as usize).min(16 << 20);
        Ok(self.channel().and_then(|c| c.file_read(&path, max)))
    }

    fn file_write(&mut self, path: String, data: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        Ok(self.channel().and_then(|c| c.file_write(&path, &data)))
    }
}

/// One guest-hook plugin instance, bound to one VM's guest channel.
pub struct GuestHook {
    inst: Instance<Bindings>,
}

impl GuestHook {
    pub fn new(
        plugin: &Plugin,
        settings: &Vec<(String, String)>,
        channel: Arc<GuestChannel>,
    ) -> Result<Self, PluginError> {
        let pre = GuestHookPre::new(plugin.pre.clone()).map_err(|e| PluginError::WrongWorld {
            plugin: plugin.name.clone(),
            expected: super::StageKind::GuestHook,
            message: format!("{e:#}"),
        })?;
        let mut inst = Instance::new(plugin, |store| {
            store.data_mut().guest = Some(channel);
            pre.instantiate(store)
        })?;
        inst.call("configure", |b, s| {
            b.arca_pipeline_hooks().call_configure(s, settings)
        })?;
        Ok(Self { inst })
    }

    pub fn name(&self) -> &str {
        &self.inst.plugin.name
    }

    pub fn pre_snapshot(&mut self, vm: &str) -> Result<(), PluginError> {
        self.inst.call("pre-snapshot", |b, s| {
            b.arca_pipeline_hooks().call_pre_snapshot(s, vm)
        })
    }

    pub fn post_snapshot(&mut self, vm: &str) -> Result<(), PluginError> {
        self.inst.call("post-snapshot", |b, s| {
            b.arca_pipeline_hooks().call_post_snapshot(s, vm)
        })
    }

    pub fn post_backup(&mut self, vm: &str, succeeded: bool) -> Result<(), PluginError> {
        self.inst.call("post-backup", |b, s| {
            b.arca_pipeline_hooks().call_post_backup(s, vm, succeeded)
        })
    }
}
