//! One attempt of a task whose source mover runs on a proxy agent: the
//! session assigns the task over the control channel (the snapshot disk to
//! read, the stages, the repository agent to send to, the task's rate),
//! keeps the rate up to date as the throttling rules rebalance, follows the
//! progress, and takes the result. The blocks go from the proxy to the
//! repository agent directly (seed step 5), never through this process.

use super::report::TaskReport;
use super::target::TaskFailure;
use super::{TaskContext, TaskSpec, VmState};
use crate::extent::{Extent, round_to_blocks};
use crate::pipeline::TaskStats;
use arca_transport::control::{AssignTask, SessionEvent};
use arca_transport::quic::{RemoteControl, run_remote_task};
use indicatif::ProgressBar;
use std::net::SocketAddr;
use tokio::sync::watch;

pub(super) fn run(
    ctx: &TaskContext,
    spec: &TaskSpec,
    state: &VmState,
    (proxy_addr, proxy_fingerprint): (SocketAddr, &str),
    bar: &ProgressBar,
    tr: &mut TaskReport,
) -> Result<(), TaskFailure> {
    let (net, (repo_addr, repo_fingerprint)) = match (ctx.net, ctx.repo.agent()) {
        (Some(net), Some(repo)) => (net, repo),
        _ => {
            return Err(TaskFailure::fatal(
                "a proxy agent needs a repository served by an agent",
            ));
        }
    };
    let (vm, disk_index) = (spec.vm, spec.disk_index);
    let disk = &vm.disks[disk_index];
    let share = ctx.throttles.remote(proxy_addr, repo_addr);
    if !share.names.is_empty() {
        tr.notices.push(format!(
            "{}/{}: throttled by rule(s) {}",
            vm.name,
            disk.name,
            share.names.join(", ")
        ));
    }
    let mut rate = share.rate.clone().expect("a remote share has a rate");
    let changes = state.snap.changes(disk_index);
    let assign = AssignTask {
        job: ctx.job.name.clone(),
        vm: vm.name.clone(),
        disk: disk.name.clone(),
        session_id: ctx.session_id,
        source: Some(state.snap.locator(disk_index)),
        block_size: ctx.job.block_size,
        pipeline: ctx.job.pipeline.name.clone(),
        stages: ctx.specs.to_vec(),
        consistency: state.consistency.as_str().into(),
        has_dirty: changes.is_some(),
        dirty: changes
            .iter()
            .flat_map(|c| dirty_ranges(&c.extents, ctx.job.block_size))
            .flat_map(|e| [e.offset, e.length])
            .collect(),
        cbt_bitmap: state.snap.cbt_bitmap(disk_index),
        dirty_since: changes.map(|c| c.since).unwrap_or_default(),
        repository_addr: repo_addr.to_string(),
        repository_fingerprint: repo_fingerprint.to_owned(),
        rate: *rate.borrow_and_update(),
        workers: ctx.workers as u32,
        retention: ctx.job.retention.map(Into::into),
        task_token: spec.token.clone(),
    };
    tr.consistency = Some(state.consistency.as_str().into());
    // Nothing cancels a task yet but the end of this process, which the
    // proxy sees as its control stream closing.
    let (_cancel, cancel) = watch::channel(None);
    let result = run_remote_task(
        net.rt.handle(),
        proxy_addr,
        proxy_fingerprint,
        &net.identity,
        assign,
        RemoteControl { rate, cancel },
        &mut |event| {
            if let SessionEvent::Progress {
                done_bytes,
                disk_bytes,
            } = event
            {
                bar.set_length(disk_bytes);
                bar.set_position(done_bytes);
            }
        },
    )
    .map_err(|e| {
        let mut f = TaskFailure::from_link(e);
        f.message = format!("{}/{}: {}", vm.name, disk.name, f.message);
        f
    })?;
    drop(share);
    tr.notices.extend(result.notices);
    if !result.ok {
        return Err(TaskFailure {
            message: result.error,
            retryable: result.retryable,
        });
    }
    // The restore point is committed whatever happens to its statistics.
    let stats: TaskStats = serde_json::from_str(&result.stats_json).unwrap_or_else(|e| {
        tr.notices.push(format!(
            "{}/{}: the proxy's statistics are unreadable ({e}); the report counts nothing for this task",
            vm.name, disk.name
        ));
        TaskStats::default()
    });
    state.snap.task_succeeded(disk_index);
    tr.parent_point = (!result.parent_point.is_empty()).then_some(result.parent_point);
    tr.restore_point = Some(result.point_id);
    tr.stats = Some(stats);
    Ok(())
}

/// A bitmap's changed ranges as sent to a proxy: as they are, unless there
/// are so many that the assignment could outgrow its control frame (16
/// bytes per range, 64 MiB): then widened to whole blocks and merged, which
/// is what the task reads of them anyway (its report then counts whole
/// blocks as changed).
fn dirty_ranges(extents: &[Extent], block_size: u32) -> Vec<Extent> {
    const AS_THEY_ARE: usize = 1 << 20;
    if extents.len() <= AS_THEY_ARE {
        return extents.to_vec();
    }
    round_to_blocks(extents, u64::from(block_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_changed_ranges_go_to_a_proxy_as_whole_blocks() {
        let few = [Extent::new(10, 5), Extent::new(4096, 1)];
        assert_eq!(dirty_ranges(&few, 1024), few, "as they are");
        // Two small ranges in each of 600 Ki blocks, every other block.
        let many: Vec<Extent> = (0..600u64 << 10)
            .flat_map(|b| [Extent::new(b * 2048, 8), Extent::new(b * 2048 + 512, 8)])
            .collect();
        let sent = dirty_ranges(&many, 1024);
        assert_eq!(sent.len(), 600 << 10);
        assert_eq!(sent[1], Extent::new(2048, 1024));
    }
}
