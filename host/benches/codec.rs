//! WASM zstd codec against native zstd (run with `cargo bench --bench codec`).
//!
//! Same data (a tar stream of this machine's system files, `ARCA_BENCH_MIB`,
//! default 256), same level (`ARCA_BENCH_LEVEL`, default 3), same blocks
//! (`ARCA_BENCH_BLOCK_KIB`, default 1024) in batches of
//! `ARCA_BENCH_BATCH_KIB` (default 8192; a local session's are 1024), one
//! core. Compress and decompress are timed separately. Every round runs native zstd and each WASM codec once, and
//! each keeps its best over the rounds (`ARCA_BENCH_ROUNDS`, default 5):
//! this machine is a VM whose speed drifts over seconds, which would
//! otherwise land on one side only. The WASM side includes the copies into
//! and out of the instance, as a session pays them.
//!
//! Both sides leave blocks that look random to be stored as they are, by
//! the built-in codec's own judgement (`plugins/zstd-codec/src/entropy.rs`,
//! compiled natively here): the same work on both sides, so the ratio is
//! zstd's. A component given with `ARCA_CODEC_WASM` that does not judge
//! (an older build) codes those blocks too, and its ratio against native is
//! then lower than zstd's. MB/s divide the whole sample, decoded or not.
//!
//! `ARCA_CODEC_WASM=a.wasm,b.wasm` measures those codec components (plugin
//! authors comparing builds) instead of the built-in one; they run with
//! their deadline checks, which only the built-in codec is spared
//! (`builtin::is_bounded`). `ARCA_BENCH_FILE=path` takes the sample from
//! that file instead. Prints MB/s and ratios; never asserts on time.

#[path = "../../plugins/zstd-codec/src/entropy.rs"]
mod entropy;

use arca::plugin::codec::{Blocks, Codec, stores_coded};
use arca::plugin::{PluginLimits, PluginRuntime, StageKind, builtin};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

const MIB: usize = 1 << 20;

/// One side of the comparison, with its best times so far.
struct Side {
    name: String,
    codec: Option<Codec>,
    compress: f64,
    decompress: f64,
    coded: usize,
}

fn main() {
    let mib: usize = env_or("ARCA_BENCH_MIB", 256);
    let level: i32 = env_or("ARCA_BENCH_LEVEL", 3);
    let rounds: usize = env_or("ARCA_BENCH_ROUNDS", 5);
    let sample = match std::env::var("ARCA_BENCH_FILE") {
        Ok(p) => {
            let mut all = std::fs::read(p).unwrap();
            all.truncate(mib * MIB);
            all
        }
        Err(_) => system_files(mib * MIB),
    };

    let runtime = PluginRuntime::new(None).unwrap();
    let components: Vec<(String, Vec<u8>)> = match std::env::var("ARCA_CODEC_WASM") {
        Ok(paths) => paths
            .split(',')
            .map(|p| (p.to_owned(), std::fs::read(p).unwrap()))
            .collect(),
        Err(_) => {
            let b = builtin::find("zstd").unwrap();
            vec![(b.name.to_owned(), b.bytes.to_vec())]
        }
    };
    let settings = vec![("level".to_owned(), level.to_string())];
    let mut sides = vec![Side {
        name: "native".into(),
        codec: None,
        compress: f64::MAX,
        decompress: f64::MAX,
        coded: 0,
    }];
    for (name, bytes) in components {
        let plugin = runtime
            .load(&name, StageKind::Codec, bytes, PluginLimits::default())
            .unwrap();
        sides.push(Side {
            name,
            codec: Some(Codec::new(&plugin, &settings).unwrap()),
            compress: f64::MAX,
            decompress: f64::MAX,
            coded: 0,
        });
    }

    // Native side: the `zstd` crate, one context reused, like the plugin.
    let mut cx = zstd::bulk::Compressor::new(level).unwrap();
    let mut dx = zstd::bulk::Decompressor::new().unwrap();
    let native_code = |cx: &mut zstd::bulk::Compressor<'_>, block: &[u8]| {
        if entropy::looks_random(block) {
            Vec::new()
        } else {
            cx.compress(block).unwrap()
        }
    };
    let native_coded: Vec<Vec<u8>> = sample
        .chunks(block_size())
        .map(|b| native_code(&mut cx, b))
        .collect();
    sides[0].coded = native_coded
        .iter()
        .zip(sample.chunks(block_size()))
        .map(|(c, b)| stored_len(c.len(), b.len()))
        .sum();
    let judged_random = native_coded.iter().filter(|c| c.is_empty()).count();
    // Each codec decodes what it coded itself: the blocks a session would
    // store coded.
    let mut coded_batches: Vec<Vec<Stored>> = vec![Vec::new()];
    for side in &mut sides[1..] {
        let codec = side.codec.as_mut().unwrap();
        let mut batches = Vec::new();
        for chunk in sample.chunks(batch()) {
            let (coded, _) = codec.compress(blocks_of(chunk)).unwrap();
            let stored = stored_coded(&coded, chunk);
            side.coded += chunk.len() - stored.1.iter().sum::<u32>() as usize + stored.0.data.len();
            batches.push(stored);
        }
        coded_batches.push(batches);
    }
    check_round_trips(&sample, &mut sides, &coded_batches, &mut dx);

    for _ in 0..rounds {
        for (i, side) in sides.iter_mut().enumerate() {
            let (c, d) = match &mut side.codec {
                None => (
                    timed(|| {
                        for block in sample.chunks(block_size()) {
                            std::hint::black_box(native_code(&mut cx, block));
                        }
                    }),
                    timed(|| {
                        for (block, raw) in native_coded.iter().zip(sample.chunks(block_size())) {
                            if stores_coded(block.len(), raw.len()) {
                                std::hint::black_box(dx.decompress(block, raw.len()).unwrap());
                            }
                        }
                    }),
                ),
                Some(codec) => {
                    // Inputs are built before the clock starts: a session
                    // reads into the buffer it hands over.
                    let inputs: Vec<Blocks> = sample.chunks(batch()).map(blocks_of).collect();
                    let c = timed(|| {
                        for batch in inputs {
                            std::hint::black_box(codec.compress(batch).unwrap());
                        }
                    });
                    let inputs: Vec<(Blocks, &Vec<u32>)> = coded_batches[i]
                        .iter()
                        .map(|(coded, raw, _)| {
                            let copy = Blocks {
                                data: coded.data.clone(),
                                lengths: coded.lengths.clone(),
                            };
                            (copy, raw)
                        })
                        .collect();
                    let d = timed(|| {
                        for (input, raw) in inputs {
                            std::hint::black_box(codec.decompress(input, raw).unwrap());
                        }
                    });
                    (c, d)
                }
            };
            side.compress = side.compress.min(c);
            side.decompress = side.decompress.min(d);
        }
    }

    let mb = sample.len() as f64 / 1e6;
    println!(
        "zstd level {level}, {} MiB of {}, {} KiB blocks ({judged_random} of {} judged random), one core, best of {rounds}:",
        sample.len() / MIB,
        std::env::var("ARCA_BENCH_FILE").unwrap_or_else(|_| "system files".into()),
        block_size() / 1024,
        native_coded.len()
    );
    let native = (sides[0].compress, sides[0].decompress);
    for side in &sides {
        println!(
            "  {:<12} compress {:>5.0} MB/s ({:.2}× native)  decompress {:>5.0} MB/s ({:.2}× native)  ratio {:.3}",
            side.name.rsplit('/').next().unwrap_or(&side.name),
            mb / side.compress,
            native.0 / side.compress,
            mb / side.decompress,
            native.1 / side.decompress,
            sample.len() as f64 / side.coded as f64
        );
    }
    let _ = std::io::stdout().flush();
}

/// What a session stores of a block coded to `coded` bytes.
fn stored_len(coded: usize, raw: usize) -> usize {
    if stores_coded(coded, raw) { coded } else { raw }
}

/// The frames of a coded batch that a session would store coded, with
/// their blocks' lengths and places in the batch.
fn stored_coded(coded: &Blocks, chunk: &[u8]) -> Stored {
    let mut kept = Blocks {
        data: Vec::new(),
        lengths: Vec::new(),
    };
    let (mut raw, mut places) = (Vec::new(), Vec::new());
    let mut at = 0;
    for (k, (&len, block)) in coded
        .lengths
        .iter()
        .zip(chunk.chunks(block_size()))
        .enumerate()
    {
        let frame = &coded.data[at..at + len as usize];
        at += len as usize;
        if stores_coded(frame.len(), block.len()) {
            kept.data.extend_from_slice(frame);
            kept.lengths.push(len);
            raw.push(block.len() as u32);
            places.push(k);
        }
    }
    (kept, raw, places)
}

/// Coded frames a session would store, their blocks' raw lengths, and
/// which blocks of the batch they are.
type Stored = (Blocks, Vec<u32>, Vec<usize>);

/// Speed means nothing for a codec that loses data (a patched build, say):
/// once, before timing, every codec must give back each block it coded
/// shorter, and native zstd must read those frames too.
fn check_round_trips(
    sample: &[u8],
    sides: &mut [Side],
    coded_batches: &[Vec<Stored>],
    dx: &mut zstd::bulk::Decompressor<'_>,
) {
    for (side, batches) in sides.iter_mut().zip(coded_batches).skip(1) {
        let codec = side.codec.as_mut().unwrap();
        for ((coded, raw, places), batch) in batches.iter().zip(sample.chunks(batch())) {
            let copy = Blocks {
                data: coded.data.clone(),
                lengths: coded.lengths.clone(),
            };
            let (plain, _) = codec.decompress(copy, raw).unwrap();
            let blocks: Vec<&[u8]> = batch.chunks(block_size()).collect();
            let expected: Vec<u8> = places.iter().flat_map(|&k| blocks[k].to_vec()).collect();
            assert!(plain.data == expected, "{}: round trip differs", side.name);
            let mut at = 0;
            for (&len, &k) in coded.lengths.iter().zip(places) {
                let frame = &coded.data[at..at + len as usize];
                at += len as usize;
                let native = dx.decompress(frame, blocks[k].len()).unwrap();
                assert!(
                    native == blocks[k],
                    "{}: native zstd reads it wrong",
                    side.name
                );
            }
        }
    }
}

/// Block size: `ARCA_BENCH_BLOCK_KIB`, default 1024 (sessions default to
/// 256, for which zstd picks other parameters); a divisor of the batch, so
/// that both sides code the same blocks.
fn block_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        let kib: usize = env_or("ARCA_BENCH_BLOCK_KIB", 1024);
        assert!(
            kib > 0 && batch().is_multiple_of(kib * 1024),
            "ARCA_BENCH_BLOCK_KIB must divide the batch, ARCA_BENCH_BATCH_KIB ({} KiB)",
            batch() / 1024
        );
        kib * 1024
    })
}

/// Batch size: `ARCA_BENCH_BATCH_KIB`, default 8192 (a batch over a link
/// with round trips; sessions whose repository is in process use 1024).
fn batch() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| env_or("ARCA_BENCH_BATCH_KIB", 8192) * 1024)
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The first `len` bytes of a tar stream of system folders: real binaries,
/// libraries and text, as a guest disk holds them.
fn system_files(len: usize) -> Vec<u8> {
    let mut child = Command::new("tar")
        .args(["-cf", "-", "/usr/lib", "/usr/share", "/usr/bin"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = Vec::with_capacity(len);
    child
        .stdout
        .take()
        .unwrap()
        .take(len as u64)
        .read_to_end(&mut out)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    out
}

fn blocks_of(chunk: &[u8]) -> Blocks {
    Blocks {
        data: chunk.to_vec(),
        lengths: chunk.chunks(block_size()).map(|c| c.len() as u32).collect(),
    }
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}
