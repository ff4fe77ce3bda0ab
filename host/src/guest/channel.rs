//! The guest channel offered to guest-hook plugins: the agent's operations,
//! limited to what the job allows, recorded for the report.
//!
//! The host, not the plugin, guarantees the two promises of guest
//! processing: every freeze is followed by a thaw (`ensure_thawed`, called by
//! the session whatever happened), and a freeze never lasts longer than the
//! job's freeze timeout (a watchdog thaws, retrying until the agent
//! answers, and marks the snapshot as no longer application-consistent).
//! Dropping a channel thaws what it left frozen; a freeze guard process
//! (`guard`) covers the death of the session itself.

use super::agent::{Agent, AgentError, ExecOutput};
use super::guard::{self, FreezeGuard};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Output kept per command for the report.
const OUTPUT_LIMIT: usize = 4096;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GuestPolicy {
    /// Programs plugins may run in the guest (exact paths).
    pub allow_exec: Vec<String>,
    pub allow_freeze: bool,
    /// Guest files plugins may read or write: exact paths, or folders
    /// ending in `/`.
    #[serde(default)]
    pub allow_files: Vec<String>,
    pub freeze_timeout: Duration,
    /// Longest wait for one answer of the agent.
    pub agent_timeout: Duration,
}

/// One command run in the guest, as the report shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExecRecord {
    pub path: String,
    pub args: Vec<String>,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub error: Option<String>,
    pub seconds: f64,
}

#[derive(Default)]
struct State {
    /// Incremented by every freeze, so a late watchdog never thaws a newer one.
    freeze_epoch: u64,
    frozen: bool,
    watchdog_thawed: bool,
    /// The watchdog's thaw attempts for the current freeze.
    watchdog_attempts: u32,
    commands: Vec<ExecRecord>,
    events: Vec<String>,
    /// Started before the first freeze; told of every freeze and thaw.
    guard: Option<FreezeGuard>,
}

impl State {
    /// Records a thaw the agent confirmed, and tells the guard.
    fn thawed(&mut self) {
        self.frozen = false;
        self.tell_guard(false);
    }

    /// Tells the guard whether the guest is (about to be) frozen; a guard
    /// that stopped listening costs an event and is let go (the session's
    /// own thaws still hold while it lives).
    fn tell_guard(&mut self, frozen: bool) {
        if let Some(g) = &mut self.guard
            && let Err(e) = g.say(frozen)
        {
            self.events.push(format!("freeze guard: {e}"));
            self.guard = None;
        }
    }
}

pub struct GuestChannel {
    socket: PathBuf,
    policy: GuestPolicy,
    agent: Mutex<Option<Agent>>,
    state: Mutex<State>,
}

fn clip(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_LIMIT)]).into_owned();
    if bytes.len() > OUTPUT_LIMIT {
        format!("{s}… ({} bytes)", bytes.len())
    } else {
        s
    }
}

impl GuestChannel {
    pub fn new(socket: PathBuf, policy: GuestPolicy) -> Arc<Self> {
        Arc::new(Self {
            socket,
            policy,
            agent: Mutex::new(None),
            state: Mutex::new(State::default()),
        })
    }

    /// Runs `f` on a connected agent; a broken connection is dropped so the
    /// next call reconnects.
    fn with_agent<R>(
        &self,
        f: impl FnOnce(&mut Agent) -> Result<R, AgentError>,
    ) -> Result<R, String> {
        self.call(f).map_err(|e| e.to_string())
    }

    fn call<R>(
        &self,
        f: impl FnOnce(&mut Agent) -> Result<R, AgentError>,
    ) -> Result<R, AgentError> {
        // A panic during an earlier call (which `Drop` may follow while
        // unwinding) leaves a connection out of step: start afresh.
        let mut slot = self.agent.lock().unwrap_or_else(|poisoned| {
            let mut slot = poisoned.into_inner();
            *slot = None;
            slot
        });
        if slot.is_none() {
            *slot = Some(Agent::connect(&self.socket, self.policy.agent_timeout)?);
        }
        let agent = slot.as_mut().expect("connected above");
        match f(agent) {
            Ok(r) => Ok(r),
            Err(e) => {
                if !matches!(e, AgentError::Command { .. }) {
                    *slot = None;
                }
                Err(e)
            }
        }
    }

    pub fn ping(&self) -> Result<(), String> {
        self.with_agent(Agent::ping)
    }

    pub fn exec(
        &self,
        path: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, String> {
        let started = Instant::now();
        let result = if self.policy.allow_exec.iter().any(|p| p == path) {
            self.with_agent(|a| a.exec(path, args, timeout))
        } else {
            Err(format!(
                "running {path} in the guest is not allowed by the job (allow_exec: {})",
                if self.policy.allow_exec.is_empty() {
                    "none".into()
                } else {
                    self.policy.allow_exec.join(", ")
                }
            ))
        };
        self.state
            .lock()
            .expect("state lock")
            .commands
            .push(ExecRecord {
                path: path.to_owned(),
                args: args.to_vec(),
                exit_code: result.as_ref().ok().map(|o| o.exit_code),
                stdout: result.as_ref().map(|o| clip(&o.stdout)).unwrap_or_default(),
                stderr: result.as_ref().map(|o| clip(&o.stderr)).unwrap_or_default(),
                error: result.as_ref().err().cloned(),
                seconds: started.elapsed().as_secs_f64(),
            });
        result
    }

    pub fn freeze(self: &Arc<Self>) -> Result<u32, String> {
        if !self.policy.allow_freeze {
            return Err("freezing guest filesystems is not allowed by the job".into());
        }
        let epoch = {
            let mut st = self.state.lock().expect("state lock");
            st.freeze_epoch += 1;
            st.watchdog_attempts = 0;
            // Counted as frozen before the call returns: a freeze that timed
            // out may still have happened, and must be thawed.
            st.frozen = true;
            st.events.push("freeze".into());
            self.tell_guard_frozen(&mut st);
            st.freeze_epoch
        };
        let result = self.call(Agent::fs_freeze);
        if let Err(AgentError::Connect { .. } | AgentError::Command { .. }) = &result {
            // The request never reached the agent, or the agent refused it
            // (qemu-ga undoes a partial freeze before it answers): nothing
            // of this freeze is left, and whatever is frozen is someone
            // else's (another session's, backing up the same VM), which
            // this channel, its watchdog and its guard must not thaw.
            let mut st = self.state.lock().expect("state lock");
            if st.freeze_epoch == epoch {
                st.thawed();
            }
        }
        let result = result.map_err(|e| e.to_string());
        let me = Arc::downgrade(self);
        let limit = self.policy.freeze_timeout;
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            // Until the agent confirms a thaw, or the channel is gone (its
            // `Drop` and the guard take over). An agent still busy with a
            // slow freeze answers nothing until that freeze is done.
            let patience = Duration::MAX;
            let _ = guard::until_thawed(patience, || match me.upgrade() {
                Some(ch) => ch.watchdog(epoch),
                None => Ok(0),
            });
        });
        result
    }

    /// Starts the guard if need be and tells it a freeze is coming; a guard
    /// that cannot be started costs an event, not the freeze.
    fn tell_guard_frozen(&self, st: &mut State) {
        if st.guard.is_none() {
            match FreezeGuard::start(&self.socket, self.policy.agent_timeout) {
                Ok(g) => st.guard = g,
                Err(e) => st.events.push(format!("freeze guard: {e}")),
            }
        }
        st.tell_guard(true);
    }

    /// One thaw attempt after the freeze timeout: `Ok` once nothing of
    /// freeze `epoch` is left to thaw.
    fn watchdog(&self, epoch: u64) -> Result<u32, String> {
        let still = |st: &State| st.frozen && st.freeze_epoch == epoch;
        if !still(&self.state.lock().expect("state lock")) {
            return Ok(0);
        }
        let r = self.with_agent(guard::thaw_confirmed);
        let mut st = self.state.lock().expect("state lock");
        if !still(&st) {
            return Ok(0);
        }
        st.watchdog_thawed = true;
        st.watchdog_attempts += 1;
        let attempt = st.watchdog_attempts;
        let limit = self.policy.freeze_timeout;
        match r {
            Ok(n) => {
                st.thawed();
                st.events.push(if attempt == 1 {
                    format!("thawed by the host after the freeze timeout of {limit:?}")
                } else {
                    format!("thawed by the host after the freeze timeout of {limit:?}, at attempt {attempt}")
                });
                Ok(n)
            }
            Err(e) => {
                if attempt == 1 {
                    st.events.push(format!(
                        "the freeze timeout of {limit:?} passed and the thaw failed ({e}); the host keeps trying"
                    ));
                }
                Err(e)
            }
        }
    }

    pub fn fs_status(&self) -> Result<String, String> {
        self.with_agent(Agent::fs_status)
    }

    fn file_allowed(&self, path: &str) -> Result<(), String> {
        let ok = !path.contains("/../")
            && self
                .policy
                .allow_files
                .iter()
                .any(|a| a == path || (a.ends_with('/') && path.starts_with(a.as_str())));
        if ok {
            Ok(())
        } else {
            Err(format!(
                "guest file {path} is not allowed by the job (allow_files: {})",
                if self.policy.allow_files.is_empty() {
                    "none".into()
                } else {
                    self.policy.allow_files.join(", ")
                }
            ))
        }
    }

    pub fn file_read(&self, path: &str, max: usize) -> Result<Vec<u8>, String> {
        self.file_allowed(path)?;
        let r = self.with_agent(|a| a.file_read(path, max));
        self.state
            .lock()
            .expect("state lock")
            .events
            .push(format!("read {path}"));
        r
    }

    pub fn file_write(&self, path: &str, data: &[u8]) -> Result<(), String> {
        self.file_allowed(path)?;
        let r = self.with_agent(|a| a.file_write(path, data));
        self.state
            .lock()
            .expect("state lock")
            .events
            .push(format!("wrote {path}"));
        r
    }

    /// A hook's thaw. Sent only while a freeze of this channel may hold:
    /// otherwise the guest is thawed already (by the watchdog, say), or
    /// frozen by someone else, whose freeze this session must not end.
    pub fn thaw(&self) -> Result<u32, String> {
        {
            let mut st = self.state.lock().expect("state lock");
            if !st.frozen {
                st.events
                    .push("thaw not sent: nothing of this session is frozen".into());
                return Ok(0);
            }
        }
        self.thaw_with(Agent::fs_thaw)
    }

    fn thaw_with(
        &self,
        thaw: impl FnOnce(&mut Agent) -> Result<u32, AgentError>,
    ) -> Result<u32, String> {
        let r = self.with_agent(thaw);
        let mut st = self.state.lock().expect("state lock");
        if r.is_ok() {
            st.thawed();
        }
        st.events.push("thaw".into());
        r
    }

    /// Thaws if anything is still frozen, and checks that the agent says
    /// so; returns a notice when it had to.
    pub fn ensure_thawed(&self) -> Option<String> {
        if !self.state.lock().expect("state lock").frozen {
            return None;
        }
        let r = self.thaw_with(guard::thaw_confirmed);
        Some(match r {
            Ok(n) => format!("the host thawed {n} guest filesystem(s) the hook left frozen"),
            Err(e) => format!("guest filesystems may still be frozen: thaw failed: {e}"),
        })
    }

    /// True when the watchdog had to end a freeze.
    pub fn watchdog_fired(&self) -> bool {
        self.state.lock().expect("state lock").watchdog_thawed
    }

    pub fn commands(&self) -> Vec<ExecRecord> {
        self.state.lock().expect("state lock").commands.clone()
    }

    pub fn events(&self) -> Vec<String> {
        self.state.lock().expect("state lock").events.clone()
    }
}

impl Drop for GuestChannel {
    /// Every way out ends here, errors that skipped the session's last
    /// `ensure_thawed` included. A thaw that fails here is left to the
    /// guard, which the end of this channel wakes (its input closes after
    /// this).
    fn drop(&mut self) {
        let frozen = self.state.get_mut().map(|st| st.frozen).unwrap_or(false);
        if frozen && let Some(n) = self.ensure_thawed() {
            tracing::warn!("{n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// An agent that answers sync, freeze, thaw and status, and records
    /// freezes and thaws.
    fn fake_agent(sock: &std::path::Path) -> Arc<Mutex<Vec<String>>> {
        let listener = UnixListener::bind(sock).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let conn = conn.unwrap();
                let mut w = conn.try_clone().unwrap();
                let l = l.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(conn).split(b'\n') {
                        let Ok(line) = line else { return };
                        let text: Vec<u8> = line.into_iter().filter(|b| *b != 0xff).collect();
                        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(&text) else {
                            continue;
                        };
                        let ret = match msg["execute"].as_str().unwrap_or("") {
                            "guest-sync" => msg["arguments"]["id"].clone(),
                            "guest-fsfreeze-status" => "thawed".into(),
                            cmd => {
                                l.lock().unwrap().push(cmd.to_owned());
                                1.into()
                            }
                        };
                        let _ = writeln!(w, "{}", serde_json::json!({ "return": ret }));
                    }
                });
            }
        });
        log
    }

    #[test]
    fn a_channel_dropped_while_frozen_thaws() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let log = fake_agent(&sock);
        let channel = GuestChannel::new(
            sock,
            GuestPolicy {
                allow_exec: Vec::new(),
                allow_freeze: true,
                allow_files: Vec::new(),
                freeze_timeout: Duration::from_secs(600),
                agent_timeout: Duration::from_secs(5),
            },
        );
        assert_eq!(channel.freeze(), Ok(1));
        // An error path that never reached the session's last thaw.
        drop(channel);
        assert_eq!(
            *log.lock().unwrap(),
            ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
        );
    }
}
