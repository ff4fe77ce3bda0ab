use super::*;

fn codec(level: i32) -> Codec {
    Codec {
        level,
        compressor: None,
        decompressor: None,
    }
}

fn batch(blocks: &[Vec<u8>]) -> Batch {
    Batch {
        data: blocks.concat(),
        lengths: blocks.iter().map(|b| b.len() as u32).collect(),
    }
}

fn settings(pairs: &[(&str, &str)]) -> Settings {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sample() -> Vec<Vec<u8>> {
    vec![
        vec![0u8; 65536],
        (0..70000u32).map(|i| (i * 7 % 251) as u8).collect(),
        Vec::new(),
        b"arca".repeat(1000),
    ]
}

#[test]
fn round_trip_keeps_blocks_independent() {
    let blocks = sample();
    let mut c = codec(3);
    let packed = c.compress(&batch(&blocks)).unwrap();
    assert_eq!(packed.lengths.len(), blocks.len());
    assert_eq!(
        packed.lengths.iter().map(|&l| l as usize).sum::<usize>(),
        packed.data.len()
    );
    assert!(
        packed.lengths[0] < 100,
        "a zero block should shrink to a few bytes"
    );

    // Each compressed block is a frame of its own.
    let second = &packed.data[packed.lengths[0] as usize..][..packed.lengths[1] as usize];
    assert_eq!(zstd::bulk::decompress(second, 70000).unwrap(), blocks[1]);

    let raw: Vec<u32> = blocks.iter().map(|b| b.len() as u32).collect();
    let unpacked = c.decompress(&packed, &raw).unwrap();
    assert_eq!(unpacked.lengths, raw);
    assert_eq!(unpacked.data, blocks.concat());
}

#[test]
fn decompress_rejects_a_wrong_raw_length() {
    let blocks = sample();
    let mut c = codec(1);
    let packed = c.compress(&batch(&blocks)).unwrap();
    let mut raw: Vec<u32> = blocks.iter().map(|b| b.len() as u32).collect();
    raw[3] += 1;
    let err = c.decompress(&packed, &raw).unwrap_err();
    assert!(err.contains("block 3"), "{err}");
    raw[3] -= 2;
    let err = c.decompress(&packed, &raw).unwrap_err();
    assert!(err.contains("block 3"), "{err}");
}

#[test]
fn decompress_rejects_garbage_and_bad_shapes() {
    let mut c = codec(3);
    let garbage = Batch {
        data: vec![1, 2, 3, 4],
        lengths: vec![4],
    };
    assert!(
        c.decompress(&garbage, &[10])
            .unwrap_err()
            .contains("block 0")
    );
    assert!(
        c.decompress(&garbage, &[10, 10])
            .unwrap_err()
            .contains("raw lengths")
    );
    let bad = Batch {
        data: vec![0; 4],
        lengths: vec![5],
    };
    assert!(c.compress(&bad).unwrap_err().contains("add up"));
}

#[test]
fn settings_are_validated() {
    assert_eq!(parse_settings(&settings(&[])).unwrap(), 1);
    assert_eq!(parse_settings(&settings(&[("level", "19")])).unwrap(), 19);
    assert_eq!(parse_settings(&settings(&[("level", "-5")])).unwrap(), -5);
    for bad in ["23", "fast", "", "3.5"] {
        let err = parse_settings(&settings(&[("level", bad)])).unwrap_err();
        assert!(err.starts_with("zstd codec: setting `level`"), "{err}");
    }
    let err = parse_settings(&settings(&[("levle", "3")])).unwrap_err();
    assert!(err.contains("unknown setting `levle`"), "{err}");
}

#[test]
fn random_blocks_come_back_empty_for_the_host_to_store() {
    let random = noise(256 << 10, 11);
    let blocks = vec![random, b"arca".repeat(1000)];
    let packed = codec(1).compress(&batch(&blocks)).unwrap();
    assert_eq!(packed.lengths[0], 0);
    assert_eq!(packed.lengths[1] as usize, packed.data.len());
    assert_eq!(
        zstd::bulk::decompress(&packed.data, 4000).unwrap(),
        blocks[1]
    );
}

/// Deterministic bytes that look random (xorshift64*), for the judgement
/// of `entropy`.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            (seed.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

#[test]
fn random_blocks_of_every_size_look_random() {
    for len in [entropy::MIN_BLOCK, 64 << 10, 256 << 10, 1 << 20, 100_003] {
        assert!(
            entropy::looks_random(&noise(len, len as u64)),
            "{len} bytes"
        );
    }
}

#[test]
fn random_blocks_with_a_frequent_byte_pass_the_first_look() {
    // A zero every 33 bytes (3%): 7.93 bits per byte over the whole
    // sample, 7.89 in the first look at a quarter of it. The first look
    // must not turn away what the whole sample keeps.
    for len in [16 << 10, 256 << 10, 1 << 20] {
        let mut dotted = noise(len, 11);
        for b in dotted.iter_mut().step_by(33) {
            *b = 0;
        }
        assert!(entropy::looks_random(&dotted), "{len} bytes");
    }
    // A zero every 28 bytes: 7.91 over the whole sample, just above the
    // threshold, 7.87 in the first look.
    let mut dotted = noise(256 << 10, 12);
    for b in dotted.iter_mut().step_by(28) {
        *b = 0;
    }
    assert!(entropy::looks_random(&dotted));
}

#[test]
fn random_pages_with_zeroed_headers_pass_the_first_look() {
    // Five zero bytes at the start of every 4 KiB page (compressed data in
    // pages with a small header): 2% of the whole sample, which stays
    // above the threshold. A first look at page starts only would have
    // counted 8% zeros there and turned the block away.
    let mut pages = noise(256 << 10, 13);
    for page in pages.chunks_mut(4096) {
        page[..5].fill(0);
    }
    assert!(entropy::looks_random(&pages));
}

#[test]
fn blocks_with_structure_do_not() {
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog; "
        .iter()
        .copied()
        .cycle()
        .take(256 << 10)
        .collect();
    assert!(!entropy::looks_random(&text));
    assert!(!entropy::looks_random(&vec![0u8; 256 << 10]));
    // Half random, half text: zstd halves the text, so it must run.
    let mut half = noise(128 << 10, 7);
    half.extend_from_slice(&text[..128 << 10]);
    assert!(!entropy::looks_random(&half));
    // Random with a zero in every 16 bytes (6%): Huffman coding alone
    // saves more than zstd's minimum gain on it.
    let mut dotted = noise(256 << 10, 9);
    for b in dotted.iter_mut().step_by(16) {
        *b = 0;
    }
    assert!(!entropy::looks_random(&dotted));
    // Evenly spread bytes that repeat: a pattern of 251 bytes, a
    // random 64 KiB written four times, one 4 KiB page copied once.
    let pattern: Vec<u8> = (0..256u32 << 10).map(|i| (i * 7 % 251) as u8).collect();
    assert!(!entropy::looks_random(&pattern));
    assert!(!entropy::looks_random(&noise(64 << 10, 5).repeat(4)));
    let mut copied = noise(256 << 10, 6);
    copied.copy_within(40 << 12..41 << 12, 3 << 12);
    assert!(!entropy::looks_random(&copied));
    // Too small to judge, however random.
    assert!(!entropy::looks_random(&noise(entropy::MIN_BLOCK - 1, 3)));
}
