//! The session report: what was processed, read, transferred and stored,
//! the ratios, and the stage that bounded the session.

use crate::pipeline::TaskStats;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub vm: String,
    pub disk: String,
    pub proxy: Option<String>,
    pub state: TaskState,
    pub error: Option<String>,
    pub restore_point: Option<String>,
    pub parent_point: Option<String>,
    pub consistency: Option<String>,
    pub queued_seconds: f64,
    pub seconds: f64,
    pub stats: Option<TaskStats>,
    pub notices: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Success,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bottleneck {
    pub stage: String,
    pub busy_seconds: f64,
    /// Busy time of this stage over the busy time of all stages.
    pub share: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionReport {
    pub session_id: u64,
    pub job: String,
    pub state: String,
    pub repository: String,
    pub started: String,
    pub duration_seconds: f64,
    pub tasks: Vec<TaskReport>,
    pub totals: TaskStats,
    pub compression_ratio: f64,
    pub dedup_ratio: f64,
    /// Bytes read over the whole session's wall time (plugin loading,
    /// snapshots and queueing included): what the operator waited for.
    pub read_mb_per_second: f64,
    pub bottleneck: Option<Bottleneck>,
    pub notices: Vec<String>,
    pub log: Vec<String>,
    /// Guest processing per VM (empty when the job has none).
    pub guest: Vec<super::guest::GuestReport>,
}

impl SessionReport {
    pub fn finish(&mut self) {
        let mut totals = TaskStats::default();
        for t in &self.tasks {
            if let Some(s) = &t.stats {
                totals.merge(s);
            }
        }
        self.compression_ratio = totals.compression_ratio();
        self.dedup_ratio = totals.dedup_ratio();
        self.read_mb_per_second = if self.duration_seconds > 0.0 {
            totals.read_bytes as f64 / 1e6 / self.duration_seconds
        } else {
            0.0
        };
        let busy: f64 = totals.stage_seconds.values().sum();
        self.bottleneck = totals.bottleneck().map(|(stage, s)| Bottleneck {
            stage,
            busy_seconds: s,
            share: if busy > 0.0 { s / busy } else { 0.0 },
        });
        let failed = self
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Failed)
            .count();
        self.state = match failed {
            0 => "success",
            n if n == self.tasks.len() => "failed",
            _ => "partial",
        }
        .into();
        self.totals = totals;
    }

    pub fn render(&self) -> String {
        use std::fmt::Write;
        let t = &self.totals;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Session {} of job '{}': {} in {:.1} s ({} task(s), repository '{}')",
            self.session_id,
            self.job,
            self.state.to_uppercase(),
            self.duration_seconds,
            self.tasks.len(),
            self.repository
        );
        for task in &self.tasks {
            match (&task.state, &task.stats) {
                (TaskState::Success, Some(st)) => {
                    let _ = writeln!(
                        s,
                        "  {}/{} on {}: restore point {} ({}{}) — read {}, stored {}, {:.1} s",
                        task.vm,
                        task.disk,
                        task.proxy.as_deref().unwrap_or("-"),
                        task.restore_point.as_deref().unwrap_or("-"),
                        task.consistency.as_deref().unwrap_or("-"),
                        task.parent_point
                            .as_deref()
                            .map(|p| format!(", incremental to {p}"))
                            .unwrap_or_else(|| ", full".into()),
                        bytes(st.read_bytes),
                        bytes(st.stored_bytes),
                        task.seconds
                    );
                    for (stage, b) in &st.excluded_by_stage {
                        let _ = writeln!(s, "      excluded by {stage}: {}", bytes(*b));
                    }
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "  {}/{}: FAILED: {}",
                        task.vm,
                        task.disk,
                        task.error.as_deref().unwrap_or("unknown error")
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "  processed {}, read {} ({:.0} MB/s over the session), skipped: holes {}, zeros {}, excluded {}, unchanged {}",
            bytes(t.disk_bytes),
            bytes(t.read_bytes),
            self.read_mb_per_second,
            bytes(t.hole_bytes),
            bytes(t.zero_bytes),
            bytes(t.excluded_bytes),
            bytes(t.unchanged_bytes)
        );
        let _ = writeln!(
            s,
            "  transferred {}, stored {} ({} new chunks); compression {:.2}x, dedup {:.2}x",
            bytes(t.transferred_bytes),
            bytes(t.stored_bytes),
            t.new_chunks,
            self.compression_ratio,
            self.dedup_ratio
        );
        if let Some(b) = &self.bottleneck {
            let _ = writeln!(
                s,
                "  bottleneck: {} ({:.1} s busy, {:.0}% of stage time)",
                b.stage,
                b.busy_seconds,
                b.share * 100.0
            );
        }
        for g in &self.guest {
            let steps: Vec<String> = g
                .steps
                .iter()
                .map(|s| {
                    format!(
                        "{} {} ({:.1} s)",
                        s.step,
                        if s.ok { "ok" } else { "FAILED" },
                        s.seconds
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "  guest processing of {} ({:?}, hook '{}'): {}; {} command(s); {}",
                g.vm,
                g.mode,
                g.hook,
                steps.join(", "),
                g.commands.len(),
                if g.application_consistent {
                    "application-consistent"
                } else {
                    "not application-consistent"
                }
            );
            for c in &g.commands {
                let _ = writeln!(
                    s,
                    "      {} {}: {}",
                    c.path,
                    c.args.join(" "),
                    match (&c.exit_code, &c.error) {
                        (Some(code), _) => format!("exit {code}"),
                        (None, Some(e)) => e.clone(),
                        _ => "?".into(),
                    }
                );
            }
        }
        for n in &self.notices {
            let _ = writeln!(s, "  note: {n}");
        }
        s
    }
}

pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
