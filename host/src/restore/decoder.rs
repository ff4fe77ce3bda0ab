//! Reads chunks back: fetch, decode with the codec component the repository
//! kept, and check the plaintext against its address. Shared by restore and
//! verify, so that both trust exactly the same checks.

use crate::config::MAX_BLOCK_SIZE;
use crate::plugin::codec::{Blocks, Codec};
use crate::plugin::{Plugin, PluginError, PluginLimits, PluginRuntime, StageKind};
use crate::repository::chunk::ChunkHeader;
use crate::repository::spans::SpanBuffer;
use crate::repository::{Repository, RepositoryError, hex};
use arca_transport::ChunkHash;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Why a chunk could not be returned; names the chunk.
#[derive(Debug, thiserror::Error)]
#[error("chunk {hash}: {reason}")]
pub struct ChunkError {
    pub hash: String,
    pub reason: String,
    /// The stored chunk is absent or its bytes are wrong. False when they
    /// could not be judged: the read failed (permissions, I/O), or the
    /// codec that coded them cannot be loaded.
    pub damaged: bool,
}

/// Why a record found without an index has no address.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Its codec cannot be loaded or ran out of time or memory: the record
    /// may be whole.
    #[error("its codec cannot judge it: {0}")]
    NoCodec(String),
    /// It does not decode (damage, or not a record at all).
    #[error("{0}")]
    Damaged(String),
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

/// One thread's decoder: its own codec instances, and buffers it reuses
/// from batch to batch.
pub struct Decoder {
    bank: CodecBank,
    codecs: HashMap<Vec<u8>, Codec>,
    /// Payloads stored without a codec.
    stored: Vec<u8>,
    /// Codec inputs handed back by the codecs.
    spare: Vec<Vec<u8>>,
    /// Where a batch's spans of packs are read.
    span: SpanBuffer,
}

/// Checked plaintexts of a batch of chunks, in the order they were asked
/// for. Give it back with `Decoder::recycle` so its memory is reused.
pub struct Plain {
    /// The stored payloads first, then one decoded buffer per codec call.
    buffers: Vec<Vec<u8>>,
    at: Vec<(usize, Range<usize>)>,
}

impl Plain {
    pub fn block(&self, i: usize) -> &[u8] {
        let (b, r) = &self.at[i];
        &self.buffers[*b][r.clone()]
    }
}

/// The chunks of a batch that one codec decodes, gathered for one call.
struct Group {
    name: String,
    codec_hash: Vec<u8>,
    input: Blocks,
    raw_lengths: Vec<u32>,
    members: Vec<usize>,
}

impl Group {
    /// The index of the group for `h`'s codec, added (with a spare input
    /// buffer) if the batch has none yet.
    fn find_or_add(groups: &mut Vec<Group>, spare: &mut Vec<Vec<u8>>, h: &ChunkHeader) -> usize {
        if let Some(g) = groups
            .iter()
            .position(|g| g.name == h.codec && g.codec_hash == h.codec_hash)
        {
            return g;
        }
        let mut data = spare.pop().unwrap_or_default();
        data.clear();
        groups.push(Group {
            name: h.codec.clone(),
            codec_hash: h.codec_hash.clone(),
            input: Blocks {
                data,
                lengths: Vec::new(),
            },
            raw_lengths: Vec::new(),
            members: Vec::new(),
        });
        groups.len() - 1
    }
}

impl Decoder {
    pub fn new(bank: CodecBank) -> Self {
        Self {
            bank,
            codecs: HashMap::new(),
            stored: Vec::new(),
            spare: Vec::new(),
            span: SpanBuffer::default(),
        }
    }

    /// Takes back the buffers of a batch that is written.
    pub fn recycle(&mut self, plain: Plain) {
        let mut buffers = plain.buffers.into_iter();
        if let Some(stored) = buffers.next() {
            self.stored = stored;
        }
    }

    /// Plaintexts of `wanted` chunks, each checked against its address and
    /// its expected length. Chunks that share a codec are decoded in one call.
    /// The records are read in spans, a request per run of them lying close
    /// together (`Repository::read_payloads`), and their payloads copied out
    /// of the span: for verify's single chunks too, one request where a
    /// header and then a payload took two (verify of the peers repository,
    /// cached: the same 1.5 s).
    pub fn fetch(&mut self, wanted: &[(ChunkHash, u32)]) -> Result<Plain, ChunkError> {
        let mut stored = std::mem::take(&mut self.stored);
        stored.clear();
        let mut at: Vec<(usize, Range<usize>)> = vec![(0, 0..0); wanted.len()];
        let mut groups: Vec<Group> = Vec::new();
        // A chunk of another length than the point expects, with its length.
        let mut misfit: Option<(usize, u32)> = None;
        let hashes: Vec<ChunkHash> = wanted.iter().map(|(h, _)| *h).collect();
        let spare = &mut self.spare;
        self.bank
            .repo
            .read_payloads(&hashes, &mut self.span, |i, h, payload| {
                if h.raw_len != wanted[i].1 {
                    misfit.get_or_insert((i, h.raw_len));
                } else if h.codec == "none" {
                    at[i] = (0, stored.len()..stored.len() + payload.len());
                    stored.extend_from_slice(payload);
                } else {
                    let g = Group::find_or_add(&mut groups, spare, h);
                    let g = &mut groups[g];
                    g.input.data.extend_from_slice(payload);
                    g.input.lengths.push(payload.len() as u32);
                    g.raw_lengths.push(h.raw_len);
                    g.members.push(i);
                }
            })
            .map_err(|(i, e)| ChunkError {
                hash: hex(&hashes[i]),
                damaged: !matches!(e, RepositoryError::ChunkUnreadable { .. }),
                reason: strip_prefix(&e.to_string()),
            })?;
        if let Some((i, len)) = misfit {
            return Err(ChunkError {
                hash: hex(&wanted[i].0),
                reason: format!(
                    "holds {len} bytes, the restore point expects {}",
                    wanted[i].1
                ),
                damaged: true,
            });
        }
        let mut buffers = vec![stored];
        for g in groups {
            self.decode_group(wanted, g, &mut buffers, &mut at)?;
        }
        let plain = Plain { buffers, at };
        for (i, (hash, _)) in wanted.iter().enumerate() {
            if blake3::hash(plain.block(i)).as_bytes() != hash {
                return Err(ChunkError {
                    hash: hex(hash),
                    reason: "content does not match its address (damaged)".into(),
                    damaged: true,
                });
            }
        }
        Ok(plain)
    }

    fn decode_group(
        &mut self,
        wanted: &[(ChunkHash, u32)],
        g: Group,
        buffers: &mut Vec<Vec<u8>>,
        at: &mut [(usize, Range<usize>)],
    ) -> Result<(), ChunkError> {
        let first = hex(&wanted[g.members[0]].0);
        let codec = self
            .codec(&g.name, &g.codec_hash)
            .map_err(|reason| ChunkError {
                hash: first.clone(),
                reason,
                damaged: false,
            })?;
        match codec.decompress(g.input, &g.raw_lengths) {
            Ok((decoded, input)) => {
                self.spare.push(input.data);
                let mut from = 0usize;
                for (&i, &len) in g.members.iter().zip(&decoded.lengths) {
                    at[i] = (buffers.len(), from..from + len as usize);
                    from += len as usize;
                }
                buffers.push(decoded.data);
                Ok(())
            }
            Err(e) if g.members.len() == 1 => {
                // A trap leaves the instance unusable, and every later chunk
                // would fail with it: a fresh instance for the next call.
                self.codecs.remove(&g.codec_hash);
                Err(ChunkError {
                    hash: first,
                    reason: format!("cannot be decoded: {e}"),
                    damaged: says_damaged(&e),
                })
            }
            Err(_) => {
                // One bad chunk fails the whole call: retry one by one,
                // on a fresh instance, so the error names the damaged one.
                self.codecs.remove(&g.codec_hash);
                for &i in &g.members {
                    let one = self.fetch(std::slice::from_ref(&wanted[i]))?;
                    at[i] = (buffers.len(), 0..one.block(0).len());
                    buffers.push(one.block(0).to_vec());
                }
                Ok(())
            }
        }
    }
}

impl Decoder {
    /// This decoder's instance of a codec the repository keeps.
    fn codec(&mut self, name: &str, hash: &[u8]) -> Result<&mut Codec, String> {
        match self.codecs.entry(hash.to_vec()) {
            std::collections::hash_map::Entry::Occupied(o) => Ok(o.into_mut()),
            std::collections::hash_map::Entry::Vacant(v) => {
                let plugin = self.bank.plugin(name, hash)?;
                Ok(v.insert(Codec::new(&plugin, &Vec::new()).map_err(|e| e.to_string())?))
            }
        }
    }

    /// The address of a record found without an index (a pack walked by
    /// repair): its payload decoded, checked to be as long as its header
    /// says, and hashed.
    pub fn record_address(
        &mut self,
        header: &ChunkHeader,
        payload: &[u8],
    ) -> Result<ChunkHash, RecordError> {
        // A damaged length would have the codec make room for it (and hit
        // its memory limit, which judges nothing) or hash a whole pack.
        if header.raw_len > MAX_BLOCK_SIZE || header.payload_len > MAX_BLOCK_SIZE {
            return Err(RecordError::Damaged(format!(
                "its header claims {} bytes, more than any block",
                header.raw_len.max(header.payload_len)
            )));
        }
        if header.codec == "none" {
            if payload.len() != header.raw_len as usize {
                return Err(RecordError::Damaged(format!(
                    "holds {} bytes, its header says {}",
                    payload.len(),
                    header.raw_len
                )));
            }
            return Ok(*blake3::hash(payload).as_bytes());
        }
        let input = Blocks {
            data: payload.to_vec(),
            lengths: vec![payload.len() as u32],
        };
        // `decompress` also holds the codec to the header's raw length.
        let decoded = self
            .codec(&header.codec, &header.codec_hash)
            .map_err(RecordError::NoCodec)?
            .decompress(input, &[header.raw_len]);
        let plain = match decoded {
            Ok((out, _)) => out.data,
            Err(e) => {
                // A trap may leave the instance unusable: a fresh one next.
                self.codecs.remove(&header.codec_hash);
                let why = format!("cannot be decoded: {e}");
                return Err(if says_damaged(&e) {
                    RecordError::Damaged(why)
                } else {
                    RecordError::NoCodec(why)
                });
            }
        };
        Ok(*blake3::hash(&plain).as_bytes())
    }
}

/// Whether a codec's failure to decode says the bytes are wrong: it refused
/// them, trapped on them, or decoded them to the wrong lengths (a codec is
/// a fixed component, so that is what it will always do with them). Not a
/// deadline or memory limit hit, which a less busy run may not hit.
fn says_damaged(e: &PluginError) -> bool {
    matches!(
        e,
        PluginError::Failed { .. } | PluginError::Trapped { .. } | PluginError::BadOutput { .. }
    )
}

fn strip_prefix(s: &str) -> String {
    // RepositoryError::Chunk already says "chunk <hash>: "; keep the reason.
    match s.split_once(": ") {
        Some((head, rest)) if head.starts_with("chunk ") => rest.to_owned(),
        _ => s.to_owned(),
    }
}
