//! A guest hook that freezes the guest's filesystems and then traps, so the
//! host's tests can show that the host thaws what a broken hook left frozen.
//! Never configure it in a real job.

wit_bindgen::generate!({
    path: "../../wit",
    world: "arca:pipeline/guest-hook",
});

use arca::pipeline::guest;
use exports::arca::pipeline::hooks::{Guest, Settings};

struct Component;

impl Guest for Component {
    fn configure(_settings: Settings) -> Result<(), String> {
        Ok(())
    }

    fn pre_snapshot(vm: String) -> Result<(), String> {
        guest::fs_freeze()?;
        panic!("hostile hook traps with {vm} frozen");
    }

    fn post_snapshot(_vm: String) -> Result<(), String> {
        Ok(())
    }

    fn post_backup(_vm: String, _succeeded: bool) -> Result<(), String> {
        Ok(())
    }
}

export!(Component);
