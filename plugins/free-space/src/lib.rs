//! Exclusion of free space: the blocks that ext2/3/4 block bitmaps and the
//! NTFS `$Bitmap` call free, which hold nothing (or deleted data) and
//! restore as zeros. No settings.

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

fn parse(settings: &[(String, String)]) -> Result<(), String> {
    settings::check_keys("free-space", settings, &[])
}

struct Component;

impl Guest for Component {
    fn configure(settings: Settings) -> Result<(), String> {
        parse(&settings)
    }

    fn excluded_extents(disk: DiskInfo, reader: &DiskReader) -> Result<Vec<Extent>, String> {
        let found = guest::excluded(&Disk(reader), &Concern::Free)
            .map_err(|e| format!("free-space: disk `{}`: {e}", disk.name))?;
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
