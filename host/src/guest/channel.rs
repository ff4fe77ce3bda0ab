//! The guest channel offered to guest-hook plugins: the agent's operations,
//! limited to what the job allows, recorded for the report.
//!
//! The host, not the plugin, guarantees the two promises of guest
//! processing: every freeze is followed by a thaw (`ensure_thawed`, called by
//! the session whatever happened), and a freeze never lasts longer than the
//! job's freeze timeout (a watchdog thaws and marks the snapshot as no longer
//! application-consistent).

use super::agent::{Agent, AgentError, ExecOutput};
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
    commands: Vec<ExecRecord>,
    events: Vec<String>,
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
        let mut slot = self.agent.lock().expect("agent lock");
        if slot.is_none() {
            *slot = Some(
                Agent::connect(&self.socket, self.policy.agent_timeout)
                    .map_err(|e| e.to_string())?,
            );
        }
        let agent = slot.as_mut().expect("connected above");
        match f(agent) {
            Ok(r) => Ok(r),
            Err(e) => {
                if !matches!(e, AgentError::Command { .. }) {
                    *slot = None;
                }
                Err(e.to_string())
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
            // Counted as frozen before the call returns: a freeze that timed
            // out may still have happened, and must be thawed.
            st.frozen = true;
            st.events.push("freeze".into());
            st.freeze_epoch
        };
        let result = self.with_agent(Agent::fs_freeze);
        let me = Arc::downgrade(self);
        let limit = self.policy.freeze_timeout;
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            if let Some(ch) = me.upgrade() {
                ch.watchdog(epoch);
            }
        });
        result
    }

    fn watchdog(&self, epoch: u64) {
        let still = {
            let st = self.state.lock().expect("state lock");
            st.frozen && st.freeze_epoch == epoch
        };
        if still {
            let r = self.with_agent(Agent::fs_thaw);
            let mut st = self.state.lock().expect("state lock");
            if st.frozen && st.freeze_epoch == epoch {
                st.watchdog_thawed = true;
                st.frozen = r.is_err();
                st.events.push(format!(
                    "thawed by the host after the freeze timeout of {:?}{}",
                    self.policy.freeze_timeout,
                    r.err()
                        .map(|e| format!(" (thaw failed: {e})"))
                        .unwrap_or_default()
                ));
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

    pub fn thaw(&self) -> Result<u32, String> {
        let r = self.with_agent(Agent::fs_thaw);
        let mut st = self.state.lock().expect("state lock");
        if r.is_ok() {
            st.frozen = false;
        }
        st.events.push("thaw".into());
        r
    }

    /// Thaws if anything is still frozen; returns a notice when it had to.
    pub fn ensure_thawed(&self) -> Option<String> {
        if !self.state.lock().expect("state lock").frozen {
            return None;
        }
        let r = self.thaw();
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
