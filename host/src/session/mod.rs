//! A backup session (seed steps 1–11 on one machine): reads the job from the
//! configuration database, makes one task per VM disk, lets the scheduler
//! place tasks on proxy and repository slots, snapshots each VM once, runs a
//! source mover per task against a target mover on the repository, and
//! reports.
//!
//! The embedded default runs the proxy and repository roles in this process
//! and joins the movers with the in-process link.

pub mod guest;
pub mod report;
pub mod scheduler;
pub mod target;
pub mod throttle;

use crate::config::GuestMode;
use crate::config::{ConfigDb, DbError, JobSettings, StageSettings, VmSettings};
use crate::pipeline::{self, Stages, TaskInput};
use crate::plugin::codec::Codec;
use crate::plugin::detect::Detector;
use crate::plugin::exclude::Excluder;
use crate::plugin::{Plugin, PluginError, PluginLimits, PluginRuntime, StageKind, builtin};
use crate::repository::RepositoryError;
use crate::source::image_file::{DiskSource, ImageSnapshot, sweep_orphans};
use crate::source::qemu::{DiskRequest, QemuSnapshot};
use crate::source::qemu_export::sweep_exports;
use crate::source::{Consistency, DiskRead, VmSnapshot};
use arca_transport::quic::OpenTask;
use guest::GuestRun;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use report::{SessionReport, TaskReport, TaskState};
use scheduler::Scheduler;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use target::{RepoAccess, TaskFailure};

/// Attempts per task when the link to the repository is lost.
const MAX_ATTEMPTS: u32 = 3;
/// Pause before a retry, times the attempt number.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("repository: {0}")]
    Target(String),
    #[error("plugin '{name}': cannot read {path}: {source}")]
    PluginFile {
        name: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub struct SessionOptions {
    /// Where this installation's identity (for agents) lives.
    pub identity_dir: std::path::PathBuf,
    /// Worker threads per task (codec instances); 0 means one per core.
    pub workers_per_task: usize,
    pub show_progress: bool,
}

/// The pipeline's plugins, loaded once per session.
struct LoadedPipeline {
    detect: (Plugin, Vec<(String, String)>),
    exclusions: Vec<(Plugin, Vec<(String, String)>)>,
    codec: (Plugin, Vec<(String, String)>),
    /// The guest hook, when the job's guest processing is on.
    guest: Option<(Plugin, Vec<(String, String)>)>,
}

/// A VM's snapshot as its tasks see it.
struct VmState {
    snap: VmSnapshot,
    consistency: Consistency,
}

impl LoadedPipeline {
    fn load(job: &JobSettings, runtime: &PluginRuntime) -> Result<Self, SessionError> {
        let one = |stage: &StageSettings,
                   kind: StageKind|
         -> Result<(Plugin, Vec<(String, String)>), SessionError> {
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
            let bytes = std::fs::read(&def.path).map_err(|source| SessionError::PluginFile {
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
        })
    }

    /// Fresh stage instances for one task.
    fn instantiate(&self) -> Result<Stages, PluginError> {
        // Instantiating the codec once here surfaces a bad setting before any
        // data is read; workers make their own instances.
        drop(Codec::new(&self.codec.0, &self.codec.1)?);
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

struct TaskSpec<'a> {
    vm: &'a VmSettings,
    disk_index: usize,
}

struct TaskDone {
    index: usize,
    proxy: String,
    report: TaskReport,
}

pub fn run_job(
    db: &ConfigDb,
    runtime: &PluginRuntime,
    job_name: &str,
    opts: &SessionOptions,
) -> Result<SessionReport, SessionError> {
    let job = db.load_job(job_name)?;
    let session_id = db.begin_session(&job.name)?;
    let started = Instant::now();
    let mut report = SessionReport {
        session_id,
        job: job.name.clone(),
        state: "running".into(),
        repository: job.repository.name.clone(),
        started: jiff::Timestamp::now().to_string(),
        duration_seconds: 0.0,
        tasks: Vec::new(),
        totals: Default::default(),
        compression_ratio: 1.0,
        dedup_ratio: 1.0,
        read_mb_per_second: 0.0,
        bottleneck: None,
        notices: Vec::new(),
        log: Vec::new(),
        guest: Vec::new(),
    };
    let result = run_tasks(db, runtime, &job, session_id, opts, &mut report);
    report.duration_seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => report.finish(),
        Err(e) => {
            report.finish();
            report.state = "failed".into();
            report.notices.push(e.to_string());
            let json = serde_json::to_string(&report).unwrap_or_default();
            db.end_session(session_id, "failed", &json)?;
            return Err(e);
        }
    }
    let json = serde_json::to_string(&report).unwrap_or_default();
    db.end_session(session_id, &report.state, &json)?;
    Ok(report)
}

fn run_tasks(
    db: &ConfigDb,
    runtime: &PluginRuntime,
    job: &JobSettings,
    session_id: u64,
    opts: &SessionOptions,
    report: &mut SessionReport,
) -> Result<(), SessionError> {
    let repo =
        RepoAccess::open(&job.repository, &opts.identity_dir).map_err(SessionError::Target)?;
    let swept = repo.sweep().map_err(SessionError::Target)?;
    if swept > 0 {
        report.notices.push(format!(
            "removed {swept} unfinished restore point(s) left in repository '{}' by an interrupted session",
            job.repository.name
        ));
    }
    let all_disks: Vec<_> = job
        .vms
        .iter()
        .filter(|v| v.hypervisor.is_none())
        .flat_map(|v| v.disks.iter().map(|d| d.path.clone()))
        .collect();
    for orphan in sweep_orphans(&all_disks) {
        report.notices.push(format!(
            "removed snapshot {} left by an interrupted session",
            orphan.display()
        ));
    }
    for orphan in sweep_exports(&export_dir()) {
        report.notices.push(format!(
            "removed disk export {} left by an interrupted session",
            orphan.display()
        ));
    }
    let pipeline = LoadedPipeline::load(job, runtime)?;
    let throttles = throttle::Throttles::new(&job.throttles);

    let tasks: Vec<TaskSpec> = job
        .vms
        .iter()
        .flat_map(|vm| (0..vm.disks.len()).map(move |disk_index| TaskSpec { vm, disk_index }))
        .collect();
    let mut scheduler = Scheduler::new(&job.proxies, &job.repository, tasks.len());
    report.log.push(format!(
        "{} task(s); proxies: {}; repository '{}' with {} slot(s)",
        tasks.len(),
        job.proxies
            .iter()
            .map(|p| format!("{} ({} slots)", p.name, p.max_tasks))
            .collect::<Vec<_>>()
            .join(", "),
        job.repository.name,
        job.repository.max_tasks
    ));
    let workers = if opts.workers_per_task == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.workers_per_task
    };
    let bars = MultiProgress::with_draw_target(if opts.show_progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template(
        "{prefix:>20} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");

    // Snapshots are per VM (all disks at one instant) and shared by the VM's
    // tasks; the last task to finish drops the snapshot, which removes it.
    let mut snapshots: HashMap<&str, Arc<VmState>> = HashMap::new();
    let mut failed_vms: HashMap<&str, String> = HashMap::new();
    let mut guests: HashMap<&str, GuestRun> = HashMap::new();
    let mut vm_ok: HashMap<&str, bool> = HashMap::new();
    let mut remaining: HashMap<&str, usize> = HashMap::new();
    for t in &tasks {
        *remaining.entry(t.vm.name.as_str()).or_default() += 1;
    }
    let queued_at = Instant::now();
    let mut results: Vec<Option<TaskReport>> = vec![None; tasks.len()];
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<TaskDone>();
    std::thread::scope(|scope| {
        let mut running = 0usize;
        loop {
            while let Some(assign) = scheduler.next_assignment() {
                let spec = &tasks[assign.task];
                let vm = spec.vm;
                let disk = &vm.disks[spec.disk_index];
                report.log.push(format!(
                    "task {}/{} assigned to proxy '{}' and repository '{}' after {:.1} s in queue",
                    vm.name,
                    disk.name,
                    assign.proxy,
                    job.repository.name,
                    queued_at.elapsed().as_secs_f64()
                ));
                let snapshot = match (
                    snapshots.get(vm.name.as_str()),
                    failed_vms.get(vm.name.as_str()),
                ) {
                    (Some(s), _) => Ok(s.clone()),
                    // The VM's snapshot failed for an earlier disk: same answer,
                    // without running its guest hooks again.
                    (None, Some(e)) => Err(e.clone()),
                    (None, None) => {
                        let mut guest = match (&job.guest, &pipeline.guest) {
                            (Some(g), Some(p)) => Some(GuestRun::before_snapshot(g, p, vm)),
                            _ => None,
                        };
                        let taken = match guest.as_ref().and_then(|g| g.fatal.clone()) {
                            Some(fatal) => Err(fatal),
                            None => {
                                let snap = take_snapshot(job, session_id, vm, &repo);
                                if let Some(g) = guest.as_mut() {
                                    g.after_snapshot(snap.is_ok());
                                }
                                match (snap, guest.as_ref().and_then(|g| g.fatal.clone())) {
                                    (Ok(_), Some(fatal)) => Err(fatal),
                                    (Ok(snap), None) => {
                                        let app = guest
                                            .as_ref()
                                            .is_some_and(GuestRun::application_consistent);
                                        let consistency = match snap.consistency() {
                                            Consistency::CrashConsistent if app => {
                                                Consistency::ApplicationConsistent
                                            }
                                            c => c,
                                        };
                                        if let Some(g) = guest.as_mut() {
                                            g.confirm_consistency(
                                                consistency == Consistency::ApplicationConsistent,
                                            );
                                        }
                                        Ok(VmState { snap, consistency })
                                    }
                                    (Err(e), _) => Err(e),
                                }
                            }
                        };
                        if let Some(g) = guest {
                            guests.insert(vm.name.as_str(), g);
                        }
                        match taken {
                            Ok(state) => {
                                report.notices.extend(state.snap.notices().iter().cloned());
                                let s = Arc::new(state);
                                snapshots.insert(vm.name.as_str(), s.clone());
                                Ok(s)
                            }
                            Err(e) => {
                                failed_vms.insert(vm.name.as_str(), e.clone());
                                Err(e)
                            }
                        }
                    }
                };
                let queued = queued_at.elapsed().as_secs_f64();
                let tx = done_tx.clone();
                let bar = bars.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{}/{}", vm.name, disk.name));
                let pipeline = &pipeline;
                let repo = &repo;
                let throttles = &throttles;
                running += 1;
                scope.spawn(move || {
                    let started = Instant::now();
                    let mut tr = TaskReport {
                        vm: vm.name.clone(),
                        disk: disk.name.clone(),
                        proxy: Some(assign.proxy.clone()),
                        state: TaskState::Failed,
                        error: None,
                        restore_point: None,
                        parent_point: None,
                        consistency: None,
                        queued_seconds: queued,
                        seconds: 0.0,
                        stats: None,
                        notices: Vec::new(),
                    };
                    let outcome = snapshot.map_err(TaskFailure::fatal).and_then(|snap| {
                        // A lost link (an agent died, a connection dropped) is
                        // retried on a fresh connection; chunks an earlier
                        // attempt committed are not sent again (dedup).
                        let mut attempt = 1;
                        loop {
                            match run_one(job, session_id, vm, spec.disk_index, &snap, pipeline, repo, throttles, workers, &bar, &mut tr) {
                                Err(f) if f.retryable && attempt < MAX_ATTEMPTS => {
                                    tr.notices.push(format!(
                                        "{}/{}: attempt {attempt} lost its link to the repository ({}); retrying",
                                        vm.name, disk.name, f.message
                                    ));
                                    std::thread::sleep(RETRY_PAUSE * attempt);
                                    bar.set_position(0);
                                    attempt += 1;
                                }
                                Err(f) if f.retryable => {
                                    break Err(TaskFailure::fatal(format!("{} (gave up after {attempt} attempts)", f.message)));
                                }
                                other => break other,
                            }
                        }
                    });
                    match outcome {
                        Ok(()) => tr.state = TaskState::Success,
                        Err(f) => tr.error = Some(f.message),
                    }
                    tr.seconds = started.elapsed().as_secs_f64();
                    bar.finish_and_clear();
                    let _ = tx.send(TaskDone {
                        index: assign.task,
                        proxy: assign.proxy,
                        report: tr,
                    });
                });
            }
            if running == 0 {
                break;
            }
            if let Some(reason) = scheduler.wait_reason() {
                report
                    .log
                    .push(format!("{} task(s) waiting: {reason}", scheduler.waiting()));
            }
            let done = done_rx.recv().expect("a running task always reports");
            running -= 1;
            scheduler.release(&done.proxy);
            let spec = &tasks[done.index];
            let vm_name = spec.vm.name.as_str();
            *vm_ok.entry(vm_name).or_insert(true) &= done.report.state == TaskState::Success;
            let left = remaining.get_mut(vm_name).expect("counted");
            *left -= 1;
            if *left == 0 {
                // Clean-up of the snapshot first, then the post-backup hook.
                snapshots.remove(vm_name);
                if let Some(g) = guests.remove(vm_name) {
                    let (r, notices) = g.after_backup(vm_ok[vm_name]);
                    report.guest.push(r);
                    report.notices.extend(notices);
                }
            }
            results[done.index] = Some(done.report);
        }
    });
    for r in results {
        let r = r.expect("every task reported");
        report.notices.extend(r.notices.iter().cloned());
        let stats = r
            .stats
            .as_ref()
            .map(|s| serde_json::to_string(s).unwrap_or_default());
        db.record_task(
            session_id,
            &r.vm,
            &r.disk,
            r.proxy.as_deref(),
            &job.repository.name,
            if r.state == TaskState::Success {
                "success"
            } else {
                "failed"
            },
            r.error.as_deref(),
            stats.as_deref(),
        )?;
        if let (Some(point), Some(st)) = (&r.restore_point, &r.stats) {
            db.record_point(
                point,
                session_id,
                &job.name,
                &r.vm,
                &r.disk,
                &job.repository.name,
                st.disk_bytes,
                st.stored_bytes,
            )?;
        }
        report.tasks.push(r);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    job: &JobSettings,
    session_id: u64,
    vm: &VmSettings,
    disk_index: usize,
    state: &VmState,
    pipeline: &LoadedPipeline,
    repo: &RepoAccess,
    throttles: &throttle::Throttles,
    workers: usize,
    bar: &ProgressBar,
    tr: &mut TaskReport,
) -> Result<(), TaskFailure> {
    let disk_name = &vm.disks[disk_index].name;
    let opened = repo.open_task(
        &OpenTask {
            job: job.name.clone(),
            vm: vm.name.clone(),
            disk: disk_name.clone(),
            session_id,
        },
        throttles,
    )?;
    let (link, previous, rules) = (opened.link, opened.previous, opened.throttled_by);
    if !rules.is_empty() {
        tr.notices.push(format!(
            "{}/{}: throttled by rule(s) {}",
            vm.name,
            disk_name,
            rules.join(", ")
        ));
    }
    tr.parent_point = previous.as_ref().map(|p| p.point_id.clone());
    let disk: Arc<dyn DiskRead> = state.snap.disk(disk_index);
    bar.set_length(disk.size());
    let input = TaskInput {
        job: job.name.clone(),
        vm: vm.name.clone(),
        disk_name: disk_name.clone(),
        disk,
        block_size: job.block_size,
        previous,
        consistency: state.consistency,
        session_id,
        pipeline: job.pipeline.name.clone(),
        workers,
        dirty: state.snap.dirty(disk_index),
        cbt_bitmap: state.snap.cbt_bitmap(disk_index),
    };
    tr.consistency = Some(state.consistency.as_str().into());
    let stages = pipeline
        .instantiate()
        .map_err(|e| TaskFailure::fatal(e.to_string()))?;
    let progress = |n: u64| bar.inc(n);
    let outcome =
        pipeline::run(&input, stages, link.as_ref(), &progress).map_err(|e| TaskFailure {
            retryable: matches!(
                e,
                pipeline::TaskError::Link(arca_transport::LinkError::Lost(_))
            ),
            message: format!("{}: {e}", input.label()),
        })?;
    state.snap.task_succeeded(disk_index);
    tr.restore_point = Some(outcome.point_id);
    tr.stats = Some(outcome.stats);
    tr.notices.extend(outcome.notices);
    Ok(())
}

/// Takes the point-in-time snapshot of one VM from its source.
fn take_snapshot(
    job: &JobSettings,
    session_id: u64,
    vm: &VmSettings,
    repo: &RepoAccess,
) -> Result<VmSnapshot, String> {
    match &vm.hypervisor {
        None => {
            let sources: Vec<DiskSource> = vm
                .disks
                .iter()
                .map(|d| DiskSource {
                    path: d.path.clone(),
                    format: d.format,
                })
                .collect();
            let tag = format!("s{session_id}");
            ImageSnapshot::take(&sources, &tag, vm.powered_off, &export_dir())
                .map(VmSnapshot::Image)
                .map_err(|e| e.to_string())
        }
        Some(h) => {
            let mut requests = Vec::new();
            for d in &vm.disks {
                let previous = repo.latest(&OpenTask {
                    job: job.name.clone(),
                    vm: vm.name.clone(),
                    disk: d.name.clone(),
                    session_id,
                })?;
                requests.push(DiskRequest {
                    node: d.node.clone().unwrap_or_default(),
                    previous_bitmap: previous.map(|p| p.cbt_bitmap).filter(|b| !b.is_empty()),
                });
            }
            QemuSnapshot::take(h, &job.name, session_id, &requests, &export_dir())
                .map(VmSnapshot::Qemu)
                .map_err(|e| format!("snapshot of vm '{}': {e}", vm.name))
        }
    }
}

/// Where QEMU exports of non-raw disks are mounted: `ARCA_EXPORT_DIR`, or
/// `arca-exports` in the temporary folder.
pub fn export_dir() -> std::path::PathBuf {
    std::env::var_os("ARCA_EXPORT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("arca-exports"))
}
