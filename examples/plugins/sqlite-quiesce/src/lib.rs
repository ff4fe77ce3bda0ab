//! Application-consistent backups of an SQLite database in WAL mode.
//!
//! Before the snapshot, the hook asks SQLite inside the guest to checkpoint
//! the write-ahead log into the database file and truncate it
//! (`PRAGMA wal_checkpoint(TRUNCATE)`), so the database file in the restore
//! point is complete on its own. If a writer holds the database busy, the
//! checkpoint cannot finish and the hook fails; the job's guest processing
//! mode decides what that means (require: no restore point; try: a
//! crash-consistent one, which SQLite also recovers from).

wit_bindgen::generate!({
    path: "../../../wit",
    world: "arca:pipeline/guest-hook",
});

use arca::pipeline::guest;
use exports::arca::pipeline::hooks::{Guest, Settings};
use std::cell::RefCell;

struct Config {
    database: String,
    sqlite3: String,
    timeout_ms: u32,
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

struct Component;

impl Guest for Component {
    fn configure(settings: Settings) -> Result<(), String> {
        let mut database = None;
        let mut sqlite3 = "/usr/bin/sqlite3".to_string();
        let mut timeout_ms = 30_000;
        for (k, v) in settings {
            match k.as_str() {
                "database" => database = Some(v),
                "sqlite3" => sqlite3 = v,
                "timeout_ms" => {
                    timeout_ms = v
                        .parse()
                        .map_err(|_| format!("sqlite-quiesce: timeout_ms must be a number, got `{v}`"))?
                }
                other => return Err(format!("sqlite-quiesce: unknown setting `{other}`")),
            }
        }
        let database = database.ok_or("sqlite-quiesce: setting `database` (path in the guest) is required")?;
        CONFIG.set(Some(Config {
            database,
            sqlite3,
            timeout_ms,
        }));
        Ok(())
    }

    fn pre_snapshot(_vm: String) -> Result<(), String> {
        CONFIG.with_borrow(|c| {
            let c = c.as_ref().ok_or("sqlite-quiesce: not configured")?;
            let out = guest::exec(
                &c.sqlite3,
                &[c.database.clone(), "PRAGMA wal_checkpoint(TRUNCATE);".to_string()],
                c.timeout_ms,
            )?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            // The pragma prints "busy|log|checkpointed"; busy = 1 means a
            // writer kept it from finishing.
            if out.exit_code != 0 || !stdout.trim_start().starts_with("0|") {
                return Err(format!(
                    "checkpoint of {} did not complete (exit {}, output {:?}, {})",
                    c.database,
                    out.exit_code,
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(())
        })
    }

    fn post_snapshot(_vm: String) -> Result<(), String> {
        Ok(())
    }

    fn post_backup(_vm: String, _succeeded: bool) -> Result<(), String> {
        Ok(())
    }
}

export!(Component);
