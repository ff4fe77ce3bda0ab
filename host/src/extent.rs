//! Byte ranges of a disk and their mapping onto fixed-size blocks.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    pub fn new(offset: u64, length: u64) -> Self {
        Self { offset, length }
    }

    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// Sorts, drops empty ranges, clips to `limit` and merges overlapping or
/// touching ranges, so that later code can walk them in one pass.
pub fn normalize(mut extents: Vec<Extent>, limit: u64) -> Vec<Extent> {
    extents.retain(|e| e.length > 0 && e.offset < limit);
    extents.sort();
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        let end = e.end().min(limit);
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                last.length = last.length.max(end - last.offset);
            }
            _ => out.push(Extent::new(e.offset, end - e.offset)),
        }
    }
    out
}

/// Ranges widened to whole blocks of `block` bytes and merged: what block
/// planning makes of them anyway, in at most one range per two blocks.
pub fn round_to_blocks(extents: &[Extent], block: u64) -> Vec<Extent> {
    let widened = extents
        .iter()
        .filter(|e| e.length > 0)
        .map(|e| {
            let start = e.offset / block * block;
            let end = e.end().div_ceil(block).saturating_mul(block);
            Extent::new(start, end - start)
        })
        .collect();
    normalize(widened, u64::MAX)
}

/// The block geometry of one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub disk_size: u64,
    pub block_size: u32,
}

impl Geometry {
    pub fn block_count(&self) -> u64 {
        self.disk_size.div_ceil(u64::from(self.block_size))
    }

    pub fn block_extent(&self, index: u64) -> Extent {
        let bs = u64::from(self.block_size);
        let offset = index * bs;
        Extent::new(offset, bs.min(self.disk_size - offset))
    }

    /// Indices of the blocks that a normalized extent list touches.
    pub fn blocks_touched(&self, extents: &[Extent]) -> Vec<bool> {
        let mut touched = vec![false; self.block_count() as usize];
        let bs = u64::from(self.block_size);
        for e in extents {
            if e.length == 0 {
                continue;
            }
            let first = e.offset / bs;
            let last = (e.end() - 1) / bs;
            for i in first..=last.min(self.block_count().saturating_sub(1)) {
                touched[i as usize] = true;
            }
        }
        touched
    }

    /// Blocks wholly inside a normalized extent list.
    pub fn blocks_covered(&self, extents: &[Extent]) -> Vec<bool> {
        let mut covered = vec![false; self.block_count() as usize];
        let bs = u64::from(self.block_size);
        for e in extents {
            let mut i = e.offset.div_ceil(bs);
            while i < self.block_count() && self.block_extent(i).end() <= e.end() {
                covered[i as usize] = true;
                i += 1;
            }
        }
        covered
    }

    /// Checks that an extent starts on a block boundary and ends on one or at
    /// the end of the disk; plugins must answer in whole blocks.
    pub fn is_block_aligned(&self, e: &Extent) -> bool {
        let bs = u64::from(self.block_size);
        e.offset.is_multiple_of(bs) && (e.end().is_multiple_of(bs) || e.end() == self.disk_size)
    }
}

/// The parts of `extents` (normalized) that fall inside block `block`, as
/// offsets relative to the block start.
pub fn ranges_within(extents: &[Extent], block: Extent) -> Vec<(usize, usize)> {
    let start = extents.partition_point(|e| e.end() <= block.offset);
    extents[start..]
        .iter()
        .take_while(|e| e.offset < block.end())
        .map(|e| {
            let from = e.offset.max(block.offset) - block.offset;
            let to = e.end().min(block.end()) - block.offset;
            (from as usize, to as usize)
        })
        .collect()
}

/// Turns a per-block flag vector into merged extents.
pub fn runs_to_extents(geometry: &Geometry, flags: &[bool]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for (i, &f) in flags.iter().enumerate() {
        if !f {
            continue;
        }
        let b = geometry.block_extent(i as u64);
        match out.last_mut() {
            Some(last) if last.end() == b.offset => last.length += b.length,
            _ => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_out_to_blocks_and_merge() {
        let e = |o, l| Extent::new(o, l);
        assert_eq!(
            round_to_blocks(&[e(10, 5), e(100, 1), e(1030, 2000), e(4096, 0)], 1024),
            [e(0, 3072)],
            "widened, then merged with their neighbours"
        );
        assert_eq!(round_to_blocks(&[e(2048, 1024)], 1024), [e(2048, 1024)]);
        // Every other block dirty in pieces: one range per dirty block.
        let scattered: Vec<Extent> = (0..100)
            .flat_map(|b| [e(b * 2048, 10), e(b * 2048 + 500, 10)])
            .collect();
        assert_eq!(round_to_blocks(&scattered, 1024).len(), 100);
    }

    const G: Geometry = Geometry {
        disk_size: 10 * 1024 + 100,
        block_size: 1024,
    };

    #[test]
    fn normalize_merges_and_clips() {
        let n = normalize(
            vec![
                Extent::new(50, 10),
                Extent::new(0, 20),
                Extent::new(20, 5),
                Extent::new(100, 0),
                Extent::new(900, 1000),
                Extent::new(2000, 5),
            ],
            1000,
        );
        assert_eq!(
            n,
            vec![
                Extent::new(0, 25),
                Extent::new(50, 10),
                Extent::new(900, 100)
            ]
        );
    }

    #[test]
    fn touched_and_covered_blocks() {
        let ex = normalize(
            vec![Extent::new(1000, 2100), Extent::new(10 * 1024, 100)],
            G.disk_size,
        );
        let touched = G.blocks_touched(&ex);
        assert_eq!(touched.iter().filter(|t| **t).count(), 5); // 0,1,2,3 and the short last block
        assert!(touched[0] && touched[3] && touched[10] && !touched[4]);
        let covered = G.blocks_covered(&ex);
        assert_eq!(
            covered
                .iter()
                .enumerate()
                .filter(|(_, c)| **c)
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            vec![1, 2, 10]
        );
    }

    #[test]
    fn ranges_inside_a_block_are_relative() {
        let ex = normalize(
            vec![Extent::new(1000, 100), Extent::new(1500, 10)],
            G.disk_size,
        );
        assert_eq!(
            ranges_within(&ex, G.block_extent(1)),
            vec![(0, 76), (476, 486)]
        );
        assert!(ranges_within(&ex, G.block_extent(3)).is_empty());
    }

    #[test]
    fn alignment_allows_a_short_last_block() {
        assert!(G.is_block_aligned(&Extent::new(1024, 2048)));
        assert!(G.is_block_aligned(&Extent::new(10 * 1024, 100)));
        assert!(!G.is_block_aligned(&Extent::new(1000, 1024)));
        let flags = [true, true, false, true];
        assert_eq!(
            runs_to_extents(&G, &flags),
            vec![Extent::new(0, 2048), Extent::new(3072, 1024)]
        );
    }
}
