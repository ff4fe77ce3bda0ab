//! Exclusion of swap: Linux swap partitions and swap files (all but the
//! header page, so a restored area is still valid swap) and Windows'
//! pagefile.sys, swapfile.sys and hiberfil.sys. Setting `swapfiles`: the
//! Linux swap files to look for (default `/swapfile, /swap.img`); a file is
//! only excluded when it carries the swap signature.

use std::cell::RefCell;

use arca_guestfs::guest::Concern;
use arca_guestfs::settings;

wit_bindgen::generate!({
    path: "../../wit",
    world: "arca:pipeline/exclusion",
});

use arca::pipeline::disk::DiskReader;
use exports::arca::pipeline::exclude::{DiskInfo, Extent, Guest, Settings};

arca_guestfs::exclusion_glue!();

#[derive(Clone)]
struct Config {
    swapfiles: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            swapfiles: vec!["/swapfile".into(), "/swap.img".into()],
        }
    }
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
}

fn parse(settings: &[(String, String)]) -> Result<Config, String> {
    settings::check_keys("swap", settings, &["swapfiles"])?;
    let mut config = Config::default();
    for (_, value) in settings {
        config.swapfiles = settings::paths("swap", "swapfiles", value)?;
    }
    Ok(config)
}

struct Component;

impl Guest for Component {
    fn configure(settings: Settings) -> Result<(), String> {
        let config = parse(&settings)?;
        CONFIG.set(config);
        Ok(())
    }

    fn excluded_extents(disk: DiskInfo, reader: &DiskReader) -> Result<Vec<Extent>, String> {
        CONFIG.with_borrow(|config| {
            let concern = Concern::Swap {
                swapfiles: &config.swapfiles,
            };
            excluded("swap", &disk, reader, &concern)
        })
    }
}

export!(Component);
