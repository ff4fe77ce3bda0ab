//! Reads chunks back: fetch, decode with the codec component the repository
//! kept, and check the plaintext against its address. Shared by restore and
//! verify, so that both trust exactly the same checks.

use crate::plugin::codec::{Blocks, Codec};
use crate::plugin::{Plugin, PluginLimits, PluginRuntime, StageKind};
use crate::repository::{Repository, hex};
use arca_transport::ChunkHash;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type CodecKey = (String, Vec<u8>);

/// Why a chunk could not be returned; names the chunk.
#[derive(Debug, thiserror::Error)]
#[error("chunk {hash}: {reason}")]
pub struct ChunkError {
    pub hash: String,
    pub reason: String,
}

/// Codec plugins loaded from the repository, shared by all decoders of one
/// operation so each component is compiled once.
#[derive(Clone)]
pub struct CodecBank {
    repo: Repository,
    runtime: PluginRuntime,
    loaded: Arc<Mutex<HashMap<Vec<u8>, Plugin>>>,
}

impl CodecBank {
    pub fn new(repo: Repository, runtime: PluginRuntime) -> Self {
        Self {
            repo,
            runtime,
            loaded: Arc::default(),
        }
    }

    fn plugin(&self, name: &str, hash: &[u8]) -> Result<Plugin, String> {
        let mut loaded = self.loaded.lock().expect("codec bank lock");
        if let Some(p) = loaded.get(hash) {
            return Ok(p.clone());
        }
        let bytes = self.repo.codec_component(hash).map_err(|e| e.to_string())?;
        let plugin = self
            .runtime
            .load(name, StageKind::Codec, bytes, PluginLimits::default())
            .map_err(|e| e.to_string())?;
        loaded.insert(hash.to_vec(), plugin.clone());
        Ok(plugin)
    }
}

/// One thread's decoder: its own codec instances.
pub struct Decoder {
    bank: CodecBank,
    codecs: HashMap<Vec<u8>, Codec>,
}

impl Decoder {
    pub fn new(bank: CodecBank) -> Self {
        Self {
            bank,
            codecs: HashMap::new(),
        }
    }

    /// Plaintexts of `wanted` chunks, each checked against its address and
    /// its expected length. Chunks that share a codec are decoded in one call.
    pub fn fetch(&mut self, wanted: &[(ChunkHash, u32)]) -> Result<Vec<Vec<u8>>, ChunkError> {
        let mut out: Vec<Option<Vec<u8>>> = vec![None; wanted.len()];
        // (codec name, codec hash) -> (position in `wanted`, payload, raw length)
        let mut by_codec: HashMap<CodecKey, Vec<(usize, Vec<u8>, u32)>> = HashMap::new();
        for (i, (hash, expected)) in wanted.iter().enumerate() {
            let err = |reason: String| ChunkError {
                hash: hex(hash),
                reason,
            };
            let chunk = self
                .bank
                .repo
                .read_chunk(hash)
                .map_err(|e| err(strip_prefix(&e.to_string())))?;
            if chunk.header.raw_len != *expected {
                return Err(err(format!(
                    "holds {} bytes, the restore point expects {expected}",
                    chunk.header.raw_len
                )));
            }
            if chunk.header.codec == "none" {
                out[i] = Some(chunk.payload);
            } else {
                by_codec
                    .entry((chunk.header.codec, chunk.header.codec_hash))
                    .or_default()
                    .push((i, chunk.payload, chunk.header.raw_len));
            }
        }
        for ((name, codec_hash), items) in by_codec {
            let codec = match self.codecs.entry(codec_hash.clone()) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let plugin =
                        self.bank
                            .plugin(&name, &codec_hash)
                            .map_err(|reason| ChunkError {
                                hash: hex(&wanted[items[0].0].0),
                                reason,
                            })?;
                    v.insert(Codec::new(&plugin, &Vec::new()).map_err(|e| ChunkError {
                        hash: hex(&wanted[items[0].0].0),
                        reason: e.to_string(),
                    })?)
                }
            };
            let mut input = Blocks {
                data: Vec::new(),
                lengths: Vec::new(),
            };
            let mut raw_lengths = Vec::new();
            for (_, payload, raw) in &items {
                input.data.extend_from_slice(payload);
                input.lengths.push(payload.len() as u32);
                raw_lengths.push(*raw);
            }
            let decoded = match codec.decompress(input, &raw_lengths) {
                Ok(d) => d,
                Err(e) if items.len() == 1 => {
                    return Err(ChunkError {
                        hash: hex(&wanted[items[0].0].0),
                        reason: format!("cannot be decoded: {e}"),
                    });
                }
                Err(_) => {
                    // One bad chunk fails the whole call: retry one by one,
                    // on a fresh instance, so the error names the damaged one.
                    self.codecs.remove(&codec_hash);
                    for (i, _, _) in &items {
                        out[*i] = Some(self.fetch(std::slice::from_ref(&wanted[*i]))?.remove(0));
                    }
                    continue;
                }
            };
            let mut at = 0usize;
            for ((i, _, _), len) in items.iter().zip(&decoded.lengths) {
                out[*i] = Some(decoded.data[at..at + *len as usize].to_vec());
                at += *len as usize;
            }
        }
        let mut plain = Vec::with_capacity(wanted.len());
        for (i, bytes) in out.into_iter().enumerate() {
            let bytes = bytes.expect("every wanted chunk was fetched");
            if blake3::hash(&bytes).as_bytes() != &wanted[i].0 {
                return Err(ChunkError {
                    hash: hex(&wanted[i].0),
                    reason: "content does not match its address (damaged)".into(),
                });
            }
            plain.push(bytes);
        }
        Ok(plain)
    }
}

fn strip_prefix(s: &str) -> String {
    // RepositoryError::Chunk already says "chunk <hash>: "; keep the reason.
    match s.split_once(": ") {
        Some((head, rest)) if head.starts_with("chunk ") => rest.to_owned(),
        _ => s.to_owned(),
    }
}
