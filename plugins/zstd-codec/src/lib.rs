//! zstd codec: every block of a batch is its own zstd frame, so that any chunk
//! can be decompressed alone at restore.

mod entropy;

use std::cell::RefCell;
use std::io::Cursor;

use zstd::bulk::{Compressor, Decompressor};

wit_bindgen::generate!({
    path: "../../wit",
    world: "arca:pipeline/compression",
});

use exports::arca::pipeline::codec::{Batch, Guest, Settings};

/// Level 1, as Proxmox Backup Server uses: on a 4 GiB guest disk of system
/// files it made the full backup 15-20% faster than level 3 for 3.4% more
/// repository (docs/BENCHMARKS.md, "Codec level"). Operators who prefer
/// size set `level`.
const DEFAULT_LEVEL: i32 = 1;

/// Instance state. The contexts are kept between calls because creating a
/// zstd context allocates and initialises several hundred KiB of tables,
/// which would dominate the cost of compressing one block.
struct Codec {
    level: i32,
    compressor: Option<Compressor<'static>>,
    decompressor: Option<Decompressor<'static>>,
}

thread_local! {
    static CODEC: RefCell<Codec> = const {
        RefCell::new(Codec { level: DEFAULT_LEVEL, compressor: None, decompressor: None })
    };
}

fn parse_level(value: &str) -> Result<i32, String> {
    let range = zstd::compression_level_range();
    match value.trim().parse::<i32>() {
        Ok(level) if range.contains(&level) => Ok(level),
        _ => Err(format!(
            "zstd codec: setting `level` must be an integer in {}..={}, got `{value}`",
            range.start(),
            range.end()
        )),
    }
}

fn parse_settings(settings: &Settings) -> Result<i32, String> {
    let mut level = None;
    for (key, value) in settings {
        match key.as_str() {
            "level" if level.is_some() => {
                return Err("zstd codec: setting `level` is given more than once".into());
            }
            "level" => level = Some(parse_level(value)?),
            other => {
                return Err(format!(
                    "zstd codec: unknown setting `{other}` (the only setting is `level`)"
                ));
            }
        }
    }
    Ok(level.unwrap_or(DEFAULT_LEVEL))
}

/// Checks that `lengths` cut `data` exactly, so slicing by them cannot go out
/// of bounds.
fn check_shape(what: &str, batch: &Batch) -> Result<(), String> {
    let sum: u64 = batch.lengths.iter().map(|&l| u64::from(l)).sum();
    if sum == batch.data.len() as u64 {
        Ok(())
    } else {
        Err(format!(
            "zstd codec: {what} batch lengths add up to {sum} bytes but it holds {} bytes",
            batch.data.len()
        ))
    }
}

fn blocks(batch: &Batch) -> impl Iterator<Item = &[u8]> {
    let mut rest = batch.data.as_slice();
    batch.lengths.iter().map(move |&len| {
        let (block, tail) = rest.split_at(len as usize);
        rest = tail;
        block
    })
}

fn zstd_error(what: &str, e: std::io::Error) -> String {
    format!("zstd codec: {what}: {e}")
}

impl Codec {
    fn compress(&mut self, batch: &Batch) -> Result<Batch, String> {
        check_shape("input", batch)?;
        let compressor = match &mut self.compressor {
            Some(c) => c,
            slot => slot.insert(
                Compressor::new(self.level).map_err(|e| zstd_error("creating a context", e))?,
            ),
        };
        // Room for the worst case up front: growing the buffer mid-batch
        // would copy everything coded so far. Untouched capacity costs no
        // memory, as pages of linear memory are only backed once written.
        let bound: usize = batch
            .lengths
            .iter()
            .map(|&l| zstd::compress_bound(l as usize))
            .sum();
        let mut out = Cursor::new(Vec::with_capacity(bound));
        let mut lengths = Vec::with_capacity(batch.lengths.len());
        for (i, block) in blocks(batch).enumerate() {
            // An empty coded block asks the host to store the block as it
            // is (`wit/pipeline.wit`, codec).
            if entropy::looks_random(block) {
                lengths.push(0);
                continue;
            }
            let start = out.get_ref().len();
            out.set_position(start as u64);
            let written = compressor
                .compress_to_buffer(block, &mut out)
                .map_err(|e| zstd_error(&format!("compressing block {i}"), e))?;
            lengths.push(u32::try_from(written).map_err(|_| {
                format!("zstd codec: block {i} compressed to {written} bytes, over 4 GiB")
            })?);
        }
        Ok(Batch {
            data: out.into_inner(),
            lengths,
        })
    }

    fn decompress(&mut self, batch: &Batch, raw_lengths: &[u32]) -> Result<Batch, String> {
        check_shape("input", batch)?;
        if raw_lengths.len() != batch.lengths.len() {
            return Err(format!(
                "zstd codec: {} blocks to decompress but {} raw lengths",
                batch.lengths.len(),
                raw_lengths.len()
            ));
        }
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            slot => {
                slot.insert(Decompressor::new().map_err(|e| zstd_error("creating a context", e))?)
            }
        };
        let total: u64 = raw_lengths.iter().map(|&l| u64::from(l)).sum();
        let total = usize::try_from(total)
            .map_err(|_| format!("zstd codec: raw lengths add up to {total} bytes, too large"))?;
        let mut out = Cursor::new(Vec::with_capacity(total));
        for (i, (block, &raw)) in blocks(batch).zip(raw_lengths).enumerate() {
            let start = out.get_ref().len();
            out.set_position(start as u64);
            // A frame that expands past `raw` either fails for lack of room or
            // is caught by the length check below; both reject the block.
            out.get_mut().reserve(raw as usize);
            let written = decompressor
                .decompress_to_buffer(block, &mut out)
                .map_err(|e| {
                    zstd_error(&format!("decompressing block {i} (raw length {raw})"), e)
                })?;
            if written != raw as usize {
                return Err(format!(
                    "zstd codec: block {i} decompressed to {written} bytes, expected {raw}"
                ));
            }
        }
        Ok(Batch {
            data: out.into_inner(),
            lengths: raw_lengths.to_vec(),
        })
    }
}

struct Component;

impl Guest for Component {
    fn configure(settings: Settings) -> Result<(), String> {
        let level = parse_settings(&settings)?;
        CODEC.with_borrow_mut(|codec| {
            if codec.level != level {
                codec.compressor = None;
            }
            codec.level = level;
        });
        Ok(())
    }

    fn compress(blocks: Batch) -> Result<Batch, String> {
        CODEC.with_borrow_mut(|codec| codec.compress(&blocks))
    }

    fn decompress(blocks: Batch, raw_lengths: Vec<u32>) -> Result<Batch, String> {
        CODEC.with_borrow_mut(|codec| codec.decompress(&blocks, &raw_lengths))
    }
}

export!(Component);

#[cfg(test)]
mod tests;
