//! Backups over a long, rate-limited link (run with `cargo bench --bench
//! wan`, as root: it makes a network namespace).
//!
//! The repository agent runs in a network namespace behind a veth pair whose
//! egress towards it is rate-limited by `tc tbf` (ARCA_BENCH_LINK_MBIT,
//! default 200 Mbit/s; buffer of 100 ms at that rate). This kernel has no
//! netem, so latency comes from a small UDP relay in this process that holds
//! every datagram for half the round-trip time in each direction. The same
//! full backup (of ARCA_BENCH_DISK_MIB, default 1024, built from real files)
//! goes to a fresh repository at 0, 50 and 100 ms RTT (ARCA_BENCH_RTTS).
//! Prints two link uses against the link's rate: the session's (payload
//! bytes over the whole session, handshakes, slow start and the final
//! commit included) and the data phase's (bytes on the wire, headers
//! included, from the first MiB to 99% of the transfer, sampled from the
//! qdisc). The goal is ≥ 80% at 100 ms. Never asserts on time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

mod common;

use common::{MIB, arca, make_disk, timed_named_job};

const HOST_ADDR: &str = "10.199.0.1";
const AGENT_ADDR: &str = "10.199.0.2";

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace for the repository host and the rate-limited veth to it.
struct Link {
    ns: String,
    veth: String,
}

impl Link {
    fn new(mbit: u64) -> Self {
        let tag = std::process::id() % 100_000;
        let link = Self {
            ns: format!("arca-wan-{tag}"),
            veth: format!("aw{tag}"),
        };
        let inner = format!("awi{tag}");
        sh("ip", &["netns", "add", &link.ns]);
        sh(
            "ip",
            &[
                "link", "add", &link.veth, "type", "veth", "peer", "name", &inner,
            ],
        );
        sh("ip", &["link", "set", &inner, "netns", &link.ns]);
        sh(
            "ip",
            &["addr", "add", &format!("{HOST_ADDR}/24"), "dev", &link.veth],
        );
        sh("ip", &["link", "set", &link.veth, "up"]);
        let ns_ip = |args: &[&str]| {
            let mut all = vec!["-n", link.ns.as_str()];
            all.extend_from_slice(args);
            sh("ip", &all);
        };
        ns_ip(&["addr", "add", &format!("{AGENT_ADDR}/24"), "dev", &inner]);
        ns_ip(&["link", "set", &inner, "up"]);
        ns_ip(&["link", "set", "lo", "up"]);
        // The bottleneck: towards the repository, where the data goes.
        let rate = format!("{mbit}mbit");
        sh(
            "tc",
            &[
                "qdisc", "add", "dev", &link.veth, "root", "tbf", "rate", &rate, "burst", "64kb",
                "latency", "100ms",
            ],
        );
        link
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Large socket buffers for the relay, so that the link's queue is the tbf
/// buffer it was given and not the relay's default socket buffer (which
/// would drop at a few milliseconds of traffic). Needs root (`*FORCE`).
fn big_buffers(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let bytes: libc::c_int = 16 << 20;
    for option in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
        // SAFETY: setsockopt on a socket we own, with a c_int value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
    }
}

/// Forwards datagrams between a client on loopback and `upstream`, holding
/// each for `one_way` in each direction. Returns the address to connect to.
async fn relay(upstream: SocketAddr, one_way: Duration) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind(format!("{HOST_ADDR}:0")).await.unwrap());
    big_buffers(&front);
    big_buffers(&back);
    let addr = front.local_addr().unwrap();
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    // Each direction: a reader stamps datagrams, a writer sends them when due.
    // One delay for all keeps them in order, as a long cable would.
    let (to_up, mut up_queue) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let (to_down, mut down_queue) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    {
        let (front, client) = (front.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                let _ = to_up.send((Instant::now() + one_way, buf[..n].to_vec()));
            }
        });
    }
    {
        let back = back.clone();
        tokio::spawn(async move {
            while let Some((due, packet)) = up_queue.recv().await {
                tokio::time::sleep_until(due).await;
                let _ = back.send_to(&packet, upstream).await;
            }
        });
    }
    {
        let back = back.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                let _ = to_down.send((Instant::now() + one_way, buf[..n].to_vec()));
            }
        });
    }
    tokio::spawn(async move {
        while let Some((due, packet)) = down_queue.recv().await {
            tokio::time::sleep_until(due).await;
            let to = *client.lock().unwrap();
            if let Some(to) = to {
                let _ = front.send_to(&packet, to).await;
            }
        }
    });
    addr
}

/// Starts a repository agent in the namespace; returns it with its port and
/// fingerprint.
fn agent(link: &Link, dir: &Path, me: &str) -> (std::process::Child, u16, String) {
    use std::io::BufRead;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &link.ns, env!("CARGO_BIN_EXE_arca")])
        .env("ARCA_HOME", dir.join("agent-home"))
        .args([
            "agent",
            "--listen",
            &format!("{AGENT_ADDR}:0"),
            "--trust",
            me,
        ])
        .arg("--repository")
        .arg(dir.join(format!("agent-repo-{}", rand::random::<u32>())))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("arca agent");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let port = words[4].rsplit(':').next().unwrap().parse().unwrap();
    (child, port, words[6].trim_end_matches(')').to_owned())
}

/// Bytes the link's qdisc has sent so far (on the wire: IP, UDP and QUIC
/// headers included).
fn link_bytes(veth: &str) -> u64 {
    let out = Command::new("tc")
        .args(["-s", "qdisc", "show", "dev", veth])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "Sent")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Samples the link's byte counter every 50 ms until `stop`.
fn sample_link(veth: String, stop: Arc<std::sync::atomic::AtomicBool>) -> Vec<(f64, u64)> {
    let t0 = std::time::Instant::now();
    let mut out = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        out.push((t0.elapsed().as_secs_f64(), link_bytes(&veth)));
        std::thread::sleep(Duration::from_millis(50));
    }
    out.push((t0.elapsed().as_secs_f64(), link_bytes(&veth)));
    out
}

/// The link's use while data flowed: from the first MiB to 99% of what the
/// session sent, in bits per second on the wire.
fn data_phase_bps(samples: &[(f64, u64)]) -> f64 {
    let (first, last) = (samples[0].1, samples[samples.len() - 1].1);
    let total = last.saturating_sub(first);
    let at = |bytes: u64| {
        samples
            .iter()
            .find(|(_, n)| n - first >= bytes)
            .copied()
            .unwrap_or(samples[samples.len() - 1])
    };
    let (t1, n1) = at(MIB);
    let (t2, n2) = at(total / 100 * 99);
    if t2 <= t1 {
        return 0.0;
    }
    (n2 - n1) as f64 * 8.0 / (t2 - t1)
}

fn main() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mbit = env("ARCA_BENCH_LINK_MBIT", 200);
    let size = env("ARCA_BENCH_DISK_MIB", 1024) * MIB;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-wan");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.raw");
    let data = make_disk(&disk, size);
    println!(
        "disk: {} MiB, {} MiB of real file data; link {mbit} Mbit/s (tc tbf), delay by a UDP relay",
        size / MIB,
        data / MIB
    );
    let home = dir.join("home");
    let me = arca(&home, &["identity"]).trim().to_owned();
    let link = Link::new(mbit);
    // The relay is the network: it must not wait for a CPU behind the
    // session's coders on this two-core machine (a real link does not).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(|| {
            // SAFETY: sets this thread's own nice value (Linux: per thread).
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -15) };
        })
        .enable_all()
        .build()
        .unwrap();
    println!(
        "\n{:>8} {:>10} {:>9} {:>10} {:>10} {:>10} {:>14}  busiest stages (thread-seconds)",
        "RTT ms", "rule", "seconds", "MiB sent", "Mbit/s", "session use", "data-phase use"
    );
    let rtts: Vec<u64> = std::env::var("ARCA_BENCH_RTTS")
        .unwrap_or_else(|_| "0,50,100".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    // Optionally also each RTT under a throttling rule at this share of the
    // link (the seed's way to keep a WAN link from being overrun).
    let rule_percent = env("ARCA_BENCH_RULE_PERCENT", 0);
    let runs = rtts
        .iter()
        .flat_map(|&rtt| [(rtt, false), (rtt, rule_percent > 0)])
        .collect::<std::collections::BTreeSet<_>>();
    for (rtt_ms, ruled) in runs {
        let (mut child, port, fp) = agent(&link, &dir, &me);
        let upstream: SocketAddr = format!("{AGENT_ADDR}:{port}").parse().unwrap();
        let front = rt.block_on(relay(upstream, Duration::from_millis(rtt_ms / 2)));
        let cfg = dir.join("wan.toml");
        std::fs::write(
            &cfg,
            format!(
                "[[repository]]\nname = \"far\"\nagent = \"{front}\"\nfingerprint = \"{fp}\"\n\n\
                 [[vm]]\nname = \"wan\"\ndisks = [\"{}\"]\n\n[[job]]\nname = \"wan\"\nvms = [\"wan\"]\nrepository = \"far\"\n{}",
                disk.display(),
                if ruled {
                    format!(
                        "\n[[throttle]]\nname = \"wan-link\"\ntarget = \"127.0.0.0/8\"\nrate = \"{}\"\n",
                        mbit * 1_000_000 / 8 * rule_percent / 100
                    )
                } else {
                    String::new()
                }
            ),
        )
        .unwrap();
        arca(&home, &["apply", cfg.to_str().unwrap()]);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (veth, stop) = (link.veth.clone(), stop.clone());
            std::thread::spawn(move || sample_link(veth, stop))
        };
        let (seconds, r) = timed_named_job(&home, "wan");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let phase = data_phase_bps(&sampler.join().unwrap());
        let _ = child.kill();
        let _ = child.wait();
        if std::env::var_os("ARCA_BENCH_SHOW_QDISC").is_some() {
            let out = Command::new("tc")
                .args(["-s", "qdisc", "show", "dev", &link.veth])
                .output()
                .unwrap();
            println!("{}", String::from_utf8_lossy(&out.stdout));
        }
        let sent = r["totals"]["transferred_bytes"].as_u64().unwrap_or(0);
        let mbits = sent as f64 * 8.0 / 1e6 / seconds;
        let mut stages: Vec<(String, f64)> = r["totals"]["stage_seconds"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default();
        stages.sort_by(|a, b| b.1.total_cmp(&a.1));
        let busiest: Vec<String> = stages
            .iter()
            .take(3)
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect();
        println!(
            "{:>8} {:>10} {:>9.2} {:>10.0} {:>10.1} {:>10.0}% {:>13.0}%  {}",
            rtt_ms,
            if ruled {
                format!("{rule_percent}% link")
            } else {
                "none".into()
            },
            seconds,
            sent as f64 / MIB as f64,
            mbits,
            100.0 * mbits / mbit as f64,
            100.0 * phase / 1e6 / mbit as f64,
            busiest.join(", ")
        );
    }
    drop(link);
}
