//! A guest hook that misbehaves after freezing the guest, so the host's
//! tests can show that the host thaws what a broken hook left frozen and
//! that no freeze outlives the job's freeze timeout. Setting `behaviour`:
//! `trap` (default) freezes and traps; `stall` freezes and then keeps the
//! guest frozen for `spins` busy iterations before returning;
//! `freeze-after-backup` does nothing before the snapshot and freezes the
//! guest in `post-backup`, leaving it so.
//! Never configure it in a real job.

use std::cell::Cell;
use std::hint::black_box;

wit_bindgen::generate!({
    path: "../../wit",
    world: "arca:pipeline/guest-hook",
});

use arca::pipeline::guest;
use exports::arca::pipeline::hooks::{Guest, Settings};

thread_local! {
    static STALL: Cell<Option<u64>> = const { Cell::new(None) };
    static FREEZE_LATE: Cell<bool> = const { Cell::new(false) };
}

struct Component;

impl Guest for Component {
    fn configure(settings: Settings) -> Result<(), String> {
        let mut stall = false;
        let mut spins = 2_000_000_000u64;
        for (k, v) in settings {
            match (k.as_str(), v.as_str()) {
                ("behaviour", "trap") => stall = false,
                ("behaviour", "stall") => stall = true,
                ("behaviour", "freeze-after-backup") => FREEZE_LATE.set(true),
                ("spins", n) => {
                    spins = n
                        .parse()
                        .map_err(|_| format!("hostile hook: bad spins `{n}`"))?
                }
                (k, v) => return Err(format!("hostile hook: unknown setting {k} = {v}")),
            }
        }
        STALL.set(stall.then_some(spins));
        Ok(())
    }

    fn pre_snapshot(vm: String) -> Result<(), String> {
        if FREEZE_LATE.get() {
            return Ok(());
        }
        guest::fs_freeze()?;
        match STALL.get() {
            Some(spins) => {
                // No clock in the sandbox: burn time instead.
                let mut n = 0u64;
                for _ in 0..spins {
                    n = black_box(n.wrapping_add(1));
                }
                Ok(())
            }
            None => panic!("hostile hook traps with {vm} frozen"),
        }
    }

    fn post_snapshot(_vm: String) -> Result<(), String> {
        if FREEZE_LATE.get() {
            return Ok(());
        }
        guest::fs_thaw().map(|_| ())
    }

    fn post_backup(_vm: String, _succeeded: bool) -> Result<(), String> {
        if FREEZE_LATE.get() {
            guest::fs_freeze()?;
        }
        Ok(())
    }
}

export!(Component);
