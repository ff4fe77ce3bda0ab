//! Throttling rules in a session: each rule in force when the session starts
//! holds one rate, shared by every task whose traffic the rule matches,
//! whichever agent the task runs on.
//!
//! Tasks whose source mover runs in this process share the rule's token
//! bucket directly. A source mover on a proxy agent has its own bucket there;
//! the session gives it its share of the rule (the rule's rate over the
//! number of matching tasks) and rebalances every share as tasks start and
//! end, so the rule's total holds across agents. The in-process link (proxy
//! and repository in one process) and movers on one host (the same address,
//! loopback included) are never throttled.

use crate::config::ThrottleRule;
use arca_transport::throttle::TokenBucket;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;

struct Rule {
    rule: ThrottleRule,
    /// Shared by the tasks in this process.
    bucket: Arc<TokenBucket>,
}

/// A task running on a proxy agent, and where its rate goes.
struct Remote {
    id: u64,
    rules: Vec<usize>,
    rate: watch::Sender<u64>,
}

#[derive(Default)]
struct Members {
    /// Tasks in this process, per rule.
    local: Vec<usize>,
    remote: Vec<Remote>,
}

pub struct Throttles {
    rules: Vec<Rule>,
    members: Mutex<Members>,
    next_id: AtomicU64,
}

/// A task's part of the throttling rules; dropping it gives the task's share
/// back to the others.
pub struct Share<'a> {
    throttles: &'a Throttles,
    rules: Vec<usize>,
    remote: Option<u64>,
    /// Names of the rules, for the report.
    pub names: Vec<String>,
    /// For a task in this process: the buckets its link passes through.
    pub buckets: Vec<Arc<TokenBucket>>,
    /// For a task on a proxy agent: its rate (0 when no rule applies), kept
    /// up to date.
    pub rate: Option<watch::Receiver<u64>>,
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        if self.rules.is_empty() {
            return;
        }
        let mut m = self.throttles.members.lock().expect("throttle lock");
        match self.remote {
            Some(id) => m.remote.retain(|r| r.id != id),
            None => {
                for &r in &self.rules {
                    m.local[r] -= 1;
                }
            }
        }
        self.throttles.rebalance(&m);
    }
}

impl Throttles {
    pub fn new(rules: &[ThrottleRule]) -> Self {
        // The local time only where a rule's window needs it: finding the
        // system's time zone lists the whole zone database (an empty CBT
        // session went from 43 to 36 ms without it, docs/BENCHMARKS.md).
        let minute = if rules.iter().all(|r| r.window.is_none()) {
            0
        } else {
            let now = jiff::Zoned::now();
            (now.hour() as u16) * 60 + now.minute() as u16
        };
        let start = Instant::now();
        let rules: Vec<Rule> = rules
            .iter()
            .filter(|r| r.active_at(minute))
            .map(|r| Rule {
                rule: r.clone(),
                bucket: Arc::new(TokenBucket::new(r.rate, start)),
            })
            .collect();
        Self {
            members: Mutex::new(Members {
                local: vec![0; rules.len()],
                remote: Vec::new(),
            }),
            rules,
            next_id: AtomicU64::new(0),
        }
    }

    /// The rules for traffic from `source` to `target`; none between two
    /// movers on one host (same address), whose traffic never leaves it.
    fn matching(&self, source: IpAddr, target: IpAddr) -> Vec<usize> {
        if source == target {
            return Vec::new();
        }
        (0..self.rules.len())
            .filter(|&i| self.rules[i].rule.matches(source, target))
            .collect()
    }

    /// The share of a task whose source mover runs in this process and
    /// sends to `target`.
    pub fn local(&self, target: SocketAddr) -> Share<'_> {
        let rules = self.matching(local_ip_towards(target), target.ip());
        let mut m = self.members.lock().expect("throttle lock");
        for &r in &rules {
            m.local[r] += 1;
        }
        self.rebalance(&m);
        drop(m);
        let buckets = rules
            .iter()
            .map(|&r| self.rules[r].bucket.clone())
            .collect();
        self.share(rules, None, buckets, None)
    }

    fn share(
        &self,
        rules: Vec<usize>,
        remote: Option<u64>,
        buckets: Vec<Arc<TokenBucket>>,
        rate: Option<watch::Receiver<u64>>,
    ) -> Share<'_> {
        Share {
            throttles: self,
            names: rules
                .iter()
                .map(|&r| self.rules[r].rule.name.clone())
                .collect(),
            rules,
            remote,
            buckets,
            rate,
        }
    }

    /// The share of a task whose source mover runs on the proxy agent at
    /// `proxy` and sends to the repository agent at `target`.
    pub fn remote(&self, proxy: SocketAddr, target: SocketAddr) -> Share<'_> {
        let rules = self.matching(proxy.ip(), target.ip());
        let (tx, rx) = watch::channel(0);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if !rules.is_empty() {
            let mut m = self.members.lock().expect("throttle lock");
            m.remote.push(Remote {
                id,
                rules: rules.clone(),
                rate: tx,
            });
            self.rebalance(&m);
        }
        self.share(rules, Some(id), Vec::new(), Some(rx))
    }

    /// Divides every rule's rate among the tasks it matches: tasks in this
    /// process get their part through the shared bucket, each remote task
    /// the smallest of its rules' shares.
    fn rebalance(&self, m: &Members) {
        let counts: Vec<u64> = (0..self.rules.len())
            .map(|r| {
                m.local[r] as u64 + m.remote.iter().filter(|t| t.rules.contains(&r)).count() as u64
            })
            .collect();
        for (r, rule) in self.rules.iter().enumerate() {
            if m.local[r] > 0 {
                // At most the rule's rate; the product may not fit u64.
                let share = u128::from(rule.rule.rate) * m.local[r] as u128 / u128::from(counts[r]);
                rule.bucket.set_rate(share as u64);
            }
        }
        for t in &m.remote {
            let share = t
                .rules
                .iter()
                .map(|&r| self.rules[r].rule.rate / counts[r].max(1))
                .min()
                .unwrap_or(0);
            t.rate.send_replace(share.max(1));
        }
    }
}

/// The address this host sends from to reach `target` (a connected UDP
/// socket sends nothing; the kernel just picks the route).
fn local_ip_towards(target: SocketAddr) -> IpAddr {
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    UdpSocket::bind(bind)
        .and_then(|s| s.connect(target).and_then(|()| s.local_addr()))
        .map(|a| a.ip())
        .unwrap_or(if target.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, rate: u64) -> ThrottleRule {
        ThrottleRule {
            name: name.into(),
            source: "127.0.0.0/8".parse().unwrap(),
            target: "127.0.0.0/8".parse().unwrap(),
            rate,
            window: None,
        }
    }

    #[test]
    fn one_rule_is_shared_by_tasks_here_and_on_agents() {
        let t = Throttles::new(&[rule("wan", 30_000_000)]);
        // Another loopback address than the one this host sends from, so
        // that the rule applies to the task here too.
        let repo: SocketAddr = "127.0.0.9:7700".parse().unwrap();
        let (p1, p2): (SocketAddr, SocketAddr) = (
            "127.0.0.2:7701".parse().unwrap(),
            "127.0.0.3:7702".parse().unwrap(),
        );
        let a = t.remote(p1, repo);
        assert_eq!(
            *a.rate.as_ref().unwrap().borrow(),
            30_000_000,
            "alone: all of it"
        );
        let b = t.remote(p2, repo);
        let here = t.local(repo);
        assert_eq!(here.names, vec!["wan".to_owned()]);
        for s in [&a, &b] {
            assert_eq!(*s.rate.as_ref().unwrap().borrow(), 10_000_000);
        }
        assert_eq!(here.buckets[0].rate(), 10_000_000);
        drop(here);
        assert_eq!(*a.rate.as_ref().unwrap().borrow(), 15_000_000, "rebalanced");
        drop(b);
        assert_eq!(*a.rate.as_ref().unwrap().borrow(), 30_000_000);
    }

    #[test]
    fn the_smallest_share_of_several_rules_wins_and_one_host_is_free() {
        let t = Throttles::new(&[rule("a", 40_000_000), rule("b", 10_000_000)]);
        let repo: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let one = t.remote("127.0.0.2:1".parse().unwrap(), repo);
        let two = t.remote("127.0.0.3:1".parse().unwrap(), repo);
        assert_eq!(*one.rate.as_ref().unwrap().borrow(), 5_000_000);
        assert_eq!(two.names.len(), 2);
        let same = t.remote("127.0.0.1:7701".parse().unwrap(), repo);
        assert!(same.names.is_empty(), "proxy and repository on one host");
        let here = t.local(repo);
        assert!(here.names.is_empty(), "loopback never leaves this host");
        assert_eq!(*same.rate.as_ref().unwrap().borrow(), 0);
        assert_eq!(
            *one.rate.as_ref().unwrap().borrow(),
            5_000_000,
            "not counted"
        );
    }

    #[test]
    fn a_rate_near_the_top_of_u64_is_shared_without_overflow() {
        let huge = 1u64 << 63;
        let t = Throttles::new(&[rule("wan", huge)]);
        let repo: SocketAddr = "127.0.0.9:7700".parse().unwrap();
        let one = t.local(repo);
        let two = t.local(repo);
        let far = t.remote("127.0.0.2:1".parse().unwrap(), repo);
        // Two of three tasks here: two thirds of the rule for the bucket.
        assert_eq!(one.buckets[0].rate(), (huge / 3 * 2) as f64 as u64);
        assert_eq!(*far.rate.as_ref().unwrap().borrow(), huge / 3);
        drop(two);
    }
}
