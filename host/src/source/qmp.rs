//! A QMP client (QEMU Machine Protocol: JSON lines over a unix socket).
//!
//! Small on purpose: arca issues a handful of block-layer commands of the
//! installed QEMU (10.x) and keeps their arguments as JSON next to the code
//! that sends them, rather than depending on a generated schema of another
//! QEMU version. Events that arrive while a reply is awaited are queued for
//! `wait_event`.

use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP {socket}: {source}")]
    Io {
        socket: String,
        source: std::io::Error,
    },
    #[error("QMP {socket}: {message}")]
    Protocol { socket: String, message: String },
    #[error("QMP {socket}: {command} failed: {desc} ({class})")]
    Command {
        socket: String,
        command: String,
        class: String,
        desc: String,
    },
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    socket: String,
    next_id: u64,
    events: VecDeque<Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let socket = path.display().to_string();
        let io = |source| QmpError::Io {
            socket: socket.clone(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            socket,
            next_id: 1,
            events: VecDeque::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol(format!("expected a QMP greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn protocol(&self, message: String) -> QmpError {
        QmpError::Protocol {
            socket: self.socket.clone(),
            message,
        }
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                socket: self.socket.clone(),
                source,
            })?;
        if n == 0 {
            return Err(self.protocol("connection closed by QEMU".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| self.protocol(format!("not JSON ({e}): {}", line.trim())))
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| QmpError::Io {
                socket: self.socket.clone(),
                source,
            })?;
        loop {
            let m = self.read_message()?;
            if m.get("event").is_some() {
                self.events.push_back(m);
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // a reply to a command of an earlier, abandoned call
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    socket: self.socket.clone(),
                    command: command.to_owned(),
                    class: e["class"].as_str().unwrap_or("?").to_owned(),
                    desc: e["desc"].as_str().unwrap_or("?").to_owned(),
                });
            }
            return Err(self.protocol(format!("unexpected reply {m}")));
        }
    }

    /// Runs a command that starts job `job` (e.g. `blockdev-create`), waits
    /// for the job to conclude, dismisses it, and returns its error if it
    /// failed: such jobs report failure only in `query-jobs`.
    pub fn run_job(
        &mut self,
        command: &str,
        arguments: Value,
        job: &str,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        self.execute(command, arguments)?;
        self.wait_event(
            "JOB_STATUS_CHANGE",
            |d| d["id"] == job && d["status"] == "concluded",
            timeout,
        )?;
        let jobs = self.execute("query-jobs", json!({}))?;
        let error = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["id"] == job)
            .and_then(|j| j["error"].as_str().map(str::to_owned));
        self.execute("job-dismiss", json!({ "id": job }))?;
        match error {
            Some(desc) => Err(QmpError::Command {
                socket: self.socket.clone(),
                command: command.to_owned(),
                class: "JobFailed".into(),
                desc,
            }),
            None => Ok(()),
        }
    }

    /// Waits for an event named `name` whose `data` satisfies `matches`.
    pub fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self
                .events
                .iter()
                .position(|e| e["event"] == name && matches(&e["data"]))
            {
                return Ok(self.events.remove(pos).expect("position is valid"));
            }
            if Instant::now() > deadline {
                return Err(self.protocol(format!("no {name} event within {timeout:?}")));
            }
            let m = self.read_message()?;
            if m.get("event").is_some() {
                self.events.push_back(m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn talks_to_qemu_storage_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        let sock = dir.path().join("qmp.sock");
        assert!(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&img)
                .arg("16M")
                .status()
                .unwrap()
                .success()
        );
        let mut child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f0",
                img.display()
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,file=f0,node-name=disk0")
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m0",
                sock.display()
            ))
            .arg("--monitor")
            .arg("chardev=m0")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The socket appears a moment before QEMU listens on it: connect
        // until it answers.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut q = loop {
            match Qmp::connect(&sock) {
                Ok(q) => break q,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "{e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let nodes = q
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .unwrap();
        let disk = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "disk0")
            .unwrap();
        assert_eq!(disk["image"]["virtual-size"], 16 << 20);
        let e = q
            .execute("blockdev-del", json!({ "node-name": "nope" }))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blockdev-del failed") && e.contains("nope"),
            "{e}"
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
