//! The proxy role: runs the source mover of each task a session assigns.
//! It opens the snapshot disk the session names, loads the pipeline's
//! stages from the components the session sent, connects to the repository
//! agent itself (seed step 5: the data goes from proxy to repository, not
//! through the backup server), and reports progress on the task's control
//! stream.

use crate::extent::Extent;
use crate::pipeline::{self, LoadedPipeline, TaskInput};
use crate::plugin::PluginRuntime;
use crate::session::target::TaskFailure;
use crate::source::image_file::RawImage;
use crate::source::nbd::{NbdClient, NbdDisk};
use crate::source::{Changes, Consistency, DiskRead};
use arca_transport::control::{AssignTask, DiskLocator, TaskResult};
use arca_transport::quic::{Identity, OpenTask, ProxyService, QuicLink, TaskControl};
use arca_transport::throttle::ThrottledLink;
use arca_transport::{CancellableLink, TargetLink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct ProxyRole {
    name: String,
    identity: Identity,
    runtime: PluginRuntime,
    rt: tokio::runtime::Handle,
}

impl ProxyRole {
    pub fn new(
        name: String,
        identity: Identity,
        cache: Option<PathBuf>,
        rt: tokio::runtime::Handle,
    ) -> Result<Self, String> {
        let runtime = PluginRuntime::new(cache).map_err(|e| e.to_string())?;
        Ok(Self {
            name,
            identity,
            runtime,
            rt,
        })
    }

    fn run(&self, a: AssignTask, control: &TaskControl) -> Result<TaskResult, TaskFailure> {
        let fatal = |e: &dyn std::fmt::Display| TaskFailure::fatal(e.to_string());
        let label = format!("{}/{}", a.vm, a.disk);
        let loaded = LoadedPipeline::from_specs(&a.stages, &self.runtime).map_err(|e| fatal(&e))?;
        // A proxy that cannot reach the snapshot (another host, storage it
        // does not see) may be the wrong proxy, not a broken task: another
        // proxy may reach it.
        let disk =
            open_disk(a.source.as_ref().unwrap_or(&DiskLocator::default())).map_err(|e| {
                TaskFailure {
                    message: format!(
                        "{label}: proxy '{}' cannot read the snapshot: {e}",
                        self.name
                    ),
                    retryable: true,
                }
            })?;
        let addr = a.repository_addr.parse().map_err(|_| {
            TaskFailure::fatal(format!(
                "repository agent '{}' is not an address",
                a.repository_addr
            ))
        })?;
        let open = OpenTask {
            job: a.job.clone(),
            vm: a.vm.clone(),
            disk: a.disk.clone(),
            session_id: a.session_id,
            header_only: false,
        };
        let link = QuicLink::connect(
            &self.rt,
            addr,
            &a.repository_fingerprint,
            &self.identity,
            &open,
        )
        .map_err(TaskFailure::from_link)?;
        let previous = link.latest(&open).map_err(TaskFailure::from_link)?;
        let link: Box<dyn TargetLink> = match control.bucket() {
            Some(b) => Box::new(ThrottledLink::new(Box::new(link), vec![b])),
            None => Box::new(link),
        };
        let link = CancellableLink::new(link, control.cancel_flag());
        let changes = a.has_dirty.then(|| Changes {
            since: a.dirty_since,
            extents: a
                .dirty
                .chunks_exact(2)
                .map(|p| Extent {
                    offset: p[0],
                    length: p[1],
                })
                .collect(),
        });
        let size = disk.size();
        let input = TaskInput {
            job: a.job,
            vm: a.vm,
            disk_name: a.disk,
            disk,
            block_size: a.block_size,
            previous,
            consistency: Consistency::parse(&a.consistency).unwrap_or(Consistency::PoweredOffOnly),
            session_id: a.session_id,
            pipeline: a.pipeline,
            workers: match a.workers {
                0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
                n => n as usize,
            },
            changes,
            cbt_bitmap: a.cbt_bitmap,
            retention: a.retention,
            task_token: a.task_token,
        };
        let stages = loaded.instantiate().map_err(|e| fatal(&e))?;
        let done = AtomicU64::new(0);
        let progress = |n: u64| {
            let now = done.fetch_add(n, Ordering::Relaxed) + n;
            control.progress(now.min(size), size);
        };
        let outcome = pipeline::run(&input, stages, &link, &progress).map_err(|e| TaskFailure {
            retryable: matches!(
                e,
                pipeline::TaskError::Link(arca_transport::LinkError::Lost(_))
            ),
            message: format!("{label}: {e}"),
        })?;
        Ok(TaskResult {
            ok: true,
            point_id: outcome.point_id,
            parent_point: outcome.parent_point.unwrap_or_default(),
            stats_json: serde_json::to_string(&outcome.stats).unwrap_or_default(),
            notices: outcome.notices,
            error: String::new(),
            retryable: false,
        })
    }
}

fn open_disk(at: &DiskLocator) -> Result<Arc<dyn DiskRead>, String> {
    if !at.path.is_empty() {
        return RawImage::open_mapped(Path::new(&at.path))
            .map(|d| Arc::new(d) as Arc<dyn DiskRead>)
            .map_err(|e| e.to_string());
    }
    if !at.nbd_socket.is_empty() {
        let contexts: Vec<&str> = at.nbd_contexts.iter().map(String::as_str).collect();
        return NbdClient::connect(Path::new(&at.nbd_socket), &at.nbd_export, &contexts)
            .map(|c| Arc::new(NbdDisk::new(c)) as Arc<dyn DiskRead>)
            .map_err(|e| e.to_string());
    }
    Err("the assignment names no disk to read".into())
}

impl ProxyService for ProxyRole {
    fn run_task(&self, task: AssignTask, control: &TaskControl) -> TaskResult {
        self.run(task, control).unwrap_or_else(|f| TaskResult {
            error: f.message,
            retryable: f.retryable,
            ..Default::default()
        })
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}
