//! The `arca` command line: the backup operator's interface.

use anyhow::{Context, Result, bail};
use arca::config::{ConfigDb, file};
use arca::plugin::{PluginRuntime, builtin};
use arca::repository::Repository;
use arca::repository::prune::PruneOptions;
use arca::restore::decoder::CodecBank;
use arca::session::report::bytes;
use arca::session::{SessionOptions, run_job};
use arca::source::qemu_export::DiskFormat;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "arca",
    version,
    about = "Backups of virtual-machine disks through sandboxed WASM stages"
)]
struct Cli {
    /// State folder: configuration database and compiled-plugin cache.
    #[arg(long, env = "ARCA_HOME", global = true)]
    home: Option<PathBuf>,
    /// Compiled-plugin cache (default: HOME/cache).
    #[arg(long, env = "ARCA_CACHE", global = true)]
    cache: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a TOML config file into the configuration database.
    Apply { file: PathBuf },
    /// Backup jobs.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
    /// List restore points.
    Points {
        #[arg(long)]
        job: Option<String>,
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        repository: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write a restore point of a disk to a raw image file, bit-exact.
    Restore {
        /// Restore point id (see `arca points`).
        point: String,
        /// Output raw image file.
        #[arg(long)]
        to: PathBuf,
        /// Overwrite the output file if it exists.
        #[arg(long)]
        force: bool,
        /// Output format: raw, qcow2 or vhdx (default: from the file extension).
        #[arg(long)]
        format: Option<String>,
        #[arg(long)]
        repository: Option<String>,
    },
    /// Read every chunk of a repository and check it against its address.
    Verify {
        #[arg(long)]
        repository: Option<String>,
        #[arg(long)]
        json: bool,
        /// Take damaged chunk copies out of the repository (needs it to
        /// itself, like prune): the next backup of a disk that still holds
        /// their data stores them again, which mends every restore point
        /// that references them.
        #[arg(long)]
        repair: bool,
    },
    /// Forget restore points by a retention policy, per disk: the newest
    /// N, and the newest point of each of the newest N days, ISO weeks and
    /// months (UTC). Each disk's newest point is always kept. Chunks stay
    /// until `arca prune` (or `--prune`).
    Forget {
        #[arg(long)]
        repository: Option<String>,
        /// Only this job's restore points.
        #[arg(long)]
        job: Option<String>,
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        disk: Option<String>,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        /// Then free what no restore point references any more.
        #[arg(long)]
        prune: bool,
        /// With --prune: rewrite a pack once this share of it is
        /// unreferenced (0 reclaims everything, rewriting more).
        #[arg(long, default_value_t = arca::repository::prune::REPACK_SHARE)]
        repack_share: f64,
        /// Show what would be forgotten (and pruned), change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Free the chunks no restore point references: packs that hold only
    /// such chunks are deleted, packs that hold many are rewritten. Needs
    /// the repository idle (no session, restore or verify).
    Prune {
        #[arg(long)]
        repository: Option<String>,
        /// Rewrite a pack once this share of it is unreferenced (0
        /// reclaims everything, rewriting more).
        #[arg(long, default_value_t = arca::repository::prune::REPACK_SHARE)]
        repack_share: f64,
        /// Show what would be freed, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Recent sessions.
    Sessions {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Built-in and configured plugins.
    Plugins,
    /// Disks (block nodes) of a configured hypervisor, with CBT bitmaps.
    Inventory { hypervisor: String },
    /// This installation's certificate fingerprint, to enrol it with a peer.
    Identity,
    /// Serve a repository and/or the proxy role to enrolled peers over QUIC
    /// (the transport service): `arca agent --listen ADDR --repository DIR`,
    /// `arca agent --listen ADDR --proxy NAME`, or both; or ask a running
    /// agent how it is doing: `arca agent status`.
    #[command(args_conflicts_with_subcommands = true)]
    Agent {
        #[command(subcommand)]
        action: Option<AgentAction>,
        /// Address to listen on, e.g. 0.0.0.0:7700.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// The repository folder this agent serves (repository role).
        #[arg(long)]
        repository: Option<PathBuf>,
        /// Serve the proxy role under this name: run the source movers of
        /// tasks that sessions assign here.
        #[arg(long)]
        proxy: Option<String>,
        /// Fingerprint of a peer allowed to connect (repeat for more); peers
        /// are also read from HOME/trusted-peers, one per line.
        #[arg(long)]
        trust: Vec<String>,
    },
    /// Thaws a guest whose session dies while it is frozen. Sessions start
    /// it before they freeze a guest (see `arca::guest::guard`); it is not
    /// an operator's command.
    #[command(hide = true)]
    FreezeGuard {
        /// The guest agent's socket.
        socket: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        agent_timeout_ms: u64,
    },
}

#[derive(Subcommand)]
enum AgentAction {
    /// Repository, uptime and tasks of a running agent.
    Status {
        /// The agent's address.
        #[arg(long)]
        agent: std::net::SocketAddr,
        /// The agent's pinned fingerprint.
        #[arg(long)]
        fingerprint: String,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Run a backup session of a job.
    Run {
        name: String,
        /// Print the session report as JSON.
        #[arg(long)]
        json: bool,
        /// Worker threads per task (default: one per core).
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
    /// List jobs.
    List,
}

fn default_home() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/arca")
    } else {
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/share/arca"))
            .unwrap_or_else(|| PathBuf::from(".arca"))
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    // Sessions start this binary as the freeze guard of a guest they freeze.
    // `/proc/self/exe` is this very program even after an upgrade replaced
    // or removed its file during a long session.
    let exe = PathBuf::from("/proc/self/exe");
    if exe.exists() {
        arca::guest::guard::install(exe);
    } else if let Ok(exe) = std::env::current_exe() {
        arca::guest::guard::install(exe);
    }
    // An agent is a service: its log says which session and task each
    // line is about, so it logs task events by default.
    let default_level = match &cli.command {
        Command::Agent { action: None, .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ARCA_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Batches are megabytes each, and wasmtime hands every codec result back
/// in a new buffer. With glibc's defaults such buffers are mapped fresh and
/// unmapped when freed, so every batch paid a page fault (and a zeroed
/// page) per 4 KiB: over half of a restore's CPU time went to the kernel.
/// Serving them from the heap and keeping freed memory for the next batch
/// took a restore of a 4 GiB disk from 6.8 s to 4.8 s on the development
/// machine, for 7% more peak memory.
///
/// What the heap keeps is kept per arena, and glibc makes up to eight
/// arenas per core as threads contend: four disks at once (a dozen threads
/// passing batches around) peaked at 379–417 MiB over runs of the same
/// session. One arena per core bounds it (320–378 MiB, docs/BENCHMARKS.md)
/// at no cost in time: the threads that allocate batches are about as many
/// as the cores.
fn tune_allocator() {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // SAFETY: mallopt only changes malloc's thresholds; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, cores.min(64) as libc::c_int);
    }
}

/// `arca freeze-guard`: waits for its session's word or end, then thaws
/// if the session left the guest frozen.
fn freeze_guard(socket: &Path, agent_timeout_ms: u64) -> i32 {
    use arca::guest::guard::{PATIENCE, serve};
    use std::io::Write;
    // The signals that stop a session (a Ctrl-C reaches its whole process
    // group; a service manager signals all its processes) must not stop
    // the one process that thaws after it.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let timeout = std::time::Duration::from_millis(agent_timeout_ms);
    let outcome = serve(socket, timeout, std::io::stdin().lock(), PATIENCE);
    if let Some(said) = outcome.message(socket) {
        // A closed stderr must not turn a done thaw into a panic.
        let _ = writeln!(std::io::stderr(), "{said}");
    }
    outcome.exit_code()
}

struct Home {
    root: PathBuf,
    db: PathBuf,
    cache: PathBuf,
    identity: PathBuf,
}

fn run(cli: Cli) -> Result<i32> {
    let root = cli.home.unwrap_or_else(default_home);
    let home = Home {
        identity: root.join("identity"),
        db: root.join("arca.db"),
        cache: cli.cache.unwrap_or_else(|| root.join("cache")),
        root,
    };
    match cli.command {
        Command::Apply { file: path } => apply(&home, &path),
        Command::Job {
            command:
                JobCommand::Run {
                    name,
                    json,
                    workers,
                },
        } => {
            let db = ConfigDb::open(&home.db)?;
            let runtime = PluginRuntime::new(Some(home.cache.clone()))?;
            let opts = SessionOptions {
                identity_dir: home.identity.clone(),
                workers_per_task: workers,
                show_progress: !json && std::io::stderr().is_terminal(),
                lock_dir: home.root.join("locks"),
            };
            let report = run_job(&db, &runtime, &name, &opts)
                .with_context(|| format!("session of job '{name}'"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.state == "success" { 0 } else { 1 })
        }
        Command::Job {
            command: JobCommand::List,
        } => {
            let db = ConfigDb::open(&home.db)?;
            for name in db.job_names()? {
                println!("{name}");
            }
            Ok(0)
        }
        Command::Points {
            job,
            vm,
            repository,
            json,
        } => {
            let db = ConfigDb::open(&home.db)?;
            let mut rows = Vec::new();
            for (repo_name, repo) in repositories(&db, repository.as_deref())? {
                for p in repo.points()? {
                    let m = &p.manifest;
                    if job.as_ref().is_some_and(|j| *j != m.job)
                        || vm.as_ref().is_some_and(|v| *v != m.vm)
                    {
                        continue;
                    }
                    rows.push(serde_json::json!({
                        "point_id": m.point_id,
                        "repository": repo_name,
                        "job": m.job,
                        "vm": m.vm,
                        "disk": m.disk,
                        "created": jiff::Timestamp::from_millisecond(m.created_unix_ms).map(|t| t.to_string()).unwrap_or_default(),
                        "disk_size": m.disk_size,
                        "block_size": m.block_size,
                        "parent_point": m.parent_point,
                        "consistency": m.consistency,
                    }));
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<28} {:<12} {:<14} {:<10} {:>10} {:<24} KIND",
                    "POINT", "JOB", "VM", "DISK", "SIZE", "CREATED"
                );
                for r in &rows {
                    println!(
                        "{:<28} {:<12} {:<14} {:<10} {:>10} {:<24} {}",
                        r["point_id"].as_str().unwrap_or(""),
                        r["job"].as_str().unwrap_or(""),
                        r["vm"].as_str().unwrap_or(""),
                        r["disk"].as_str().unwrap_or(""),
                        bytes(r["disk_size"].as_u64().unwrap_or(0)),
                        r["created"].as_str().unwrap_or(""),
                        if r["parent_point"].as_str().unwrap_or("").is_empty() {
                            "full"
                        } else {
                            "incremental"
                        }
                    );
                }
            }
            Ok(0)
        }
        Command::Restore {
            point,
            to,
            force,
            format,
            repository,
        } => {
            let format = match format {
                Some(f) => f.parse::<DiskFormat>().map_err(anyhow::Error::msg)?,
                None => DiskFormat::from_extension(&to),
            };
            if format == DiskFormat::Vmdk {
                bail!(
                    "restore writes raw, qcow2 or vhdx; convert to vmdk with qemu-img if you need it"
                );
            }
            let db = ConfigDb::open(&home.db)?;
            let runtime = PluginRuntime::new(Some(home.cache.clone()))?;
            let mut found = None;
            for (_, repo) in repositories(&db, repository.as_deref())? {
                // Locked before the point is looked up: no prune moves or
                // frees its chunks from then until the restore ends.
                let reading = repo.read_lock()?;
                if let Ok(p) = repo.find_point(&point) {
                    found = Some((repo, p, reading));
                    break;
                }
            }
            let Some((repo, entry, _reading)) = found else {
                bail!("restore point '{point}' is in no configured repository (see `arca points`)");
            };
            let bank = CodecBank::new(repo, runtime);
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
            let stats = arca::restore::restore_to_image(
                &bank,
                &entry.manifest,
                &to,
                format,
                force,
                workers,
                &|_| {},
            )?;
            println!(
                "restored {}/{}/{} point {} to {}: {} written ({} unbuffered), {} left sparse, {:.1} s ({:.0} MB/s)",
                entry.manifest.job,
                entry.manifest.vm,
                entry.manifest.disk,
                point,
                to.display(),
                bytes(stats.written_bytes),
                bytes(stats.unbuffered_bytes),
                bytes(stats.hole_bytes),
                stats.seconds,
                stats.disk_bytes as f64 / 1e6 / stats.seconds.max(1e-9)
            );
            Ok(0)
        }
        Command::Verify {
            repository,
            json,
            repair,
        } => {
            let db = ConfigDb::open(&home.db)?;
            let runtime = PluginRuntime::new(Some(home.cache.clone()))?;
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
            let mut clean = true;
            let mut reports = Vec::new();
            for (name, repo) in repositories(&db, repository.as_deref())? {
                let bank = CodecBank::new(repo.clone(), runtime.clone());
                let (r, mended) = if repair {
                    let mut done = arca::verify::repair(&repo, &bank, workers)?;
                    (std::mem::take(&mut done.after), Some(done))
                } else {
                    let _reading = repo.read_lock()?;
                    (arca::verify::verify(&repo, &bank, workers)?, None)
                };
                clean &= r.is_clean();
                if !json {
                    print_verify(&name, &r, mended.as_ref());
                }
                let mut entry = serde_json::json!({ "repository": name, "report": r });
                if let Some(done) = mended {
                    entry["rebuilt"] = serde_json::to_value(done.rebuilt)?;
                    entry["dropped"] = serde_json::to_value(done.dropped)?;
                    entry["not_repaired"] = serde_json::to_value(done.not_repaired)?;
                }
                reports.push(entry);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            }
            Ok(if clean { 0 } else { 1 })
        }
        Command::Forget {
            repository,
            job,
            vm,
            disk,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            prune,
            repack_share,
            dry_run,
            json,
        } => {
            if !prune && repack_share != arca::repository::prune::REPACK_SHARE {
                bail!("--repack-share applies to the prune: add --prune");
            }
            let policy = arca::repository::retention::Policy {
                keep_last,
                keep_daily,
                keep_weekly,
                keep_monthly,
            };
            let pruning = prune.then(|| PruneOptions {
                dry_run,
                repack_share,
                ..Default::default()
            });
            let wanted = |m: &arca_transport::Manifest| {
                job.as_ref().is_none_or(|j| *j == m.job)
                    && vm.as_ref().is_none_or(|v| *v == m.vm)
                    && disk.as_ref().is_none_or(|d| *d == m.disk)
            };
            let db = ConfigDb::open(&home.db)?;
            forget(
                &db,
                repository.as_deref(),
                &policy,
                wanted,
                pruning,
                dry_run,
                json,
            )
        }
        Command::Prune {
            repository,
            repack_share,
            dry_run,
            json,
        } => {
            let opts = PruneOptions {
                dry_run,
                repack_share,
                ..Default::default()
            };
            opts.check().map_err(anyhow::Error::msg)?;
            let db = ConfigDb::open(&home.db)?;
            let mut out = Vec::new();
            for (name, repo) in repositories(&db, repository.as_deref())? {
                let r = repo.prune(opts.clone())?;
                if !json {
                    print_prune(&name, &r);
                }
                out.push(serde_json::json!({ "repository": name, "report": r }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            Ok(0)
        }
        Command::Sessions { limit, json } => {
            let db = ConfigDb::open(&home.db)?;
            let rows = db.sessions(limit)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for s in rows {
                    let started = jiff::Timestamp::from_millisecond(s.started_ms)
                        .map(|t| t.to_string())
                        .unwrap_or_default();
                    println!("{:>5} {:<16} {:<10} {}", s.id, s.job, s.state, started);
                }
            }
            Ok(0)
        }
        Command::Inventory { hypervisor } => {
            let db = ConfigDb::open(&home.db)?;
            let h = db.hypervisor(&hypervisor)?;
            let inv = arca::source::qemu::inventory(&h)?;
            println!("{}", serde_json::to_string_pretty(&inv)?);
            Ok(0)
        }
        Command::FreezeGuard {
            socket,
            agent_timeout_ms,
        } => Ok(freeze_guard(&socket, agent_timeout_ms)),
        Command::Identity => {
            let id = arca_transport::quic::Identity::load_or_create(&home.identity)?;
            println!("{}", id.fingerprint);
            Ok(0)
        }
        Command::Agent {
            action: Some(AgentAction::Status { agent, fingerprint }),
            ..
        } => {
            let id = arca_transport::quic::Identity::load_or_create(&home.identity)?;
            // Multi-thread: QuicLink drives its calls through a runtime
            // handle, which only a multi-thread runtime serves on its own.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let s = arca_transport::quic::QuicLink::status(rt.handle(), agent, &fingerprint, &id)?;
            println!(
                "agent {agent}: arca {}, up {} s, repository {}, tasks running {}, committed {}, aborted {}",
                s.version,
                s.uptime_seconds,
                s.repository,
                s.tasks_running,
                s.tasks_committed,
                s.tasks_aborted
            );
            Ok(0)
        }
        Command::Agent {
            action: None,
            listen,
            repository,
            proxy,
            mut trust,
        } => {
            let Some(listen) = listen.filter(|_| repository.is_some() || proxy.is_some()) else {
                bail!(
                    "arca agent needs --listen ADDR and a role: --repository DIR, --proxy NAME or both (or `arca agent status`)"
                );
            };
            let id = arca_transport::quic::Identity::load_or_create(&home.identity)?;
            if let Ok(text) = std::fs::read_to_string(home.root.join("trusted-peers")) {
                trust.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
            }
            if trust.is_empty() {
                bail!(
                    "no peer is enrolled: pass --trust FINGERPRINT (the backup server's `arca identity`) or list it in {}",
                    home.root.join("trusted-peers").display()
                );
            }
            let roles = arca::agent::AgentRoles {
                repository: repository
                    .map(|r| Repository::open_or_create(&r))
                    .transpose()?,
                proxy: proxy.map(|name| (name, Some(home.cache.clone()))),
            };
            let fp = id.fingerprint.clone();
            arca::agent::run(id, trust, roles, listen, |addr| {
                println!("arca agent listening on {addr} (identity {fp})");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            })?;
            Ok(0)
        }
        Command::Plugins => {
            for b in builtin::BUILTINS {
                println!(
                    "{:<16} {:<17} built-in  {}",
                    b.name,
                    b.kind.to_string(),
                    b.summary
                );
            }
            let db = ConfigDb::open(&home.db)?;
            for p in db.plugins()? {
                println!(
                    "{:<16} {:<17} {}",
                    p.name,
                    p.kind.to_string(),
                    p.path.display()
                );
            }
            Ok(0)
        }
    }
}

fn apply(home: &Home, path: &Path) -> Result<i32> {
    let mut db = ConfigDb::open(&home.db)?;
    let parsed = file::load(path, &db.known()?)?;
    let s = db.apply(&parsed)?;
    println!(
        "applied {}: {} repositories, {} proxies, {} vms, {} plugins, {} pipelines, {} jobs",
        path.display(),
        s.repositories,
        s.proxies,
        s.vms,
        s.plugins,
        s.pipelines,
        s.jobs
    );
    compile_pipelines(home, &db)?;
    Ok(0)
}

/// Compiles every job's stages into the plugin cache, so that a session
/// starts at once instead of spending its first second or two in the
/// compiler, and so that a plugin that cannot load (a missing file, not a
/// component, the wrong world) is reported when it is configured. The
/// configuration stays applied either way: the job's sessions will report
/// the same error until the plugin is fixed.
fn compile_pipelines(home: &Home, db: &ConfigDb) -> Result<()> {
    let runtime = PluginRuntime::new(Some(home.cache.clone()))?;
    for name in db.job_names()? {
        let job = db.load_job(&name)?;
        if let Err(e) = arca::pipeline::LoadedPipeline::load(&job, &runtime) {
            eprintln!("warning: job '{name}' cannot load its pipeline: {e}");
        }
    }
    Ok(())
}

/// `arca forget`: `policy` on the points `wanted` selects in each
/// repository, then a prune if `pruning` says so (of what would be left,
/// in a dry run).
fn forget(
    db: &ConfigDb,
    repository: Option<&str>,
    policy: &arca::repository::retention::Policy,
    wanted: impl Fn(&arca_transport::Manifest) -> bool,
    pruning: Option<PruneOptions>,
    dry_run: bool,
    json: bool,
) -> Result<i32> {
    policy.check().map_err(anyhow::Error::msg)?;
    if let Some(p) = &pruning {
        p.check().map_err(anyhow::Error::msg)?;
    }
    let ids = |v: &[arca::repository::PointEntry]| -> Vec<String> {
        v.iter().map(|p| p.manifest.point_id.clone()).collect()
    };
    let mut out = Vec::new();
    for (name, repo) in repositories(db, repository)? {
        let plan = repo.plan_retention(policy, &wanted)?;
        if !dry_run {
            repo.forget(&plan.forget)?;
        }
        if !json {
            let verb = if dry_run { "would forget" } else { "forgot" };
            println!(
                "repository '{name}': {verb} {} restore point(s), kept {}",
                plan.forget.len(),
                plan.keep.len()
            );
            for p in &plan.forget {
                let m = &p.manifest;
                println!("  {verb} {}/{}/{} {}", m.job, m.vm, m.disk, m.point_id);
            }
            for p in &plan.skipped {
                let m = &p.manifest;
                println!(
                    "  left alone, dated over a day ahead: {}/{}/{} {} ({})",
                    m.job,
                    m.vm,
                    m.disk,
                    m.point_id,
                    p.path.display()
                );
            }
        }
        let pruned = match &pruning {
            Some(opts) => Some(repo.prune(PruneOptions {
                // A dry run forgot nothing: the prune counts those points as gone.
                forgotten: if dry_run {
                    plan.forget.iter().map(|p| p.path.clone()).collect()
                } else {
                    Default::default()
                },
                ..opts.clone()
            })?),
            None => None,
        };
        if !json && let Some(r) = &pruned {
            print_prune(&name, r);
        }
        out.push(serde_json::json!({
            "repository": name,
            "dry_run": dry_run,
            "forgotten": ids(&plan.forget),
            "kept": ids(&plan.keep),
            "skipped_future": ids(&plan.skipped),
            "prune": pruned,
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(0)
}

fn print_verify(
    name: &str,
    r: &arca::verify::VerifyReport,
    mended: Option<&arca::verify::RepairReport>,
) {
    println!(
        "repository '{name}': {} restore point(s), {} chunk(s) checked: {}",
        r.restore_points,
        r.chunks_checked,
        if r.is_clean() { "clean" } else { "DAMAGED" }
    );
    for m in &r.damaged_manifests {
        println!("  damaged manifest {}: {}", m.path, m.reason);
    }
    for m in &r.damaged_indexes {
        println!("  damaged pack index {}: {}", m.path, m.reason);
    }
    for c in &r.damaged_chunks {
        println!(
            "  damaged chunk {}: {}; restore points hurt: {}",
            arca::repository::hex(&c.address),
            c.reason,
            c.restore_points.join(", ")
        );
    }
    let Some(done) = mended else {
        return;
    };
    if let Some(why) = &done.not_repaired {
        eprintln!("repository '{name}': nothing mended: {why}");
    }
    for i in &done.rebuilt {
        println!(
            "  repair: wrote pack index {} anew from its pack: {} chunk(s) indexed, {} damaged record(s) left out",
            i.file, i.chunks, i.skipped
        );
    }
    for d in &done.dropped {
        println!("  repair: took damaged chunk {} out of {}", d.hash, d.file);
    }
    if !done.dropped.is_empty() {
        println!(
            "  repair: the next backup of a disk that still holds their data stores them again, and the restore points they hurt are whole again"
        );
    }
}

fn print_prune(name: &str, r: &arca::repository::prune::PruneReport) {
    let verb = if r.dry_run { "would free" } else { "freed" };
    println!(
        "repository '{name}': {} restore point(s) reference {} chunk(s); packs: {} before, {} deleted, {} rewritten{}, {} kept ({} unreferenced left in them); {} orphan pack(s) and {} format-1 chunk file(s) deleted; {verb} {}{}",
        r.restore_points,
        r.referenced_chunks,
        r.packs_before,
        r.packs_deleted,
        r.packs_repacked,
        if r.dry_run {
            String::new()
        } else {
            format!(" into {}", r.packs_written)
        },
        r.packs_kept,
        bytes(r.unreferenced_bytes_kept),
        r.orphan_packs_deleted,
        r.loose_chunks_deleted,
        bytes(r.bytes_freed),
        if r.packs_with_damaged_index > 0 {
            format!(
                "; {} pack(s) with a damaged index left alone (see arca verify)",
                r.packs_with_damaged_index
            )
        } else {
            String::new()
        }
    );
}

fn repositories(db: &ConfigDb, only: Option<&str>) -> Result<Vec<(String, Repository)>> {
    let mut out = Vec::new();
    let all = db.repositories()?;
    if let Some(name) = only
        && !all.iter().any(|r| r.name == name)
    {
        bail!(
            "repository '{name}' is not configured (configured: {})",
            all.iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for r in all {
        // Repositories served by an agent are listed, restored from and
        // verified on the agent's host (configure them there by path).
        if only.is_some_and(|o| o != r.name) || r.agent.is_some() {
            continue;
        }
        match Repository::open(&r.path) {
            Ok(repo) => out.push((r.name, repo)),
            // A repository no session has written yet holds nothing to list.
            Err(arca::repository::RepositoryError::NotARepository { .. }) if only.is_none() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}
