//! Proxies served by separate `arca agent` processes on loopback: the
//! session assigns tasks over the control channel, source movers run on the
//! proxy agents and send blocks straight to a repository agent. Each agent
//! has its own identity; the repository trusts the session and both proxies,
//! the proxies trust the session.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Site {
    repo: Agent,
    proxies: Vec<Agent>,
}

fn site(lab: &Lab, proxies: &[&str]) -> Site {
    site_on(lab, proxies, None)
}

/// The repository and the proxies on loopback, or each on its own host of
/// `net` (the repository on host 0, proxy i on host i + 1).
fn site_on(lab: &Lab, proxies: &[&str], net: Option<&Network>) -> Site {
    let me = lab.ok(&["identity"]).trim().to_owned();
    let start = |host: usize, home: &str, role: &[&str], trust: &[&str]| match net {
        Some(net) => Agent::spawn_with(
            lab.command_in(&net.hosts[host]),
            lab,
            home,
            role,
            trust,
            &format!("{}:0", net.addr(host)),
        ),
        None => Agent::spawn(lab, home, role, trust, "127.0.0.1:0"),
    };
    let proxies: Vec<Agent> = proxies
        .iter()
        .enumerate()
        .map(|(i, name)| start(i + 1, &format!("{name}-home"), &["--proxy", name], &[&me]))
        .collect();
    let mut trust: Vec<&str> = vec![&me];
    trust.extend(proxies.iter().map(|p| p.fingerprint.as_str()));
    let repo_dir = lab.path("agent-repo");
    let repo = start(
        0,
        "repo-home",
        &["--repository", repo_dir.to_str().unwrap()],
        &trust,
    );
    Site { repo, proxies }
}

/// A job over `vms` whose tasks run on the site's proxies, `slots` each.
fn site_config(
    lab: &Lab,
    site: &Site,
    slots: &[u32],
    vms: &[(&str, &[&Path])],
    extra: &str,
) -> String {
    let mut s = format!(
        "[[repository]]\nname = \"remote\"\nagent = \"{}\"\nfingerprint = \"{}\"\nmax_tasks = 4\n\n\
         [[repository]]\nname = \"local-view\"\npath = \"{}\"\n\n",
        site.repo.addr,
        site.repo.fingerprint,
        lab.path("agent-repo").display()
    );
    let mut names = Vec::new();
    for (i, p) in site.proxies.iter().enumerate() {
        let name = format!("p{}", i + 1);
        s.push_str(&format!(
            "[[proxy]]\nname = \"{name}\"\nagent = \"{}\"\nfingerprint = \"{}\"\nmax_tasks = {}\n\n",
            p.addr, p.fingerprint, slots[i]
        ));
        names.push(format!("\"{name}\""));
    }
    let mut vm_names = Vec::new();
    for (name, disks) in vms {
        s.push_str(&vm_toml(name, disks));
        vm_names.push(format!("\"{name}\""));
    }
    s.push_str(extra);
    s.push_str(&format!(
        "[[job]]\nname = \"nightly\"\nvms = [{}]\nrepository = \"remote\"\nproxies = [{}]\n",
        vm_names.join(", "),
        names.join(", ")
    ));
    s
}

#[test]
fn two_proxy_agents_share_the_tasks_and_restores_are_bit_exact() {
    let lab = Lab::new();
    let site = site(&lab, &["p1", "p2"]);
    let disks: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = lab.path(&format!("d{i}.raw"));
            make_disk(&p, 24 * MIB, 300 + i);
            p
        })
        .collect();
    let a: &[&Path] = &[&disks[0], &disks[1]];
    let b: &[&Path] = &[&disks[2], &disks[3]];
    lab.apply(&site_config(
        &lab,
        &site,
        &[1, 1],
        &[("a", a), ("b", b)],
        "",
    ));

    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let tasks = r["tasks"].as_array().unwrap();
    let on = |p: &str| tasks.iter().filter(|t| t["proxy"] == p).count();
    assert_eq!(on("p1") + on("p2"), 4);
    assert!(on("p1") >= 1 && on("p2") >= 1, "spread: {r:#}");
    let log = r["log"].to_string();
    assert!(
        log.contains("task(s) waiting: every proxy has all its task slots busy"),
        "one slot per proxy, four tasks: {log}"
    );
    assert!(r["totals"]["transferred_bytes"].as_u64().unwrap() > 0);

    // An incremental: each proxy asks the repository agent for the parent.
    change_disk(&disks[0], 3, 64 * 1024, 310);
    let (ok, r2) = lab.run_job("nightly");
    assert!(ok, "{r2:#}");
    for t in r2["tasks"].as_array().unwrap() {
        assert!(t["parent_point"].is_string(), "{t:#}");
        assert!(
            t["stats"]["unchanged_bytes"].as_u64().unwrap() > 0,
            "incremental on the proxy: {t:#}"
        );
        // The proxy maps the raw snapshot it reads, as a local task does.
        assert_eq!(
            t["stats"]["mapped_bytes"], t["stats"]["read_bytes"],
            "{t:#}"
        );
    }
    for t in r2["tasks"].as_array().unwrap() {
        let i: usize = match (t["vm"].as_str().unwrap(), t["disk"].as_str().unwrap()) {
            ("a", "disk0") => 0,
            ("a", _) => 1,
            ("b", "disk0") => 2,
            _ => 3,
        };
        restore_matches(&lab, t["restore_point"].as_str().unwrap(), &disks[i]);
    }
    lab.ok(&["verify", "--repository", "local-view"]);
    // Snapshot clones are gone; the proxies' logs name session and task.
    assert!(
        std::fs::read_dir(lab.dir.path())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".arca-snap")),
        "snapshots cleaned up"
    );
    let session = r2["session_id"].as_u64().unwrap();
    let logs: String = site.proxies.iter().map(Agent::log_text).collect();
    assert!(
        logs.contains(&format!(
            "session {session} task a/disk0: source mover ended: success"
        )),
        "{logs}"
    );
}

#[test]
fn a_proxy_killed_mid_task_is_replaced_by_the_other() {
    let lab = Lab::new();
    // Own hosts, so that a throttling rule can slow the task down: it is
    // surely running when p1 dies.
    let net = Network::new(3);
    let mut site = site_on(&lab, &["p1", "p2"], Some(&net));
    let disk = random_disk(&lab, "d.raw", 32 * MIB, 320);
    let rule = format!(
        "[[throttle]]\nname = \"slow\"\ntarget = \"{}.0/24\"\nrate = \"6MiB\"\n\n",
        net.prefix
    );
    lab.apply(&site_config(
        &lab,
        &site,
        &[1, 1],
        &[("a", &[&disk])],
        &rule,
    ));
    let session = lab
        .command()
        .args(["job", "run", "nightly", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The single task goes to the least-loaded proxy, p1 by name.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !site.proxies[0].log_text().contains("source mover started") {
        assert!(Instant::now() < deadline, "p1 never started the task");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(800));
    let p1 = site.proxies.remove(0);
    drop(p1); // SIGKILL
    let out = session.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{r:#}");
    assert_eq!(r["tasks"][0]["proxy"], "p2", "{r:#}");
    assert!(
        r["notices"]
            .to_string()
            .contains("attempt 1 on proxy 'p1' failed"),
        "{r:#}"
    );
    assert!(
        r["notices"]
            .to_string()
            .contains("link to target mover lost"),
        "{r:#}"
    );
    assert!(r["log"].to_string().contains("queued again"), "{r:#}");
    restore_matches(
        &lab,
        r["tasks"][0]["restore_point"].as_str().unwrap(),
        &disk,
    );
    lab.ok(&["verify", "--repository", "local-view"]);

    // p1 stays dead: the next session leaves it out and still succeeds.
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(
        r["log"]
            .to_string()
            .contains("proxy 'p1' is out of service"),
        "{r:#}"
    );
    assert_eq!(r["tasks"][0]["proxy"], "p2");
}

#[test]
fn a_throttling_rule_holds_across_proxy_agents() {
    // Rules never apply within one host: each agent gets its own.
    let lab = Lab::new();
    let net = Network::new(3);
    let site = site_on(&lab, &["p1", "p2"], Some(&net));
    let disks: Vec<PathBuf> = (0..3)
        .map(|i| random_disk(&lab, &format!("d{i}.raw"), 24 * MIB, 330 + i))
        .collect();
    let rule = format!(
        "[[throttle]]\nname = \"wan\"\ntarget = \"{}.0/24\"\nrate = \"12MiB\"\n\n",
        net.prefix
    );
    let vms: Vec<(String, [&Path; 1])> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("vm{i}"), [d.as_path()]))
        .collect();
    let vms: Vec<(&str, &[&Path])> = vms.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
    lab.apply(&site_config(&lab, &site, &[2, 1], &vms, &rule));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let tasks = r["tasks"].as_array().unwrap();
    assert_eq!(tasks.iter().filter(|t| t["proxy"] == "p1").count(), 2);
    assert_rule_held(&r, "wan", 12 * MIB, 70 * MIB);
}

#[test]
fn a_proxy_that_cannot_see_the_snapshot_hands_the_task_to_one_that_can() {
    let lab = Lab::new();
    let me = lab.ok(&["identity"]).trim().to_owned();
    let disks = lab.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let disk = disks.join("d.raw");
    make_disk(&disk, 16 * MIB, 340);
    // p1 runs in a mount namespace of its own where the disks' folder is an
    // empty tmpfs: the snapshot is out of its reach, as on another host.
    let mut hidden = Command::new("unshare");
    hidden.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &format!("mount -t tmpfs none '{}' && exec \"$@\"", disks.display()),
        "sh",
        arca_bin(),
    ]);
    let p1 = Agent::spawn_with(
        lab.setup(hidden),
        &lab,
        "p1-home",
        &["--proxy", "p1"],
        &[&me],
        "127.0.0.1:0",
    );
    let p2 = Agent::spawn(&lab, "p2-home", &["--proxy", "p2"], &[&me], "127.0.0.1:0");
    let repo_dir = lab.path("agent-repo");
    let repo = Agent::spawn(
        &lab,
        "repo-home",
        &["--repository", repo_dir.to_str().unwrap()],
        &[&me, &p1.fingerprint, &p2.fingerprint],
        "127.0.0.1:0",
    );
    let site = Site {
        repo,
        proxies: vec![p1, p2],
    };
    lab.apply(&site_config(&lab, &site, &[1, 1], &[("a", &[&disk])], ""));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert_eq!(r["tasks"][0]["proxy"], "p2", "{r:#}");
    assert!(
        r["notices"]
            .to_string()
            .contains("proxy 'p1' cannot read the snapshot"),
        "{r:#}"
    );
    restore_matches(
        &lab,
        r["tasks"][0]["restore_point"].as_str().unwrap(),
        &disk,
    );
}
