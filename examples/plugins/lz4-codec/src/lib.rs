//! An LZ4 codec for arca, written against the published WIT contract only.
//! Each block of a batch is compressed as an independent LZ4 block, so any
//! chunk can be decompressed alone.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "arca:pipeline/compression",
});

use exports::arca::pipeline::codec::{Batch, Guest, Settings};
use lz4_flex::block;

/// Splits a batch into its blocks, after checking that the lengths cut the
/// data exactly.
fn blocks(batch: &Batch) -> Result<Vec<&[u8]>, String> {
    let mut rest = batch.data.as_slice();
    let mut out = Vec::with_capacity(batch.lengths.len());
    for &len in &batch.lengths {
        if len as usize > rest.len() {
            return Err("lz4 codec: batch lengths exceed its data".into());
        }
        let (block, tail) = rest.split_at(len as usize);
        out.push(block);
        rest = tail;
    }
    if rest.is_empty() {
        Ok(out)
    } else {
        Err("lz4 codec: batch lengths do not cover all of its data".into())
    }
}

fn compress(batch: &Batch) -> Result<Batch, String> {
    let mut data = Vec::with_capacity(batch.data.len() / 2);
    let mut lengths = Vec::with_capacity(batch.lengths.len());
    for (i, raw) in blocks(batch)?.into_iter().enumerate() {
        let start = data.len();
        data.resize(start + block::get_maximum_output_size(raw.len()), 0);
        let n = block::compress_into(raw, &mut data[start..])
            .map_err(|e| format!("lz4 codec: compressing block {i}: {e}"))?;
        data.truncate(start + n);
        lengths.push(n as u32);
    }
    Ok(Batch { data, lengths })
}

fn decompress(batch: &Batch, raw_lengths: &[u32]) -> Result<Batch, String> {
    let blocks = blocks(batch)?;
    if blocks.len() != raw_lengths.len() {
        return Err(format!(
            "lz4 codec: {} blocks to decompress but {} raw lengths",
            blocks.len(),
            raw_lengths.len()
        ));
    }
    let total: usize = raw_lengths.iter().map(|&l| l as usize).sum();
    let mut data = vec![0; total];
    let mut at = 0;
    for (i, (packed, &raw)) in blocks.into_iter().zip(raw_lengths).enumerate() {
        let out = &mut data[at..at + raw as usize];
        // An output slice of exactly `raw` bytes makes a block that would
        // expand further fail instead of spilling into the next one.
        let n = block::decompress_into(packed, out).map_err(|e| {
            format!("lz4 codec: block {i} does not decompress to its raw length {raw}: {e}")
        })?;
        if n != raw as usize {
            return Err(format!(
                "lz4 codec: block {i} decompressed to {n} bytes, expected {raw}"
            ));
        }
        at += n;
    }
    Ok(Batch {
        data,
        lengths: raw_lengths.to_vec(),
    })
}

struct Lz4;

impl Guest for Lz4 {
    fn configure(settings: Settings) -> Result<(), String> {
        match settings.first() {
            None => Ok(()),
            Some((key, _)) => Err(format!(
                "lz4 codec: unknown setting `{key}` (it takes no settings)"
            )),
        }
    }

    fn compress(blocks: Batch) -> Result<Batch, String> {
        compress(&blocks)
    }

    fn decompress(blocks: Batch, raw_lengths: Vec<u32>) -> Result<Batch, String> {
        decompress(&blocks, &raw_lengths)
    }
}

export!(Lz4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_length_check() {
        let raw = [vec![0u8; 4096], b"lz4".repeat(999), Vec::new()];
        let batch = Batch {
            data: raw.concat(),
            lengths: raw.iter().map(|b| b.len() as u32).collect(),
        };
        let packed = compress(&batch).unwrap();
        assert_eq!(
            packed.lengths.iter().map(|&l| l as usize).sum::<usize>(),
            packed.data.len()
        );
        let back = decompress(&packed, &batch.lengths).unwrap();
        assert_eq!(back.data, batch.data);
        assert_eq!(back.lengths, batch.lengths);

        let mut wrong = batch.lengths.clone();
        wrong[1] -= 1;
        assert!(decompress(&packed, &wrong).unwrap_err().contains("block 1"));
        wrong[1] += 2;
        assert!(decompress(&packed, &wrong).unwrap_err().contains("block 1"));
    }
}
