//! One chunk record (a record in a pack, or a format-1 chunk file): magic,
//! header length, prost header, coded payload.

use prost::Message;
use std::io::{self, Write};
use std::ops::Range;

/// Starts every record: a pack without its index is walked by it.
pub(super) const MAGIC: &[u8; 8] = b"ARCACHK1";

pub(super) fn check_payload_len(header: &ChunkHeader, len: u64) -> Result<(), String> {
    if len == u64::from(header.payload_len) {
        Ok(())
    } else {
        Err(format!(
            "payload is {len} bytes, header says {}",
            header.payload_len
        ))
    }
}

/// Stored beside each payload so that a chunk can be decoded alone.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChunkHeader {
    #[prost(string, tag = "1")]
    pub codec: String,
    #[prost(bytes = "vec", tag = "2")]
    pub codec_hash: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub raw_len: u32,
    #[prost(uint32, tag = "4")]
    pub payload_len: u32,
    // Tags 5 and 6 are kept for encryption at rest (key id, nonce).
}

#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub header: ChunkHeader,
    pub payload: Vec<u8>,
}

impl StoredChunk {
    /// Writes a chunk file: the prefix (magic, header length, header), then
    /// the payload as it is, without first copying both into one buffer.
    pub fn write(w: &mut impl Write, header: &ChunkHeader, payload: &[u8]) -> io::Result<()> {
        w.write_all(&Self::prefix(header))?;
        w.write_all(payload)
    }

    /// What precedes the payload in a record: magic, header length, header.
    pub fn prefix(header: &ChunkHeader) -> Vec<u8> {
        let h = header.encode_to_vec();
        let mut prefix = Vec::with_capacity(MAGIC.len() + 4 + h.len());
        prefix.extend_from_slice(MAGIC);
        prefix.extend_from_slice(&(h.len() as u32).to_le_bytes());
        prefix.extend_from_slice(&h);
        prefix
    }

    /// The header at the start of a chunk file, and the offset of its
    /// payload; `bytes` need not hold the payload. `Ok(None)`: the header
    /// goes on past `bytes`.
    pub fn parse_prefix(bytes: &[u8]) -> Result<Option<(ChunkHeader, usize)>, String> {
        if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not a chunk file (bad magic)".into());
        }
        let hlen = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        let body = &bytes[12..];
        if hlen > body.len() {
            return Ok(None);
        }
        let header =
            ChunkHeader::decode(&body[..hlen]).map_err(|e| format!("chunk header: {e}"))?;
        Ok(Some((header, 12 + hlen)))
    }

    /// The header of a chunk file's bytes, and where its payload is in them.
    pub fn parse_in_place(bytes: &[u8]) -> Result<(ChunkHeader, Range<usize>), String> {
        let (header, start) =
            Self::parse_prefix(bytes)?.ok_or("chunk header is truncated".to_owned())?;
        let payload = start..bytes.len();
        check_payload_len(&header, payload.len() as u64)?;
        Ok((header, payload))
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let (header, payload) = Self::parse_in_place(bytes)?;
        Ok(Self {
            header,
            payload: bytes[payload].to_vec(),
        })
    }
}
