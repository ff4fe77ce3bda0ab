//! Proxies and a repository on their own network hosts: each agent runs in
//! a network namespace of its own, joined to the backup server (this
//! namespace) by veth pairs on a bridge. What crosses between them is real
//! routed traffic, so throttling rules match by real source addresses.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A bridge with one namespace per host; removed when dropped.
struct Network {
    bridge: String,
    hosts: Vec<String>,
    /// The /24 the bridge and the hosts share: `{prefix}.1` is this side.
    prefix: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Network {
    fn new(hosts: usize) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let prefix = format!("10.{}.{}", 100 + n, std::process::id() % 250);
        let net = Self {
            bridge: format!("abr{tag}"),
            hosts: (0..hosts).map(|i| format!("arca-{tag}-h{i}")).collect(),
            prefix,
        };
        ip(&["link", "add", &net.bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}.1/24", net.prefix),
            "dev",
            &net.bridge,
        ]);
        ip(&["link", "set", &net.bridge, "up"]);
        for (i, ns) in net.hosts.iter().enumerate() {
            let (outer, inner) = (format!("av{tag}{i}"), format!("ai{tag}{i}"));
            ip(&["netns", "add", ns]);
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &outer, "master", &net.bridge, "up"]);
            ip(&["link", "set", &inner, "netns", ns]);
            let addr = format!("{}/24", net.addr(i));
            ip(&["-n", ns, "addr", "add", &addr, "dev", &inner]);
            ip(&["-n", ns, "link", "set", &inner, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn addr(&self, host: usize) -> String {
        format!("{}.{}", self.prefix, host + 2)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and with it the pair.
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

fn random_disk(lab: &Lab, name: &str, size: u64, seed: u64) -> PathBuf {
    let p = lab.path(name);
    let mut data = vec![0u8; size as usize];
    rand::RngCore::fill_bytes(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed),
        &mut data,
    );
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn proxies_and_repository_on_separate_network_hosts() {
    let lab = Lab::new();
    let net = Network::new(3);
    let me = lab.ok(&["identity"]).trim().to_owned();
    let start = |host: usize, home: &str, role: &[&str], trust: &[&str]| {
        Agent::spawn_with(
            lab.command_in(&net.hosts[host]),
            &lab,
            home,
            role,
            trust,
            &format!("{}:0", net.addr(host)),
        )
    };
    let p1 = start(1, "p1-home", &["--proxy", "p1"], &[&me]);
    let p2 = start(2, "p2-home", &["--proxy", "p2"], &[&me]);
    let repo_dir = lab.path("agent-repo");
    let repo = start(
        0,
        "repo-home",
        &["--repository", repo_dir.to_str().unwrap()],
        &[&me, &p1.fingerprint, &p2.fingerprint],
    );
    assert!(repo.addr.starts_with(&net.prefix), "{}", repo.addr);

    let d0 = random_disk(&lab, "d0.raw", 24 * MIB, 400);
    let d1 = lab.path("d1.raw");
    make_disk(&d1, 24 * MIB, 401);
    // A rule for p1's host only: its task is throttled, p2's is not.
    let rule = format!(
        "[[throttle]]\nname = \"from-p1\"\nsource = \"{}/32\"\ntarget = \"{}/24\"\nrate = \"8MiB\"\n\n",
        net.addr(1),
        net.prefix.clone() + ".0"
    );
    let mut toml = format!(
        "[[repository]]\nname = \"remote\"\nagent = \"{}\"\nfingerprint = \"{}\"\n\n\
         [[repository]]\nname = \"local-view\"\npath = \"{}\"\n\n",
        repo.addr,
        repo.fingerprint,
        repo_dir.display()
    );
    for (name, p) in [("p1", &p1), ("p2", &p2)] {
        toml.push_str(&format!(
            "[[proxy]]\nname = \"{name}\"\nagent = \"{}\"\nfingerprint = \"{}\"\nmax_tasks = 1\n\n",
            p.addr, p.fingerprint
        ));
    }
    toml.push_str(&vm_toml("a", &[&d0]));
    toml.push_str(&vm_toml("b", &[&d1]));
    toml.push_str(&rule);
    toml.push_str(
        "[[job]]\nname = \"nightly\"\nvms = [\"a\", \"b\"]\nrepository = \"remote\"\nproxies = [\"p1\", \"p2\"]\n",
    );
    lab.apply(&toml);

    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let tasks = r["tasks"].as_array().unwrap();
    let on = |p: &str| tasks.iter().find(|t| t["proxy"] == p).unwrap();
    let (t1, t2) = (on("p1"), on("p2"));
    let throttled = |t: &serde_json::Value| t["notices"].to_string().contains("from-p1");
    assert!(throttled(t1), "p1's traffic matches the rule: {t1:#}");
    assert!(!throttled(t2), "p2's does not: {t2:#}");
    for t in tasks {
        let src: &Path = if t["vm"] == "a" { &d0 } else { &d1 };
        let out = lab.path("out.raw");
        lab.ok(&[
            "restore",
            t["restore_point"].as_str().unwrap(),
            "--to",
            out.to_str().unwrap(),
            "--force",
        ]);
        assert_eq!(sha256(&out), sha256(src));
    }
    lab.ok(&["verify", "--repository", "local-view"]);
    // The repository saw each proxy connect from its own host.
    let log = repo.stderr();
    for host in [1, 2] {
        assert!(
            log.contains(&format!("target mover started for {}:", net.addr(host))),
            "{log}"
        );
    }
    drop((p1, p2));
}
