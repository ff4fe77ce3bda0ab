//! Repositories served by a separate `arca agent` process over QUIC, on
//! loopback: mutual TLS with pinned certificates, refusals, and an agent
//! killed mid-task.

use crate::common::*;
use std::path::Path;
use std::process::Stdio;

trait RepositoryAgent {
    fn start(lab: &Lab, repo: &Path, trust: &[&str]) -> Agent;
    fn start_on(lab: &Lab, repo: &Path, trust: &[&str], listen: &str) -> Agent;
}

impl RepositoryAgent for Agent {
    fn start(lab: &Lab, repo: &Path, trust: &[&str]) -> Agent {
        Self::start_on(lab, repo, trust, "127.0.0.1:0")
    }

    fn start_on(lab: &Lab, repo: &Path, trust: &[&str], listen: &str) -> Agent {
        let repo = repo.to_str().unwrap();
        Agent::spawn(lab, "agent-home", &["--repository", repo], trust, listen)
    }
}

fn remote_config(lab: &Lab, disks: &[&Path], agent: &Agent, fingerprint: &str) -> String {
    let list: Vec<String> = disks
        .iter()
        .map(|d| format!("\"{}\"", d.display()))
        .collect();
    format!(
        "[[repository]]\nname = \"remote\"\nagent = \"{}\"\nfingerprint = \"{fingerprint}\"\n\n\
         [[repository]]\nname = \"local-view\"\npath = \"{}\"\n\n\
         [[vm]]\nname = \"web01\"\ndisks = [{}]\n\n[[job]]\nname = \"nightly\"\nvms = [\"web01\"]\nrepository = \"remote\"\n",
        agent.addr,
        lab.path("agent-repo").display(),
        list.join(", ")
    )
}

#[test]
fn backups_go_to_a_repository_agent_over_quic() {
    let lab = Lab::new();
    let me = lab.ok(&["identity"]).trim().to_owned();
    let agent = Agent::start(&lab, &lab.path("agent-repo"), &[&me]);
    let d0 = lab.path("d0.raw");
    let d1 = lab.path("d1.raw");
    make_disk(&d0, 24 * MIB, 81);
    make_disk(&d1, 24 * MIB, 82);
    lab.apply(&remote_config(
        &lab,
        &[&d0, &d1],
        &agent,
        &agent.fingerprint,
    ));

    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(r["totals"]["transferred_bytes"].as_u64().unwrap() > 0);
    change_disk(&d0, 4, 64 * 1024, 83);
    let (ok, r2) = lab.run_job("nightly");
    assert!(ok, "{r2:#}");
    let t0 = r2["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["disk"] == "disk0")
        .unwrap();
    assert!(
        t0["parent_point"].is_string(),
        "incremental against the agent's repository: {t0:#}"
    );

    let status = lab.ok(&[
        "agent",
        "status",
        "--agent",
        &agent.addr,
        "--fingerprint",
        &agent.fingerprint,
    ]);
    assert!(
        status.contains("tasks running 0, committed 4, aborted 0"),
        "{status}"
    );
    assert!(status.contains("agent-repo"), "{status}");

    // Restore and verify on the repository's host (here: the same machine).
    lab.ok(&["verify", "--repository", "local-view"]);
    for t in r2["tasks"].as_array().unwrap() {
        let src = if t["disk"] == "disk0" { &d0 } else { &d1 };
        restore_matches(&lab, t["restore_point"].as_str().unwrap(), src);
    }
    // The agent's log names the session and task of each line.
    let log = agent.stderr();
    let session = r2["session_id"].as_u64().unwrap();
    assert!(
        log.contains(&format!(
            "session {session} task web01/disk0: restore point"
        )),
        "{log}"
    );
}

#[test]
fn a_point_whose_block_list_is_larger_than_a_batch_travels_whole() {
    // 2.75 Mi blocks of 64 KiB: a block list of 88 MiB, over the 80 MiB a
    // store message may take (a 1 TiB disk at 256 KiB blocks has 128 MiB).
    // Sparse: only a few blocks hold data.
    let lab = Lab::new();
    let me = lab.ok(&["identity"]).trim().to_owned();
    let agent = Agent::start(&lab, &lab.path("agent-repo"), &[&me]);
    let disk = lab.path("big.raw");
    let size = 176 * 1024 * MIB;
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0x5a; 4096], 0).unwrap();
    f.write_all_at(&[0xa5; 4096], size - 4096).unwrap();
    drop(f);
    let config = remote_config(&lab, &[&disk], &agent, &agent.fingerprint);
    lab.apply(&format!("{config}block_size = \"64KiB\"\n"));

    let (ok, full) = lab.run_job("nightly");
    assert!(ok, "{full:#}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&[0x77; 4096], size / 2)
        .unwrap();
    // The incremental reads its parent from the agent (`LATEST`, whole).
    let (ok, incr) = lab.run_job("nightly");
    assert!(ok, "{incr:#}");
    let t = &incr["tasks"][0];
    assert_eq!(
        t["parent_point"], full["tasks"][0]["restore_point"],
        "{t:#}"
    );
    assert_eq!(t["stats"]["unchanged_bytes"].as_u64(), Some(2 * 64 * 1024));
    assert_eq!(t["stats"]["new_bytes"].as_u64(), Some(64 * 1024));
}

#[test]
fn unenrolled_peers_wrong_certificates_and_garbage_are_refused() {
    let lab = Lab::new();
    let me = lab.ok(&["identity"]).trim().to_owned();
    let disk = lab.path("d.raw");
    make_disk(&disk, 4 * MIB, 84);

    // The agent does not know this backup server.
    let stranger = Agent::start(&lab, &lab.path("agent-repo"), &["sha256:00"]);
    lab.apply(&remote_config(
        &lab,
        &[&disk],
        &stranger,
        &stranger.fingerprint,
    ));
    let (ok, r) = lab.run_job("nightly");
    assert!(!ok);
    let e = r["tasks"][0]["error"].as_str().unwrap();
    assert!(
        e.contains("the agent refused this server") && e.contains("--trust"),
        "{e}"
    );
    let log = stranger.stderr();
    assert!(log.contains("not enrolled"), "the agent says why: {log}");

    // The server pins another certificate than the agent's.
    let agent = Agent::start(&lab, &lab.path("agent-repo"), &[&me]);
    lab.apply(&remote_config(
        &lab,
        &[&disk],
        &agent,
        "sha256:0123456789abcdef",
    ));
    let (ok, r) = lab.run_job("nightly");
    assert!(!ok);
    let e = r["tasks"][0]["error"].as_str().unwrap();
    assert!(
        e.contains("not enrolled") && e.contains("check its fingerprint"),
        "{e}"
    );
    assert!(
        !e.contains("gave up after"),
        "a refusal is not retried: {e}"
    );

    // Garbage on the port: the agent shrugs and goes on serving.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..1200).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
        sock.send_to(&junk, &agent.addr).unwrap();
    }
    lab.apply(&remote_config(&lab, &[&disk], &agent, &agent.fingerprint));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "the agent still serves after garbage: {r:#}");
}

/// Starts a one-worker session and kills the agent once it has staged some
/// chunks; returns the running session.
fn session_with_agent_killed(lab: &Lab, agent: Agent) -> std::process::Child {
    let session = lab
        .command()
        .args(["job", "run", "nightly", "--json", "--workers", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let staging = lab.path("agent-repo/staging");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let staged = std::fs::read_dir(&staging)
            .map(|d| {
                d.flatten().any(|e| {
                    // A staging pack with a few chunks in it.
                    std::fs::read_dir(e.path())
                        .map(|f| {
                            f.flatten().any(|p| {
                                p.path().extension().is_some_and(|x| x == "pack")
                                    && p.metadata().is_ok_and(|m| m.len() > 256 << 10)
                            })
                        })
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false);
        if staged {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never staged anything"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    drop(agent); // SIGKILL
    session
}

#[test]
fn a_task_whose_agent_dies_is_retried_and_fails_clearly_when_it_stays_down() {
    let lab = Lab::new();
    let me = lab.ok(&["identity"]).trim().to_owned();
    let disk = lab.path("d.raw");
    make_disk(&disk, 192 * MIB, 85);

    // The agent comes back: the retry succeeds.
    let agent = Agent::start(&lab, &lab.path("agent-repo"), &[&me]);
    let addr = agent.addr.clone();
    lab.apply(&remote_config(&lab, &[&disk], &agent, &agent.fingerprint));
    let session = session_with_agent_killed(&lab, agent);
    let agent = Agent::start_on(&lab, &lab.path("agent-repo"), &[&me], &addr);
    let out = session.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{r:#}");
    assert!(
        r["notices"]
            .to_string()
            .contains("attempt 1 on proxy 'local' failed"),
        "{r:#}"
    );
    let point = r["tasks"][0]["restore_point"].as_str().unwrap().to_owned();
    lab.ok(&["verify", "--repository", "local-view"]);
    let restored = lab.path("out.raw");
    lab.ok(&["restore", &point, "--to", restored.to_str().unwrap()]);
    assert_eq!(sha256(&restored), sha256(&disk));

    // The agent stays down: the task fails clearly, no partial point appears.
    change_disk(&disk, 40, 1 << 20, 86);
    let points_before = lab.points().len();
    let session = session_with_agent_killed(&lab, agent);
    let out = session.wait_with_output().unwrap();
    assert!(!out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = r["tasks"][0]["error"].as_str().unwrap();
    assert!(e.contains("gave up after 3 attempts"), "{e}");
    assert_eq!(
        lab.points().len(),
        points_before,
        "no partial restore point"
    );

    // A restarted agent sweeps the staging; the repository verifies clean.
    let agent = Agent::start_on(&lab, &lab.path("agent-repo"), &[&me], &addr);
    lab.ok(&["verify", "--repository", "local-view"]);
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    drop(agent);
}

#[test]
fn a_throttling_rule_is_shared_by_parallel_tasks() {
    // The repository on a host of its own: rules never apply within one.
    let lab = Lab::new();
    let net = Network::new(1);
    let me = lab.ok(&["identity"]).trim().to_owned();
    let repo = lab.path("agent-repo");
    let agent = Agent::spawn_with(
        lab.command_in(&net.hosts[0]),
        &lab,
        "agent-home",
        &["--repository", repo.to_str().unwrap()],
        &[&me],
        &format!("{}:0", net.addr(0)),
    );
    // Incompressible disks, so what is sent is what the rule meters.
    let disks: Vec<_> = (0..3)
        .map(|i| random_disk(&lab, &format!("d{i}.raw"), 24 * MIB, 90 + i))
        .collect();
    let rate = 12 * MIB;
    lab.apply(&format!(
        "[[repository]]\nname = \"remote\"\nagent = \"{}\"\nfingerprint = \"{}\"\nmax_tasks = 3\n\n\
         [[proxy]]\nname = \"local\"\nmax_tasks = 3\n\n\
         [[throttle]]\nname = \"wan\"\ntarget = \"{}.0/24\"\nrate = \"12MiB\"\n\n\
         [[vm]]\nname = \"a\"\ndisks = [\"{}\"]\n[[vm]]\nname = \"b\"\ndisks = [\"{}\"]\n[[vm]]\nname = \"c\"\ndisks = [\"{}\"]\n\n\
         [[job]]\nname = \"nightly\"\nvms = [\"a\", \"b\", \"c\"]\nrepository = \"remote\"\n",
        agent.addr,
        agent.fingerprint,
        net.prefix,
        disks[0].display(),
        disks[1].display(),
        disks[2].display()
    ));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert_rule_held(&r, "wan", rate, 70 * MIB);
}

/// A UDP relay in front of an agent, on loopback: each client address gets
/// its own upstream socket, and the agent's datagrams wait `delay` before
/// they go back. `cut` makes every flow seen so far a black hole for good
/// (datagrams still waiting included); flows that start later pass.
struct Relay {
    addr: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    dead: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
}

impl Relay {
    fn start(agent: &str, delay: std::time::Duration) -> Relay {
        use std::collections::{HashMap, VecDeque};
        use std::net::{SocketAddr, UdpSocket};
        use std::sync::{Arc, Condvar, Mutex};
        use std::time::Instant;
        type Queue = Arc<(Mutex<VecDeque<(Instant, SocketAddr, Vec<u8>)>>, Condvar)>;
        let agent: SocketAddr = agent.parse().unwrap();
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let relay = Relay {
            addr: front.local_addr().unwrap().to_string(),
            seen: Arc::default(),
            dead: Arc::default(),
        };
        let queue: Queue = Arc::default();
        // Back to the clients, each datagram once its delay is over.
        {
            let (front, queue, dead) = (front.clone(), queue.clone(), relay.dead.clone());
            std::thread::spawn(move || {
                let (lock, ready) = &*queue;
                let mut q = lock.lock().unwrap();
                loop {
                    match q.front() {
                        None => q = ready.wait(q).unwrap(),
                        Some(&(due, _, _)) if due > Instant::now() => {
                            q = ready.wait_timeout(q, due - Instant::now()).unwrap().0;
                        }
                        Some(_) => {
                            let (_, client, data) = q.pop_front().unwrap();
                            if !dead.lock().unwrap().contains(&client) {
                                let _ = front.send_to(&data, client);
                            }
                        }
                    }
                }
            });
        }
        // From the clients to the agent, one upstream socket per client.
        let (seen, dead) = (relay.seen.clone(), relay.dead.clone());
        std::thread::spawn(move || {
            let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            while let Ok((n, client)) = front.recv_from(&mut buf) {
                if dead.lock().unwrap().contains(&client) {
                    continue;
                }
                let up = upstream.entry(client).or_insert_with(|| {
                    seen.lock().unwrap().push(client);
                    let up = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
                    up.connect(agent).unwrap();
                    let (up2, queue) = (up.clone(), queue.clone());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = up2.recv(&mut buf) {
                            let (lock, ready) = &*queue;
                            let due = Instant::now() + delay;
                            lock.lock()
                                .unwrap()
                                .push_back((due, client, buf[..n].to_vec()));
                            ready.notify_one();
                        }
                    });
                    up
                });
                let _ = up.send(&buf[..n]);
            }
        });
        relay
    }

    /// Every flow seen so far carries nothing more, either way.
    fn cut(&self) {
        let seen = self.seen.lock().unwrap().clone();
        self.dead.lock().unwrap().extend(seen);
    }
}

/// Manifests under a repository's `points/`.
fn manifests(repo: &Path) -> usize {
    fn walk(p: &Path) -> usize {
        std::fs::read_dir(p).map_or(0, |d| {
            d.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p)
                    } else {
                        usize::from(p.extension().is_some_and(|x| x == "manifest"))
                    }
                })
                .sum()
        })
    }
    walk(&repo.join("points"))
}

/// The agent commits a point but its answer never arrives: the link is cut
/// while the answer is still on its way (the relay holds the agent's
/// datagrams back long enough for the test to see the point land). The
/// retried task finds its own point and makes no second one.
#[test]
fn a_commit_whose_answer_is_lost_makes_no_second_point() {
    let lab = Lab::new();
    let me = lab.ok(&["identity"]).trim().to_owned();
    let disk = lab.path("d.raw");
    make_disk(&disk, 16 * MIB, 87);
    let agent = Agent::start(&lab, &lab.path("agent-repo"), &[&me]);
    // Long enough for this test to see the point land and cut the link
    // before the answer goes out, even on a busy machine.
    let relay = Relay::start(&agent.addr, std::time::Duration::from_millis(600));
    lab.apply(
        &remote_config(&lab, &[&disk], &agent, &agent.fingerprint)
            .replace(&agent.addr, &relay.addr),
    );
    for round in 0..2 {
        if round == 1 {
            change_disk(&disk, 8, 64 * 1024, 88);
        }
        let before = manifests(&lab.path("agent-repo"));
        let session = lab
            .command()
            .args(["job", "run", "nightly", "--json", "--workers", "1"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while manifests(&lab.path("agent-repo")) == before {
            assert!(std::time::Instant::now() < deadline, "no point landed");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        relay.cut();
        let out = session.wait_with_output().unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(out.status.success(), "round {round}: {r:#}");
        let notices = r["notices"].to_string() + &r["tasks"][0]["notices"].to_string();
        assert!(
            notices.contains("attempt 1 on proxy 'local' failed"),
            "round {round}: the answer was lost: {r:#}"
        );
        assert_eq!(
            manifests(&lab.path("agent-repo")),
            before + 1,
            "round {round}: one point for the task, not two"
        );
        assert!(
            notices.contains("committed by an earlier attempt of this task"),
            "round {round}: {r:#}"
        );
        let point = r["tasks"][0]["restore_point"].as_str().unwrap();
        restore_matches(&lab, point, &disk);
        if round == 1 {
            assert!(r["tasks"][0]["parent_point"].is_string(), "{r:#}");
            assert_ne!(r["tasks"][0]["parent_point"].as_str(), Some(point));
        }
    }
    lab.ok(&["verify", "--repository", "local-view"]);
}
