//! The freeze guard: a process of its own that thaws the guest when the
//! session that froze it dies first.
//!
//! Inside a live session, the channel's watchdog and `ensure_thawed` end
//! every freeze. Nothing inside the session's process survives its death:
//! `SIGKILL`, the OOM killer, or a Ctrl-C (which the terminal sends to the
//! whole foreground process group). A frozen guest blocks every write of its
//! applications until someone thaws it, so the channel starts a guard before
//! its first freeze: `arca freeze-guard SOCKET`, in a process group of its
//! own, ignoring the signals that stop a session.
//!
//! Protocol: the channel writes `frozen` on the guard's stdin before every
//! freeze call and `thawed` after every thaw the agent confirmed. When stdin
//! ends (the channel was dropped, or its process died and the kernel closed
//! the pipe) after `frozen`, the guard connects to the agent and thaws,
//! retrying with backoff until the agent says `thawed` or `PATIENCE` has
//! passed. After `thawed` it just exits.
//!
//! A library user has no `arca` binary to start: `install` names it, and
//! the `arca` binary installs itself; without it the channel guards in
//! process only.

use super::agent::{Agent, AgentError};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a guard keeps trying to thaw: an agent stuck behind a slow
/// freeze answers again once the freeze completes, which can take minutes
/// on a guest with much dirty data.
pub const PATIENCE: Duration = Duration::from_secs(600);

static PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Names the program that serves `freeze-guard` (the `arca` binary).
pub fn install(program: PathBuf) {
    let _ = PROGRAM.set(program);
}

/// A running guard, owned by one guest channel.
pub struct FreezeGuard {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

impl FreezeGuard {
    /// Starts a guard for the agent at `socket`; `Ok(None)` when no guard
    /// program is installed.
    pub fn start(socket: &Path, agent_timeout: Duration) -> Result<Option<Self>, String> {
        let Some(program) = PROGRAM.get() else {
            return Ok(None);
        };
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(program)
            .arg("freeze-guard")
            .arg(socket)
            .arg("--agent-timeout-ms")
            .arg(agent_timeout.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Out of the session's process group: a Ctrl-C or a group kill
            // meant for the session must leave the guard to do its work.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start the freeze guard {}: {e}", program.display()))?;
        let stdin = child.stdin.take();
        Ok(Some(Self {
            child: Some(child),
            stdin,
        }))
    }

    /// Tells the guard the guest is (about to be) frozen, or that the
    /// agent confirmed a thaw.
    pub fn say(&mut self, frozen: bool) -> Result<(), String> {
        let line: &[u8] = if frozen { b"frozen\n" } else { b"thawed\n" };
        let stdin = self.stdin.as_mut().ok_or("the freeze guard is closed")?;
        stdin
            .write_all(line)
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("the freeze guard stopped listening: {e}"))
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        // Closing stdin is the guard's cue; it may take its time to thaw,
        // so it is reaped on a thread of its own rather than waited for.
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            let _ = std::thread::Builder::new()
                .name("freeze-guard-reaper".into())
                .spawn(move || child.wait());
        }
    }
}

/// What a guard did once its input ended.
#[derive(Debug, PartialEq)]
pub enum GuardOutcome {
    /// The last word was `thawed` (or nothing): nothing to do.
    NothingFrozen,
    /// It thawed this many filesystems, at this attempt.
    Thawed { filesystems: u32, attempts: u32 },
    /// It gave up after `PATIENCE` (or the given patience).
    GaveUp { last_error: String, attempts: u32 },
}

impl GuardOutcome {
    /// What the guard says on stderr, if anything, for the agent at
    /// `socket`.
    pub fn message(&self, socket: &Path) -> Option<String> {
        let at = socket.display();
        match self {
            GuardOutcome::NothingFrozen => None,
            GuardOutcome::Thawed {
                filesystems,
                attempts,
            } => Some(format!(
                "arca freeze-guard: the session ended with the guest at {at} frozen; thawed {filesystems} filesystem(s) (attempt {attempts})"
            )),
            GuardOutcome::GaveUp {
                last_error,
                attempts,
            } => Some(format!(
                "arca freeze-guard: the session ended with the guest at {at} frozen and {attempts} thaw attempts over {PATIENCE:?} failed, the last with: {last_error}; thaw it by hand (guest-fsfreeze-thaw)"
            )),
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            GuardOutcome::GaveUp { .. } => 1,
            _ => 0,
        }
    }
}

/// The guard's work (`arca freeze-guard`): follows `input` to its end, then
/// thaws if the last word was `frozen`.
pub fn serve(
    socket: &Path,
    agent_timeout: Duration,
    input: impl BufRead,
    patience: Duration,
) -> GuardOutcome {
    let mut frozen = false;
    for line in input.lines() {
        match line.as_deref().map(str::trim) {
            Ok("frozen") => frozen = true,
            Ok("thawed") => frozen = false,
            // An unknown word changes nothing; a read error is as good as
            // the end of input (the session is gone either way).
            Ok(_) => {}
            Err(_) => break,
        }
    }
    if !frozen {
        return GuardOutcome::NothingFrozen;
    }
    let mut attempts = 0;
    let result = until_thawed(patience, || {
        attempts += 1;
        Agent::connect(socket, agent_timeout)
            .and_then(|mut agent| thaw_confirmed(&mut agent))
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(filesystems) => GuardOutcome::Thawed {
            filesystems,
            attempts,
        },
        Err(last_error) => GuardOutcome::GaveUp {
            last_error,
            attempts,
        },
    }
}

/// Thaws, then asks: a thaw answered while a freeze is still being
/// processed elsewhere would otherwise count as done.
pub fn thaw_confirmed(agent: &mut Agent) -> Result<u32, AgentError> {
    let n = agent.fs_thaw()?;
    match agent.fs_status() {
        Ok(s) if s == "frozen" => Err(agent.command_failed(
            "guest-fsfreeze-status",
            "the guest is still frozen after a thaw".into(),
        )),
        // An agent without the status command has thawed all it can.
        Ok(_) | Err(AgentError::Command { .. }) => Ok(n),
        Err(e) => Err(e),
    }
}

/// Calls `attempt` until it succeeds or `patience` has passed, waiting
/// 0.1 s, 0.2 s, … up to 5 s between calls; returns the last error.
pub fn until_thawed(
    patience: Duration,
    mut attempt: impl FnMut() -> Result<u32, String>,
) -> Result<u32, String> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        match attempt() {
            Ok(n) => return Ok(n),
            Err(e) if started.elapsed() + pause > patience => return Err(e),
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_thawed_after_a_confirmed_thaw_or_no_freeze() {
        let nowhere = Path::new("/nonexistent/qga.sock");
        for input in ["", "frozen\nthawed\n", "frozen\nthawed\nnoise\n"] {
            assert_eq!(
                serve(
                    nowhere,
                    Duration::from_millis(100),
                    input.as_bytes(),
                    Duration::ZERO
                ),
                GuardOutcome::NothingFrozen,
                "{input:?}"
            );
        }
    }

    #[test]
    fn a_guard_left_frozen_tries_until_its_patience_ends() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let started = Instant::now();
        let outcome = serve(
            &sock,
            Duration::from_millis(100),
            &b"thawed\nfrozen\n"[..],
            Duration::from_millis(500),
        );
        let GuardOutcome::GaveUp {
            last_error,
            attempts,
        } = outcome
        else {
            panic!("{outcome:?}")
        };
        assert!(last_error.contains("cannot connect"), "{last_error}");
        // 0.1 + 0.2 s of pauses fit in 0.5 s; the next 0.4 s does not (a
        // loaded machine may oversleep the first pauses and try once less).
        assert!((2..=3).contains(&attempts), "{attempts}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn until_thawed_stops_at_the_first_success() {
        let mut calls = 0;
        let r = until_thawed(Duration::from_secs(10), || {
            calls += 1;
            if calls < 3 {
                Err(format!("no {calls}"))
            } else {
                Ok(2)
            }
        });
        assert_eq!((r, calls), (Ok(2), 3));
    }
}
