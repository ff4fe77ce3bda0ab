//! Exclusion by configuration: byte ranges, and whole partitions found in the
//! disk's MBR or GPT. Excluded ranges restore as zeros.

mod exclude;
mod settings;

// Partition tables and the disk reader are shared with the guest-filesystem
// plugins through `arca-guestfs`.
use arca_guestfs::disk;

use std::cell::RefCell;

wit_bindgen::generate!({
    path: "../../wit",
    world: "arca:pipeline/exclusion",
});

use arca::pipeline::disk::DiskReader;
use exports::arca::pipeline::exclude::{DiskInfo, Extent, Guest, Settings};

thread_local! {
    static CONFIG: RefCell<settings::Config> = RefCell::new(settings::Config::default());
}

impl disk::ReadAt for DiskReader {
    fn size(&self) -> u64 {
        DiskReader::size(self)
    }
    fn read_at(&self, offset: u64, length: u32) -> Result<Vec<u8>, String> {
        self.read(offset, length)
    }
}

struct Component;

impl Guest for Component {
    fn configure(settings: Settings) -> Result<(), String> {
        let config = settings::parse(&settings)?;
        CONFIG.set(config);
        Ok(())
    }

    fn excluded_extents(disk: DiskInfo, reader: &DiskReader) -> Result<Vec<Extent>, String> {
        let extents = CONFIG
            .with_borrow(|config| exclude::excluded(config, &disk.name, disk.size, reader))?;
        Ok(extents
            .into_iter()
            .map(|e| Extent {
                offset: e.offset,
                length: e.length,
            })
            .collect())
    }
}

export!(Component);
