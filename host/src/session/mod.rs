//! A backup session (seed steps 1–11 on one machine): reads the job from the
//! configuration database, makes one task per VM disk, lets the scheduler
//! place tasks on proxy and repository slots, snapshots each VM once, runs a
//! source mover per task against a target mover on the repository, and
//! reports.
//!
//! The embedded default runs the proxy and repository roles in this process
//! and joins the movers with the in-process link. A proxy served by an
//! `arca agent` runs the task's source mover there (`remote.rs`); a task
//! whose link is lost is queued again, for another proxy when there is one.

pub mod guest;
pub mod lock;
mod remote;
pub mod report;
pub mod scheduler;
pub mod target;
pub mod throttle;

use crate::config::{ConfigDb, DbError, JobSettings, VmSettings};
use crate::pipeline::{self, LoadError, LoadedPipeline, TaskInput};
use crate::plugin::{PluginError, PluginRuntime};
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
use target::{Network, RepoAccess, TaskFailure};

/// Attempts per task when a link (to the repository, or to the proxy agent)
/// is lost.
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
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("repository: {0}")]
    Target(String),
    #[error("proxies: {0}")]
    Proxy(String),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
}

pub struct SessionOptions {
    /// Where this installation's identity (for agents) lives.
    pub identity_dir: std::path::PathBuf,
    /// Worker threads per task (codec instances); 0 means one per core.
    pub workers_per_task: usize,
    pub show_progress: bool,
    /// Where the job locks live (`lock::JobLock`): one session per job.
    pub lock_dir: std::path::PathBuf,
}

/// A VM's snapshot as its tasks see it.
struct VmState {
    snap: VmSnapshot,
    consistency: Consistency,
}

struct TaskSpec<'a> {
    vm: &'a VmSettings,
    disk_index: usize,
    /// Random, the same in each attempt (`Manifest::task_token`).
    token: Vec<u8>,
}

struct TaskDone {
    index: usize,
    proxy: String,
    report: TaskReport,
    failure: Option<TaskFailure>,
}

/// Where a proxy runs its source movers.
enum ProxyPlace {
    /// In this process (the embedded default).
    Local,
    /// On an `arca agent` with the proxy role.
    Agent {
        addr: std::net::SocketAddr,
        fingerprint: String,
    },
}

pub fn run_job(
    db: &ConfigDb,
    runtime: &PluginRuntime,
    job_name: &str,
    opts: &SessionOptions,
) -> Result<SessionReport, SessionError> {
    let job = db.load_job(job_name)?;
    let _lock = lock::JobLock::acquire(&opts.lock_dir, &job.name)?;
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
    let mut net_made: Option<Arc<Network>> = None;
    let mut net = || -> Result<Arc<Network>, String> {
        if let Some(n) = &net_made {
            return Ok(n.clone());
        }
        let n = Arc::new(Network::new(&opts.identity_dir)?);
        net_made = Some(n.clone());
        Ok(n)
    };
    let repo = RepoAccess::open(&job.repository, &mut net).map_err(SessionError::Target)?;
    let mut places: HashMap<&str, ProxyPlace> = HashMap::new();
    let mut unreachable = Vec::new();
    for p in &job.proxies {
        let place = match (&p.agent, &p.fingerprint) {
            (Some(agent), Some(fingerprint)) => {
                let addr: std::net::SocketAddr = agent.parse().map_err(|_| {
                    SessionError::Proxy(format!(
                        "proxy '{}': agent '{agent}' is not an address",
                        p.name
                    ))
                })?;
                if repo.agent().is_none() {
                    return Err(SessionError::Proxy(format!(
                        "proxy '{}' runs on an agent, so repository '{}' must be served by an agent too (its movers talk to each other directly)",
                        p.name, job.repository.name
                    )));
                }
                let n = net().map_err(SessionError::Proxy)?;
                // Only proxies that answer take tasks.
                if let Err(e) = arca_transport::quic::QuicLink::status(
                    n.rt.handle(),
                    addr,
                    fingerprint,
                    &n.identity,
                ) {
                    unreachable.push((p.name.clone(), e.to_string()));
                }
                ProxyPlace::Agent {
                    addr,
                    fingerprint: fingerprint.clone(),
                }
            }
            _ => ProxyPlace::Local,
        };
        places.insert(p.name.as_str(), place);
    }
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
    // Sent to proxy agents with each assignment.
    let specs = if places
        .values()
        .any(|p| matches!(p, ProxyPlace::Agent { .. }))
    {
        pipeline.specs()
    } else {
        Vec::new()
    };
    let throttles = throttle::Throttles::new(&job.throttles);

    let tasks: Vec<TaskSpec> = job
        .vms
        .iter()
        .flat_map(|vm| {
            (0..vm.disks.len()).map(move |disk_index| TaskSpec {
                vm,
                disk_index,
                token: rand::random::<[u8; 16]>().to_vec(),
            })
        })
        .collect();
    let mut scheduler = Scheduler::new(&job.proxies, &job.repository, tasks.len());
    for (name, why) in &unreachable {
        scheduler.disable(name);
        report.log.push(format!(
            "proxy '{name}' is out of service for this session: {why}"
        ));
    }
    if !scheduler.usable() {
        return Err(SessionError::Proxy(format!(
            "no proxy of job '{}' can take tasks; start their agents, or check `agent` and `fingerprint` of each [[proxy]] (`arca agent status` tests one): {}",
            job.name,
            unreachable
                .iter()
                .map(|(n, why)| format!("'{n}': {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
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
        default_workers(job, tasks.len())
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
    // Reports of tasks being retried, and how many attempts each has had.
    let mut carried: Vec<Option<TaskReport>> = vec![None; tasks.len()];
    let mut attempts: Vec<u32> = vec![0; tasks.len()];
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
                attempts[assign.task] += 1;
                let attempt = attempts[assign.task];
                let carried = carried[assign.task].take();
                let place = &places[assign.proxy.as_str()];
                let ctx = TaskContext {
                    job,
                    session_id,
                    pipeline: &pipeline,
                    specs: &specs,
                    repo: &repo,
                    net: net_made.as_deref(),
                    throttles: &throttles,
                    workers,
                };
                running += 1;
                scope.spawn(move || {
                    let started = Instant::now();
                    let mut tr = carried.unwrap_or_else(|| TaskReport {
                        vm: vm.name.clone(),
                        disk: disk.name.clone(),
                        proxy: None,
                        state: TaskState::Failed,
                        error: None,
                        restore_point: None,
                        parent_point: None,
                        consistency: None,
                        queued_seconds: queued,
                        seconds: 0.0,
                        stats: None,
                        notices: Vec::new(),
                    });
                    tr.proxy = Some(assign.proxy.clone());
                    let outcome = TaskFailure::guard(|| {
                        snapshot
                            .map_err(TaskFailure::fatal)
                            .and_then(|snap| match place {
                                ProxyPlace::Local => run_one(&ctx, spec, &snap, &bar, &mut tr),
                                ProxyPlace::Agent { addr, fingerprint } => remote::run(
                                    &ctx,
                                    spec,
                                    &snap,
                                    (*addr, fingerprint),
                                    &bar,
                                    &mut tr,
                                ),
                            })
                    });
                    let failure = match outcome {
                        Ok(()) => {
                            tr.state = TaskState::Success;
                            tr.error = None;
                            None
                        }
                        // A lost link (an agent died, a connection dropped):
                        // the task is queued again; chunks an earlier attempt
                        // sent are not sent again (dedup).
                        Err(f) if f.retryable && attempt < MAX_ATTEMPTS => {
                            tr.notices.push(format!(
                                "{}/{}: attempt {attempt} on proxy '{}' failed ({}); retrying",
                                vm.name, disk.name, assign.proxy, f.message
                            ));
                            std::thread::sleep(RETRY_PAUSE * attempt);
                            Some(f)
                        }
                        Err(f) => {
                            tr.error = Some(if f.retryable {
                                format!("{} (gave up after {attempt} attempts)", f.message)
                            } else {
                                f.message
                            });
                            None
                        }
                    };
                    tr.seconds += started.elapsed().as_secs_f64();
                    bar.finish_and_clear();
                    let _ = tx.send(TaskDone {
                        index: assign.task,
                        proxy: assign.proxy,
                        report: tr,
                        failure,
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
            if done.failure.is_some() {
                report.log.push(format!(
                    "task {}/{} queued again after attempt {} on proxy '{}' failed",
                    done.report.vm, done.report.disk, attempts[done.index], done.proxy
                ));
                scheduler.retry(done.index, &done.proxy);
                carried[done.index] = Some(done.report);
                continue;
            }
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
        // The task's outcome stands whatever the database says: its restore
        // point is committed, and the repository lists it (`arca points`).
        let recorded = db
            .record_task(
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
            )
            .and_then(|()| match (&r.restore_point, &r.stats) {
                (Some(point), Some(st)) => db.record_point(
                    point,
                    session_id,
                    &job.name,
                    &r.vm,
                    &r.disk,
                    &job.repository.name,
                    st.disk_bytes,
                    st.stored_bytes,
                ),
                _ => Ok(()),
            });
        if let Err(e) = recorded {
            report.notices.push(format!(
                "{}/{}: the configuration database did not record this task ({e}); its outcome stands{}",
                r.vm,
                r.disk,
                r.restore_point
                    .as_deref()
                    .map(|p| format!(" and restore point {p} is in the repository"))
                    .unwrap_or_default()
            ));
        }
        report.tasks.push(r);
    }
    Ok(())
}

/// What every task of a session shares.
struct TaskContext<'a> {
    job: &'a JobSettings,
    session_id: u64,
    pipeline: &'a LoadedPipeline,
    /// The data stages as sent to proxy agents (empty without any).
    specs: &'a [arca_transport::control::StageSpec],
    repo: &'a RepoAccess,
    net: Option<&'a Network>,
    throttles: &'a throttle::Throttles,
    workers: usize,
}

/// One attempt of a task whose source mover runs in this process.
fn run_one(
    ctx: &TaskContext,
    spec: &TaskSpec,
    state: &VmState,
    bar: &ProgressBar,
    tr: &mut TaskReport,
) -> Result<(), TaskFailure> {
    let TaskContext {
        job,
        session_id,
        pipeline,
        repo,
        throttles,
        workers,
        ..
    } = *ctx;
    let (vm, disk_index) = (spec.vm, spec.disk_index);
    let disk_name = &vm.disks[disk_index].name;
    let opened = repo.open_task(
        &OpenTask {
            job: job.name.clone(),
            vm: vm.name.clone(),
            disk: disk_name.clone(),
            session_id,
            header_only: false,
        },
        throttles,
    )?;
    let (link, previous, share) = (opened.link, opened.previous, opened.share);
    let rules = share.as_ref().map(|s| s.names.clone()).unwrap_or_default();
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
        changes: state.snap.changes(disk_index),
        cbt_bitmap: state.snap.cbt_bitmap(disk_index),
        retention: job.retention.map(Into::into),
        task_token: spec.token.clone(),
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
    tr.parent_point = outcome.parent_point;
    tr.stats = Some(outcome.stats);
    tr.notices.extend(outcome.notices);
    Ok(())
}

/// Coders per task when the operator did not say: the cores divided among
/// the tasks that can run at once, so that a single disk uses every core and
/// many disks together neither oversubscribe the cores nor hold a codec
/// instance and its buffers per core each (memory).
fn default_workers(job: &JobSettings, tasks: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let slots: u32 = job.proxies.iter().map(|p| p.max_tasks).sum();
    let at_once = tasks
        .min(job.repository.max_tasks as usize)
        .min(slots as usize)
        .max(1);
    (cores / at_once).max(1)
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
                let previous = repo.latest_header(&OpenTask {
                    job: job.name.clone(),
                    vm: vm.name.clone(),
                    disk: d.name.clone(),
                    session_id,
                    header_only: true,
                })?;
                requests.push(DiskRequest {
                    node: d.node.clone().unwrap_or_default(),
                    previous_point: previous
                        .as_ref()
                        .map(|p| p.point_id.clone())
                        .unwrap_or_default(),
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
