//! A codec that misbehaves on purpose, so that the host's tests can show the
//! sandbox holds: CPU and memory limits, traps, malformed results and the
//! absence of filesystem access, and that a codec which loses bytes is
//! caught before anything it coded is stored. Never configure it in a real
//! pipeline.

use std::cell::Cell;
use std::hint::black_box;

wit_bindgen::generate!({
    path: "../../wit",
    world: "arca:pipeline/compression",
});

use exports::arca::pipeline::codec::{Batch, Guest, Settings};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    None,
    Loop,
    MemoryBomb,
    Trap,
    WrongShape,
    OpenFile,
    Lossy,
}

impl Behaviour {
    const NAMES: &'static [(&'static str, Behaviour)] = &[
        ("none", Behaviour::None),
        ("loop", Behaviour::Loop),
        ("memory-bomb", Behaviour::MemoryBomb),
        ("trap", Behaviour::Trap),
        ("wrong-shape", Behaviour::WrongShape),
        ("open-file", Behaviour::OpenFile),
        ("lossy", Behaviour::Lossy),
    ];

    fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        Self::NAMES
            .iter()
            .find(|(name, _)| *name == value)
            .map(|&(_, b)| b)
            .ok_or_else(|| {
                let names: Vec<_> = Self::NAMES.iter().map(|(n, _)| *n).collect();
                format!(
                    "hostile codec: setting `behaviour` must be one of {}, got `{value}`",
                    names.join(", ")
                )
            })
    }
}

thread_local! {
    static BEHAVIOUR: Cell<Behaviour> = const { Cell::new(Behaviour::None) };
}

const CHUNK: usize = 16 << 20;
const PAGE: usize = 64 << 10;

fn spin() -> ! {
    // black_box hides the counter from the optimiser, so the loop cannot be
    // proven side-effect free and removed.
    let mut n = 0u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

fn hoard_memory() -> ! {
    // Allocation failure aborts, which is a trap: the host sees the memory
    // limit hit rather than an error returned by the plugin.
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; CHUNK];
        // Writing every wasm page makes the memory really used, not just
        // reserved, whatever the allocator does.
        for i in (0..CHUNK).step_by(PAGE) {
            chunk[i] = 1;
        }
        hoard.push(black_box(chunk));
    }
}

/// A batch whose block count differs from the input's and whose lengths do not
/// add up to its data length.
fn wrong_shape(blocks: Batch) -> Batch {
    let mut lengths = vec![0u32; blocks.lengths.len() + 1];
    let off_by_one = match u32::try_from(blocks.data.len()) {
        Ok(len) if len < u32::MAX => len + 1,
        _ => 0,
    };
    if let Some(last) = lengths.last_mut() {
        *last = off_by_one;
    }
    Batch {
        data: blocks.data,
        lengths,
    }
}

/// Each block without its last byte: shorter, so it looks compressed, and
/// `decompress` gives it back with a zero there, which is right only for
/// blocks that ended in zero.
fn lossy(blocks: Batch) -> Batch {
    let mut data = Vec::with_capacity(blocks.data.len());
    let mut lengths = Vec::with_capacity(blocks.lengths.len());
    let mut at = 0usize;
    for &len in &blocks.lengths {
        let len = len as usize;
        let keep = len.saturating_sub(1);
        data.extend_from_slice(&blocks.data[at..at + keep]);
        lengths.push(keep as u32);
        at += len;
    }
    Batch { data, lengths }
}

/// Every block padded with zeros to its raw length (as it is, for blocks
/// the other behaviours coded, which are already that long).
fn pad(blocks: Batch, raw_lengths: &[u32]) -> Batch {
    let mut data = Vec::with_capacity(raw_lengths.iter().map(|&l| l as usize).sum());
    let mut at = 0usize;
    for (&len, &raw) in blocks.lengths.iter().zip(raw_lengths) {
        let len = len as usize;
        data.extend_from_slice(&blocks.data[at..at + len]);
        data.resize(data.len() + (raw as usize).saturating_sub(len), 0);
        at += len;
    }
    Batch {
        data,
        lengths: raw_lengths.to_vec(),
    }
}

fn open_file() -> Result<Batch, String> {
    let data = std::fs::read("/etc/passwd").map_err(|e| format!("open-file: {e}"))?;
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    Ok(Batch {
        data,
        lengths: vec![len],
    })
}

struct Component;

impl Guest for Component {
    fn configure(settings: Settings) -> Result<(), String> {
        let mut behaviour = Behaviour::None;
        for (key, value) in &settings {
            match key.as_str() {
                "behaviour" => behaviour = Behaviour::parse(value)?,
                other => {
                    return Err(format!(
                        "hostile codec: unknown setting `{other}` (the only setting is `behaviour`)"
                    ));
                }
            }
        }
        BEHAVIOUR.set(behaviour);
        Ok(())
    }

    fn compress(blocks: Batch) -> Result<Batch, String> {
        match BEHAVIOUR.get() {
            Behaviour::None => Ok(blocks),
            Behaviour::Loop => spin(),
            Behaviour::MemoryBomb => hoard_memory(),
            Behaviour::Trap => panic!("hostile plugin panics on purpose"),
            Behaviour::WrongShape => Ok(wrong_shape(blocks)),
            Behaviour::OpenFile => open_file(),
            Behaviour::Lossy => Ok(lossy(blocks)),
        }
    }

    fn decompress(blocks: Batch, raw_lengths: Vec<u32>) -> Result<Batch, String> {
        if blocks.lengths.len() != raw_lengths.len() {
            return Ok(blocks);
        }
        Ok(pad(blocks, &raw_lengths))
    }
}

export!(Component);

#[cfg(test)]
mod tests;
