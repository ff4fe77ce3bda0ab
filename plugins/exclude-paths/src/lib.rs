//! Exclusion of guest files by path: the data blocks of the regular files
//! matching the `exclude` patterns (ext2/3/4 case-sensitively, NTFS
//! case-insensitively), e.g. `exclude = "/tmp/**, /var/cache/**"`. The files
//! stay in the restored filesystem with their size, their content reads as
//! zeros; directories and filesystem metadata are always kept.

use std::cell::RefCell;

use arca_guestfs::disk::ReadAt;
use arca_guestfs::guest::{self, Concern};
use arca_guestfs::settings;

wit_bindgen::generate!({
    path: "../../wit",
    world: "arca:pipeline/exclusion",
});

use arca::pipeline::disk::DiskReader;
use exports::arca::pipeline::exclude::{DiskInfo, Extent, Guest, Settings};

/// The disk resource as the parsers' reader.
struct Disk<'a>(&'a DiskReader);

impl ReadAt for Disk<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, length: u32) -> Result<Vec<u8>, String> {
        self.0.read(offset, length)
    }
}

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
        let found = CONFIG
            .with_borrow(|config| {
                guest::excluded(&Disk(reader), &Concern::Paths { patterns: config })
            })
            .map_err(|e| format!("exclude-paths: disk `{}`: {e}", disk.name))?;
        Ok(found
            .into_iter()
            .map(|e| Extent {
                offset: e.offset,
                length: e.length,
            })
            .collect())
    }
}

export!(Component);
