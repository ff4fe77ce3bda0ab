//! Change detection for sources without changed block tracking: every
//! allocated block is read and its digest compared with the previous restore
//! point. When the source does track changes, clean blocks are referenced
//! without reading.

mod plan;

use std::cell::RefCell;

wit_bindgen::generate!({
    path: "../../wit",
    world: "arca:pipeline/change-detection",
});

use exports::arca::pipeline::detect::{Extent, Guest, PlanInput, ReadPlan, Settings};

thread_local! {
    /// Digests of the previous restore point from the last `plan`, which the
    /// host's `classify` calls for the same disk compare against.
    static PREVIOUS: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

fn to_plan(extents: &[Extent]) -> Vec<plan::ByteExtent> {
    extents
        .iter()
        .map(|e| plan::ByteExtent {
            offset: e.offset,
            length: e.length,
        })
        .collect()
}

fn to_wit(extents: Vec<plan::ByteExtent>) -> Vec<Extent> {
    extents
        .into_iter()
        .map(|e| Extent {
            offset: e.offset,
            length: e.length,
        })
        .collect()
}

struct Component;

impl Guest for Component {
    fn configure(settings: Settings) -> Result<(), String> {
        match settings.first() {
            None => Ok(()),
            Some((key, _)) => Err(format!(
                "digest-detect: unknown setting `{key}` (it takes no settings)"
            )),
        }
    }

    fn plan(input: PlanInput) -> Result<ReadPlan, String> {
        let allocated = to_plan(&input.allocated);
        let dirty = input.dirty.as_deref().map(to_plan);
        let result = plan::plan(&plan::PlanInput {
            disk_size: input.disk.size,
            block_size: input.disk.block_size,
            allocated: &allocated,
            dirty: dirty.as_deref(),
            previous_digests: input.previous_digests.as_deref(),
        });
        // Replaced even on error, so a failed plan never leaves another
        // disk's digests behind for `classify`.
        let valid = result.is_ok().then_some(input.previous_digests).flatten();
        PREVIOUS.set(valid);
        let p = result?;
        Ok(ReadPlan {
            read: to_wit(p.read),
            unchanged: to_wit(p.unchanged),
        })
    }

    fn classify(first_block: u64, digests: Vec<u8>) -> Result<Vec<bool>, String> {
        PREVIOUS.with_borrow(|previous| plan::classify(previous.as_deref(), first_block, &digests))
    }
}

export!(Component);
