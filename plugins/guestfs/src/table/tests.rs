//! Handmade MBR, EBR and GPT images.

use super::*;
use crate::gpt::tests_support::crc32;

const S: u64 = 512;

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes an MBR or EBR sector at `lba` with up to four (type, start, sectors)
/// entries.
fn write_mbr(disk: &mut [u8], lba: u64, entries: &[(u8, u32, u32)]) {
    let b = &mut disk[(lba * S) as usize..][..512];
    for (i, &(sys, start, sectors)) in entries.iter().enumerate() {
        let e = 446 + 16 * i;
        b[e + 4] = sys;
        put_u32(b, e + 8, start);
        put_u32(b, e + 12, sectors);
    }
    b[510] = 0x55;
    b[511] = 0xAA;
}

struct Gpt {
    sector: u64,
    entry_size: u32,
    entry_count: u32,
    /// (entry index, first LBA, last LBA)
    parts: Vec<(usize, u64, u64)>,
}

impl Gpt {
    fn new(parts: &[(usize, u64, u64)]) -> Self {
        Gpt {
            sector: 512,
            entry_size: 128,
            entry_count: 128,
            parts: parts.to_vec(),
        }
    }

    /// Writes the partition array at `entries_lba` and a header at `lba`.
    fn write(&self, disk: &mut [u8], lba: u64, entries_lba: u64) {
        let mut array = vec![0u8; (self.entry_size * self.entry_count) as usize];
        for &(i, first, last) in &self.parts {
            let e = i * self.entry_size as usize;
            array[e..e + 16].copy_from_slice(&[0xAF; 16]);
            array[e + 16..e + 32].copy_from_slice(&[i as u8 + 1; 16]);
            put_u64(&mut array, e + 32, first);
            put_u64(&mut array, e + 40, last);
        }
        let at = (entries_lba * self.sector) as usize;
        disk[at..at + array.len()].copy_from_slice(&array);

        let mut h = [0u8; 92];
        h[..8].copy_from_slice(b"EFI PART");
        put_u32(&mut h, 8, 0x0001_0000);
        put_u32(&mut h, 12, 92);
        put_u64(&mut h, 24, lba);
        put_u64(&mut h, 72, entries_lba);
        put_u32(&mut h, 80, self.entry_count);
        put_u32(&mut h, 84, self.entry_size);
        put_u32(&mut h, 88, crc32(&array));
        let crc = crc32(&h);
        put_u32(&mut h, 16, crc);
        let at = (lba * self.sector) as usize;
        disk[at..at + 92].copy_from_slice(&h);
    }

    /// A disk of `sectors` sectors with a protective MBR, a primary and a
    /// backup GPT.
    fn image(&self, sectors: u64) -> Vec<u8> {
        let mut disk = vec![0u8; (sectors * self.sector) as usize];
        write_mbr(&mut disk, 0, &[(0xEE, 1, (sectors - 1) as u32)]);
        let array_sectors = u64::from(self.entry_size * self.entry_count).div_ceil(self.sector);
        self.write(&mut disk, 1, 2);
        self.write(&mut disk, sectors - 1, sectors - 1 - array_sectors);
        disk
    }
}

fn ext(lba: u64, sectors: u64) -> Extent {
    Extent {
        offset: lba * S,
        length: sectors * S,
    }
}

fn numbers(t: &Table) -> Vec<u32> {
    t.partitions.iter().map(|p| p.number).collect()
}

#[test]
fn mbr_primary_partitions() {
    let mut disk = vec![0u8; 8192 * 512];
    write_mbr(
        &mut disk,
        0,
        &[(0x83, 2048, 1024), (0, 0, 0), (0x82, 4096, 2048)],
    );
    let t = read(disk.as_slice()).unwrap().unwrap();
    assert_eq!(t.scheme, "MBR");
    assert_eq!(numbers(&t), vec![1, 3]);
    assert_eq!(
        select(&t, &[3, 1]).unwrap(),
        vec![ext(4096, 2048), ext(2048, 1024)]
    );
    let err = select(&t, &[2]).unwrap_err();
    assert_eq!(err, "partition 2 does not exist (MBR partitions: 1, 3)");
}

#[test]
fn mbr_logical_partitions_are_numbered_from_5() {
    let mut disk = vec![0u8; 8192 * 512];
    write_mbr(&mut disk, 0, &[(0x83, 2048, 2048), (0x05, 4096, 4096)]);
    // EBR chain: each EBR's first entry is relative to the EBR, its link
    // relative to the extended partition.
    write_mbr(&mut disk, 4096, &[(0x83, 1, 1000), (0x05, 2000, 1100)]);
    write_mbr(&mut disk, 6096, &[(0x83, 1, 500)]);
    let t = read(disk.as_slice()).unwrap().unwrap();
    assert_eq!(numbers(&t), vec![1, 2, 5, 6]);
    assert_eq!(
        select(&t, &[5, 6]).unwrap(),
        vec![ext(4097, 1000), ext(6097, 500)]
    );
}

#[test]
fn gpt_numbers_follow_entry_slots() {
    let disk = Gpt::new(&[(0, 2048, 4095), (2, 4096, 8191)]).image(16384);
    let t = read(disk.as_slice()).unwrap().unwrap();
    assert_eq!(t.scheme, "GPT");
    assert_eq!(numbers(&t), vec![1, 3]);
    assert_eq!(select(&t, &[3]).unwrap(), vec![ext(4096, 4096)]);
    assert!(
        select(&t, &[2])
            .unwrap_err()
            .contains("GPT partitions: 1, 3")
    );
}

#[test]
fn gpt_falls_back_to_the_backup_header() {
    let mut disk = Gpt::new(&[(0, 34, 99)]).image(200);
    disk[512 + 30] ^= 0xFF;
    let t = read(disk.as_slice()).unwrap().unwrap();
    assert_eq!(select(&t, &[1]).unwrap(), vec![ext(34, 66)]);
}

#[test]
fn gpt_with_damaged_headers_is_an_error_not_a_missing_table() {
    let mut disk = Gpt::new(&[(0, 34, 99)]).image(200);
    disk[512 + 30] ^= 0xFF;
    disk[199 * 512 + 30] ^= 0xFF;
    let err = read(disk.as_slice()).err().unwrap();
    assert!(err.contains("CRC"), "{err}");
}

#[test]
fn gpt_with_damaged_partition_array_is_rejected() {
    let mut disk = Gpt::new(&[(0, 34, 99)]).image(200);
    // Both arrays: the primary at LBA 2, the backup just before the last LBA.
    disk[2 * 512 + 40] ^= 1;
    disk[(199 - 32) * 512 + 40] ^= 1;
    let err = read(disk.as_slice()).err().unwrap();
    assert!(err.contains("partition array"), "{err}");
}

#[test]
fn gpt_with_4k_sectors_and_large_entries() {
    let mut gpt = Gpt::new(&[(1, 10, 19)]);
    gpt.sector = 4096;
    gpt.entry_size = 256;
    gpt.entry_count = 16;
    let disk = gpt.image(64);
    let t = read(disk.as_slice()).unwrap().unwrap();
    assert_eq!(
        t.partitions,
        vec![Partition {
            number: 2,
            extent: Extent {
                offset: 10 * 4096,
                length: 10 * 4096
            },
            kind: PartitionType::Gpt([0xAF; 16]),
        }]
    );
}

#[test]
fn gpt_declaring_a_huge_array_is_rejected() {
    let mut gpt = Gpt::new(&[]);
    let mut disk = vec![0u8; 400 * 512];
    write_mbr(&mut disk, 0, &[(0xEE, 1, 399)]);
    // A valid one-entry table, then the header's count raised and re-sealed.
    gpt.entry_count = 1;
    gpt.write(&mut disk, 1, 2);
    let at = 512 + 80;
    disk[at..at + 4].copy_from_slice(&(1u32 << 20).to_le_bytes());
    disk[512 + 16..512 + 20].fill(0);
    let crc = crc32(&disk[512..512 + 92]);
    disk[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
    let err = read(disk.as_slice()).err().unwrap();
    assert!(err.contains("-byte partition array"), "{err}");
}

#[test]
fn protective_mbr_without_gpt_is_an_error() {
    let mut disk = vec![0u8; 100 * 512];
    write_mbr(&mut disk, 0, &[(0xEE, 1, 99)]);
    assert!(read(disk.as_slice()).err().unwrap().contains("protective"));
}

#[test]
fn blank_disk_has_no_table() {
    let disk = vec![0u8; 100 * 512];
    assert!(read(disk.as_slice()).unwrap().is_none());
}
