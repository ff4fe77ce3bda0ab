//! Exclusion stage: plugins read the snapshot through a read-only disk
//! resource and name the byte ranges not worth keeping.

use super::bindings::exclusion::arca::pipeline::disk::{Host, HostDiskReader};
use super::bindings::exclusion::arca::pipeline::types::DiskInfo;
use super::bindings::exclusion::{Exclusion, ExclusionPre};
use super::runtime::{Instance, PluginState};
use super::{Plugin, PluginError};
use crate::extent::Extent;
use crate::source::DiskRead;
use std::sync::Arc;
use wasmtime::component::{HasSelf, Linker, Resource};

/// Largest read a plugin may ask for in one call; bounds host memory.
const MAX_READ: u32 = 16 << 20;

/// The host side of `disk-reader`: a snapshot disk, read-only.
pub struct DiskReaderHandle {
    disk: Arc<dyn DiskRead>,
}

pub(super) fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    Exclusion::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)
}

impl Host for PluginState {}

impl super::bindings::exclusion::arca::pipeline::types::Host for PluginState {}

impl HostDiskReader for PluginState {
    fn size(&mut self, reader: Resource<DiskReaderHandle>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&reader)?.disk.size())
    }

    fn read(
        &mut self,
        reader: Resource<DiskReaderHandle>,
        offset: u64,
        length: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        if length > MAX_READ {
            return Ok(Err(format!(
                "read of {length} bytes is over the limit of {MAX_READ}"
            )));
        }
        let disk = &self.table.get(&reader)?.disk;
        let size = disk.size();
        if offset >= size {
            return Ok(Ok(Vec::new()));
        }
        let n = u64::from(length).min(size - offset) as usize;
        let mut buf = vec![0u8; n];
        Ok(match disk.read_at(&mut buf, offset) {
            Ok(got) => {
                buf.truncate(got);
                Ok(buf)
            }
            Err(e) => Err(format!("disk read at {offset}: {e}")),
        })
    }

    fn drop(&mut self, reader: Resource<DiskReaderHandle>) -> wasmtime::Result<()> {
        self.table.delete(reader)?;
        Ok(())
    }
}

pub struct Excluder {
    inst: Instance<Exclusion>,
}

impl Excluder {
    pub fn new(plugin: &Plugin, settings: &Vec<(String, String)>) -> Result<Self, PluginError> {
        let pre = ExclusionPre::new(plugin.pre.clone()).map_err(|e| PluginError::WrongWorld {
            plugin: plugin.name.clone(),
            expected: super::StageKind::Exclusion,
            message: format!("{e:#}"),
        })?;
        let mut inst = Instance::new(plugin, |store| pre.instantiate(store))?;
        inst.call("configure", |b, s| {
            b.arca_pipeline_exclude().call_configure(s, settings)
        })?;
        Ok(Self { inst })
    }

    pub fn name(&self) -> &str {
        &self.inst.plugin.name
    }

    /// The ranges to exclude, checked to lie inside the disk.
    pub fn excluded(
        &mut self,
        disk_name: &str,
        disk: Arc<dyn DiskRead>,
        block_size: u32,
    ) -> Result<Vec<Extent>, PluginError> {
        let size = disk.size();
        let info = DiskInfo {
            name: disk_name.to_owned(),
            size,
            block_size,
        };
        let handle = self
            .inst
            .store
            .data_mut()
            .table
            .push(DiskReaderHandle { disk })
            .map_err(|e| PluginError::Load {
                plugin: self.inst.plugin.name.clone(),
                message: e.to_string(),
            })?;
        let rep = handle.rep();
        let result = self.inst.call("excluded-extents", |b, s| {
            b.arca_pipeline_exclude()
                .call_excluded_extents(s, &info, Resource::new_borrow(rep))
        });
        // The host owns the resource; remove it whatever the plugin did.
        let _ = self.inst.store.data_mut().table.delete(handle);
        let extents = result?;
        let mut out = Vec::with_capacity(extents.len());
        for e in extents {
            if e.offset.checked_add(e.length).is_none_or(|end| end > size) {
                return Err(PluginError::BadOutput {
                    plugin: self.inst.plugin.name.clone(),
                    call: "excluded-extents",
                    message: format!(
                        "range {}+{} lies outside the disk ({size} bytes)",
                        e.offset, e.length
                    ),
                });
            }
            out.push(Extent::new(e.offset, e.length));
        }
        Ok(out)
    }
}
