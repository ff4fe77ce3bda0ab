//! The built-in guest hook: runs the job's pre-freeze script, freezes the
//! guest's filesystems, lets the host take the snapshot, thaws, runs the
//! post-thaw script; after a successful backup, runs the post-backup script
//! (e.g. log truncation).
//!
//! A script that exits non-zero, times out or cannot run is an error; the
//! host applies the job's mode (require success / try). Thawing is also
//! guaranteed by the host, so a failure here never leaves a guest frozen.

use std::cell::RefCell;

wit_bindgen::generate!({
    path: "../../wit",
    world: "arca:pipeline/guest-hook",
});

use arca::pipeline::guest;
use exports::arca::pipeline::hooks::{Guest, Settings};

#[derive(Clone)]
struct Config {
    pre_freeze: Option<String>,
    post_thaw: Option<String>,
    post_backup: Option<String>,
    stamp: Option<String>,
    freeze: bool,
    timeout_ms: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pre_freeze: None,
            post_thaw: None,
            post_backup: None,
            stamp: None,
            freeze: true,
            timeout_ms: 60_000,
        }
    }
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
    static FROZE: RefCell<bool> = const { RefCell::new(false) };
}

fn parse(settings: &Settings) -> Result<Config, String> {
    let mut c = Config::default();
    for (k, v) in settings {
        let path = || {
            if v.starts_with('/') {
                Ok(Some(v.clone()))
            } else {
                Err(format!(
                    "guest-scripts: `{k}` must be an absolute path in the guest, got `{v}`"
                ))
            }
        };
        match k.as_str() {
            "pre_freeze" => c.pre_freeze = path()?,
            "post_thaw" => c.post_thaw = path()?,
            "post_backup" => c.post_backup = path()?,
            "stamp" => c.stamp = path()?,
            "freeze" => {
                c.freeze = match v.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(format!(
                            "guest-scripts: `freeze` must be true or false, got `{v}`"
                        ));
                    }
                }
            }
            "timeout_ms" => {
                c.timeout_ms = v.parse().ok().filter(|t| *t > 0).ok_or_else(|| {
                    format!("guest-scripts: `timeout_ms` must be a positive integer, got `{v}`")
                })?
            }
            other => {
                return Err(format!(
                    "guest-scripts: unknown setting `{other}` (pre_freeze, post_thaw, post_backup, stamp, freeze, timeout_ms)"
                ));
            }
        }
    }
    Ok(c)
}

fn run(what: &str, script: &Option<String>, vm: &str, timeout_ms: u32) -> Result<(), String> {
    let Some(path) = script else { return Ok(()) };
    let out = guest::exec(path, &[vm.to_string()], timeout_ms)
        .map_err(|e| format!("{what} script {path}: {e}"))?;
    if out.exit_code != 0 {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{what} script {path} exited with {}{}",
            out.exit_code,
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", stderr.trim())
            }
        ));
    }
    Ok(())
}

struct Component;

impl Guest for Component {
    fn configure(settings: Settings) -> Result<(), String> {
        let c = parse(&settings)?;
        CONFIG.set(c);
        Ok(())
    }

    fn pre_snapshot(vm: String) -> Result<(), String> {
        let c = CONFIG.with_borrow(Clone::clone);
        guest::ping().map_err(|e| format!("guest agent: {e}"))?;
        run("pre-freeze", &c.pre_freeze, &vm, c.timeout_ms)?;
        if c.freeze {
            // Someone else's freeze would be thawed by ours: refuse instead.
            if guest::fs_status().map_err(|e| format!("freeze status: {e}"))? == "frozen" {
                return Err("the guest's filesystems are already frozen by someone else".into());
            }
            guest::fs_freeze().map_err(|e| format!("freeze: {e}"))?;
            FROZE.set(true);
        }
        Ok(())
    }

    fn post_snapshot(vm: String) -> Result<(), String> {
        let c = CONFIG.with_borrow(Clone::clone);
        if FROZE.replace(false) {
            guest::fs_thaw().map_err(|e| format!("thaw: {e}"))?;
        }
        run("post-thaw", &c.post_thaw, &vm, c.timeout_ms)
    }

    fn post_backup(vm: String, succeeded: bool) -> Result<(), String> {
        let c = CONFIG.with_borrow(Clone::clone);
        if succeeded {
            run("post-backup", &c.post_backup, &vm, c.timeout_ms)?;
            // Lets monitoring inside the guest see its last good backup.
            if let Some(stamp) = &c.stamp {
                guest::file_write(stamp, format!("{vm}: backed up by arca\n").as_bytes())
                    .map_err(|e| format!("stamp {stamp}: {e}"))?;
            }
        }
        Ok(())
    }
}

export!(Component);
