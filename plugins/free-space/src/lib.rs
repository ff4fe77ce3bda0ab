//! Exclusion of free space: the blocks that ext2/3/4 block bitmaps and the
//! NTFS `$Bitmap` call free, which hold nothing (or deleted data) and
//! restore as zeros. No settings.

use arca_guestfs::guest::Concern;
use arca_guestfs::settings;

wit_bindgen::generate!({
    path: "../../wit",
    world: "arca:pipeline/exclusion",
});

use arca::pipeline::disk::DiskReader;
use exports::arca::pipeline::exclude::{DiskInfo, Extent, Guest, Settings};

arca_guestfs::exclusion_glue!();

fn parse(settings: &[(String, String)]) -> Result<(), String> {
    settings::check_keys("free-space", settings, &[])
}

struct Component;

impl Guest for Component {
    fn configure(settings: Settings) -> Result<(), String> {
        parse(&settings)
    }

    fn excluded_extents(disk: DiskInfo, reader: &DiskReader) -> Result<Vec<Extent>, String> {
        excluded("free-space", &disk, reader, &Concern::Free)
    }
}

export!(Component);
