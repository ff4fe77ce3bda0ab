//! Codec stage: compresses blocks before they leave the proxy and decodes
//! them at restore.

use super::bindings::compression::{Compression, CompressionPre, arca::pipeline::types::Batch};
use super::runtime::Instance;
use super::{Plugin, PluginError};

/// One instance of a codec plugin, owned by one worker.
pub struct Codec {
    inst: Instance<Compression>,
    /// Whether what it codes is decoded again before it is stored
    /// (`lost_blocks`): a codec other than the built-in one.
    checked: bool,
}

/// Whether a block coded to `coded` bytes from `raw` is stored coded. An
/// empty coded block is a codec's way to say "store it as it is" (it judged
/// the block incompressible without coding it), and a coded block no
/// shorter than the block gains nothing.
pub fn stores_coded(coded: usize, raw: usize) -> bool {
    coded > 0 && coded < raw
}

/// A coded or decoded batch: `data` with per-block `lengths`.
pub struct Blocks {
    pub data: Vec<u8>,
    pub lengths: Vec<u32>,
}

impl From<Batch> for Blocks {
    fn from(b: Batch) -> Self {
        Self {
            data: b.data,
            lengths: b.lengths,
        }
    }
}

impl From<Blocks> for Batch {
    fn from(b: Blocks) -> Self {
        Self {
            data: b.data,
            lengths: b.lengths,
        }
    }
}

impl Codec {
    pub fn new(plugin: &Plugin, settings: &Vec<(String, String)>) -> Result<Self, PluginError> {
        let pre = CompressionPre::new(plugin.pre.clone()).map_err(|e| PluginError::WrongWorld {
            plugin: plugin.name.clone(),
            expected: super::StageKind::Codec,
            message: format!("{e:#}"),
        })?;
        let mut inst = Instance::new(plugin, |store| pre.instantiate(store))?;
        inst.call("configure", |b, s| {
            b.arca_pipeline_codec().call_configure(s, settings)
        })?;
        Ok(Self {
            inst,
            checked: !super::builtin::is_bounded(&plugin.hash),
        })
    }

    pub fn plugin(&self) -> &Plugin {
        &self.inst.plugin
    }

    /// Compresses each block on its own; returns the coded batch and hands
    /// the input back so its buffer can be reused.
    pub fn compress(&mut self, input: Blocks) -> Result<(Blocks, Blocks), PluginError> {
        let batch = Batch::from(input);
        let out = self.inst.call("compress", |b, s| {
            b.arca_pipeline_codec().call_compress(s, &batch)
        })?;
        self.check_shape("compress", &out, batch.lengths.len(), None)?;
        Ok((out.into(), batch.into()))
    }

    /// Decodes each block and checks that it has exactly its raw length;
    /// hands the input back so its buffer can be reused.
    pub fn decompress(
        &mut self,
        input: Blocks,
        raw_lengths: &[u32],
    ) -> Result<(Blocks, Blocks), PluginError> {
        let batch = Batch::from(input);
        let out = self.inst.call("decompress", |b, s| {
            b.arca_pipeline_codec()
                .call_decompress(s, &batch, raw_lengths)
        })?;
        self.check_shape("decompress", &out, raw_lengths.len(), Some(raw_lengths))?;
        Ok((out.into(), batch.into()))
    }

    /// Per block of a batch this codec compressed (`coded` from `raw`):
    /// whether storing its coded form would lose it, because it is shorter
    /// than the block (so it would be stored) and decodes to other bytes.
    /// The built-in codec is trusted; any other is decoded, in this
    /// instance, which costs its decoding time. A `decompress` error, or
    /// decoded blocks of the wrong sizes, is the task's error, as in any call.
    pub fn lost_blocks(&mut self, coded: &Blocks, raw: &Blocks) -> Result<Vec<bool>, PluginError> {
        let n = raw.lengths.len();
        let mut lost = vec![false; n];
        if !self.checked {
            return Ok(lost);
        }
        // The blocks that would be stored coded, with where each one's raw
        // bytes lie.
        let mut picked: Vec<(usize, usize)> = Vec::new();
        let mut input = Blocks {
            data: Vec::new(),
            lengths: Vec::new(),
        };
        let mut raw_lengths = Vec::new();
        let (mut coded_at, mut raw_at) = (0usize, 0usize);
        for i in 0..n {
            let (c, r) = (coded.lengths[i] as usize, raw.lengths[i] as usize);
            if stores_coded(c, r) {
                picked.push((i, raw_at));
                input
                    .data
                    .extend_from_slice(&coded.data[coded_at..coded_at + c]);
                input.lengths.push(c as u32);
                raw_lengths.push(r as u32);
            }
            coded_at += c;
            raw_at += r;
        }
        if picked.is_empty() {
            return Ok(lost);
        }
        let (decoded, _) = self.decompress(input, &raw_lengths)?;
        let mut at = 0usize;
        for (&(i, raw_at), &len) in picked.iter().zip(&raw_lengths) {
            let len = len as usize;
            lost[i] = decoded.data[at..at + len] != raw.data[raw_at..raw_at + len];
            at += len;
        }
        Ok(lost)
    }

    fn check_shape(
        &self,
        call: &'static str,
        out: &Batch,
        count: usize,
        exact: Option<&[u32]>,
    ) -> Result<(), PluginError> {
        let bad = |message: String| PluginError::BadOutput {
            plugin: self.inst.plugin.name.clone(),
            call,
            message,
        };
        if out.lengths.len() != count {
            return Err(bad(format!(
                "{} blocks in, {} out",
                count,
                out.lengths.len()
            )));
        }
        let sum: u64 = out.lengths.iter().map(|l| u64::from(*l)).sum();
        if sum != out.data.len() as u64 {
            return Err(bad(format!(
                "lengths add up to {sum} bytes but {} bytes came back",
                out.data.len()
            )));
        }
        if let Some(expected) = exact
            && expected != out.lengths.as_slice()
        {
            return Err(bad(
                "decoded block sizes differ from the recorded sizes".into()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{PluginLimits, PluginRuntime, StageKind, builtin};

    /// Random-looking bytes, the same on every run.
    fn noise(len: usize, seed: u8) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut out);
        out
    }

    fn zstd(runtime: &PluginRuntime, bytes: Vec<u8>) -> Codec {
        let plugin = runtime
            .load("zstd", StageKind::Codec, bytes, PluginLimits::default())
            .unwrap();
        Codec::new(&plugin, &Vec::new()).unwrap()
    }

    #[test]
    fn random_blocks_are_left_to_be_stored_as_they_are() {
        let text: Vec<u8> = b"arca keeps restore points of virtual disks. "
            .iter()
            .copied()
            .cycle()
            .take(256 << 10)
            .collect();
        let blocks = [noise(256 << 10, 1), text.clone(), noise(2048, 2)];
        let raw = || Blocks {
            data: blocks.concat(),
            lengths: blocks.iter().map(|b| b.len() as u32).collect(),
        };
        let runtime = PluginRuntime::new(None).unwrap();
        let builtin = builtin::find("zstd").unwrap().bytes.to_vec();
        let mut codec = zstd(&runtime, builtin.clone());
        let (coded, _) = codec.compress(raw()).unwrap();
        // The random block is judged without coding it; the text is
        // coded; the small random block is coded (too small to judge)
        // but gains nothing, so it is stored as it is too.
        let stored: Vec<bool> = (0..3)
            .map(|i| stores_coded(coded.lengths[i] as usize, blocks[i].len()))
            .collect();
        assert_eq!(coded.lengths[0], 0, "{:?}", coded.lengths);
        assert!(coded.lengths[2] > 0, "{:?}", coded.lengths);
        assert_eq!(stored, [false, true, false], "{:?}", coded.lengths);

        // A codec other than the built-in one (the same with a custom
        // section appended) is checked by decoding what it would store:
        // the empty block is not among it, so nothing is lost and the
        // text comes back.
        let mut other = builtin;
        other.extend_from_slice(&[0, 5, 4, b'a', b'r', b'c', b'a']);
        let mut checked = zstd(&runtime, other);
        let raw = raw();
        let (coded, raw) = checked.compress(raw).unwrap();
        assert_eq!(coded.lengths[0], 0);
        assert_eq!(checked.lost_blocks(&coded, &raw).unwrap(), [false; 3]);
        let text_coded = Blocks {
            data: coded.data[..coded.lengths[1] as usize].to_vec(),
            lengths: vec![coded.lengths[1]],
        };
        let (decoded, _) = checked
            .decompress(text_coded, &[text.len() as u32])
            .unwrap();
        assert_eq!(decoded.data, text);
    }
}
