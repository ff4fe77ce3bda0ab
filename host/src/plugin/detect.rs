//! Change-detection stage: plans what to read and tells new blocks from
//! unchanged ones.

use super::bindings::change_detection::arca::pipeline::types::{DiskInfo, Extent as WitExtent};
use super::bindings::change_detection::exports::arca::pipeline::detect::{PlanInput, ReadPlan};
use super::bindings::change_detection::{ChangeDetection, ChangeDetectionPre};
use super::runtime::Instance;
use super::{Plugin, PluginError};
use crate::extent::Extent;

pub struct Detector {
    inst: Instance<ChangeDetection>,
}

pub struct Plan {
    pub read: Vec<Extent>,
    pub unchanged: Vec<Extent>,
}

fn to_wit(e: &[Extent]) -> Vec<WitExtent> {
    e.iter()
        .map(|e| WitExtent {
            offset: e.offset,
            length: e.length,
        })
        .collect()
}

fn from_wit(e: Vec<WitExtent>) -> Vec<Extent> {
    e.into_iter()
        .map(|e| Extent::new(e.offset, e.length))
        .collect()
}

impl Detector {
    pub fn new(plugin: &Plugin, settings: &Vec<(String, String)>) -> Result<Self, PluginError> {
        let pre =
            ChangeDetectionPre::new(plugin.pre.clone()).map_err(|e| PluginError::WrongWorld {
                plugin: plugin.name.clone(),
                expected: super::StageKind::ChangeDetection,
                message: format!("{e:#}"),
            })?;
        let mut inst = Instance::new(plugin, |store| pre.instantiate(store))?;
        inst.call("configure", |b, s| {
            b.arca_pipeline_detect().call_configure(s, settings)
        })?;
        Ok(Self { inst })
    }

    pub fn name(&self) -> &str {
        &self.inst.plugin.name
    }

    pub fn plan(
        &mut self,
        disk_name: &str,
        disk_size: u64,
        block_size: u32,
        allocated: &[Extent],
        dirty: Option<&[Extent]>,
        previous_digests: Option<Vec<u8>>,
    ) -> Result<Plan, PluginError> {
        let input = PlanInput {
            disk: DiskInfo {
                name: disk_name.to_owned(),
                size: disk_size,
                block_size,
            },
            allocated: to_wit(allocated),
            dirty: dirty.map(to_wit),
            previous_digests,
        };
        let ReadPlan { read, unchanged } = self
            .inst
            .call("plan", |b, s| b.arca_pipeline_detect().call_plan(s, &input))?;
        Ok(Plan {
            read: from_wit(read),
            unchanged: from_wit(unchanged),
        })
    }

    /// Per block of a consecutive run: true when it is new.
    pub fn classify(&mut self, first_block: u64, digests: &[u8]) -> Result<Vec<bool>, PluginError> {
        let flags = self.inst.call("classify", |b, s| {
            b.arca_pipeline_detect()
                .call_classify(s, first_block, digests)
        })?;
        if flags.len() != digests.len() / 32 {
            return Err(PluginError::BadOutput {
                plugin: self.inst.plugin.name.clone(),
                call: "classify",
                message: format!(
                    "{} blocks in, {} answers out",
                    digests.len() / 32,
                    flags.len()
                ),
            });
        }
        Ok(flags)
    }
}
