//! Exclusion of guest files by path: the data blocks of the regular files
//! matching the `exclude` patterns (ext2/3/4 case-sensitively, NTFS
//! case-insensitively), e.g. `exclude = "/tmp/**, /var/cache/**"`. The files
//! stay in the restored filesystem with their size, their content reads as
//! zeros; directories and filesystem metadata are always kept.

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

use arca_guestfs::glob::Pattern;

thread_local! {
    static CONFIG: RefCell<Vec<Pattern>> = const { RefCell::new(Vec::new()) };
}

fn parse(settings: &[(String, String)]) -> Result<Vec<Pattern>, String> {
    settings::check_keys("exclude-paths", settings, &["exclude"])?;
    let mut patterns = Vec::new();
    for (_, value) in settings {
        for item in settings::items(value) {
            patterns.push(
                Pattern::parse(item)
                    .map_err(|e| format!("exclude-paths: setting `exclude`: {e}"))?,
            );
        }
    }
    if patterns.is_empty() {
        return Err("exclude-paths: setting `exclude` names no path patterns".into());
    }
    Ok(patterns)
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
            excluded(
                "exclude-paths",
                &disk,
                reader,
                &Concern::Paths { patterns: config },
            )
        })
    }
}

export!(Component);
