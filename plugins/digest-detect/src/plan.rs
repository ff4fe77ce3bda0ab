//! Block and extent arithmetic of the change detector, free of any binding
//! types so that it can be tested natively.
//!
//! Internally everything is a run of block indices `start..end`; byte extents
//! only appear at the edges.

use std::ops::Range;

/// Length of a BLAKE3 digest, the unit of `previous-digests` and `classify`.
pub const DIGEST_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteExtent {
    pub offset: u64,
    pub length: u64,
}

pub struct PlanInput<'a> {
    pub disk_size: u64,
    pub block_size: u32,
    pub allocated: &'a [ByteExtent],
    pub dirty: Option<&'a [ByteExtent]>,
    pub previous_digests: Option<&'a [u8]>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub read: Vec<ByteExtent>,
    pub unchanged: Vec<ByteExtent>,
}

type Runs = Vec<Range<u64>>;

pub fn plan(input: &PlanInput) -> Result<Plan, String> {
    let size = input.disk_size;
    let block = u64::from(input.block_size);
    if block == 0 {
        return Err("digest-detect: the disk's block size is 0".into());
    }
    let blocks = size.div_ceil(block);
    if let Some(previous) = input.previous_digests {
        let expected = blocks.checked_mul(DIGEST_LEN as u64);
        if expected != Some(previous.len() as u64) {
            return Err(format!(
                "digest-detect: previous digests hold {} bytes, expected {DIGEST_LEN} per block \
                 for {blocks} blocks of {block} bytes",
                previous.len()
            ));
        }
    }

    let allocated = block_runs("allocated", input.allocated, size, block)?;
    let (read, unchanged) = match (input.dirty, input.previous_digests) {
        (Some(dirty), Some(previous)) => {
            let dirty = block_runs("dirty", dirty, size, block)?;
            let clean = subtract(&allocated, &dirty);
            // A block with an all-zero previous digest has no stored data
            // to reference (the host says so for a block whose excluded
            // bytes changed), so it must be read even if untouched.
            let (unchanged, unreferenced) = split_by_reference(&clean, previous);
            let mut read = intersect(&allocated, &dirty);
            read.extend(unreferenced);
            (merge(read), unchanged)
        }
        _ => (allocated, Vec::new()),
    };
    Ok(Plan {
        read: byte_extents(&read, block, size),
        unchanged: byte_extents(&unchanged, block, size),
    })
}

/// Per block of a batch: true when the block must be stored (no previous
/// restore point, no previous digest at that index, or a different one).
pub fn classify(
    previous: Option<&[u8]>,
    first_block: u64,
    digests: &[u8],
) -> Result<Vec<bool>, String> {
    if !digests.len().is_multiple_of(DIGEST_LEN) {
        return Err(format!(
            "digest-detect: classify got {} digest bytes, not a multiple of {DIGEST_LEN}",
            digests.len()
        ));
    }
    let Some(previous) = previous else {
        return Ok(vec![true; digests.len() / DIGEST_LEN]);
    };
    Ok(digests
        .chunks_exact(DIGEST_LEN)
        .enumerate()
        .map(|(i, digest)| {
            first_block
                .checked_add(i as u64)
                .and_then(|index| previous_digest(previous, index))
                .is_none_or(|old| old != digest)
        })
        .collect())
}

fn previous_digest(previous: &[u8], index: u64) -> Option<&[u8]> {
    let start = usize::try_from(index).ok()?.checked_mul(DIGEST_LEN)?;
    previous.get(start..start.checked_add(DIGEST_LEN)?)
}

/// Blocks touched by `extents`, clipped to the disk, sorted and merged.
fn block_runs(what: &str, extents: &[ByteExtent], size: u64, block: u64) -> Result<Runs, String> {
    let mut runs = Vec::with_capacity(extents.len());
    for e in extents {
        let end = e.offset.checked_add(e.length).ok_or_else(|| {
            format!(
                "digest-detect: {what} extent at {} of length {} overflows",
                e.offset, e.length
            )
        })?;
        let end = end.min(size);
        if e.offset < end {
            runs.push(e.offset / block..end.div_ceil(block));
        }
    }
    Ok(merge(runs))
}

/// Sorts runs and joins those that overlap or touch.
fn merge(mut runs: Runs) -> Runs {
    runs.sort_unstable_by_key(|r| r.start);
    let mut merged: Runs = Vec::with_capacity(runs.len());
    for run in runs {
        match merged.last_mut() {
            Some(last) if run.start <= last.end => last.end = last.end.max(run.end),
            _ => merged.push(run),
        }
    }
    merged
}

/// Both inputs sorted and merged; so is the result.
fn intersect(a: &[Range<u64>], b: &[Range<u64>]) -> Runs {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let start = a[i].start.max(b[j].start);
        let end = a[i].end.min(b[j].end);
        if start < end {
            out.push(start..end);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// `a` without `b`; both sorted and merged, and so is the result.
fn subtract(a: &[Range<u64>], b: &[Range<u64>]) -> Runs {
    let mut out = Vec::new();
    let mut j = 0;
    for run in a {
        let mut start = run.start;
        while j < b.len() && b[j].end <= start {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].start < run.end {
            if b[k].start > start {
                out.push(start..b[k].start);
            }
            start = start.max(b[k].end);
            k += 1;
        }
        if start < run.end {
            out.push(start..run.end);
        }
    }
    out
}

/// Splits runs into blocks whose previous digest references stored data and
/// blocks whose previous digest is all-zero (nothing to reference).
fn split_by_reference(runs: &[Range<u64>], previous: &[u8]) -> (Runs, Runs) {
    let mut data: Runs = Vec::new();
    let mut none: Runs = Vec::new();
    for run in runs {
        for index in run.clone() {
            let unreferenced =
                previous_digest(previous, index).is_none_or(|d| d.iter().all(|&b| b == 0));
            let target = if unreferenced { &mut none } else { &mut data };
            match target.last_mut() {
                Some(last) if last.end == index => last.end += 1,
                _ => target.push(index..index + 1),
            }
        }
    }
    (data, none)
}

fn byte_extents(runs: &[Range<u64>], block: u64, size: u64) -> Vec<ByteExtent> {
    runs.iter()
        .map(|r| {
            let offset = r.start * block;
            let end = r.end.saturating_mul(block).min(size);
            ByteExtent {
                offset,
                length: end - offset,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
