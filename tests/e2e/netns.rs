//! Proxies and a repository on their own network hosts: each agent runs in
//! a network namespace of its own, joined to the backup server (this
//! namespace) by veth pairs on a bridge. What crosses between them is real
//! routed traffic, so throttling rules match by real source addresses.

use crate::common::*;
use std::path::Path;

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
        restore_matches(&lab, t["restore_point"].as_str().unwrap(), src);
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
