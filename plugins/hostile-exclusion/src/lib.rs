//! An exclusion stage that misbehaves only on the disk named in its `disk`
//! setting and excludes nothing elsewhere, so that the host's tests can show
//! that one task's bad plugin leaves the other tasks of a session alone.
//! Never configure it in a real pipeline.

use std::cell::RefCell;
use std::hint::black_box;

wit_bindgen::generate!({
    path: "../../wit",
    world: "arca:pipeline/exclusion",
});

use arca::pipeline::disk::DiskReader;
use arca::pipeline::types::{DiskInfo, Extent};
use exports::arca::pipeline::exclude::{Guest, Settings};

#[derive(Default, Clone)]
struct Config {
    behaviour: String,
    disk: String,
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
}

struct Component;

impl Guest for Component {
    fn configure(settings: Settings) -> Result<(), String> {
        let mut c = Config::default();
        for (k, v) in settings {
            match k.as_str() {
                "behaviour" => match v.as_str() {
                    "loop" | "trap" | "out-of-range" | "none" => c.behaviour = v,
                    other => return Err(format!("hostile exclusion: unknown behaviour `{other}`")),
                },
                "disk" => c.disk = v,
                other => return Err(format!("hostile exclusion: unknown setting `{other}`")),
            }
        }
        CONFIG.set(c);
        Ok(())
    }

    fn excluded_extents(disk: DiskInfo, reader: &DiskReader) -> Result<Vec<Extent>, String> {
        let c = CONFIG.with_borrow(Clone::clone);
        if disk.name != c.disk {
            // Reading through the resource proves the grant works.
            let first = reader.read(0, 512)?;
            let _ = black_box(first);
            return Ok(Vec::new());
        }
        match c.behaviour.as_str() {
            "loop" => {
                let mut n = 0u64;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "trap" => panic!("hostile exclusion traps on {}", disk.name),
            "out-of-range" => Ok(vec![Extent {
                offset: disk.size - 1,
                length: 4096,
            }]),
            _ => Ok(Vec::new()),
        }
    }
}

export!(Component);
