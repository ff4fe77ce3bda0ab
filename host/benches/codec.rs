//! WASM zstd codec against native zstd (run with `cargo bench --bench codec`).
//!
//! Same data (a tar stream of this machine's system files, `ARCA_BENCH_MIB`,
//! default 256), same level (`ARCA_BENCH_LEVEL`, default 3), same blocks
//! (`ARCA_BENCH_BLOCK_KIB`, default 1024) in 8 MiB batches, one core.
//! Compress and decompress are timed separately. Every round runs native zstd and each WASM codec once, and
//! each keeps its best over the rounds (`ARCA_BENCH_ROUNDS`, default 5):
//! this machine is a VM whose speed drifts over seconds, which would
//! otherwise land on one side only. The WASM side includes the copies into
//! and out of the instance, as a session pays them.
//!
//! `ARCA_CODEC_WASM=a.wasm,b.wasm` measures those codec components (plugin
//! authors comparing builds) instead of the built-in one; they run with
//! their deadline checks, which only the built-in codec is spared
//! (`builtin::is_bounded`). `ARCA_BENCH_FILE=path` takes the sample from
//! that file instead. Prints MB/s and ratios; never asserts on time.

use arca::plugin::codec::{Blocks, Codec};
use arca::plugin::{PluginLimits, PluginRuntime, StageKind, builtin};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

const MIB: usize = 1 << 20;
const BATCH: usize = 8 * MIB;

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
    let native_coded: Vec<Vec<u8>> = sample
        .chunks(block_size())
        .map(|b| cx.compress(b).unwrap())
        .collect();
    sides[0].coded = native_coded.iter().map(Vec::len).sum();
    // Each codec decodes what it coded itself.
    let mut coded_batches: Vec<Vec<(Blocks, Vec<u32>)>> = vec![Vec::new()];
    for side in &mut sides[1..] {
        let codec = side.codec.as_mut().unwrap();
        let mut batches = Vec::new();
        for chunk in sample.chunks(BATCH) {
            let (coded, _) = codec.compress(blocks_of(chunk)).unwrap();
            side.coded += coded.data.len();
            batches.push((
                coded,
                chunk.chunks(block_size()).map(|c| c.len() as u32).collect(),
            ));
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
                            std::hint::black_box(cx.compress(block).unwrap());
                        }
                    }),
                    timed(|| {
                        for block in &native_coded {
                            std::hint::black_box(dx.decompress(block, block_size()).unwrap());
                        }
                    }),
                ),
                Some(codec) => {
                    // Inputs are built before the clock starts: a session
                    // reads into the buffer it hands over.
                    let inputs: Vec<Blocks> = sample.chunks(BATCH).map(blocks_of).collect();
                    let c = timed(|| {
                        for batch in inputs {
                            std::hint::black_box(codec.compress(batch).unwrap());
                        }
                    });
                    let inputs: Vec<(Blocks, &Vec<u32>)> = coded_batches[i]
                        .iter()
                        .map(|(coded, raw)| {
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
        "zstd level {level}, {} MiB of system files, {} KiB blocks, one core, best of {rounds}:",
        sample.len() / MIB,
        block_size() / 1024
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

/// Speed means nothing for a codec that loses data (a patched build, say):
/// once, before timing, every codec must give the sample back, and native
/// zstd must read what it wrote block by block.
fn check_round_trips(
    sample: &[u8],
    sides: &mut [Side],
    coded_batches: &[Vec<(Blocks, Vec<u32>)>],
    dx: &mut zstd::bulk::Decompressor<'_>,
) {
    for (side, batches) in sides.iter_mut().zip(coded_batches).skip(1) {
        let codec = side.codec.as_mut().unwrap();
        for ((coded, raw), original) in batches.iter().zip(sample.chunks(BATCH)) {
            let copy = Blocks {
                data: coded.data.clone(),
                lengths: coded.lengths.clone(),
            };
            let (plain, _) = codec.decompress(copy, raw).unwrap();
            assert!(plain.data == original, "{}: round trip differs", side.name);
            let mut at = 0;
            for (len, block) in coded.lengths.iter().zip(original.chunks(block_size())) {
                let frame = &coded.data[at..at + *len as usize];
                at += *len as usize;
                let native = dx.decompress(frame, block_size()).unwrap();
                assert!(native == block, "{}: native zstd reads it wrong", side.name);
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
            kib > 0 && BATCH.is_multiple_of(kib * 1024),
            "ARCA_BENCH_BLOCK_KIB must divide {} KiB",
            BATCH / 1024
        );
        kib * 1024
    })
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
