//! The previous restore point as this task's change detection sees it:
//! which of its blocks may be carried unread, and the digests the detector
//! is given.
//!
//! A point's stored block is the disk's block with that point's excluded
//! ranges zeroed. Carrying a block unread (changed block tracking says it is
//! clean) is right only where this task would store the same bytes, that is
//! where it excludes the same bytes of the block. A block excluded otherwise
//! now is *stale* and must be read: an exclusion lifted (a file moved out of
//! an excluded folder, a stage taken out of the pipeline) leaves its blocks
//! clean, but their kept bytes were stored as zeros.
//!
//! A zero block is stored as a hole, and the detector is shown the digest of
//! zeros for it like for any stored block: a clean zero block is carried
//! instead of read again in every session. Stale blocks are shown with the
//! all-zero digest, which the contract reserves for blocks with no stored
//! data to reference.

use crate::extent::{Extent, Geometry, normalize};
use crate::repository::HOLE;
use arca_transport::{ExcludedRanges, HASH_LEN, Manifest};

/// What this task records of its exclusions (normalized ranges).
pub fn record(excluded: &[Extent]) -> ExcludedRanges {
    ExcludedRanges::from_ranges(excluded.iter().map(|e| (e.offset, e.length)))
}

/// The ranges `point` excluded, normalized to its disk, or why they are not
/// known (the sentence's end after the point's name).
pub fn recorded_exclusions(point: &Manifest) -> Result<Vec<Extent>, String> {
    let Some(record) = &point.excluded else {
        return Err(
            "does not record the ranges it excluded (an older arca made it, or an older \
             repository agent stored it: upgrade agents before the hosts that use them)"
                .into(),
        );
    };
    let ranges = record
        .ranges()
        .map_err(|e| format!("has an unreadable record of the ranges it excluded ({e})"))?;
    let ranges = ranges.into_iter().map(|(o, l)| Extent::new(o, l)).collect();
    Ok(normalize(ranges, point.disk_size))
}

/// Per block, whether it is stale: its excluded bytes in `before` (the
/// previous point's record) differ from those in `now`. Both ways: bytes
/// excluded only now would otherwise stay in the new point, and operators
/// exclude what must not be kept (deleted files, swap). Without a record,
/// every hole of the point is stale, since it may have been excluded (and
/// a block excluded in part cannot be told at all: such a point is not
/// used with changed block tracking, and nothing of it is carried).
pub fn stale_blocks(
    geometry: &Geometry,
    point: &Manifest,
    before: Option<&[Extent]>,
    now: &[Extent],
) -> Vec<bool> {
    match before {
        Some(before) => geometry.blocks_touched(&symmetric_difference(before, now)),
        None => point
            .block_hashes
            .chunks_exact(HASH_LEN)
            .map(|d| d == HOLE)
            .collect(),
    }
}

/// The previous point's digests for the detector: the digest of zeros for a
/// hole, all-zero for a stale block, the address for any other.
pub fn digests_for_detector(point: &Manifest, geometry: &Geometry, stale: &[bool]) -> Vec<u8> {
    let mut out = point.block_hashes.clone();
    let blocks = geometry.block_count();
    // Only the last block can be shorter than the others.
    let zeros = |len: u64| *blake3::hash(&vec![0u8; len as usize]).as_bytes();
    let whole = zeros(u64::from(geometry.block_size));
    let last = blocks
        .checked_sub(1)
        .map(|i| zeros(geometry.block_extent(i).length));
    for (i, d) in out.chunks_exact_mut(HASH_LEN).enumerate() {
        if stale.get(i).copied().unwrap_or(false) {
            d.fill(0);
        } else if d == HOLE {
            let is_last = i as u64 + 1 == blocks;
            d.copy_from_slice(match &last {
                Some(last) if is_last => last,
                _ => &whole,
            });
        }
    }
    out
}

/// The bytes covered by exactly one of two normalized range lists.
fn symmetric_difference(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let mut edges: Vec<u64> = a
        .iter()
        .chain(b)
        .flat_map(|e| [e.offset, e.end()])
        .collect();
    edges.sort_unstable();
    edges.dedup();
    // Between two neighbouring edges each list covers all or nothing.
    let covers = |list: &[Extent], at: u64| {
        let i = list.partition_point(|e| e.end() <= at);
        list.get(i).is_some_and(|e| e.offset <= at)
    };
    let mut out: Vec<Extent> = Vec::new();
    for w in edges.windows(2) {
        let (from, to) = (w[0], w[1]);
        if covers(a, from) == covers(b, from) {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end() == from => last.length += to - from,
            _ => out.push(Extent::new(from, to - from)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        disk_size: 4 * 1024 + 100,
        block_size: 1024,
    };

    fn ex(v: &[(u64, u64)]) -> Vec<Extent> {
        v.iter().map(|&(o, l)| Extent::new(o, l)).collect()
    }

    fn point(hashes: &[u8]) -> Manifest {
        Manifest {
            disk_size: G.disk_size,
            block_size: G.block_size,
            block_hashes: hashes.iter().flat_map(|&b| [b; HASH_LEN]).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn blocks_excluded_otherwise_now_are_stale() {
        let p = point(&[1, 2, 0, 0, 0]);
        let before = ex(&[(100, 200), (2048, 1024)]);
        // Block 0 the same; block 2 was excluded whole and is kept now;
        // block 3 is excluded in part now.
        let now = ex(&[(100, 200), (3072 + 10, 10)]);
        assert_eq!(
            stale_blocks(&G, &p, Some(&before), &now),
            [false, false, true, true, false]
        );
        // The same ranges: nothing stale, in particular no zero block.
        assert_eq!(stale_blocks(&G, &p, Some(&before), &before), [false; 5]);
        // A range that grew by a byte makes its block stale.
        let grown = ex(&[(100, 201), (2048, 1024)]);
        assert_eq!(
            stale_blocks(&G, &p, Some(&before), &grown),
            [true, false, false, false, false]
        );
        // No record: every hole may have been excluded.
        assert_eq!(
            stale_blocks(&G, &p, None, &now),
            [false, false, true, true, true]
        );
    }

    #[test]
    fn the_detector_sees_zero_blocks_as_zeros_and_stale_ones_as_nothing() {
        let p = point(&[1, 0, 0, 2, 0]);
        let d = digests_for_detector(&p, &G, &[false, true, false, true, false]);
        let at = |i: usize| &d[i * HASH_LEN..(i + 1) * HASH_LEN];
        assert_eq!(at(0), [1; HASH_LEN]);
        assert_eq!(at(1), HOLE, "stale");
        assert_eq!(at(2), blake3::hash(&[0u8; 1024]).as_bytes());
        assert_eq!(at(3), HOLE, "stale, though stored");
        // The last block is 100 bytes long.
        assert_eq!(at(4), blake3::hash(&[0u8; 100]).as_bytes());
    }

    #[test]
    fn recorded_ranges_come_back_normalized_or_say_why_not() {
        let mut p = point(&[0; 5]);
        let e = recorded_exclusions(&p).unwrap_err();
        assert!(e.contains("older arca"), "{e}");
        p.excluded = Some(record(&ex(&[(0, 10), (4096, 1000)])));
        assert_eq!(recorded_exclusions(&p), Ok(ex(&[(0, 10), (4096, 100)])));
        p.excluded = Some(ExcludedRanges {
            gaps_and_lengths: vec![1],
        });
        let e = recorded_exclusions(&p).unwrap_err();
        assert!(e.contains("unreadable"), "{e}");
    }

    #[test]
    fn symmetric_difference_of_ranges() {
        assert_eq!(
            symmetric_difference(&ex(&[(0, 10), (20, 10)]), &ex(&[(5, 20)])),
            ex(&[(0, 5), (10, 10), (25, 5)])
        );
        assert_eq!(symmetric_difference(&ex(&[(0, 10)]), &ex(&[(0, 10)])), []);
        assert_eq!(symmetric_difference(&[], &ex(&[(3, 4)])), ex(&[(3, 4)]));
    }
}
