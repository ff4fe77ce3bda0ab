//! A cheap look at a block before zstd runs over it: blocks whose bytes are
//! spread as evenly as random data's (swap, encrypted or already compressed
//! files, deleted data of those) are left to the host to store as they are.
//!
//! zstd would find the same, but only after its match finder, a histogram of
//! all literals and three copies of the block inside the instance (literals
//! into its sequence store, raw literals out, then the whole block as a raw
//! block), and the host would copy that raw frame out again only to drop it.
//! On a disk of random data, copies were half of the backup's CPU, these
//! ones a fifth; skipping them and zstd's work took 21% off it
//! (docs/BENCHMARKS.md, "Incompressible blocks").

/// Bytes read at each sampled place.
const RUN: usize = 64;
// `Counts` takes runs four bytes at a time and `repeats` eight.
const _: () = assert!(RUN.is_multiple_of(8));
/// Places sampled per block at most: 16 KiB of a block of 256 KiB or more.
const RUNS: usize = 256;
/// Below this a block is simply compressed: too little to judge, too little
/// to save.
pub const MIN_BLOCK: usize = 4096;
/// Shannon entropy, in bits per byte, at or above which a sample counts as
/// random. A uniform sample of 4-16 KiB measures 7.955-7.99. A byte value
/// that makes up about 4.5% or more of a block, the rest being random,
/// pulls the figure under the threshold; above it an order-0 coder alone
/// cannot save zstd's minimum gain of a block (1/64 of it), so what is left
/// to the host is at most a few percent of its size that zstd's matches
/// might still have saved.
const RANDOM_BITS: f64 = 7.9;

/// Bits per byte under which a first look at a quarter of the runs (4 KiB
/// of a 256 KiB block) decides "not random" without the rest. A uniform 4
/// KiB sample measures 7.955 (the estimate's bias is 0.045 bits there, its
/// spread 0.004), a block that measures `RANDOM_BITS` over all its runs
/// about 7.87, so the first look only ends the judgement early for blocks
/// the whole sample would also turn away, and a miss would only send a
/// block to zstd.
const FIRST_LOOK_BITS: f64 = 7.8;
/// Runs at or above which the first look is taken: it must hold 4 KiB.
const FIRST_LOOK_RUNS: usize = 4 * 4096 / RUN;

/// Whether `block` looks like random data, judged from about `RUNS` evenly
/// spaced runs of `RUN` bytes (the whole block when it is small): their
/// bytes must be spread like random bytes, and no two of their 8-byte words
/// may be equal.
///
/// Most blocks a codec sees are plainly not random (text, code, tables);
/// for them the judgement is a cost on top of zstd's, so it is kept to a
/// first look at a quarter of the runs (in WASM, counting all 16 KiB took
/// about 6% of a full backup's CPU in a `perf` profile).
pub fn looks_random(block: &[u8]) -> bool {
    if block.len() < MIN_BLOCK {
        return false;
    }
    let stride = (block.len() / RUNS).max(RUN);
    // At most 2 * RUNS runs whatever the length (the stride is rounded
    // down), which keeps `repeats` within its table.
    let runs = || {
        (0..block.len() - RUN + 1)
            .step_by(stride)
            .take(2 * RUNS)
            .map(|start| &block[start..start + RUN])
    };
    let mut counts = Counts::default();
    if runs().count() >= FIRST_LOOK_RUNS {
        // One run in four, at a place that turns with each group of four:
        // with 256 KiB blocks four runs span a 4 KiB page, and every fourth
        // run alone would see only page starts, where headers are.
        let first = |i: usize| (i + i / 4).is_multiple_of(4);
        let pick = |want: bool| {
            runs()
                .enumerate()
                .filter(move |&(i, _)| first(i) == want)
                .map(|(_, r)| r)
        };
        counts.add(pick(true));
        if counts.bits() < FIRST_LOOK_BITS {
            return false;
        }
        counts.add(pick(false));
    } else {
        counts.add(runs());
    }
    counts.bits() >= RANDOM_BITS && !repeats(runs())
}

/// A histogram of byte values, counted in four lanes: a run of equal bytes
/// (text is full of them) would otherwise make every increment wait for the
/// one before it.
struct Counts {
    lanes: [[u32; 4]; 256],
    total: u32,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            lanes: [[0; 4]; 256],
            total: 0,
        }
    }
}

impl Counts {
    fn add<'a>(&mut self, runs: impl Iterator<Item = &'a [u8]>) {
        for run in runs {
            for quad in run.chunks_exact(4) {
                for (lane, &b) in quad.iter().enumerate() {
                    self.lanes[b as usize][lane] += 1;
                }
            }
            self.total += RUN as u32;
        }
    }

    /// Shannon entropy of the bytes counted, in bits per byte.
    fn bits(&self) -> f64 {
        let n = f64::from(self.total);
        self.lanes
            .iter()
            .map(|l| l.iter().sum::<u32>())
            .filter(|&c| c > 0)
            .map(|c| {
                let p = f64::from(c) / n;
                -p * p.log2()
            })
            .sum()
    }
}

/// Whether two 8-byte words of `runs` are equal. Two words of random data
/// are equal with odds of 2^-64; data made of evenly spread bytes that
/// repeats itself (a pattern, a page copied within the block) shows it
/// here whenever two sampled words lie a period apart. For the default
/// 256 KiB blocks that is always so for periods under 2 KiB (2048 words
/// sampled: two of them fall on the same place in the period), and for a
/// 4 KiB page copied to another page boundary (each page is sampled at the
/// same four offsets). Smaller blocks sample fewer words; from 2 MiB up not
/// every page is sampled. A miss costs only compression: such a block is
/// stored as it is.
fn repeats<'a>(runs: impl Iterator<Item = &'a [u8]>) -> bool {
    /// Twice the words `2 * RUNS` runs hold, so probing always ends.
    const SLOTS: usize = 4 * RUNS * RUN / 8;
    let mut table = vec![0u64; SLOTS];
    let mut zero = false;
    for run in runs {
        for word in run.chunks_exact(8) {
            let v = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            // 0 marks a free slot, so the zero word is tracked apart.
            if v == 0 {
                if zero {
                    return true;
                }
                zero = true;
                continue;
            }
            let mut i = (v.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % SLOTS;
            loop {
                match table[i] {
                    0 => {
                        table[i] = v;
                        break;
                    }
                    w if w == v => return true,
                    _ => i = (i + 1) % SLOTS,
                }
            }
        }
    }
    false
}
