//! Retention: which restore points a policy keeps, and forgetting the rest.
//!
//! Policies are per disk (job, VM, disk), in the style operators know from
//! GFS rotation: the newest `keep_last` points, and the newest point of
//! each of the newest `keep_daily` days, `keep_weekly` ISO weeks and
//! `keep_monthly` months that have points (calendar in UTC). A point any
//! rule keeps is kept. The newest point of a disk is always kept: it is the
//! next incremental's parent and its changed block tracking starts there.
//!
//! Every restore point is a logical full (its manifest lists every block),
//! so forgetting one never breaks another. Forgetting removes manifests
//! only; `prune` then frees the chunks nothing references any more.

use super::{PointEntry, Repository, RepositoryError, io_err, manifest, writer::sync_dir};
use arca_transport::{CommitReply, Manifest, RetentionPolicy};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
}

impl From<Policy> for RetentionPolicy {
    fn from(p: Policy) -> Self {
        RetentionPolicy {
            keep_last: p.keep_last,
            keep_daily: p.keep_daily,
            keep_weekly: p.keep_weekly,
            keep_monthly: p.keep_monthly,
        }
    }
}

impl From<RetentionPolicy> for Policy {
    fn from(p: RetentionPolicy) -> Self {
        Policy {
            keep_last: p.keep_last,
            keep_daily: p.keep_daily,
            keep_weekly: p.keep_weekly,
            keep_monthly: p.keep_monthly,
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set: Vec<String> = self
            .rules()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        f.write_str(&set.join(", "))
    }
}

impl Policy {
    /// Each rule by its setting's name.
    fn rules(&self) -> [(&'static str, u32); 4] {
        [
            ("keep_last", self.keep_last),
            ("keep_daily", self.keep_daily),
            ("keep_weekly", self.keep_weekly),
            ("keep_monthly", self.keep_monthly),
        ]
    }

    /// A policy that keeps nothing but each disk's newest point is almost
    /// always a mistake (a missing setting), so it is refused.
    pub fn check(&self) -> Result<(), String> {
        if self.rules().iter().all(|(_, n)| *n == 0) {
            return Err(
                "a retention policy needs at least one of keep_last, keep_daily, keep_weekly, keep_monthly above 0"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A point's day, ISO week and month.
type Buckets = (String, String, String);

/// The calendar buckets of a point's creation time (UTC).
fn buckets(m: &Manifest) -> Buckets {
    let ts =
        jiff::Timestamp::from_millisecond(m.created_unix_ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let date = ts.to_zoned(jiff::tz::TimeZone::UTC).date();
    let week = date.iso_week_date();
    (
        date.to_string(),
        format!("{}-W{:02}", week.year(), week.week()),
        format!("{}-{:02}", date.year(), date.month()),
    )
}

/// Which of one disk's points `policy` keeps (same order as `points`).
pub fn keep(points: &[&Manifest], policy: &Policy) -> Vec<bool> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    // Newest first; ties broken by id, as `Repository::points` orders them.
    order.sort_by(|&a, &b| {
        (points[b].created_unix_ms, &points[b].point_id)
            .cmp(&(points[a].created_unix_ms, &points[a].point_id))
    });
    let mut kept = vec![false; points.len()];
    if let Some(&newest) = order.first() {
        kept[newest] = true;
    }
    for &i in order.iter().take(policy.keep_last as usize) {
        kept[i] = true;
    }
    let all: Vec<Buckets> = points.iter().map(|m| buckets(m)).collect();
    let rules = [
        (policy.keep_daily, 0),
        (policy.keep_weekly, 1),
        (policy.keep_monthly, 2),
    ];
    for (count, rule) in rules {
        let mut seen = HashSet::new();
        for &i in &order {
            if seen.len() >= count as usize {
                break;
            }
            let (day, week, month) = &all[i];
            let bucket = [day, week, month][rule];
            // The first (newest) point of each bucket stands for it.
            if seen.insert(bucket) {
                kept[i] = true;
            }
        }
    }
    kept
}

/// Which restore points to keep and to forget (their headers: retention
/// reads no block list).
#[derive(Debug, Default)]
pub struct Plan {
    pub keep: Vec<PointEntry>,
    pub forget: Vec<PointEntry>,
    /// Dated past the horizon: neither kept by a rule nor forgotten.
    pub skipped: Vec<PointEntry>,
}

/// What a job's retention did after a commit (`CommitReply`'s fields).
#[derive(Debug, Default)]
pub(crate) struct Retained {
    pub forgotten: Vec<String>,
    pub skipped: Vec<String>,
    pub error: String,
}

/// The session report's notices on what the repository's retention did
/// (`label` names the task's disk).
pub fn notices(label: &str, policy: RetentionPolicy, reply: &CommitReply) -> Vec<String> {
    let policy = Policy::from(policy);
    let mut out = Vec::new();
    if !reply.forgotten.is_empty() {
        out.push(format!(
            "{label}: retention ({policy}) forgot {} restore point(s): {}",
            reply.forgotten.len(),
            reply.forgotten.join(", ")
        ));
    }
    if !reply.retention_skipped.is_empty() {
        out.push(format!(
            "{label}: retention ({policy}) left {} restore point(s) dated over a day ahead alone (a damaged header or a clock gone wrong; check them): {}",
            reply.retention_skipped.len(),
            reply.retention_skipped.join(", ")
        ));
    }
    if !reply.retention_applied {
        out.push(format!(
            "{label}: retention ({policy}) not applied: the repository's arca predates retention; upgrade it"
        ));
    } else if !reply.retention_error.is_empty() {
        out.push(format!(
            "{label}: retention ({policy}) not applied: {}",
            reply.retention_error
        ));
    }
    out
}

/// A day: how far ahead of the clock a point may be dated before retention
/// stops believing its date.
pub const FUTURE_SLACK_MS: i64 = 86_400_000;

/// Applies `policy` to each disk of `points` (others than `wanted` are
/// left out of the plan: neither kept nor forgotten).
///
/// A point dated after `horizon_ms` (a damaged header, a clock gone wrong)
/// would pass for the newest and push every real one out: it goes to
/// `skipped`, neither kept by a rule nor forgotten.
pub fn plan(
    points: Vec<PointEntry>,
    policy: &Policy,
    wanted: impl Fn(&Manifest) -> bool,
    horizon_ms: i64,
) -> Plan {
    let mut disks: BTreeMap<(String, String, String), Vec<PointEntry>> = BTreeMap::new();
    let mut out = Plan::default();
    for p in points.into_iter().filter(|p| wanted(&p.manifest)) {
        if p.manifest.created_unix_ms > horizon_ms {
            out.skipped.push(p);
            continue;
        }
        let key = (
            p.manifest.job.clone(),
            p.manifest.vm.clone(),
            p.manifest.disk.clone(),
        );
        disks.entry(key).or_default().push(p);
    }
    for (_, mut series) in disks {
        series.sort_by(|a, b| {
            (a.manifest.created_unix_ms, &a.manifest.point_id)
                .cmp(&(b.manifest.created_unix_ms, &b.manifest.point_id))
        });
        let headers: Vec<&Manifest> = series.iter().map(|p| &p.manifest).collect();
        let kept = keep(&headers, policy);
        for (p, k) in series.into_iter().zip(kept) {
            if k {
                out.keep.push(p);
            } else {
                out.forget.push(p);
            }
        }
    }
    out
}

impl Repository {
    /// `policy` on every disk `wanted` selects, dated against the clock;
    /// changes nothing (`forget` does).
    pub fn plan_retention(
        &self,
        policy: &Policy,
        wanted: impl Fn(&Manifest) -> bool,
    ) -> Result<Plan, RepositoryError> {
        let horizon = jiff::Timestamp::now().as_millisecond() + FUTURE_SLACK_MS;
        Ok(plan(self.listed_points()?, policy, wanted, horizon))
    }

    /// Every restore point's header (block lists are not read: a 1 TiB
    /// disk's is 128 MiB); unreadable ones are left out with a warning,
    /// so retention never forgets what it cannot date.
    fn listed_points(&self) -> Result<Vec<PointEntry>, RepositoryError> {
        let mut out = Vec::new();
        for path in self.manifest_paths()? {
            match manifest::read_header(&path) {
                Ok(manifest) => out.push(PointEntry { manifest, path }),
                Err(e) => tracing::warn!("retention leaves a restore point alone: {e}"),
            }
        }
        Ok(out)
    }

    /// Removes the manifests of `points` (durably: their folders are
    /// synced). Their chunks stay until `prune`.
    pub fn forget(&self, points: &[PointEntry]) -> Result<(), RepositoryError> {
        let mut dirs = BTreeSet::new();
        for p in points {
            match std::fs::remove_file(&p.path) {
                Ok(()) => {}
                // Forgotten by someone else meanwhile: the same outcome.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p.path)(e)),
            }
            if let Some(d) = p.path.parent() {
                dirs.insert(d.to_owned());
            }
        }
        for d in &dirs {
            sync_dir(d)?;
        }
        Ok(())
    }

    /// A job's retention after the commit of `committed`: `policy` on its
    /// disk's points, never forgetting `committed` itself. The horizon
    /// counts from the committed point too: after a clock set back, commits
    /// are dated after their parent (`writer`), ahead of the clock, and
    /// must still count. A failure is the outcome's `error`, not the
    /// commit's: the point is durable already.
    pub(crate) fn retain_after_commit(&self, committed: &Manifest, policy: Policy) -> Retained {
        let run = || -> Result<Retained, String> {
            policy.check()?;
            let listed = self
                .point_headers(&committed.job, &committed.vm, &committed.disk)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|(path, header)| PointEntry {
                    manifest: (*header).clone(),
                    path,
                })
                .collect();
            let horizon = jiff::Timestamp::now()
                .as_millisecond()
                .max(committed.created_unix_ms)
                + FUTURE_SLACK_MS;
            let mut plan = plan(listed, &policy, |_| true, horizon);
            plan.forget
                .retain(|p| p.manifest.point_id != committed.point_id);
            self.forget(&plan.forget).map_err(|e| e.to_string())?;
            let ids = |v: Vec<PointEntry>| v.into_iter().map(|p| p.manifest.point_id).collect();
            Ok(Retained {
                forgotten: ids(plan.forget),
                skipped: ids(plan.skipped),
                error: String::new(),
            })
        };
        run().unwrap_or_else(|error| Retained {
            error,
            ..Retained::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = FUTURE_SLACK_MS;

    fn point(id: &str, at_ms: i64) -> Manifest {
        Manifest {
            point_id: id.into(),
            created_unix_ms: at_ms,
            ..Manifest::default()
        }
    }

    fn kept_ids(points: &[Manifest], policy: Policy) -> Vec<&str> {
        let refs: Vec<&Manifest> = points.iter().collect();
        let k = keep(&refs, &policy);
        points
            .iter()
            .zip(k)
            .filter(|(_, k)| *k)
            .map(|(p, _)| p.point_id.as_str())
            .collect()
    }

    #[test]
    fn keep_last_keeps_the_newest_whatever_the_order() {
        // 2026-11-02 is a Monday.
        let base = jiff::civil::date(2026, 11, 2)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_millisecond();
        let points = vec![
            point("c", base + 2 * DAY),
            point("a", base),
            point("d", base + 3 * DAY),
            point("b", base + DAY),
        ];
        let last2 = Policy {
            keep_last: 2,
            ..Policy::default()
        };
        assert_eq!(kept_ids(&points, last2), ["c", "d"]);
    }

    #[test]
    fn calendar_rules_keep_the_newest_point_of_each_bucket() {
        let base = jiff::civil::date(2026, 11, 2)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_millisecond();
        let hour = 3_600_000;
        // Three points a day over 21 days (three ISO weeks), one more on the
        // last day of October (another month).
        let mut points = vec![point("oct31", base - 2 * DAY + 5 * hour)];
        for d in 0..21 {
            for h in [1, 9, 17] {
                points.push(point(&format!("d{d:02}h{h:02}"), base + d * DAY + h * hour));
            }
        }
        let daily = Policy {
            keep_daily: 3,
            ..Policy::default()
        };
        assert_eq!(kept_ids(&points, daily), ["d18h17", "d19h17", "d20h17"]);
        let weekly = Policy {
            keep_weekly: 4,
            ..Policy::default()
        };
        // Weeks of Nov 2, 9, 16 (their Sundays' last points) and the week of
        // Oct 26 (its newest point: Oct 31).
        assert_eq!(
            kept_ids(&points, weekly),
            ["oct31", "d06h17", "d13h17", "d20h17"]
        );
        let monthly = Policy {
            keep_monthly: 12,
            ..Policy::default()
        };
        assert_eq!(kept_ids(&points, monthly), ["oct31", "d20h17"]);
        // Rules add up; the newest point is always there.
        let mixed = Policy {
            keep_last: 1,
            keep_daily: 1,
            keep_monthly: 2,
            ..Policy::default()
        };
        assert_eq!(kept_ids(&points, mixed), ["oct31", "d20h17"]);
    }

    #[test]
    fn the_newest_point_is_kept_and_an_empty_policy_refused() {
        let points = [point("old", 1000), point("new", 2000)];
        let refs: Vec<&Manifest> = points.iter().collect();
        assert_eq!(keep(&refs, &Policy::default()), [false, true]);
        assert!(Policy::default().check().is_err());
        assert!(
            Policy {
                keep_weekly: 1,
                ..Policy::default()
            }
            .check()
            .is_ok()
        );
    }

    #[test]
    fn after_a_commit_it_is_kept_and_points_dated_ahead_are_left_alone() {
        use super::super::writer::tests::{chunk, store_and_commit};
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        let (h, c) = chunk(3);
        let ids: Vec<String> = (0..3).map(|_| store_and_commit(&repo, &c, &[h])).collect();
        // A point dated a year ahead (a damaged header, a clock gone wrong).
        let listed = repo.listed_points().unwrap();
        let mut ahead = manifest::read(&listed[0].path).unwrap();
        ahead.point_id = "29990101T000000Z-0000aaaa".into();
        ahead.created_unix_ms = jiff::Timestamp::now().as_millisecond() + 365 * DAY;
        let folder = listed[0].path.parent().unwrap().to_owned();
        std::fs::write(
            folder.join(format!("{}.manifest", ahead.point_id)),
            manifest::encode(&ahead),
        )
        .unwrap();
        // A link that aliases the job's folder lists nothing twice.
        let job_folder = folder.parent().unwrap().parent().unwrap().to_owned();
        std::os::unix::fs::symlink(&job_folder, job_folder.with_file_name("alias")).unwrap();
        assert_eq!(repo.listed_points().unwrap().len(), 4);

        let committed = manifest::read(&folder.join(format!("{}.manifest", ids[2]))).unwrap();
        let last2 = Policy {
            keep_last: 2,
            ..Policy::default()
        };
        // Believed, the point ahead would be the newest and push the
        // second newest real point out.
        let done = repo.retain_after_commit(&committed, last2);
        assert_eq!(done.error, "");
        assert_eq!(done.skipped, [ahead.point_id.clone()]);
        assert_eq!(done.forgotten, [ids[0].clone()]);
        let mut left: Vec<String> = repo
            .listed_points()
            .unwrap()
            .into_iter()
            .map(|p| p.manifest.point_id)
            .collect();
        left.sort();
        // Ids made in one second sort by their random suffix.
        let mut want = vec![ids[1].clone(), ids[2].clone(), ahead.point_id];
        want.sort();
        assert_eq!(left, want);
    }
}
