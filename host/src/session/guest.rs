//! Guest processing around one VM's snapshot (seed step 7), in the job's
//! mode: `require` fails the VM when it fails, `try` falls back to a
//! crash-consistent restore point and says so, `off` does nothing.
//!
//! Order: pre-snapshot hook → snapshot → post-snapshot hook → (the host
//! thaws whatever is still frozen, always) → tasks → post-backup hook with
//! the VM's outcome.

use crate::config::{GuestMode, GuestSettings, VmSettings};
use crate::guest::{ExecRecord, GuestChannel};
use crate::plugin::Plugin;
use crate::plugin::hook::GuestHook;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct GuestStep {
    pub step: String,
    pub ok: bool,
    pub seconds: f64,
    pub error: Option<String>,
}

/// What guest processing did for one VM, for the session report.
#[derive(Debug, Clone, Serialize)]
pub struct GuestReport {
    pub vm: String,
    pub mode: GuestMode,
    pub hook: String,
    pub steps: Vec<GuestStep>,
    pub commands: Vec<ExecRecord>,
    /// Freeze, thaw and host interventions, in order.
    pub events: Vec<String>,
    pub application_consistent: bool,
}

pub struct GuestRun {
    mode: GuestMode,
    vm: String,
    hook: Option<GuestHook>,
    channel: Option<Arc<GuestChannel>>,
    pre_ok: bool,
    pub report: GuestReport,
    pub notices: Vec<String>,
    /// Set when the VM must fail (require mode).
    pub fatal: Option<String>,
}

impl GuestRun {
    /// Runs the pre-snapshot hook; `fatal` is set when the VM must fail.
    pub fn before_snapshot(
        settings: &GuestSettings,
        plugin: &(Plugin, Vec<(String, String)>),
        vm: &VmSettings,
    ) -> Self {
        let mut run = GuestRun {
            mode: settings.mode,
            vm: vm.name.clone(),
            hook: None,
            channel: None,
            pre_ok: false,
            report: GuestReport {
                vm: vm.name.clone(),
                mode: settings.mode,
                hook: plugin.0.name.clone(),
                steps: Vec::new(),
                commands: Vec::new(),
                events: Vec::new(),
                application_consistent: false,
            },
            notices: Vec::new(),
            fatal: None,
        };
        let started = Instant::now();
        let result = match &vm.guest_agent {
            None => Err(format!("vm '{}' has no guest_agent configured", vm.name)),
            Some(socket) => {
                let channel = GuestChannel::new(socket.clone(), settings.policy.clone());
                run.channel = Some(channel.clone());
                GuestHook::new(&plugin.0, &plugin.1, channel)
                    .and_then(|mut hook| {
                        let r = hook.pre_snapshot(&vm.name);
                        run.hook = Some(hook);
                        r
                    })
                    .map_err(|e| e.to_string())
            }
        };
        run.step("pre-snapshot", started, &result);
        match result {
            Ok(()) => run.pre_ok = true,
            Err(e) => {
                if let Some(n) = run.channel.as_ref().and_then(|c| c.ensure_thawed()) {
                    run.notices.push(format!("vm '{}': {n}", run.vm));
                }
                let msg = format!(
                    "guest processing of vm '{}' failed before the snapshot: {e}",
                    run.vm
                );
                if run.mode == GuestMode::Require {
                    run.fatal = Some(format!("{msg} (mode require: no restore point without it)"));
                } else {
                    run.notices.push(format!(
                        "{msg}; mode try: the restore point is crash-consistent"
                    ));
                }
            }
        }
        run
    }

    fn step(&mut self, step: &str, started: Instant, result: &Result<(), String>) {
        self.report.steps.push(GuestStep {
            step: step.into(),
            ok: result.is_ok(),
            seconds: started.elapsed().as_secs_f64(),
            error: result.as_ref().err().cloned(),
        });
    }

    /// Runs the post-snapshot hook and makes sure nothing stays frozen;
    /// sets `fatal` when the snapshot was not application-consistent after
    /// all and the mode requires it.
    pub fn after_snapshot(&mut self, snapshot_taken: bool) {
        let started = Instant::now();
        let result = match &mut self.hook {
            Some(h) => h.post_snapshot(&self.vm).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        self.step("post-snapshot", started, &result);
        if let Some(channel) = &self.channel
            && let Some(n) = channel.ensure_thawed()
        {
            self.notices.push(format!("vm '{}': {n}", self.vm));
        }
        if let Err(e) = &result {
            self.notices
                .push(format!("vm '{}': post-snapshot hook failed: {e}", self.vm));
        }
        let watchdog = self.channel.as_ref().is_some_and(|c| c.watchdog_fired());
        self.report.application_consistent = self.pre_ok && snapshot_taken && !watchdog;
        if watchdog {
            let msg = format!(
                "vm '{}': the guest stayed frozen past the freeze timeout and was thawed before the snapshot finished",
                self.vm
            );
            if self.mode == GuestMode::Require {
                self.fatal.get_or_insert(format!("{msg} (mode require)"));
            } else {
                self.notices
                    .push(format!("{msg}; the restore point is crash-consistent"));
            }
        }
    }

    pub fn application_consistent(&self) -> bool {
        self.report.application_consistent
    }

    /// The snapshot decides in the end: quiescing a guest whose disk could
    /// only be read live does not make the restore point consistent.
    pub fn confirm_consistency(&mut self, application_consistent: bool) {
        self.report.application_consistent = application_consistent;
    }

    /// Runs the post-backup hook with the VM's outcome and makes sure it
    /// left nothing frozen (the watchdog dies with this run); returns the
    /// report.
    pub fn after_backup(mut self, succeeded: bool) -> (GuestReport, Vec<String>) {
        if let Some(h) = &mut self.hook {
            let started = Instant::now();
            let result = h
                .post_backup(&self.vm, succeeded)
                .map_err(|e| e.to_string());
            self.step("post-backup", started, &result);
            if let Err(e) = result {
                self.notices
                    .push(format!("vm '{}': post-backup hook failed: {e}", self.vm));
            }
        }
        if let Some(channel) = &self.channel
            && let Some(n) = channel.ensure_thawed()
        {
            self.notices.push(format!("vm '{}': {n}", self.vm));
        }
        self.finish_report();
        (self.report, self.notices)
    }

    fn finish_report(&mut self) {
        if let Some(c) = &self.channel {
            self.report.commands = c.commands();
            self.report.events = c.events();
        }
    }
}
