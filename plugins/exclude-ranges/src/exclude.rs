use crate::settings::Config;
use arca_guestfs::disk::ReadAt;
use arca_guestfs::extent::{Extent, normalise};
use arca_guestfs::table;

/// The extents `config` excludes on one disk, clipped to `disk_size`. The
/// partition table is only read when partitions are requested.
pub fn excluded(
    config: &Config,
    disk_name: &str,
    disk_size: u64,
    disk: &(impl ReadAt + ?Sized),
) -> Result<Vec<Extent>, String> {
    let mut extents = config.ranges.clone();
    if !config.partitions.is_empty() {
        let fail = |why: String| format!("exclude-ranges: disk `{disk_name}`: {why}");
        let table = table::read(disk).map_err(fail)?.ok_or_else(|| {
            let numbers: Vec<String> = config.partitions.iter().map(u32::to_string).collect();
            fail(format!(
                "setting `partitions` names {} but the disk has no MBR or GPT partition table",
                numbers.join(", ")
            ))
        })?;
        extents.extend(table::select(&table, &config.partitions).map_err(fail)?);
    }
    Ok(normalise(extents, disk_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that must not be read.
    struct Untouchable;

    impl ReadAt for Untouchable {
        fn size(&self) -> u64 {
            1 << 30
        }
        fn read_at(&self, _: u64, _: u32) -> Result<Vec<u8>, String> {
            Err("read".into())
        }
    }

    fn config(ranges: &[(u64, u64)], partitions: &[u32]) -> Config {
        Config {
            ranges: ranges
                .iter()
                .map(|&(offset, length)| Extent { offset, length })
                .collect(),
            partitions: partitions.to_vec(),
        }
    }

    #[test]
    fn ranges_alone_do_not_read_the_disk_and_are_clipped() {
        let c = config(&[(100, 50), (900, 500), (5000, 1)], &[]);
        let got = excluded(&c, "vm/disk0", 1000, &Untouchable).unwrap();
        assert_eq!(
            got,
            vec![
                Extent {
                    offset: 100,
                    length: 50
                },
                Extent {
                    offset: 900,
                    length: 100
                }
            ]
        );
    }

    #[test]
    fn partitions_and_ranges_merge() {
        let mut disk = vec![0u8; 64 * 512];
        disk[446 + 4] = 0x83;
        disk[446 + 8..446 + 12].copy_from_slice(&8u32.to_le_bytes());
        disk[446 + 12..446 + 16].copy_from_slice(&8u32.to_le_bytes());
        disk[510..512].copy_from_slice(&[0x55, 0xAA]);
        let c = config(&[(0, 4096)], &[1]);
        let got = excluded(&c, "vm/disk0", disk.len() as u64, disk.as_slice()).unwrap();
        assert_eq!(
            got,
            vec![Extent {
                offset: 0,
                length: 8192
            }]
        );
    }

    #[test]
    fn partitions_without_a_table_are_an_error() {
        let disk = vec![0u8; 64 * 512];
        let err =
            excluded(&config(&[], &[2, 3]), "vm/disk0", 64 * 512, disk.as_slice()).unwrap_err();
        assert!(
            err.contains("vm/disk0") && err.contains("2, 3") && err.contains("no MBR or GPT"),
            "{err}"
        );
    }
}
