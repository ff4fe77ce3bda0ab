//! The configuration database (SQLite, embedded): objects applied from TOML,
//! and the history of sessions, tasks and restore points.

use super::file::{ConfigFile, Known};
use super::{
    DiskSettings, JobSettings, PipelineSettings, PluginSettings, ProxySettings, RepositorySettings,
    VmSettings,
};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};

const SCHEMA_VERSION: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("configuration database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("configuration database {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "job '{name}' is not in the configuration database (jobs: {known}); add it to a config file and run `arca apply FILE`"
    )]
    UnknownJob { name: String, known: String },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct ConfigDb {
    conn: Connection,
    path: PathBuf,
}

/// A session as listed by `arca sessions`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionRow {
    pub id: u64,
    pub job: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub state: String,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ApplySummary {
    pub repositories: usize,
    pub proxies: usize,
    pub vms: usize,
    pub plugins: usize,
    pub pipelines: usize,
    pub jobs: usize,
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

impl ConfigDb {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DbError::Create {
                path: dir.to_owned(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| DbError::Sqlite {
            path: path.to_owned(),
            source,
        })?;
        let db = Self {
            conn,
            path: path.to_owned(),
        };
        db.init()?;
        Ok(db)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> DbError + '_ {
        |source| DbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn init(&self) -> Result<(), DbError> {
        self.conn
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(self.err())?;
        self.conn
            .execute_batch(
                "PRAGMA journal_mode=WAL;
                 PRAGMA foreign_keys=ON;
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS repositories (name TEXT PRIMARY KEY, path TEXT NOT NULL, max_tasks INTEGER NOT NULL,
                     agent TEXT, fingerprint TEXT);
                 CREATE TABLE IF NOT EXISTS proxies (name TEXT PRIMARY KEY, max_tasks INTEGER NOT NULL,
                     agent TEXT, fingerprint TEXT);
                 CREATE TABLE IF NOT EXISTS throttles (name TEXT PRIMARY KEY, rule TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS hypervisors (name TEXT PRIMARY KEY, qmp TEXT NOT NULL, nbd TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, powered_off INTEGER NOT NULL, hypervisor TEXT,
                     guest_agent TEXT);
                 CREATE TABLE IF NOT EXISTS disks (vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
                     name TEXT NOT NULL, path TEXT NOT NULL, format TEXT NOT NULL, node TEXT, position INTEGER NOT NULL, PRIMARY KEY (vm, name));
                 CREATE TABLE IF NOT EXISTS plugins (name TEXT PRIMARY KEY, kind TEXT NOT NULL, path TEXT NOT NULL,
                     memory_mib INTEGER NOT NULL, deadline_ms INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS pipelines (name TEXT PRIMARY KEY, stages TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS jobs (name TEXT PRIMARY KEY, repository TEXT NOT NULL,
                     pipeline TEXT NOT NULL, block_size INTEGER NOT NULL, guest TEXT, retention TEXT);
                 CREATE TABLE IF NOT EXISTS job_vms (job TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
                     vm TEXT NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (job, vm));
                 CREATE TABLE IF NOT EXISTS job_proxies (job TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
                     proxy TEXT NOT NULL, PRIMARY KEY (job, proxy));
                 CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL,
                     pid INTEGER NOT NULL, started_ms INTEGER NOT NULL, ended_ms INTEGER, state TEXT NOT NULL, report TEXT);
                 CREATE TABLE IF NOT EXISTS tasks (id INTEGER PRIMARY KEY AUTOINCREMENT,
                     session INTEGER NOT NULL REFERENCES sessions(id), vm TEXT NOT NULL, disk TEXT NOT NULL,
                     proxy TEXT, repository TEXT, state TEXT NOT NULL, error TEXT, stats TEXT);
                 CREATE TABLE IF NOT EXISTS restore_points (point_id TEXT PRIMARY KEY, session INTEGER NOT NULL,
                     job TEXT NOT NULL, vm TEXT NOT NULL, disk TEXT NOT NULL, repository TEXT NOT NULL,
                     created_ms INTEGER NOT NULL, disk_size INTEGER NOT NULL, stored_bytes INTEGER NOT NULL);",
            )
            .map_err(self.err())?;
        let version: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?;
        match version.as_deref().map(str::parse::<i64>) {
            None => {
                self.conn
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                        [SCHEMA_VERSION.to_string()],
                    )
                    .map_err(self.err())?;
            }
            Some(Ok(v)) if v <= SCHEMA_VERSION => {}
            Some(_) => {
                return Err(DbError::Corrupt {
                    path: self.path.clone(),
                    message: format!(
                        "schema version {version:?} is newer than this arca ({SCHEMA_VERSION}); upgrade arca"
                    ),
                });
            }
        }
        // Databases made before proxies could be agents lack their columns.
        let has_agent: bool = self
            .conn
            .query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('proxies') WHERE name = 'agent'",
                [],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        if !has_agent {
            self.conn
                .execute_batch(
                    "ALTER TABLE proxies ADD COLUMN agent TEXT;
                     ALTER TABLE proxies ADD COLUMN fingerprint TEXT;",
                )
                .map_err(self.err())?;
        }
        // Databases made before jobs had retention lack its column.
        let has_retention: bool = self
            .conn
            .query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('jobs') WHERE name = 'retention'",
                [],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        if !has_retention {
            self.conn
                .execute_batch("ALTER TABLE jobs ADD COLUMN retention TEXT;")
                .map_err(self.err())?;
        }
        // The embedded defaults exist without any configuration.
        let proxy = super::default_proxy();
        self.conn
            .execute(
                "INSERT OR IGNORE INTO proxies (name, max_tasks) VALUES (?1, ?2)",
                params![proxy.name, proxy.max_tasks],
            )
            .map_err(self.err())?;
        let pipeline = super::default_pipeline();
        self.conn
            .execute(
                "INSERT OR IGNORE INTO pipelines (name, stages) VALUES (?1, ?2)",
                params![
                    pipeline.name,
                    serde_json::to_string(&pipeline).expect("pipeline serializes")
                ],
            )
            .map_err(self.err())?;
        Ok(())
    }

    fn names(&self, table: &str) -> Result<std::collections::BTreeSet<String>, DbError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT name FROM {table} ORDER BY name"))
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Names already defined, for validating a file against.
    pub fn known(&self) -> Result<Known, DbError> {
        let mut k = Known {
            hypervisors: self.names("hypervisors")?,
            repositories: self.names("repositories")?,
            proxies: self.names("proxies")?,
            vms: self.names("vms")?,
            pipelines: self.names("pipelines")?,
            plugins: Default::default(),
        };
        for b in crate::plugin::builtin::BUILTINS {
            k.plugins.insert(b.name.into(), b.kind);
        }
        for p in self.plugins()? {
            k.plugins.insert(p.name, p.kind);
        }
        Ok(k)
    }

    /// Loads a validated file in one transaction: all of it or nothing.
    pub fn apply(&mut self, f: &ConfigFile) -> Result<ApplySummary, DbError> {
        let path = self.path.clone();
        let err = |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        for r in &f.repositories {
            tx.execute(
                "INSERT INTO repositories (name, path, max_tasks, agent, fingerprint) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(name) DO UPDATE SET path = excluded.path, max_tasks = excluded.max_tasks,
                 agent = excluded.agent, fingerprint = excluded.fingerprint",
                params![r.name, r.path.to_string_lossy(), r.max_tasks, r.agent, r.fingerprint],
            )
            .map_err(err)?;
        }
        for p in &f.proxies {
            tx.execute(
                "INSERT INTO proxies (name, max_tasks, agent, fingerprint) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET max_tasks = excluded.max_tasks,
                 agent = excluded.agent, fingerprint = excluded.fingerprint",
                params![p.name, p.max_tasks, p.agent, p.fingerprint],
            )
            .map_err(err)?;
        }
        for t in &f.throttles {
            tx.execute(
                "INSERT INTO throttles (name, rule) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET rule = excluded.rule",
                params![t.name, serde_json::to_string(t).expect("rule serializes")],
            )
            .map_err(err)?;
        }
        for h in &f.hypervisors {
            tx.execute(
                "INSERT INTO hypervisors (name, qmp, nbd) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET qmp = excluded.qmp, nbd = excluded.nbd",
                params![h.name, h.qmp.to_string_lossy(), h.nbd.to_string_lossy()],
            )
            .map_err(err)?;
        }
        for (v, hypervisor) in f.vms.iter().zip(&f.vm_hypervisors) {
            tx.execute(
                "INSERT INTO vms (name, powered_off, hypervisor, guest_agent) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET powered_off = excluded.powered_off,
                 hypervisor = excluded.hypervisor, guest_agent = excluded.guest_agent",
                params![
                    v.name,
                    v.powered_off,
                    hypervisor,
                    v.guest_agent.as_ref().map(|p| p.to_string_lossy().into_owned())
                ],
            )
            .map_err(err)?;
            tx.execute("DELETE FROM disks WHERE vm = ?1", [&v.name])
                .map_err(err)?;
            for (i, d) in v.disks.iter().enumerate() {
                tx.execute(
                    "INSERT INTO disks (vm, name, path, format, node, position) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![v.name, d.name, d.path.to_string_lossy(), d.format.driver(), d.node, i as i64],
                )
                .map_err(err)?;
            }
        }
        for p in &f.plugins {
            tx.execute(
                "INSERT INTO plugins (name, kind, path, memory_mib, deadline_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(name) DO UPDATE SET kind = excluded.kind, path = excluded.path,
                 memory_mib = excluded.memory_mib, deadline_ms = excluded.deadline_ms",
                params![p.name, p.kind.to_string(), p.path.to_string_lossy(), p.memory_mib, p.deadline_ms as i64],
            )
            .map_err(err)?;
        }
        for p in &f.pipelines {
            tx.execute(
                "INSERT INTO pipelines (name, stages) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET stages = excluded.stages",
                params![
                    p.name,
                    serde_json::to_string(p).expect("pipeline serializes")
                ],
            )
            .map_err(err)?;
        }
        for j in &f.jobs {
            tx.execute(
                "INSERT INTO jobs (name, repository, pipeline, block_size, guest, retention) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET repository = excluded.repository,
                 pipeline = excluded.pipeline, block_size = excluded.block_size, guest = excluded.guest,
                 retention = excluded.retention",
                params![
                    j.name,
                    j.repository,
                    j.pipeline,
                    j.block_size,
                    j.guest.as_ref().map(|g| serde_json::to_string(g).expect("guest settings serialize")),
                    j.retention.as_ref().map(|r| serde_json::to_string(r).expect("retention serializes"))
                ],
            )
            .map_err(err)?;
            tx.execute("DELETE FROM job_vms WHERE job = ?1", [&j.name])
                .map_err(err)?;
            tx.execute("DELETE FROM job_proxies WHERE job = ?1", [&j.name])
                .map_err(err)?;
            for (i, vm) in j.vms.iter().enumerate() {
                tx.execute(
                    "INSERT INTO job_vms (job, vm, position) VALUES (?1, ?2, ?3)",
                    params![j.name, vm, i as i64],
                )
                .map_err(err)?;
            }
            for p in &j.proxies {
                tx.execute(
                    "INSERT INTO job_proxies (job, proxy) VALUES (?1, ?2)",
                    params![j.name, p],
                )
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(ApplySummary {
            repositories: f.repositories.len(),
            proxies: f.proxies.len(),
            vms: f.vms.len(),
            plugins: f.plugins.len(),
            pipelines: f.pipelines.len(),
            jobs: f.jobs.len(),
        })
    }

    pub fn plugins(&self) -> Result<Vec<PluginSettings>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, kind, path, memory_mib, deadline_ms FROM plugins ORDER BY name")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (name, kind, path, memory_mib, deadline_ms) = row.map_err(self.err())?;
            let kind =
                serde_json::from_value(serde_json::Value::String(kind.clone())).map_err(|_| {
                    DbError::Corrupt {
                        path: self.path.clone(),
                        message: format!("plugin '{name}' has unknown kind '{kind}'"),
                    }
                })?;
            out.push(PluginSettings {
                name,
                kind,
                path: path.into(),
                memory_mib,
                deadline_ms: deadline_ms as u64,
            });
        }
        Ok(out)
    }

    pub fn repositories(&self) -> Result<Vec<RepositorySettings>, DbError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, path, max_tasks, agent, fingerprint FROM repositories ORDER BY name",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(RepositorySettings {
                    name: r.get(0)?,
                    path: r.get::<_, String>(1)?.into(),
                    max_tasks: r.get(2)?,
                    agent: r.get(3)?,
                    fingerprint: r.get(4)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    pub fn hypervisor(&self, name: &str) -> Result<crate::source::qemu::Hypervisor, DbError> {
        self.conn
            .query_row(
                "SELECT qmp, nbd FROM hypervisors WHERE name = ?1",
                [name],
                |r| {
                    Ok(crate::source::qemu::Hypervisor {
                        name: name.to_owned(),
                        qmp: r.get::<_, String>(0)?.into(),
                        nbd: r.get::<_, String>(1)?.into(),
                    })
                },
            )
            .optional()
            .map_err(self.err())?
            .ok_or_else(|| DbError::Corrupt {
                path: self.path.clone(),
                message: format!("hypervisor '{name}' is not configured"),
            })
    }

    pub fn job_names(&self) -> Result<Vec<String>, DbError> {
        Ok(self.names("jobs")?.into_iter().collect())
    }

    /// Resolves a job and everything it references.
    pub fn load_job(&self, name: &str) -> Result<JobSettings, DbError> {
        type JobColumns = (String, String, u32, Option<String>, Option<String>);
        let row: Option<JobColumns> = self
            .conn
            .query_row(
                "SELECT repository, pipeline, block_size, guest, retention FROM jobs WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(self.err())?;
        let Some((repo_name, pipeline_name, block_size, guest, retention)) = row else {
            let known = self.job_names()?;
            return Err(DbError::UnknownJob {
                name: name.into(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            });
        };
        let corrupt = |message: String| DbError::Corrupt {
            path: self.path.clone(),
            message,
        };
        let repository = self
            .repositories()?
            .into_iter()
            .find(|r| r.name == repo_name)
            .ok_or_else(|| {
                corrupt(format!(
                    "job '{name}' names missing repository '{repo_name}'"
                ))
            })?;
        let stages: String = self
            .conn
            .query_row(
                "SELECT stages FROM pipelines WHERE name = ?1",
                [&pipeline_name],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?
            .ok_or_else(|| {
                corrupt(format!(
                    "job '{name}' names missing pipeline '{pipeline_name}'"
                ))
            })?;
        let pipeline: PipelineSettings = serde_json::from_str(&stages)
            .map_err(|e| corrupt(format!("pipeline '{pipeline_name}': {e}")))?;

        let all_proxies: Vec<ProxySettings> = {
            let mut stmt = self
                .conn
                .prepare("SELECT name, max_tasks, agent, fingerprint FROM proxies ORDER BY name")
                .map_err(self.err())?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(ProxySettings {
                        name: r.get(0)?,
                        max_tasks: r.get(1)?,
                        agent: r.get(2)?,
                        fingerprint: r.get(3)?,
                    })
                })
                .map_err(self.err())?;
            rows.collect::<Result<_, _>>().map_err(self.err())?
        };
        let chosen: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT proxy FROM job_proxies WHERE job = ?1 ORDER BY proxy")
                .map_err(self.err())?;
            let rows = stmt.query_map([name], |r| r.get(0)).map_err(self.err())?;
            rows.collect::<Result<_, _>>().map_err(self.err())?
        };
        let proxies = all_proxies
            .into_iter()
            .filter(|p| chosen.is_empty() || chosen.contains(&p.name))
            .collect();

        let vm_names: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT vm FROM job_vms WHERE job = ?1 ORDER BY position")
                .map_err(self.err())?;
            let rows = stmt.query_map([name], |r| r.get(0)).map_err(self.err())?;
            rows.collect::<Result<_, _>>().map_err(self.err())?
        };
        let mut vms = Vec::new();
        for vm in vm_names {
            let (powered_off, hypervisor, guest_agent): (bool, Option<String>, Option<String>) =
                self.conn
                    .query_row(
                        "SELECT powered_off, hypervisor, guest_agent FROM vms WHERE name = ?1",
                        [&vm],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()
                    .map_err(self.err())?
                    .ok_or_else(|| corrupt(format!("job '{name}' names missing vm '{vm}'")))?;
            let hypervisor = match hypervisor {
                None => None,
                Some(h) => Some(
                    self.conn
                        .query_row(
                            "SELECT qmp, nbd FROM hypervisors WHERE name = ?1",
                            [&h],
                            |r| {
                                Ok(crate::source::qemu::Hypervisor {
                                    name: h.clone(),
                                    qmp: r.get::<_, String>(0)?.into(),
                                    nbd: r.get::<_, String>(1)?.into(),
                                })
                            },
                        )
                        .optional()
                        .map_err(self.err())?
                        .ok_or_else(|| {
                            corrupt(format!("vm '{vm}' names missing hypervisor '{h}'"))
                        })?,
                ),
            };
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT name, path, format, node FROM disks WHERE vm = ?1 ORDER BY position",
                )
                .map_err(self.err())?;
            let rows: Vec<(String, String, String, Option<String>)> = stmt
                .query_map([&vm], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(self.err())?
                .collect::<Result<_, _>>()
                .map_err(self.err())?;
            let mut disks = Vec::new();
            for (dname, path, format, node) in rows {
                disks.push(DiskSettings {
                    node,
                    name: dname,
                    path: path.into(),
                    format: format
                        .parse()
                        .map_err(|e: String| corrupt(format!("vm '{vm}': {e}")))?,
                });
            }
            vms.push(VmSettings {
                name: vm,
                powered_off,
                disks,
                hypervisor,
                guest_agent: guest_agent.map(PathBuf::from),
            });
        }
        let guest: Option<super::GuestSettings> = guest
            .map(|g| {
                serde_json::from_str(&g)
                    .map_err(|e| corrupt(format!("job '{name}' guest settings: {e}")))
            })
            .transpose()?;
        let retention = retention
            .map(|r| {
                serde_json::from_str(&r)
                    .map_err(|e| corrupt(format!("job '{name}' retention: {e}")))
            })
            .transpose()?;
        let used: Vec<&str> = std::iter::once(&pipeline.change_detection)
            .chain(&pipeline.exclusions)
            .chain(std::iter::once(&pipeline.codec))
            .chain(guest.iter().map(|g| &g.hook))
            .map(|s| s.plugin.as_str())
            .collect();
        let plugins = self
            .plugins()?
            .into_iter()
            .filter(|p| used.contains(&p.name.as_str()))
            .collect();
        let throttles = {
            let mut stmt = self
                .conn
                .prepare("SELECT rule FROM throttles ORDER BY name")
                .map_err(self.err())?;
            let rows: Vec<String> = stmt
                .query_map([], |r| r.get(0))
                .map_err(self.err())?
                .collect::<Result<_, _>>()
                .map_err(self.err())?;
            rows.iter()
                .map(|r| {
                    serde_json::from_str(r).map_err(|e| corrupt(format!("throttle rule: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(JobSettings {
            throttles,
            name: name.into(),
            block_size,
            repository,
            proxies,
            pipeline,
            vms,
            plugins,
            guest,
            retention,
        })
    }

    /// Starts a session record; sessions of processes that died are marked
    /// `killed` so the history never shows them running forever.
    pub fn begin_session(&self, job: &str) -> Result<u64, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, pid FROM sessions WHERE state = 'running'")
            .map_err(self.err())?;
        let running: Vec<(i64, i32)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        for (id, pid) in running {
            if !crate::source::image_file::process_alive(pid) {
                self.conn
                    .execute("UPDATE sessions SET state = 'killed' WHERE id = ?1", [id])
                    .map_err(self.err())?;
            }
        }
        self.conn
            .execute(
                "INSERT INTO sessions (job, pid, started_ms, state) VALUES (?1, ?2, ?3, 'running')",
                params![job, std::process::id(), now_ms()],
            )
            .map_err(self.err())?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    pub fn end_session(&self, id: u64, state: &str, report: &str) -> Result<(), DbError> {
        self.conn
            .execute(
                "UPDATE sessions SET ended_ms = ?1, state = ?2, report = ?3 WHERE id = ?4",
                params![now_ms(), state, report, id as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record_task(
        &self,
        session: u64,
        vm: &str,
        disk: &str,
        proxy: Option<&str>,
        repository: &str,
        state: &str,
        error: Option<&str>,
        stats: Option<&str>,
    ) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO tasks (session, vm, disk, proxy, repository, state, error, stats)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    session as i64,
                    vm,
                    disk,
                    proxy,
                    repository,
                    state,
                    error,
                    stats
                ],
            )
            .map_err(self.err())?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record_point(
        &self,
        point_id: &str,
        session: u64,
        job: &str,
        vm: &str,
        disk: &str,
        repository: &str,
        disk_size: u64,
        stored_bytes: u64,
    ) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO restore_points
                 (point_id, session, job, vm, disk, repository, created_ms, disk_size, stored_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    point_id,
                    session as i64,
                    job,
                    vm,
                    disk,
                    repository,
                    now_ms(),
                    disk_size as i64,
                    stored_bytes as i64
                ],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn sessions(&self, limit: u32) -> Result<Vec<SessionRow>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, job, started_ms, ended_ms, state FROM sessions ORDER BY id DESC LIMIT ?1")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([limit], |r| {
                Ok(SessionRow {
                    id: r.get::<_, i64>(0)? as u64,
                    job: r.get(1)?,
                    started_ms: r.get(2)?,
                    ended_ms: r.get(3)?,
                    state: r.get(4)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_then_load_job_resolves_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = ConfigDb::open(&dir.path().join("arca.db")).unwrap();
        let src = r#"
[[repository]]
name = "main"
path = "/srv/repo"
max_tasks = 3
[[vm]]
name = "web01"
disks = ["/d0.raw", "/d1.raw"]
[[job]]
name = "nightly"
vms = ["web01"]
repository = "main"
"#;
        let file =
            super::super::file::parse(Path::new("c.toml"), src, &db.known().unwrap()).unwrap();
        db.apply(&file).unwrap();
        let job = db.load_job("nightly").unwrap();
        assert_eq!(job.repository.max_tasks, 3);
        assert_eq!(job.pipeline, super::super::default_pipeline());
        assert_eq!(job.vms[0].disks.len(), 2);
        assert_eq!(job.proxies[0].name, "local");
        let err = db.load_job("weekly").unwrap_err().to_string();
        assert!(
            err.contains("job 'weekly'") && err.contains("nightly"),
            "{err}"
        );

        let s = db.begin_session("nightly").unwrap();
        db.end_session(s, "success", "{}").unwrap();
        assert_eq!(db.sessions(10).unwrap()[0].state, "success");
    }
}
