//! The resource scheduler (seed step 2): a task runs when both a proxy slot
//! and a repository slot are free; otherwise it waits in a FIFO queue. The
//! least-loaded proxy wins; a proxy that cannot be reached gets no tasks, and
//! a task retried after a lost link goes to another proxy when there is one.
//! Plain logic, no threads, so it is tested on its own.

use crate::config::{ProxySettings, RepositorySettings};
use std::collections::{HashMap, VecDeque};

#[derive(Debug, Clone)]
struct Slots {
    name: String,
    max: u32,
    running: u32,
}

impl Slots {
    fn free(&self) -> bool {
        self.running < self.max
    }
    fn load(&self) -> f64 {
        f64::from(self.running) / f64::from(self.max.max(1))
    }
}

#[derive(Debug)]
pub struct Scheduler {
    proxies: Vec<Slots>,
    repository: Slots,
    queue: VecDeque<usize>,
    /// Proxies a retried task should not go back to.
    avoid: HashMap<usize, Vec<String>>,
}

/// A decision: task `task` runs on `proxy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub task: usize,
    pub proxy: String,
}

impl Scheduler {
    pub fn new(proxies: &[ProxySettings], repository: &RepositorySettings, tasks: usize) -> Self {
        Self {
            proxies: proxies
                .iter()
                .map(|p| Slots {
                    name: p.name.clone(),
                    max: p.max_tasks,
                    running: 0,
                })
                .collect(),
            repository: Slots {
                name: repository.name.clone(),
                max: repository.max_tasks,
                running: 0,
            },
            queue: (0..tasks).collect(),
            avoid: HashMap::new(),
        }
    }

    /// Takes a proxy out of service (its agent cannot be reached).
    pub fn disable(&mut self, proxy: &str) {
        if let Some(p) = self.proxies.iter_mut().find(|p| p.name == proxy) {
            p.max = 0;
        }
    }

    /// Whether any proxy can take tasks.
    pub fn usable(&self) -> bool {
        self.proxies.iter().any(|p| p.max > 0)
    }

    /// Puts a task whose link was lost back at the head of the queue; it
    /// goes to another proxy than `failed_on` if one is in service.
    pub fn retry(&mut self, task: usize, failed_on: &str) {
        self.avoid
            .entry(task)
            .or_default()
            .push(failed_on.to_owned());
        self.queue.push_front(task);
    }

    /// The next task that can start now, on the least-loaded proxy.
    pub fn next_assignment(&mut self) -> Option<Assignment> {
        if self.queue.is_empty() || !self.repository.free() {
            return None;
        }
        let task = *self.queue.front()?;
        let avoid: &[String] = self.avoid.get(&task).map_or(&[], Vec::as_slice);
        // Avoid only while some proxy in service is not avoided; with none
        // left, any proxy is better than failing.
        let all_avoided = self
            .proxies
            .iter()
            .filter(|p| p.max > 0)
            .all(|p| avoid.contains(&p.name));
        let avoided = |p: &Slots| avoid.contains(&p.name);
        let proxy = self
            .proxies
            .iter_mut()
            .filter(|p| p.free() && (all_avoided || !avoided(p)))
            .min_by(|a, b| {
                a.load()
                    .total_cmp(&b.load())
                    .then_with(|| a.name.cmp(&b.name))
            })?;
        self.queue.pop_front();
        proxy.running += 1;
        self.repository.running += 1;
        Some(Assignment {
            task,
            proxy: proxy.name.clone(),
        })
    }

    pub fn release(&mut self, proxy: &str) {
        if let Some(p) = self.proxies.iter_mut().find(|p| p.name == proxy) {
            p.running = p.running.saturating_sub(1);
        }
        self.repository.running = self.repository.running.saturating_sub(1);
    }

    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Why the head of the queue waits, for the session log.
    pub fn wait_reason(&self) -> Option<String> {
        if self.queue.is_empty() {
            return None;
        }
        if !self.repository.free() {
            return Some(format!(
                "repository '{}' has all {} task slots busy",
                self.repository.name, self.repository.max
            ));
        }
        Some("every proxy has all its task slots busy".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(name: &str, max: u32) -> ProxySettings {
        ProxySettings {
            name: name.into(),
            max_tasks: max,
            agent: None,
            fingerprint: None,
        }
    }

    fn repo(max: u32) -> RepositorySettings {
        RepositorySettings {
            name: "r".into(),
            path: "/r".into(),
            max_tasks: max,
            agent: None,
            fingerprint: None,
        }
    }

    #[test]
    fn spreads_over_proxies_and_queues_when_full() {
        let mut s = Scheduler::new(&[proxy("a", 1), proxy("b", 2)], &repo(10), 5);
        let got: Vec<_> = std::iter::from_fn(|| s.next_assignment()).collect();
        assert_eq!(got.len(), 3, "three slots in all");
        assert_eq!(got[0].proxy, "a");
        assert_eq!(got[1].proxy, "b");
        assert_eq!(s.waiting(), 2);
        assert!(s.wait_reason().unwrap().contains("proxy"));
        s.release("a");
        assert_eq!(
            s.next_assignment(),
            Some(Assignment {
                task: 3,
                proxy: "a".into()
            })
        );
    }

    #[test]
    fn repository_slots_bound_everything() {
        let mut s = Scheduler::new(&[proxy("a", 8)], &repo(2), 4);
        assert!(s.next_assignment().is_some() && s.next_assignment().is_some());
        assert_eq!(s.next_assignment(), None);
        assert!(s.wait_reason().unwrap().contains("repository 'r'"));
        s.release("a");
        assert_eq!(s.next_assignment().map(|a| a.task), Some(2));
    }

    #[test]
    fn a_retry_goes_to_another_proxy_and_a_disabled_one_gets_nothing() {
        let mut s = Scheduler::new(&[proxy("a", 1), proxy("b", 1), proxy("c", 1)], &repo(10), 2);
        s.disable("c");
        let first = s.next_assignment().unwrap();
        assert_eq!(first.proxy, "a");
        s.release("a");
        s.retry(first.task, "a");
        let again = s.next_assignment().unwrap();
        assert_eq!(
            (again.task, again.proxy.as_str()),
            (0, "b"),
            "not back to a"
        );
        // Task 1 runs on a; c is never used.
        assert_eq!(s.next_assignment().unwrap().proxy, "a");
        assert_eq!(s.next_assignment(), None);
        // Once every proxy in service failed it, any free one takes it.
        s.release("b");
        s.retry(0, "b");
        assert_eq!(s.next_assignment().unwrap().proxy, "b");
        // A fresh retry avoiding only a waits for b rather than using a.
        let mut s = Scheduler::new(&[proxy("a", 1), proxy("b", 1)], &repo(10), 2);
        let t0 = s.next_assignment().unwrap();
        let t1 = s.next_assignment().unwrap();
        assert_eq!((t0.proxy.as_str(), t1.proxy.as_str()), ("a", "b"));
        s.release("a");
        s.retry(t0.task, "a");
        assert_eq!(s.next_assignment(), None, "b is busy, a avoided");
        s.release("b");
        assert_eq!(s.next_assignment().unwrap().proxy, "b");
    }

    #[test]
    fn with_one_proxy_a_retry_goes_back_to_it() {
        let mut s = Scheduler::new(&[proxy("a", 1)], &repo(1), 1);
        let t = s.next_assignment().unwrap();
        s.release("a");
        s.retry(t.task, "a");
        assert_eq!(s.next_assignment().unwrap().proxy, "a");
        let mut none = Scheduler::new(&[proxy("a", 1)], &repo(1), 1);
        none.disable("a");
        assert!(!none.usable());
    }
}
