//! A client of the QEMU guest agent protocol (JSON over a unix socket or a
//! virtio-serial chardev exposed as one): sync handshake, ping, info, exec,
//! filesystem freeze and thaw. Every call is bounded in time; an agent that
//! hangs, disconnects or talks garbage gives a clear error, never a hang.

use base64::Engine;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Lines that are not the answer we wait for, before we call it garbage.
const MAX_STRAY_LINES: usize = 64;
/// Largest line accepted from an agent.
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("guest agent {socket}: cannot connect: {source}")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("guest agent {socket}: no answer to {command} within {timeout:?}")]
    Timeout {
        socket: PathBuf,
        command: String,
        timeout: Duration,
    },
    #[error("guest agent {socket}: connection lost during {command}")]
    Disconnected { socket: PathBuf, command: String },
    #[error("guest agent {socket}: unintelligible answer to {command}: {detail}")]
    Garbage {
        socket: PathBuf,
        command: String,
        detail: String,
    },
    #[error("guest agent {socket}: {command} failed: {desc}")]
    Command {
        socket: PathBuf,
        command: String,
        desc: String,
    },
}

/// What a command run in the guest did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

pub struct Agent {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
}

/// Connects within `timeout`. A plain `connect` to a unix socket waits
/// without bound while the listener's backlog is full, and QEMU's chardev
/// serves one client at a time with a backlog of one: a guard or a watchdog
/// behind another client would wait forever. Non-blocking, a full backlog
/// is `WouldBlock`, tried again until the deadline.
fn connect_within(socket: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let addr = SockAddr::unix(socket)?;
    let deadline = Instant::now() + timeout;
    loop {
        let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        match s.connect(&addr) {
            Ok(()) => {
                s.set_nonblocking(false)?;
                let stream = UnixStream::from(std::os::fd::OwnedFd::from(s));
                // Writes are bounded too: a peer that stops reading fills
                // the socket buffer.
                stream.set_write_timeout(Some(timeout))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the agent accepted no connection within {timeout:?} (another client holds it)"
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Agent {
    /// Connects and synchronises (`guest-sync` with a random id, so stale
    /// answers of an earlier client are skipped).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let stream = connect_within(socket, timeout).map_err(|source| AgentError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|source| AgentError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
        let mut agent = Agent {
            socket: socket.to_owned(),
            reader: BufReader::new(stream),
            writer,
            timeout,
        };
        // 0xFF resets the agent's JSON parser after a half-written request
        // of a previous client; the agent answers it with an error line,
        // which the sync below skips.
        agent.send_raw(b"\xff", "guest-sync")?;
        let id = u64::from(rand::random::<u32>());
        let r = agent.call("guest-sync", json!({ "id": id }))?;
        if r.as_u64() != Some(id) {
            return Err(agent.garbage("guest-sync", format!("expected {id}, got {r}")));
        }
        Ok(agent)
    }

    /// A command that the agent answered but that did not do its job.
    pub fn command_failed(&self, command: &str, desc: String) -> AgentError {
        AgentError::Command {
            socket: self.socket.clone(),
            command: command.to_owned(),
            desc,
        }
    }

    fn garbage(&self, command: &str, detail: String) -> AgentError {
        AgentError::Garbage {
            socket: self.socket.clone(),
            command: command.to_owned(),
            detail,
        }
    }

    fn send_raw(&mut self, bytes: &[u8], command: &str) -> Result<(), AgentError> {
        self.writer
            .write_all(bytes)
            .map_err(|_| AgentError::Disconnected {
                socket: self.socket.clone(),
                command: command.to_owned(),
            })
    }

    /// Sends a command and waits for its `return` within the timeout.
    pub fn call(&mut self, command: &str, arguments: Value) -> Result<Value, AgentError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments.clone();
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.send_raw(text.as_bytes(), command)?;
        let deadline = Instant::now() + self.timeout;
        let expect_sync = (command == "guest-sync").then(|| arguments["id"].clone());
        let mut stray = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_err(command));
            }
            let _ = self.reader.get_ref().set_read_timeout(Some(left));
            let mut line = Vec::new();
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => {
                    return Err(AgentError::Disconnected {
                        socket: self.socket.clone(),
                        command: command.to_owned(),
                    });
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.timeout_err(command));
                }
                Err(_) => {
                    return Err(AgentError::Disconnected {
                        socket: self.socket.clone(),
                        command: command.to_owned(),
                    });
                }
            }
            if line.len() > MAX_LINE {
                return Err(self.garbage(command, format!("a line of {} bytes", line.len())));
            }
            let parsed: Option<Value> = serde_json::from_slice(&line).ok();
            let shown = || {
                String::from_utf8_lossy(&line[..line.len().min(80)])
                    .trim()
                    .to_owned()
            };
            if let Some(id) = &expect_sync {
                // Skips what the 0xFF reset and earlier clients left.
                if parsed.as_ref().and_then(|v| v.get("return")) == Some(id) {
                    return Ok(id.clone());
                }
                stray += 1;
                if stray > MAX_STRAY_LINES {
                    return Err(self.garbage(command, shown()));
                }
                continue;
            }
            return match parsed {
                Some(v) if v.get("return").is_some() => Ok(v["return"].clone()),
                Some(v) if v.get("error").is_some() => Err(AgentError::Command {
                    socket: self.socket.clone(),
                    command: command.to_owned(),
                    desc: v["error"]["desc"]
                        .as_str()
                        .unwrap_or("unknown error")
                        .to_owned(),
                }),
                _ => Err(self.garbage(command, shown())),
            };
        }
    }

    fn timeout_err(&self, command: &str) -> AgentError {
        AgentError::Timeout {
            socket: self.socket.clone(),
            command: command.to_owned(),
            timeout: self.timeout,
        }
    }

    pub fn ping(&mut self) -> Result<(), AgentError> {
        self.call("guest-ping", json!({})).map(|_| ())
    }

    pub fn info(&mut self) -> Result<Value, AgentError> {
        self.call("guest-info", json!({}))
    }

    /// Runs a program in the guest and waits for it, at most `timeout`.
    pub fn exec(
        &mut self,
        path: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let r = self.call(
            "guest-exec",
            json!({ "path": path, "arg": args, "capture-output": true }),
        )?;
        let pid = r["pid"]
            .as_i64()
            .ok_or_else(|| self.garbage("guest-exec", format!("no pid in {r}")))?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            let s = self.call("guest-exec-status", json!({ "pid": pid }))?;
            if s["exited"] == true {
                let decode = |key: &str| {
                    s[key]
                        .as_str()
                        .map(|b| {
                            base64::engine::general_purpose::STANDARD
                                .decode(b)
                                .unwrap_or_default()
                        })
                        .unwrap_or_default()
                };
                return Ok(ExecOutput {
                    exit_code: s["exitcode"]
                        .as_i64()
                        .or_else(|| s["signal"].as_i64().map(|sig| 128 + sig))
                        .unwrap_or(-1) as i32,
                    stdout: decode("out-data"),
                    stderr: decode("err-data"),
                });
            }
            if Instant::now() >= deadline {
                return Err(AgentError::Timeout {
                    socket: self.socket.clone(),
                    command: format!("guest-exec of {path} (pid {pid} in the guest)"),
                    timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Freezes the guest's filesystems; returns how many.
    pub fn fs_freeze(&mut self) -> Result<u32, AgentError> {
        let r = self.call("guest-fsfreeze-freeze", json!({}))?;
        r.as_u64()
            .map(|n| n as u32)
            .ok_or_else(|| self.garbage("guest-fsfreeze-freeze", r.to_string()))
    }

    /// `thawed` or `frozen`.
    pub fn fs_status(&mut self) -> Result<String, AgentError> {
        let r = self.call("guest-fsfreeze-status", json!({}))?;
        r.as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.garbage("guest-fsfreeze-status", r.to_string()))
    }

    fn file_handle(&mut self, path: &str, mode: &str) -> Result<i64, AgentError> {
        let r = self.call("guest-file-open", json!({ "path": path, "mode": mode }))?;
        r.as_i64()
            .ok_or_else(|| self.garbage("guest-file-open", r.to_string()))
    }

    /// Reads at most `max` bytes of a guest file.
    pub fn file_read(&mut self, path: &str, max: usize) -> Result<Vec<u8>, AgentError> {
        let h = self.file_handle(path, "r")?;
        let mut out = Vec::new();
        let result = loop {
            // The agent base64-encodes; 48 KiB per call keeps lines small.
            let count = (max - out.len()).min(48 << 10);
            if count == 0 {
                break Ok(());
            }
            match self.call("guest-file-read", json!({ "handle": h, "count": count })) {
                Ok(r) => {
                    let chunk = r["buf-b64"]
                        .as_str()
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .unwrap_or_default();
                    out.extend_from_slice(&chunk);
                    if r["eof"] == true || chunk.is_empty() {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        };
        let _ = self.call("guest-file-close", json!({ "handle": h }));
        result.map(|()| out)
    }

    /// Creates or replaces a guest file.
    pub fn file_write(&mut self, path: &str, data: &[u8]) -> Result<(), AgentError> {
        let h = self.file_handle(path, "w")?;
        let mut result = Ok(());
        for chunk in data.chunks(48 << 10) {
            let b64 = base64::engine::general_purpose::STANDARD.encode(chunk);
            if let Err(e) = self.call("guest-file-write", json!({ "handle": h, "buf-b64": b64 })) {
                result = Err(e);
                break;
            }
        }
        let closed = self.call("guest-file-close", json!({ "handle": h }));
        result.and(closed.map(|_| ()))
    }

    /// Thaws the guest's filesystems; returns how many.
    pub fn fs_thaw(&mut self) -> Result<u32, AgentError> {
        let r = self.call("guest-fsfreeze-thaw", json!({}))?;
        r.as_u64()
            .map(|n| n as u32)
            .ok_or_else(|| self.garbage("guest-fsfreeze-thaw", r.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// QEMU's chardev serves one client at a time: a listener that accepts
    /// nobody, with its backlog full, must cost a timeout, not a hang.
    #[test]
    fn connecting_to_a_busy_agent_times_out() {
        use socket2::{Domain, SockAddr, Socket, Type};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("busy.sock");
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&sock).unwrap()).unwrap();
        listener.listen(0).unwrap();
        // Fill the backlog; these connections are never accepted.
        let mut held = Vec::new();
        while let Ok(c) = connect_within(&sock, Duration::from_millis(50)) {
            held.push(c);
            assert!(held.len() < 1000, "the backlog never filled");
        }
        let started = Instant::now();
        let e = Agent::connect(&sock, Duration::from_millis(300))
            .err()
            .expect("no connection to a full backlog");
        assert!(
            e.to_string().contains("accepted no connection within"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// This machine's own qemu-ga, with freezing blocked (it would freeze the
    /// host): everything else is the real protocol.
    #[test]
    fn talks_to_a_real_qemu_ga() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let mut ga = Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-t")
            .arg(dir.path())
            .args([
                "-b",
                "guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw",
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-ga (scripts/setup.sh installs qemu-guest-agent)");
        for _ in 0..500 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut a = Agent::connect(&sock, Duration::from_secs(5)).unwrap();
        a.ping().unwrap();
        assert!(a.info().unwrap()["version"].is_string());
        assert_eq!(a.fs_status().unwrap(), "thawed");
        let e = a.fs_freeze().unwrap_err().to_string();
        assert!(
            e.contains("guest-fsfreeze-freeze failed") && e.contains("disabled"),
            "{e}"
        );

        let file = dir.path().join("in-guest.txt");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        a.file_write(file.to_str().unwrap(), &data).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), data);
        assert_eq!(a.file_read(file.to_str().unwrap(), 1 << 20).unwrap(), data);
        assert_eq!(
            a.file_read(file.to_str().unwrap(), 1000).unwrap(),
            data[..1000]
        );

        let out = a
            .exec(
                "/bin/sh",
                &["-c".into(), "echo out; echo err >&2; exit 7".into()],
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(
            (out.exit_code, out.stdout.as_slice(), out.stderr.as_slice()),
            (7, &b"out\n"[..], &b"err\n"[..])
        );
        let _ = ga.kill();
        let _ = ga.wait();
    }
}
