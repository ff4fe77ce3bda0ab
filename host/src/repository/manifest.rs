//! Manifest files: magic, prost `Manifest`, BLAKE3 trailer over both, so a
//! damaged manifest is detected rather than restored.

use super::{RepositoryError, io_err};
#[cfg(test)]
use arca_transport::ExcludedRanges;
use arca_transport::{MANIFEST_FORMAT_VERSION, Manifest};
use prost::Message;
use std::path::Path;

const MAGIC: &[u8; 8] = b"ARCAMAN1";

pub fn encode(m: &Manifest) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    m.encode(&mut out).expect("Vec grows as needed");
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

pub fn decode(bytes: &[u8], path: &Path) -> Result<Manifest, RepositoryError> {
    let bad = |reason: String| RepositoryError::Manifest {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < MAGIC.len() + 32 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("not a manifest (bad magic or truncated)".into()));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(bad("checksum mismatch: the manifest is damaged".into()));
    }
    let m = Manifest::decode(&body[MAGIC.len()..]).map_err(|e| bad(e.to_string()))?;
    check(&m).map_err(bad)?;
    Ok(m)
}

/// What every stored manifest satisfies: a format this arca reads and a
/// block list that matches the disk. A commit checks it before writing,
/// since a remote mover may be of another version, or broken.
pub fn check(m: &Manifest) -> Result<(), String> {
    if m.format_version > MANIFEST_FORMAT_VERSION {
        return Err(format!(
            "manifest format {} is newer than this arca ({MANIFEST_FORMAT_VERSION})",
            m.format_version
        ));
    }
    // Checked: a crafted size over a block size of 1 would overflow.
    let expected = m.block_count().checked_mul(32);
    if m.block_size == 0 || expected != Some(m.block_hashes.len() as u64) {
        return Err("block list does not match the disk size".into());
    }
    Ok(())
}

/// What a commit asks of a manifest besides `check`: names that are one
/// path component each, since the point's folder is made of them. (Not
/// asked of what is read: the folder is already there.)
pub fn check_names(m: &Manifest) -> Result<(), String> {
    check_point_names(&m.job, &m.vm, &m.disk)
}

/// A disk's points folder is `points/<job>/<vm>/<disk>`: each name must be
/// one arca gives, so that none leads outside it.
pub fn check_point_names(job: &str, vm: &str, disk: &str) -> Result<(), String> {
    for (what, name) in [("job", job), ("vm", vm), ("disk", disk)] {
        if !crate::config::valid_name(name) {
            return Err(format!(
                "{what} name '{name}' is not one arca gives (letters, digits, '.', '_', '-', not first '.')"
            ));
        }
    }
    Ok(())
}

pub fn read(path: &Path) -> Result<Manifest, RepositoryError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    decode(&bytes, path)
}

/// How much of a manifest `read_header` reads from its start at first:
/// arca's own headers (names, ids, times, geometry) take a few hundred
/// bytes, and a session reads the header of every point of its disk, so a
/// larger first read costs each session in proportion to its history.
const HEADER_PROBE: usize = 4 << 10;
/// The most `read_header` reads from a manifest's start, and from its end,
/// before it reads the whole file (a header with very long names).
const HEADER_READ: usize = 64 << 10;
/// The block list's field.
const BLOCK_HASHES_TAG: u32 = 10;
/// The excluded ranges' field (the last one today). Every field but these
/// two is the header; header reads skip both by their lengths.
const EXCLUDED_TAG: u32 = 15;

/// A manifest's header (`Manifest::into_header`: names, point id, creation
/// time, geometry, parent before the block list; consistency, session,
/// pipeline and CBT bitmap after it), read from the first bytes of the file
/// and the few after the block list. A disk's restore points are ordered
/// by these, and a point's block list is 32 bytes per block (128 MiB for a
/// 1 TiB disk), so finding the newest of many points must not read them
/// all. Not checked against the trailer: whoever keeps a point reads it
/// whole with `read`. A file shorter than the first read (4 KiB, a disk
/// of fewer than ~120 blocks) is decoded whole, and so checked.
pub fn read_header(path: &Path) -> Result<Manifest, RepositoryError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut buf = Vec::with_capacity(HEADER_PROBE);
    for first in [HEADER_PROBE, HEADER_READ] {
        // On from where the last read ended, up to `first` bytes in all.
        (&file)
            .take((first - buf.len()) as u64)
            .read_to_end(&mut buf)
            .map_err(io_err(path))?;
        if buf.len() < first {
            return decode(&buf, path).map(Manifest::into_header);
        }
        if let Some(header) = header_within(&file, path, &buf)? {
            return Ok(header);
        }
    }
    // The header did not end within the reads (never so for arca's own
    // manifests), or the block list runs past the end: read it whole, which
    // says what is wrong.
    read(path).map(Manifest::into_header)
}

/// The header, if the block list's key and length lie within `buf`, the
/// file's first bytes.
fn header_within(
    file: &std::fs::File,
    path: &Path,
    buf: &[u8],
) -> Result<Option<Manifest>, RepositoryError> {
    let bad = |reason: String| RepositoryError::Manifest {
        path: path.to_owned(),
        reason,
    };
    if &buf[..MAGIC.len()] != MAGIC {
        return Err(bad("not a manifest (bad magic)".into()));
    }
    let body = &buf[MAGIC.len()..];
    let mut rest = body;
    while !rest.is_empty() {
        let at = body.len() - rest.len();
        // A key or field cut by the end of the read: a longer read, or
        // the whole file, takes it.
        let Ok((tag, wire_type)) = prost::encoding::decode_key(&mut rest) else {
            break;
        };
        if tag == BLOCK_HASHES_TAG {
            // The fields after the block list lie between it and the trailer.
            // A length from a damaged or crafted file may point anywhere:
            // anything odd is left to the whole read, which names the damage.
            if wire_type != prost::encoding::WireType::LengthDelimited {
                break;
            }
            let Ok(len) = prost::encoding::decode_varint(&mut rest) else {
                break;
            };
            let file_len = file.metadata().map_err(io_err(path))?.len();
            let tail = ((MAGIC.len() + body.len() - rest.len()) as u64)
                .checked_add(len)
                .zip(file_len.checked_sub(32))
                .filter(|&(from, end)| from <= end);
            let Some((tail_from, end)) = tail else {
                break;
            };
            let Some(tail) = tail_fields(file, path, tail_from, end)? else {
                break;
            };
            let mut fields = body[..at].to_vec();
            fields.extend_from_slice(&tail);
            return Manifest::decode(fields.as_slice())
                .map(|m| Some(m.into_header()))
                .map_err(|e| bad(e.to_string()));
        }
        let ctx = prost::encoding::DecodeContext::default();
        if prost::encoding::skip_field(wire_type, tag, &mut rest, ctx).is_err() {
            break;
        }
    }
    Ok(None)
}

/// The header's fields after the block list, from `from` to `end` (the
/// trailer), with the excluded ranges left out unread: they are skipped by
/// their length, so a header field a later format puts after them is kept.
/// `None` when a field does not parse, or one field or all of them take
/// more than `HEADER_READ` bytes, for the whole read to judge.
fn tail_fields(
    file: &std::fs::File,
    path: &Path,
    mut pos: u64,
    end: u64,
) -> Result<Option<Vec<u8>>, RepositoryError> {
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    use std::os::unix::fs::FileExt;
    let mut fields = Vec::new();
    let mut window = HEADER_PROBE;
    'read: while pos < end {
        let len = (end - pos).min(window as u64) as usize;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, pos).map_err(io_err(path))?;
        let to_end = pos + len as u64 == end;
        let mut rest = &buf[..];
        while !rest.is_empty() {
            let at = pos + (len - rest.len()) as u64;
            let mut after = rest;
            // Some(None): a header field; Some(Some(n)): the excluded
            // ranges, n bytes long after their key and length.
            let field = decode_key(&mut after).ok().and_then(|(tag, wire_type)| {
                if tag != EXCLUDED_TAG {
                    skip_field(wire_type, tag, &mut after, DecodeContext::default()).ok()?;
                    return Some(None);
                }
                if wire_type != WireType::LengthDelimited {
                    return None;
                }
                decode_varint(&mut after).ok().map(Some)
            });
            match field {
                Some(None) => {
                    fields.extend_from_slice(&rest[..rest.len() - after.len()]);
                    if fields.len() > HEADER_READ {
                        return Ok(None);
                    }
                    rest = after;
                }
                Some(Some(n)) => {
                    let body = pos + (len - after.len()) as u64;
                    let Some(next) = body.checked_add(n).filter(|&next| next <= end) else {
                        return Ok(None);
                    };
                    pos = next;
                    window = HEADER_PROBE;
                    continue 'read;
                }
                // Cut by the end of the read, perhaps: read again from the
                // field's start, as much as a field may take.
                None if !to_end && (at > pos || window < HEADER_READ) => {
                    pos = at;
                    window = HEADER_READ;
                    continue 'read;
                }
                None => return Ok(None),
            }
        }
        pos += len as u64;
    }
    Ok(Some(fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(blocks: u64, ranges: u64) -> Manifest {
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            job: "nightly".into(),
            vm: "web01".into(),
            disk: "disk0".into(),
            disk_size: blocks * 4096,
            block_size: 4096,
            block_hashes: vec![7; blocks as usize * 32],
            cbt_bitmap: "arca.nightly.7".into(),
            excluded: Some(ExcludedRanges::from_ranges(
                (0..ranges).map(|i| (i * 8192, 4096)),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn a_header_read_skips_the_excluded_ranges_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.manifest");
        let m = sample(1_000, 25_000);
        let mut bytes = encode(&m);
        // A flipped bit inside the ranges: the whole read sees the damage,
        // the header read never reads them.
        let at = bytes.len() - 32 - 1_000;
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_header(&path).unwrap(), m.clone().into_header());
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
    }

    #[test]
    fn a_header_field_after_the_excluded_ranges_is_kept() {
        // A later format may add header fields, which prost writes after
        // the ranges: here the CBT bitmap's name, written last by hand.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.manifest");
        let m = sample(1_000, 25_000);
        let mut body = MAGIC.to_vec();
        Manifest {
            cbt_bitmap: String::new(),
            ..m.clone()
        }
        .encode(&mut body)
        .unwrap();
        prost::encoding::string::encode(14, &m.cbt_bitmap, &mut body);
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        std::fs::write(&path, &body).unwrap();
        assert_eq!(read(&path).unwrap(), m);
        assert_eq!(read_header(&path).unwrap(), m.clone().into_header());
    }

    #[test]
    fn the_header_of_a_large_manifest_matches_the_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        // A header longer than the first probe (a parent id of 10 000
        // characters) takes the second read; the last, longer than that
        // (70 000), is read whole.
        for (blocks, parent) in [
            (0u64, 1),
            (3, 1),
            (1_000, 1),
            (100_000, 1),
            (100_000, 10_000),
            (100_000, 70_000),
        ] {
            let m = Manifest {
                format_version: MANIFEST_FORMAT_VERSION,
                job: "nightly".into(),
                vm: "web01".into(),
                disk: "disk0".into(),
                point_id: "20261201T000000Z-00000000".into(),
                created_unix_ms: 1_764_547_200_123,
                disk_size: blocks * 4096,
                block_size: 4096,
                parent_point: "p".repeat(parent),
                block_hashes: vec![7; blocks as usize * 32],
                consistency: "crash-consistent".into(),
                session_id: 42,
                pipeline: "default".into(),
                cbt_bitmap: "arca.nightly.7".into(),
                task_token: vec![9; 16],
                // Ranges that take ~100 KiB after the header's last field:
                // more than any header read, and not read.
                excluded: Some(ExcludedRanges::from_ranges(
                    (0..25_000u64).map(|i| (i * 8192, 4096)),
                )),
            };
            let path = dir.path().join(format!("{blocks}-{parent}.manifest"));
            std::fs::write(&path, encode(&m)).unwrap();
            let h = read_header(&path).unwrap();
            // Every field but the block list and the excluded ranges, before
            // the block list and after it.
            assert_eq!(h, m.clone().into_header());
            assert_eq!(h.cbt_bitmap, "arca.nightly.7");
            assert_eq!(h.task_token, [9; 16]);
            assert_eq!(read(&path).unwrap(), m);
        }
        let path = dir.path().join("junk.manifest");
        std::fs::write(&path, vec![1u8; HEADER_READ + 10]).unwrap();
        assert!(read_header(&path).is_err());
        // A large manifest cut inside its block list: no header from past
        // the end, but the whole read's error.
        let whole = std::fs::read(dir.path().join("100000-1.manifest")).unwrap();
        let path = dir.path().join("cut.manifest");
        std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        let e = read_header(&path).unwrap_err().to_string();
        assert!(e.contains("damaged") || e.contains("truncated"), "{e}");
        // A block list whose length says 2^64 - 1 bytes, or that is not a
        // length-delimited field: the whole read's error, no panic.
        for key in [
            0x52u8, /* tag 10, bytes */
            0x50,   /* tag 10, varint */
        ] {
            let mut crafted = MAGIC.to_vec();
            crafted.extend_from_slice(&[0x0a, 0x01, b'j', key]);
            crafted.extend_from_slice(&[0xff; 9]);
            crafted.push(0x01);
            crafted.resize(HEADER_READ + 100, 0);
            let path = dir.path().join("crafted.manifest");
            std::fs::write(&path, &crafted).unwrap();
            let e = read_header(&path).unwrap_err().to_string();
            assert!(e.contains("damaged"), "{e}");
        }
    }
}
