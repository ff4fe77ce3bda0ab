//! Guest processing: hooks over the QEMU guest agent protocol.
//!
//! Scripts, exit codes, modes and timeouts run against a real `qemu-ga`
//! started here (its freeze commands blocked: it is this machine's own
//! agent). Freeze/thaw ordering and the always-thaw guarantee run against
//! `FakeAgent`, a protocol peer that speaks the agent's JSON exactly as
//! qemu-ga does for these commands but freezes nothing; it also plays the
//! agent that hangs, hangs up or talks garbage.

use crate::common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct QemuGa(Child);

impl QemuGa {
    fn start(dir: &Path) -> (Self, PathBuf) {
        let sock = dir.join("qga.sock");
        let state = dir.join("qga-state");
        std::fs::create_dir_all(&state).unwrap();
        let child = Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-t")
            .arg(&state)
            .args([
                "-b",
                "guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw",
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-ga (scripts/setup.sh installs qemu-guest-agent)");
        wait_until_listening(&sock, "qemu-ga");
        (Self(child), sock)
    }
}

impl Drop for QemuGa {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn script(lab: &Lab, name: &str, body: &str) -> PathBuf {
    let p = lab.path(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A lab with a faithful fake guest agent and a 4 MiB disk made from
/// `seed`.
fn faithful_lab(seed: u64) -> (Lab, FakeAgent, PathBuf) {
    let lab = Lab::new();
    let agent = FakeAgent::start(lab.dir.path(), Peer::Faithful);
    let disk = lab.path("vm.raw");
    make_disk(&disk, 4 * MIB, seed);
    (lab, agent, disk)
}

/// A job whose guest processing runs the hostile hook plugin under the
/// name `bad-hook`; `guest` is the rest of the `[job.guest]` table and
/// `hook` the hook's settings after its plugin name.
fn apply_hostile_hook(lab: &Lab, disk: &Path, agent: &Path, guest: &str, hook: &str) {
    let plugin = Path::new(env!("ARCA_PLUGIN_DIR")).join("arca_plugin_hostile_hook.wasm");
    lab.apply(&format!(
        "[[repository]]\nname = \"main\"\npath = \"{}\"\n\n[[plugin]]\nname = \"bad-hook\"\nkind = \"guest-hook\"\npath = \"{}\"\n\n\
         [[vm]]\nname = \"app01\"\ndisks = [\"{}\"]\nguest_agent = \"{}\"\n\n\
         [[job]]\nname = \"nightly\"\nvms = [\"app01\"]\nrepository = \"main\"\n\n[job.guest]\n{guest}\n\
         hook = {{ plugin = \"bad-hook\"{hook} }}\n",
        lab.path("repo").display(),
        plugin.display(),
        disk.display(),
        agent.display()
    ));
}

fn apply_guest(lab: &Lab, disk: &Path, agent: &Path, guest: &str) {
    lab.apply(&format!(
        "[[repository]]\nname = \"main\"\npath = \"{}\"\n\n[[vm]]\nname = \"app01\"\ndisks = [\"{}\"]\nguest_agent = \"{}\"\n\n\
         [[job]]\nname = \"nightly\"\nvms = [\"app01\"]\nrepository = \"main\"\n\n[job.guest]\n{guest}\n",
        lab.path("repo").display(),
        disk.display(),
        agent.display()
    ));
}

#[test]
fn scripts_run_around_the_snapshot_in_order() {
    let lab = Lab::new();
    let (_ga, sock) = QemuGa::start(lab.dir.path());
    // A filesystem with reflinks, so the snapshot is a point in time between
    // the pre-freeze and post-thaw scripts.
    let fs = crate::snapshot::XfsMount::new(&lab);
    let disk = fs.dir.join("vm.raw");
    make_disk(&disk, 4 * MIB, 61);
    let log = lab.path("hooks.log");
    // The pre-freeze script writes a marker into the disk: it must be in the
    // restore point. The post-thaw script writes another: it must not.
    let pre = script(
        &lab,
        "pre.sh",
        &format!(
            "echo pre $1 >> {log}; printf PRE-FREEZE | dd of={disk} bs=1 seek=100 conv=notrunc status=none; echo quiesced",
            log = log.display(),
            disk = disk.display()
        ),
    );
    let post = script(
        &lab,
        "post.sh",
        &format!(
            "echo post $1 >> {log}; printf POST-THAW! | dd of={disk} bs=1 seek=200 conv=notrunc status=none",
            log = log.display(),
            disk = disk.display()
        ),
    );
    let after = script(
        &lab,
        "after.sh",
        &format!("echo backup-done $1 >> {}", log.display()),
    );
    apply_guest(
        &lab,
        &disk,
        &sock,
        &format!(
            "mode = \"require\"\nallow_exec = [\"{p}\", \"{q}\", \"{a}\"]\nhook = {{ plugin = \"guest-scripts\", pre_freeze = \"{p}\", post_thaw = \"{q}\", post_backup = \"{a}\", freeze = false }}",
            p = pre.display(),
            q = post.display(),
            a = after.display()
        ),
    );
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre app01\npost app01\nbackup-done app01\n"
    );
    let g = &r["guest"][0];
    assert_eq!(g["vm"], "app01");
    let steps: Vec<&str> = g["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["pre-snapshot", "post-snapshot", "post-backup"]);
    assert_eq!(
        g["commands"][0]["stdout"], "quiesced\n",
        "outputs are reported"
    );
    assert_eq!(g["application_consistent"], true);
    assert_eq!(r["tasks"][0]["consistency"], "application-consistent");

    let out = lab.path("restored.raw");
    lab.ok(&[
        "restore",
        r["tasks"][0]["restore_point"].as_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    let data = std::fs::read(&out).unwrap();
    assert_eq!(
        &data[100..110],
        b"PRE-FREEZE",
        "pre-freeze ran before the snapshot"
    );
    assert_ne!(
        &data[200..210],
        b"POST-THAW!",
        "post-thaw ran after the snapshot"
    );
}

#[test]
fn exit_codes_drive_the_modes_and_timeouts_hold() {
    let lab = Lab::new();
    let (_ga, sock) = QemuGa::start(lab.dir.path());
    let disk = lab.path("vm.raw");
    make_disk(&disk, 4 * MIB, 62);
    let fail = script(&lab, "fail.sh", "echo db busy >&2; exit 3");
    let slow = script(&lab, "slow.sh", "sleep 20");
    let ran = lab.path("ran");
    let marker = script(&lab, "mark.sh", &format!("touch {}", ran.display()));

    let conf = |mode: &str, pre: &Path, extra: &str| {
        format!(
            "mode = \"{mode}\"\nallow_exec = [\"{p}\"]\nhook = {{ plugin = \"guest-scripts\", pre_freeze = \"{p}\", freeze = false{extra} }}",
            p = pre.display()
        )
    };
    // require + failing script: the VM fails, no restore point.
    apply_guest(&lab, &disk, &sock, &conf("require", &fail, ""));
    let (ok, r) = lab.run_job("nightly");
    assert!(!ok);
    let e = r["tasks"][0]["error"].as_str().unwrap();
    assert!(
        e.contains("exited with 3") && e.contains("db busy") && e.contains("mode require"),
        "{e}"
    );
    assert!(lab.points().is_empty());

    // try + failing script: a crash-consistent restore point, said so.
    apply_guest(&lab, &disk, &sock, &conf("try", &fail, ""));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert_ne!(r["tasks"][0]["consistency"], "application-consistent");
    assert!(r["notices"].to_string().contains("mode try"), "{r:#}");
    assert_eq!(r["guest"][0]["application_consistent"], false);

    // off: no hook runs at all.
    apply_guest(&lab, &disk, &sock, &conf("off", &marker, ""));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert!(!ran.exists(), "mode off runs nothing in the guest");
    assert!(r["guest"].as_array().unwrap().is_empty());

    // A script that outlives its timeout fails in time.
    apply_guest(
        &lab,
        &disk,
        &sock,
        &conf("require", &slow, ", timeout_ms = 500"),
    );
    let started = Instant::now();
    let (ok, r) = lab.run_job("nightly");
    assert!(!ok);
    let e = r["tasks"][0]["error"].as_str().unwrap();
    assert!(e.contains("no answer") || e.contains("within"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the timeout held"
    );

    // A program the job does not allow is refused by the host.
    apply_guest(
        &lab,
        &disk,
        &sock,
        &format!(
            "mode = \"require\"\nhook = {{ plugin = \"guest-scripts\", pre_freeze = \"{}\", freeze = false }}",
            marker.display()
        ),
    );
    let (ok, r) = lab.run_job("nightly");
    assert!(!ok);
    assert!(
        r["tasks"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not allowed by the job"),
        "{r:#}"
    );
    assert!(!ran.exists());
}

/// How the fake agent behaves.
#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Faithful,
    /// Someone else has frozen the guest.
    AlreadyFrozen,
    Hang,
    HangUp,
    Garbage,
    /// The first two thaws fail (as they do while the agent is still busy
    /// with a slow freeze).
    ThawFailsTwice,
}

/// The fake guest's state, shared by every connection: the guest is frozen,
/// not the connection that froze it.
#[derive(Default)]
struct Guest {
    log: Vec<String>,
    frozen: bool,
    failed_thaws: u32,
}

/// A guest-agent protocol peer for freeze/thaw (see the module comment).
struct FakeAgent {
    guest: Arc<Mutex<Guest>>,
    sock: PathBuf,
}

impl FakeAgent {
    fn start(dir: &Path, behaviour: Peer) -> Self {
        let sock = dir.join("fake-qga.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let guest = Arc::new(Mutex::new(Guest {
            frozen: behaviour == Peer::AlreadyFrozen,
            ..Guest::default()
        }));
        let g = guest.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let g = g.clone();
                std::thread::spawn(move || serve(conn, behaviour, g));
            }
        });
        Self { guest, sock }
    }

    fn log(&self) -> Vec<String> {
        self.guest.lock().unwrap().log.clone()
    }

    fn frozen(&self) -> bool {
        self.guest.lock().unwrap().frozen
    }
}

fn serve(conn: std::os::unix::net::UnixStream, behaviour: Peer, guest: Arc<Mutex<Guest>>) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
            return;
        }
        // 0xFF resets the parser, as in qemu-ga.
        let text: Vec<u8> = line.into_iter().filter(|b| *b != 0xff).collect();
        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(&text) else {
            continue;
        };
        let cmd = msg["execute"].as_str().unwrap_or("").to_owned();
        if cmd != "guest-sync" {
            match behaviour {
                Peer::Hang => {
                    std::thread::sleep(Duration::from_secs(60));
                    return;
                }
                Peer::HangUp => return,
                Peer::Garbage => {
                    let _ = w.write_all(b"\x00\x13garbage{{{\n");
                    continue;
                }
                Peer::Faithful | Peer::AlreadyFrozen | Peer::ThawFailsTwice => {}
            }
        }
        let mut g = guest.lock().unwrap();
        let reply = match cmd.as_str() {
            "guest-sync" => serde_json::json!({ "return": msg["arguments"]["id"] }),
            "guest-ping" => serde_json::json!({ "return": {} }),
            // qemu-ga takes only thaw and status (and sync, ping) while frozen.
            "guest-fsfreeze-freeze" if g.frozen => {
                g.log.push("freeze refused".into());
                serde_json::json!({ "error": { "class": "GenericError", "desc": "Command guest-fsfreeze-freeze has been disabled" } })
            }
            "guest-fsfreeze-freeze" => {
                g.frozen = true;
                g.log.push("freeze".into());
                serde_json::json!({ "return": 2 })
            }
            "guest-fsfreeze-thaw" if behaviour == Peer::ThawFailsTwice && g.failed_thaws < 2 => {
                g.failed_thaws += 1;
                g.log.push("thaw failed".into());
                serde_json::json!({ "error": { "class": "GenericError", "desc": "busy" } })
            }
            "guest-fsfreeze-thaw" => {
                let n = if g.frozen { 2 } else { 0 };
                g.frozen = false;
                g.log.push("thaw".into());
                serde_json::json!({ "return": n })
            }
            "guest-fsfreeze-status" => {
                serde_json::json!({ "return": if g.frozen { "frozen" } else { "thawed" } })
            }
            other => {
                serde_json::json!({ "error": { "class": "CommandNotFound", "desc": format!("The command {other} has not been found") } })
            }
        };
        drop(g);
        let mut out = reply.to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

fn freeze_conf(mode: &str) -> String {
    format!("mode = \"{mode}\"\nagent_timeout_ms = 1000\nhook = {{ plugin = \"guest-scripts\" }}")
}

#[test]
fn freeze_surrounds_the_snapshot_and_thaw_always_happens() {
    let lab = Lab::new();
    let agent = FakeAgent::start(lab.dir.path(), Peer::Faithful);
    let fs = crate::snapshot::XfsMount::new(&lab);
    let disk = fs.dir.join("vm.raw");
    make_disk(&disk, 4 * MIB, 63);
    apply_guest(&lab, &disk, &agent.sock, &freeze_conf("require"));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert_eq!(agent.log(), ["freeze", "thaw"]);
    assert_eq!(
        r["guest"][0]["events"],
        serde_json::json!(["freeze", "thaw"])
    );
    assert_eq!(r["guest"][0]["application_consistent"], true);
    assert_eq!(r["tasks"][0]["consistency"], "application-consistent");

    // The snapshot fails after the freeze (the disk is gone): thawed anyway.
    std::fs::remove_file(&disk).unwrap();
    let (ok, r) = lab.run_job("nightly");
    assert!(!ok);
    assert!(
        r["tasks"][0]["error"].as_str().unwrap().contains("vm.raw"),
        "{r:#}"
    );
    assert_eq!(
        agent.log(),
        ["freeze", "thaw", "freeze", "thaw"],
        "thaw after a failed snapshot"
    );
}

#[test]
fn a_hook_that_dies_while_frozen_is_thawed_by_the_host() {
    let (lab, agent, disk) = faithful_lab(64);
    // A third-party hook that freezes and then traps.
    apply_hostile_hook(&lab, &disk, &agent.sock, "mode = \"try\"", "");
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "mode try goes on crash-consistent: {r:#}");
    assert_eq!(
        agent.log(),
        ["freeze", "thaw"],
        "the host thawed what the hook left frozen"
    );
    let notices = r["notices"].to_string();
    assert!(
        notices.contains("plugin 'bad-hook'") && notices.contains("host thawed"),
        "{notices}"
    );
    assert_ne!(r["tasks"][0]["consistency"], "application-consistent");
}

#[test]
fn a_hook_that_freezes_after_the_backup_is_thawed_by_the_host() {
    let (lab, agent, disk) = faithful_lab(67);
    apply_hostile_hook(
        &lab,
        &disk,
        &agent.sock,
        "mode = \"try\"",
        ", behaviour = \"freeze-after-backup\"",
    );
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert_eq!(
        agent.log(),
        ["freeze", "thaw"],
        "the post-backup freeze does not outlive the session"
    );
    assert!(r["notices"].to_string().contains("host thawed"), "{r:#}");
}

#[test]
fn an_agent_that_hangs_hangs_up_or_talks_garbage_is_a_clear_error() {
    for (peer, expect) in [
        (Peer::Hang, "no answer to guest-ping within"),
        (Peer::HangUp, "connection lost during guest-ping"),
        (Peer::Garbage, "unintelligible answer to guest-ping"),
    ] {
        let lab = Lab::new();
        let agent = FakeAgent::start(lab.dir.path(), peer);
        let disk = lab.path("vm.raw");
        make_disk(&disk, 4 * MIB, 65);
        apply_guest(&lab, &disk, &agent.sock, &freeze_conf("require"));
        let started = Instant::now();
        let (ok, r) = lab.run_job("nightly");
        assert!(!ok);
        let e = r["tasks"][0]["error"].as_str().unwrap();
        assert!(e.contains(expect), "{e}");
        assert!(started.elapsed() < Duration::from_secs(20), "nothing hangs");

        apply_guest(&lab, &disk, &agent.sock, &freeze_conf("try"));
        let (ok, r) = lab.run_job("nightly");
        assert!(ok, "mode try backs up crash-consistent: {r:#}");
        assert!(r["notices"].to_string().contains(expect), "{r:#}");
    }
}

#[test]
fn the_example_sqlite_hook_checkpoints_the_database_before_the_snapshot() {
    let lab = Lab::new();
    let (_ga, sock) = QemuGa::start(lab.dir.path());
    let disk = lab.path("vm.raw");
    make_disk(&disk, 4 * MIB, 66);
    let db = lab.path("app.db");
    // A database in WAL mode with committed rows still in its log: an idle
    // second connection (an application) keeps the writer's close from
    // checkpointing them.
    let sqlite = |sql: &str| {
        let out = Command::new("sqlite3")
            .arg(&db)
            .arg(sql)
            .output()
            .expect("sqlite3 (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sqlite("PRAGMA journal_mode=WAL; CREATE TABLE t(x);");
    let mut app = Command::new("sqlite3")
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    app.stdin
        .as_mut()
        .unwrap()
        .write_all(b"SELECT count(*) FROM t;\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    sqlite("PRAGMA wal_autocheckpoint=0; INSERT INTO t VALUES (1),(2),(3);");
    let wal = lab.path("app.db-wal");
    assert!(
        std::fs::metadata(&wal).unwrap().len() > 0,
        "rows wait in the WAL"
    );

    let plugin =
        Path::new(env!("ARCA_EXAMPLE_PLUGIN_DIR")).join("arca_example_sqlite_quiesce.wasm");
    lab.apply(&format!(
        "[[repository]]\nname = \"main\"\npath = \"{}\"\n\n[[plugin]]\nname = \"sqlite-quiesce\"\nkind = \"guest-hook\"\npath = \"{}\"\n\n\
         [[vm]]\nname = \"app01\"\ndisks = [\"{}\"]\nguest_agent = \"{}\"\n\n\
         [[job]]\nname = \"nightly\"\nvms = [\"app01\"]\nrepository = \"main\"\n\n[job.guest]\nmode = \"require\"\n\
         allow_exec = [\"/usr/bin/sqlite3\"]\nhook = {{ plugin = \"sqlite-quiesce\", database = \"{}\" }}\n",
        lab.path("repo").display(), plugin.display(), disk.display(), sock.display(), db.display()
    ));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    let cmd = &r["guest"][0]["commands"][0];
    assert_eq!(cmd["path"], "/usr/bin/sqlite3");
    assert_eq!(cmd["exit_code"], 0);
    assert!(cmd["stdout"].as_str().unwrap().starts_with("0|"), "{cmd:#}");
    assert_eq!(
        std::fs::metadata(&wal).unwrap().len(),
        0,
        "the WAL was checkpointed into the database"
    );
    let _ = app.kill();
    let _ = app.wait();
}

#[test]
fn a_guest_frozen_by_someone_else_is_not_frozen_again() {
    let lab = Lab::new();
    let agent = FakeAgent::start(lab.dir.path(), Peer::AlreadyFrozen);
    let disk = lab.path("vm.raw");
    make_disk(&disk, 4 * MIB, 67);
    apply_guest(&lab, &disk, &agent.sock, &freeze_conf("require"));
    let (ok, r) = lab.run_job("nightly");
    assert!(!ok);
    assert!(
        r["tasks"][0]["error"]
            .as_str()
            .unwrap()
            .contains("already frozen by someone else"),
        "{r:#}"
    );
    assert!(
        agent.log().iter().all(|e| e != "freeze"),
        "no second freeze: {:?}",
        agent.log()
    );
}

#[test]
fn a_freeze_the_agent_refuses_leaves_someone_elses_freeze_alone() {
    let lab = Lab::new();
    // Another session (another job backing up the same VM) holds a freeze.
    let agent = FakeAgent::start(lab.dir.path(), Peer::AlreadyFrozen);
    let disk = lab.path("vm.raw");
    make_disk(&disk, 4 * MIB, 73);
    // A hook that freezes without asking first.
    apply_hostile_hook(&lab, &disk, &agent.sock, "mode = \"try\"", "");
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "mode try goes on crash-consistent: {r:#}");
    assert!(
        wait_for(Duration::from_secs(10), || guards_of(&agent.sock)
            .is_empty()),
        "a guard outlived its session"
    );
    // Neither the session, nor its Drop, nor its guard thawed the other
    // session's freeze.
    assert_eq!(agent.log(), ["freeze refused"]);
    assert!(agent.frozen());
    assert_ne!(r["tasks"][0]["consistency"], "application-consistent");
}

#[test]
fn the_stamp_is_written_in_the_guest_only_where_the_job_allows() {
    let lab = Lab::new();
    let (_ga, sock) = QemuGa::start(lab.dir.path());
    let disk = lab.path("vm.raw");
    make_disk(&disk, 4 * MIB, 68);
    let stamp = lab.path("stamps/last-backup");
    std::fs::create_dir_all(stamp.parent().unwrap()).unwrap();
    let conf = |allow: &str| {
        format!(
            "mode = \"try\"\nallow_files = [{allow}]\nhook = {{ plugin = \"guest-scripts\", freeze = false, stamp = \"{}\" }}",
            stamp.display()
        )
    };
    apply_guest(
        &lab,
        &disk,
        &sock,
        &conf(&format!("\"{}/\"", stamp.parent().unwrap().display())),
    );
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    assert_eq!(
        std::fs::read_to_string(&stamp).unwrap(),
        "app01: backed up by arca\n"
    );

    std::fs::remove_file(&stamp).unwrap();
    apply_guest(&lab, &disk, &sock, &conf(""));
    let (ok, r) = lab.run_job("nightly");
    assert!(
        ok,
        "a failed post-backup hook does not undo the backup: {r:#}"
    );
    assert!(
        r["notices"].to_string().contains("not allowed by the job"),
        "{r:#}"
    );
    assert!(!stamp.exists());
}

#[test]
fn a_freeze_never_outlives_the_freeze_timeout() {
    for (mode, ok_expected) in [("require", false), ("try", true)] {
        let (lab, agent, disk) = faithful_lab(69);
        // The hook keeps the guest frozen for about a second; the job allows 100 ms.
        apply_hostile_hook(
            &lab,
            &disk,
            &agent.sock,
            &format!("mode = \"{mode}\"\nfreeze_timeout_ms = 100"),
            ", behaviour = \"stall\"",
        );
        let (ok, r) = lab.run_job("nightly");
        assert_eq!(ok, ok_expected, "{mode}: {r:#}");
        let log = agent.log();
        assert_eq!(
            &log[..2],
            ["freeze", "thaw"],
            "{mode}: thawed by the watchdog before the hook returned"
        );
        let events = r["guest"][0]["events"].to_string();
        assert!(
            events.contains("thawed by the host after the freeze timeout"),
            "{mode}: {events}"
        );
        let all = r.to_string();
        assert!(
            all.contains("stayed frozen past the freeze timeout"),
            "{mode}: {all}"
        );
        assert_eq!(r["guest"][0]["application_consistent"], false);
    }
}

/// Waits up to `limit` for `done`.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done()
}

#[test]
fn a_thaw_that_fails_after_the_freeze_timeout_is_retried_until_it_holds() {
    let lab = Lab::new();
    let agent = FakeAgent::start(lab.dir.path(), Peer::ThawFailsTwice);
    let disk = lab.path("vm.raw");
    make_disk(&disk, 4 * MIB, 70);
    // The hook keeps the guest frozen for seconds; the job allows 100 ms.
    apply_hostile_hook(
        &lab,
        &disk,
        &agent.sock,
        "mode = \"try\"\nfreeze_timeout_ms = 100",
        ", behaviour = \"stall\", spins = \"4000000000\"",
    );
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "mode try goes on crash-consistent: {r:#}");
    // The watchdog tried again 0.1 s and 0.2 s after its failures, while the
    // hook still held the freeze, so the hook's own thaw found nothing to
    // do. A single attempt would have left the hook's thaw to fail and the
    // host's last thaw to end the freeze, seconds late.
    assert_eq!(
        agent.log(),
        ["freeze", "thaw failed", "thaw failed", "thaw"]
    );
    assert!(!agent.frozen());
    let events: Vec<String> = serde_json::from_value(r["guest"][0]["events"].clone()).unwrap();
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(events[1].contains("the host keeps trying"), "{events:?}");
    assert_eq!(
        events[2],
        "thawed by the host after the freeze timeout of 100ms, at attempt 3"
    );
    assert_eq!(
        events[3],
        "thaw not sent: nothing of this session is frozen"
    );
    assert_eq!(r["guest"][0]["application_consistent"], false);
}

/// The pids of freeze guards serving `sock`.
fn guards_of(sock: &Path) -> Vec<u32> {
    let needle = sock.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.contains(&&b"freeze-guard"[..]) && args.contains(&needle)
        })
        .collect()
}

#[test]
fn a_session_that_dies_with_the_guest_frozen_is_thawed_by_its_guard() {
    use std::os::unix::process::CommandExt;
    for (how, signal, group) in [
        ("SIGKILL to the session", libc::SIGKILL, false),
        ("Ctrl-C to its process group", libc::SIGINT, true),
    ] {
        let (lab, agent, disk) = faithful_lab(71);
        // The hook holds the freeze far longer than the test waits, under a
        // freeze timeout that never fires: only the guard can end it.
        apply_hostile_hook(
            &lab,
            &disk,
            &agent.sock,
            "mode = \"require\"\nfreeze_timeout_ms = 600000",
            ", behaviour = \"stall\", spins = \"400000000000\"",
        );
        let log = lab.path("session.stderr");
        let mut session = lab.command();
        session
            .args(["job", "run", "nightly", "--json"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .process_group(0);
        let mut session = session.spawn().unwrap();
        assert!(
            wait_for(Duration::from_secs(60), || agent.frozen()),
            "{how}: the session never froze the guest: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert_eq!(guards_of(&agent.sock).len(), 1, "{how}: one guard");
        let target = if group {
            -(session.id() as i32)
        } else {
            session.id() as i32
        };
        // SAFETY: signalling our own child (or its process group).
        assert_eq!(unsafe { libc::kill(target, signal) }, 0);
        let status = session.wait().unwrap();
        assert!(!status.success(), "{how}: {status:?}");
        assert!(
            wait_for(Duration::from_secs(20), || !agent.frozen()),
            "{how}: the guest stayed frozen: {:?}",
            agent.log()
        );
        assert_eq!(agent.log(), ["freeze", "thaw"], "{how}");
        assert!(
            wait_for(Duration::from_secs(10), || guards_of(&agent.sock)
                .is_empty()),
            "{how}: the guard stayed after its thaw"
        );
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(
            said.contains("arca freeze-guard: the session ended with the guest at")
                && said.contains("thawed 2 filesystem(s)"),
            "{how}: {said}"
        );
    }
}

#[test]
fn a_session_that_ends_normally_leaves_no_guard() {
    let (lab, agent, disk) = faithful_lab(72);
    apply_guest(&lab, &disk, &agent.sock, &freeze_conf("require"));
    let (ok, r) = lab.run_job("nightly");
    assert!(ok, "{r:#}");
    // The guard was told of the thaw and left when the session ended,
    // without a thaw of its own.
    assert!(
        wait_for(Duration::from_secs(10), || guards_of(&agent.sock)
            .is_empty()),
        "a guard outlived its session"
    );
    assert_eq!(agent.log(), ["freeze", "thaw"]);
    assert!(!r.to_string().contains("freeze guard"), "{r:#}");
}
