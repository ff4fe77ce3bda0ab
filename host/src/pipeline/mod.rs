//! The source data mover of one task: runs the pipeline's stages over one
//! snapshot disk and sends blocks to the target mover (seed steps 9 and 10).
//!
//! Order of work: the allocation map and the exclusion stages decide which
//! blocks can hold anything worth keeping; the change-detection stage plans
//! what to read; analyst threads read batches in disk order, zero excluded
//! ranges, drop zero blocks, hash, classify and ask the target which chunks
//! it lacks; coders (one codec instance each, so a single disk uses every
//! core) compress those and send them (`worker.rs`). The manifest is
//! committed last.
//!
//! The host never trusts a plugin with a content address: digests are
//! computed here, an "unchanged" answer is only accepted when the digest
//! matches the previous restore point, and every allocated block must be
//! either read or carried from the previous restore point.

mod loaded;
mod previous;
mod stats;
mod worker;

pub use loaded::{LoadError, LoadedPipeline};

pub use stats::{StageClock, TaskStats};

use crate::extent::{Extent, Geometry, normalize};
use crate::plugin::detect::Detector;
use crate::plugin::exclude::Excluder;
use crate::plugin::{Plugin, PluginError};
use crate::source::{Changes, Consistency, DiskRead};
use arca_transport::{
    CommitPoint, HASH_LEN, LinkError, MANIFEST_FORMAT_VERSION, Manifest, RegisterCodec, TargetLink,
};
use std::sync::Arc;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("reading {disk} at offset {offset}: {source}")]
    Read {
        disk: String,
        offset: u64,
        source: std::io::Error,
    },
    #[error(
        "{disk} changed under the task: {source}; nothing was committed. Run the job again once nothing truncates or replaces the image during a backup (or use a filesystem with reflink snapshots, which freeze it)"
    )]
    Shrunk {
        disk: String,
        source: std::io::Error,
    },
    #[error("allocation map of {disk}: {source}")]
    Allocation {
        disk: String,
        source: std::io::Error,
    },
    #[error("change detection plugin '{plugin}' gave an unusable plan: {message}")]
    BadPlan { plugin: String, message: String },
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("task cancelled")]
    Cancelled,
}

/// Everything the source mover needs to know about its task.
pub struct TaskInput {
    pub job: String,
    pub vm: String,
    pub disk_name: String,
    pub disk: Arc<dyn DiskRead>,
    pub block_size: u32,
    pub previous: Option<Manifest>,
    pub consistency: Consistency,
    pub session_id: u64,
    pub pipeline: String,
    pub workers: usize,
    /// Changed block tracking, when the source has it: used only if the
    /// point it counts from is this task's parent.
    pub changes: Option<Changes>,
    /// Recorded in the manifest: the CBT bitmap that counts from this snapshot.
    pub cbt_bitmap: String,
    /// The job's retention, applied by the target after the commit.
    pub retention: Option<arca_transport::RetentionPolicy>,
    /// Recorded in the manifest: the session's token for this task, the
    /// same in every attempt (`Manifest::task_token`; empty for none).
    pub task_token: Vec<u8>,
}

impl TaskInput {
    pub fn label(&self) -> String {
        format!("{}/{}", self.vm, self.disk_name)
    }
}

/// The stage instances of one task (a fresh store each).
pub struct Stages {
    pub exclusions: Vec<Excluder>,
    pub detector: Detector,
    pub codec: Plugin,
    pub codec_settings: Vec<(String, String)>,
}

pub struct TaskOutcome {
    pub point_id: String,
    /// The point it is incremental to, if any.
    pub parent_point: Option<String>,
    pub stats: TaskStats,
    pub notices: Vec<String>,
}

/// What happens to one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockPlan {
    Hole,
    Excluded,
    Read,
    Unchanged,
}

pub fn run(
    input: &TaskInput,
    stages: Stages,
    link: &dyn TargetLink,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<TaskOutcome, TaskError> {
    let result = run_inner(input, stages, link, progress);
    if result.is_err() {
        link.abort();
    }
    result
}

fn run_inner(
    input: &TaskInput,
    mut stages: Stages,
    link: &dyn TargetLink,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<TaskOutcome, TaskError> {
    let label = input.label();
    let clock = StageClock::default();
    let mut stats = TaskStats::default();
    let mut notices = Vec::new();
    let size = input.disk.size();
    let geometry = Geometry {
        disk_size: size,
        block_size: input.block_size,
    };
    let blocks = geometry.block_count() as usize;
    stats.disk_bytes = size;
    if let Some(done) = input.previous.as_ref().filter(|p| committed_by(p, input)) {
        // An earlier attempt committed this task's point and lost the
        // answer: that point is this task's, and a second would be a
        // duplicate (which retention's keep_last would count).
        link.abort();
        notices.push(format!(
            "{}; nothing was read again",
            earlier_attempt(&label, &done.point_id)
        ));
        return Ok(TaskOutcome {
            point_id: done.point_id.clone(),
            parent_point: Some(done.parent_point.clone()).filter(|p| !p.is_empty()),
            stats,
            notices,
        });
    }

    let allocation = clock
        .time("allocation-map", || input.disk.allocation())
        .map_err(|source| match input.disk.check_intact() {
            // Cut while its map was walked: the map's error (a seek past
            // the new end) says less than the cut does.
            Err(shrunk) if shrunk.kind() == std::io::ErrorKind::UnexpectedEof => {
                TaskError::Shrunk {
                    disk: label.clone(),
                    source: shrunk,
                }
            }
            _ => TaskError::Allocation {
                disk: label.clone(),
                source,
            },
        })?;
    let allocation = normalize(allocation, size);

    let mut excluded = Vec::new();
    for ex in &mut stages.exclusions {
        let found = clock.time("exclusion", || {
            ex.excluded(&label, input.disk.clone(), input.block_size)
        });
        let found = match found {
            Ok(found) => found,
            // The plugin ran and said it cannot judge this disk (unknown or
            // damaged filesystem): keeping everything is always safe. A trap,
            // a timeout or a malformed answer still fails the task.
            Err(PluginError::Failed {
                plugin, message, ..
            }) => {
                notices.push(format!(
                    "{label}: exclusion stage '{plugin}' excluded nothing: {message}; the disk is backed up whole"
                ));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let found = normalize(found, size);
        stats.add_exclusion(ex.name(), found.iter().map(|e| e.length).sum());
        excluded.extend(found);
    }
    let excluded = normalize(excluded, size);
    stats.excluded_bytes = excluded.iter().map(|e| e.length).sum();

    let previous = input.previous.as_ref().filter(|p| {
        let fits = p.disk_size == size && p.block_size == input.block_size;
        if !fits {
            notices.push(format!(
                "{label}: previous restore point {} has another size or block size; this backup reads the whole disk",
                p.point_id
            ));
        }
        fits
    });
    // CBT counts only against the restore point it started at: a parent
    // that is another point (the newest one's block list unreadable, say)
    // would take blocks changed in between for unchanged.
    let before = previous.map(previous::recorded_exclusions);
    let dirty = match (&input.changes, previous, &before) {
        (Some(c), Some(p), _) if p.point_id != c.since => {
            notices.push(format!(
                "{label}: changed block tracking counts from restore point {} but the parent is {} (`arca verify` names a damaged point); this backup compares digests instead",
                c.since, p.point_id
            ));
            None
        }
        // Which clean blocks may be carried depends on what the parent
        // excluded (`previous`).
        (Some(_), Some(p), Some(Err(why))) => {
            notices.push(format!(
                "{label}: restore point {} {why}; this backup compares digests instead of using changed block tracking",
                p.point_id
            ));
            None
        }
        (Some(c), Some(_), _) => Some(normalize(c.extents.clone(), size)),
        _ => None,
    };
    let stale = previous.map_or_else(Vec::new, |p| {
        let before = before.as_ref().and_then(|b| b.as_deref().ok());
        previous::stale_blocks(&geometry, p, before, &excluded)
    });
    // Without a record, a block stored with bytes zeroed cannot be told
    // from one stored whole: a detector may carry none of them.
    let not_carried: std::borrow::Cow<[bool]> = match &before {
        Some(Err(_)) => vec![true; blocks].into(),
        _ => (&stale[..]).into(),
    };
    if let Some(d) = &dirty {
        stats.cbt_dirty_bytes = Some(d.iter().map(|e| e.length).sum());
    }
    let plan = clock.time("change-detection", || {
        stages.detector.plan(
            &label,
            size,
            input.block_size,
            &allocation,
            dirty.as_deref(),
            previous.map(|p| previous::digests_for_detector(p, &geometry, &stale)),
        )
    })?;
    let block_plan = make_block_plan(
        &geometry,
        &allocation,
        &excluded,
        &plan,
        previous.is_some(),
        dirty.as_deref(),
        &not_carried,
    )
    .map_err(|message| TaskError::BadPlan {
        plugin: stages.detector.name().to_owned(),
        message,
    })?;

    let mut hashes = vec![0u8; blocks * HASH_LEN];
    let mut resolved_early = 0u64;
    for (i, p) in block_plan.iter().enumerate() {
        let len = geometry.block_extent(i as u64).length;
        match p {
            BlockPlan::Unchanged => {
                let prev = previous.expect("unchanged only with a previous point");
                hashes[i * HASH_LEN..(i + 1) * HASH_LEN]
                    .copy_from_slice(&prev.block_hashes[i * HASH_LEN..(i + 1) * HASH_LEN]);
                stats.unchanged_bytes += len;
                resolved_early += len;
            }
            BlockPlan::Hole => {
                stats.hole_bytes += len;
                resolved_early += len;
            }
            BlockPlan::Excluded => resolved_early += len,
            BlockPlan::Read => {}
        }
    }
    progress(resolved_early);

    link.register_codec(RegisterCodec {
        name: stages.codec.name.clone(),
        hash: stages.codec.hash.to_vec(),
        component: stages.codec.component.as_ref().clone(),
    })?;

    let detector = Mutex::new(stages.detector);
    let shared = worker::Shared {
        input,
        geometry,
        excluded: &excluded,
        previous,
        detector: &detector,
        codec: &stages.codec,
        codec_settings: &stages.codec_settings,
        link,
        clock: &clock,
        progress,
    };
    let batches = worker::batches(&block_plan, &geometry, worker::batch_bytes(&shared));
    let totals = worker::run_batches(&shared, batches, &mut hashes)?;
    // A live image truncated while it was read (before its allocation map
    // was taken, say) may have read as holes rather than failed a read.
    input
        .disk
        .check_intact()
        .map_err(|source| TaskError::Shrunk {
            disk: label.clone(),
            source,
        })?;
    stats.absorb(&totals);
    if totals.codec_lost_blocks > 0 {
        notices.push(format!(
            "{label}: codec '{}' decoded {} of the blocks it coded to other bytes; they were stored as they are (uncompressed). Fix or replace the codec",
            stages.codec.name, totals.codec_lost_blocks
        ));
    }
    if totals.unchanged_claims_rejected > 0 {
        notices.push(format!(
            "{label}: change detection plugin '{}' called {} changed blocks unchanged; they were stored as new",
            detector.lock().expect("detector lock").name(),
            totals.unchanged_claims_rejected
        ));
    }

    let manifest = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        job: input.job.clone(),
        vm: input.vm.clone(),
        disk: input.disk_name.clone(),
        point_id: String::new(),
        created_unix_ms: 0,
        disk_size: size,
        block_size: input.block_size,
        parent_point: previous.map(|p| p.point_id.clone()).unwrap_or_default(),
        block_hashes: hashes,
        consistency: input.consistency.as_str().into(),
        session_id: input.session_id,
        pipeline: input.pipeline.clone(),
        cbt_bitmap: input.cbt_bitmap.clone(),
        excluded: Some(previous::record(&excluded)),
        task_token: input.task_token.clone(),
    };
    let parent_point = Some(manifest.parent_point.clone()).filter(|p| !p.is_empty());
    let reply = clock.time("commit", || {
        link.commit(CommitPoint {
            manifest: Some(manifest),
            retention: input.retention,
        })
    })?;
    if reply.earlier_attempt {
        notices.push(earlier_attempt(&label, &reply.point_id));
    }
    if let Some(policy) = input.retention {
        notices.extend(crate::repository::retention::notices(
            &input.label(),
            policy,
            &reply,
        ));
    }
    stats.stored_bytes = reply.stored_bytes;
    stats.new_chunks = reply.new_chunks;
    stats.transferred_bytes = link.stats().sent_bytes;
    stats.stage_seconds = clock.seconds();
    Ok(TaskOutcome {
        point_id: reply.point_id,
        parent_point,
        stats,
        notices,
    })
}

fn earlier_attempt(label: &str, point: &str) -> String {
    format!(
        "{label}: restore point {point} was committed by an earlier attempt of this task, whose answer was lost"
    )
}

/// Whether `point` is this task's own, committed by an earlier attempt.
fn committed_by(point: &Manifest, input: &TaskInput) -> bool {
    !input.task_token.is_empty() && point.task_token == input.task_token
}

fn make_block_plan(
    geometry: &Geometry,
    allocation: &[Extent],
    excluded: &[Extent],
    plan: &crate::plugin::detect::Plan,
    has_previous: bool,
    dirty: Option<&[Extent]>,
    not_carried: &[bool],
) -> Result<Vec<BlockPlan>, String> {
    for e in plan.read.iter().chain(&plan.unchanged) {
        if e.end() > geometry.disk_size || !geometry.is_block_aligned(e) {
            return Err(format!(
                "range {}+{} is not whole blocks of {} bytes inside the disk",
                e.offset, e.length, geometry.block_size
            ));
        }
    }
    if !plan.unchanged.is_empty() && !has_previous {
        return Err("blocks called unchanged, but there is no previous restore point".into());
    }
    let covered = geometry.blocks_covered(excluded);
    let allocated = geometry.blocks_touched(allocation);
    let read = geometry.blocks_touched(&normalize(plan.read.clone(), geometry.disk_size));
    let unchanged = geometry.blocks_touched(&normalize(plan.unchanged.clone(), geometry.disk_size));
    if let Some(dirty) = dirty {
        // Changed block tracking said these blocks were written: carrying
        // them from the previous point would restore old data.
        let written = geometry.blocks_touched(dirty);
        if let Some(i) = (0..written.len()).find(|&i| written[i] && unchanged[i] && !read[i]) {
            return Err(format!(
                "block {i} was written since the previous restore point but is called unchanged"
            ));
        }
    }
    let mut out = Vec::with_capacity(covered.len());
    for i in 0..covered.len() {
        out.push(if covered[i] {
            BlockPlan::Excluded
        } else if read[i] || (unchanged[i] && not_carried.get(i).copied().unwrap_or(false)) {
            // A stale block's stored bytes are not what it holds now
            // (`previous`): a detector that calls it unchanged is overruled.
            BlockPlan::Read
        } else if unchanged[i] {
            BlockPlan::Unchanged
        } else if allocated[i] {
            return Err(format!(
                "block {i} holds data but is neither read nor carried from the previous restore point"
            ));
        } else {
            BlockPlan::Hole
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::detect::Plan;

    const G: Geometry = Geometry {
        disk_size: 4 * 1024,
        block_size: 1024,
    };

    fn plan(read: &[(u64, u64)], unchanged: &[(u64, u64)]) -> Plan {
        let ex = |v: &[(u64, u64)]| v.iter().map(|(o, l)| Extent::new(*o, *l)).collect();
        Plan {
            read: ex(read),
            unchanged: ex(unchanged),
        }
    }

    #[test]
    fn every_allocated_block_is_read_or_carried() {
        let alloc = [Extent::new(0, 4096)];
        let ok = make_block_plan(
            &G,
            &alloc,
            &[],
            &plan(&[(0, 2048)], &[(2048, 2048)]),
            true,
            None,
            &[],
        )
        .unwrap();
        assert_eq!(
            ok,
            vec![
                BlockPlan::Read,
                BlockPlan::Read,
                BlockPlan::Unchanged,
                BlockPlan::Unchanged
            ]
        );
        let dropped = make_block_plan(&G, &alloc, &[], &plan(&[(0, 2048)], &[]), true, None, &[]);
        assert!(dropped.unwrap_err().contains("block 2 holds data"));
    }

    #[test]
    fn unchanged_needs_a_previous_point_and_whole_blocks() {
        let alloc = [Extent::new(0, 4096)];
        let e = make_block_plan(&G, &alloc, &[], &plan(&[], &[(0, 4096)]), false, None, &[])
            .unwrap_err();
        assert!(e.contains("no previous restore point"), "{e}");
        let e = make_block_plan(&G, &alloc, &[], &plan(&[(100, 4000)], &[]), true, None, &[])
            .unwrap_err();
        assert!(e.contains("not whole blocks"), "{e}");
    }

    #[test]
    fn blocks_written_per_cbt_cannot_be_called_unchanged() {
        let alloc = [Extent::new(0, 4096)];
        let dirty = [Extent::new(3000, 10)];
        let e = make_block_plan(
            &G,
            &alloc,
            &[],
            &plan(&[(0, 1024)], &[(1024, 3072)]),
            true,
            Some(&dirty),
            &[],
        )
        .unwrap_err();
        assert!(e.contains("block 2 was written"), "{e}");
        let ok = make_block_plan(
            &G,
            &alloc,
            &[],
            &plan(&[(2048, 1024)], &[(0, 2048), (3072, 1024)]),
            true,
            Some(&dirty),
            &[],
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn excluded_blocks_win_over_everything() {
        let alloc = [Extent::new(0, 4096)];
        let excluded = [Extent::new(1024, 1024)];
        let p = make_block_plan(
            &G,
            &alloc,
            &excluded,
            &plan(&[(0, 4096)], &[]),
            false,
            None,
            &[],
        )
        .unwrap();
        assert_eq!(p[1], BlockPlan::Excluded);
    }

    #[test]
    fn stale_blocks_are_read_though_called_unchanged() {
        let alloc = [Extent::new(0, 4096)];
        let p = make_block_plan(
            &G,
            &alloc,
            &[],
            &plan(&[], &[(0, 4096)]),
            true,
            Some(&[]),
            &[false, true, false, false],
        )
        .unwrap();
        assert_eq!(
            p,
            [
                BlockPlan::Unchanged,
                BlockPlan::Read,
                BlockPlan::Unchanged,
                BlockPlan::Unchanged
            ]
        );
    }
}
