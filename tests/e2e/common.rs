//! Shared helpers: a private arca home per test, disk image makers, digests.

use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub const MIB: u64 = 1 << 20;
/// The block size of a job that does not set one.
pub const BLOCK: u64 = arca::config::DEFAULT_BLOCK_SIZE as u64;

pub fn arca_bin() -> &'static str {
    env!("CARGO_BIN_EXE_arca")
}

pub fn plugin_path(file: &str) -> PathBuf {
    Path::new(env!("ARCA_PLUGIN_DIR")).join(file)
}

/// A private arca installation: state folder, repository and disks in one
/// temporary folder. Compiled plugins are cached across tests.
pub struct Lab {
    pub dir: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn command(&self) -> Command {
        self.setup(Command::new(arca_bin()))
    }

    /// arca inside the network namespace `netns` (same files, own network).
    pub fn command_in(&self, netns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns, arca_bin()]);
        self.setup(c)
    }

    /// Gives `c` this lab's environment (home, plugin cache, exports).
    pub fn setup(&self, mut c: Command) -> Command {
        c.env("ARCA_HOME", self.path("home"))
            .env(
                "ARCA_CACHE",
                Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache"),
            )
            .env("ARCA_EXPORT_DIR", self.path("exports"))
            .env_remove("ARCA_LOG");
        c
    }

    pub fn arca(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run arca")
    }

    /// Runs arca and insists it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.arca(args);
        assert!(
            out.status.success(),
            "arca {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn apply(&self, toml: &str) -> String {
        let path = self.path("arca.toml");
        std::fs::write(&path, toml).unwrap();
        self.ok(&["apply", path.to_str().unwrap()])
    }

    /// Runs a job with a JSON report.
    pub fn run_job(&self, job: &str) -> (bool, serde_json::Value) {
        let out = self.arca(&["job", "run", job, "--json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "no JSON report ({e}); status {}\nstdout: {text}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), report)
    }

    pub fn points(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["points", "--json"])).unwrap()
    }
}

/// An `arca agent` process with its own home (so its own identity),
/// killed with SIGKILL when dropped.
pub struct Agent {
    pub child: std::process::Child,
    pub addr: String,
    pub fingerprint: String,
    /// The agent's log: a file, because an unread pipe would fill and
    /// block the agent.
    pub log: PathBuf,
}

impl Agent {
    /// Starts an agent with `role` arguments (`--repository DIR`,
    /// `--proxy NAME`) that trusts the `trust` fingerprints.
    pub fn spawn(lab: &Lab, home: &str, role: &[&str], trust: &[&str], listen: &str) -> Self {
        Self::spawn_with(lab.command(), lab, home, role, trust, listen)
    }

    /// Like `spawn`, with `cmd` as the arca command (e.g. run inside a
    /// network namespace).
    pub fn spawn_with(
        mut cmd: Command,
        lab: &Lab,
        home: &str,
        role: &[&str],
        trust: &[&str],
        listen: &str,
    ) -> Self {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
        let log = lab.path(&format!("{home}-{}.log", rand::random::<u32>()));
        cmd.env("ARCA_HOME", lab.path(home))
            .args(["agent", "--listen", listen])
            .args(role)
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap());
        for t in trust {
            cmd.args(["--trust", t]);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "arca agent listening on ADDR (identity FP)"
        let addr = line
            .split_whitespace()
            .nth(4)
            .unwrap_or_else(|| panic!("agent said: {line:?}"))
            .to_owned();
        let fingerprint = line
            .trim()
            .trim_end_matches(')')
            .rsplit(' ')
            .next()
            .unwrap()
            .to_owned();
        Self {
            child,
            addr,
            fingerprint,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the agent and returns its log.
    pub fn stderr(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log_text()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `[[vm]]` table of image-file disks.
pub fn vm_toml(name: &str, disks: &[&Path]) -> String {
    let list: Vec<String> = disks
        .iter()
        .map(|d| format!("\"{}\"", d.display()))
        .collect();
    format!(
        "[[vm]]\nname = \"{name}\"\ndisks = [{}]\n\n",
        list.join(", ")
    )
}

/// Checks that a session's tasks were throttled by `rule` at `rate` bytes/s
/// and that, over the whole session, they stayed under the rate (+10%)
/// without being starved (the floor is loose on purpose: the session time
/// also pays plugin compilation on a cold cache and shares two cores with
/// the other tests).
pub fn assert_rule_held(r: &serde_json::Value, rule: &str, rate: u64, min_sent: u64) {
    assert!(
        r["notices"]
            .to_string()
            .contains(&format!("throttled by rule(s) {rule}")),
        "{r:#}"
    );
    let sent = r["totals"]["transferred_bytes"].as_u64().unwrap();
    assert!(sent > min_sent, "everything went over the link: {sent}");
    let seconds = r["duration_seconds"].as_f64().unwrap();
    let measured = sent as f64 / seconds;
    eprintln!(
        "throttled session: {:.2} MiB/s over {seconds:.2} s under a rule of {:.2} MiB/s",
        measured / MIB as f64,
        rate as f64 / MIB as f64
    );
    let ratio = measured / rate as f64;
    assert!(
        (0.7..1.10).contains(&ratio),
        "the tasks together ran at {:.2} MiB/s under a rule of {:.2} MiB/s",
        measured / MIB as f64,
        rate as f64 / MIB as f64
    );
}

/// The standard config of a lab: one repository, the given VMs
/// (`name -> disk paths`), one job per call.
pub fn config(lab: &Lab, vms: &[(&str, &[&Path])], extra: &str) -> String {
    let mut s = format!(
        "[[repository]]\nname = \"main\"\npath = \"{}\"\nmax_tasks = 4\n\n",
        lab.path("repo").display()
    );
    for (name, disks) in vms {
        s.push_str(&vm_toml(name, disks));
    }
    s.push_str(extra);
    s
}

/// A disk image with a realistic mix: compressible text, random data, zero
/// runs written as data, and holes never written (sparse). Block-sized
/// regions of each kind, chosen by a seeded generator.
pub fn make_disk(path: &Path, size: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let region = 256 * 1024u64;
    let words: Vec<&str> = "the quick brown fox jumps over lazy dog backup repository snapshot proxy session task restore point chunk block disk"
        .split(' ')
        .collect();
    let mut off = 0;
    while off < size {
        let len = region.min(size - off);
        let kind = rng.random_range(0..10);
        let mut buf = vec![0u8; len as usize];
        match kind {
            0..=3 => {
                // ~40% text-like
                let mut pos = 0;
                while pos < buf.len() {
                    let w = words[rng.random_range(0..words.len())].as_bytes();
                    let n = w.len().min(buf.len() - pos);
                    buf[pos..pos + n].copy_from_slice(&w[..n]);
                    pos += n;
                    if pos < buf.len() {
                        buf[pos] = b' ';
                        pos += 1;
                    }
                }
            }
            4..=5 => rng.fill_bytes(&mut buf),
            6 => {} // zeros written as data
            _ => {
                off += len; // hole
                continue;
            }
        }
        f.write_all_at(&buf, off).unwrap();
        off += len;
    }
    f.sync_all().unwrap();
}

/// Overwrites `count` runs of random bytes at seeded places.
pub fn change_disk(path: &Path, count: usize, run: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    for _ in 0..count {
        let at = rng.random_range(0..size - run as u64);
        let mut buf = vec![0u8; run];
        rng.fill_bytes(&mut buf);
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

pub fn sha256(path: &Path) -> String {
    let mut f = File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

/// Bytes a file really occupies on disk.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Total size of all chunk records in a repository (its packs, and chunk
/// files of format 1).
pub fn chunk_bytes(repo: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        let mut total = 0;
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                total += walk(&path);
            } else {
                total += std::fs::metadata(&path).unwrap().len();
            }
        }
        total
    }
    ["packs", "chunks"]
        .iter()
        .map(|d| repo.join(d))
        .filter(|d| d.is_dir())
        .map(|d| walk(&d))
        .sum()
}

/// The chunk addresses a repository holds, read through arca's own index.
pub fn chunk_addresses(repo: &Path) -> Vec<[u8; 32]> {
    arca::repository::Repository::open(repo)
        .unwrap()
        .chunk_addresses()
        .unwrap()
}

pub fn point_of<'a>(
    points: &'a [serde_json::Value],
    vm: &str,
    disk: &str,
) -> Vec<&'a serde_json::Value> {
    points
        .iter()
        .filter(|p| p["vm"] == vm && p["disk"] == disk)
        .collect()
}

/// A bridge with one namespace per host; removed when dropped.
pub struct Network {
    bridge: String,
    pub hosts: Vec<String>,
    /// The /24 the bridge and the hosts share: `{prefix}.1` is this side.
    pub prefix: String,
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
    pub fn new(hosts: usize) -> Self {
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

    pub fn addr(&self, host: usize) -> String {
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

/// A disk of random (incompressible) data.
pub fn random_disk(lab: &Lab, name: &str, size: u64, seed: u64) -> PathBuf {
    let p = lab.path(name);
    let mut data = vec![0u8; size as usize];
    rand::RngCore::fill_bytes(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed),
        &mut data,
    );
    std::fs::write(&p, data).unwrap();
    p
}

/// Restores `point` and insists it is bit-exact with `source`.
pub fn restore_matches(lab: &Lab, point: &str, source: &Path) {
    let out = lab.path("out.raw");
    lab.ok(&["restore", point, "--to", out.to_str().unwrap(), "--force"]);
    assert_eq!(sha256(&out), sha256(source), "restore of {point}");
}

/// Waits until a program started by a test listens on the Unix socket
/// `path`: the socket file appears a moment before it does.
pub fn wait_until_listening(path: &Path, program: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{program} did not start listening on {}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Runs job `nightly` through `agent` after its repository was pruned or
/// repaired under it, and insists that the agent loaded its index again:
/// the chunks it had indexed are stored again, the repository verifies
/// clean, and the new point restores to `expected` (a SHA-256).
pub fn run_after_index_change(lab: &Lab, agent: &Agent, expected: &str) {
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(
        r["totals"]["stored_bytes"].as_u64().unwrap() > 0,
        "the chunks were sent again: {r:#}"
    );
    assert!(
        lab.ok(&["verify", "--repository", "local-view"])
            .contains("clean")
    );
    let out = lab.path("reloaded.raw");
    let point = r["tasks"][0]["restore_point"].as_str().unwrap();
    lab.ok(&["restore", point, "--to", out.to_str().unwrap(), "--force"]);
    assert_eq!(sha256(&out), expected, "restore of {point}");
    assert!(
        agent
            .log_text()
            .contains("since its index was loaded; loading it again"),
        "{}",
        agent.log_text()
    );
}

/// A repository agent on loopback serving `agent-repo`, and the config of
/// one VM (`web01`, `disk`) whose job `job` backs up to it ("remote"); the
/// same folder is also configured as "local-view", for the agent's host's
/// own commands (verify, prune). `extra` is appended to the job's table.
pub fn agent_lab(lab: &Lab, disk: &Path, job: &str, extra: &str) -> Agent {
    let me = lab.ok(&["identity"]).trim().to_owned();
    let agent_repo = lab.path("agent-repo");
    let agent = Agent::spawn(
        lab,
        "agent-home",
        &["--repository", agent_repo.to_str().unwrap()],
        &[&me],
        "127.0.0.1:0",
    );
    lab.apply(&format!(
        "[[repository]]\nname = \"remote\"\nagent = \"{}\"\nfingerprint = \"{}\"\n\n\
         [[repository]]\nname = \"local-view\"\npath = \"{}\"\n\n{}\
         [[job]]\nname = \"{job}\"\nvms = [\"web01\"]\nrepository = \"remote\"\n{extra}",
        agent.addr,
        agent.fingerprint,
        agent_repo.display(),
        vm_toml("web01", &[disk])
    ));
    agent
}
