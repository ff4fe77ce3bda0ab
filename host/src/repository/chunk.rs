//! One chunk file: magic, header length, prost header, coded payload.

use prost::Message;

const MAGIC: &[u8; 8] = b"ARCACHK1";

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
    pub fn encode(header: &ChunkHeader, payload: &[u8]) -> Vec<u8> {
        let h = header.encode_to_vec();
        let mut out = Vec::with_capacity(MAGIC.len() + 4 + h.len() + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(payload);
        out
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not a chunk file (bad magic)".into());
        }
        let hlen = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        let body = &bytes[12..];
        if hlen > body.len() {
            return Err("chunk header is truncated".into());
        }
        let header =
            ChunkHeader::decode(&body[..hlen]).map_err(|e| format!("chunk header: {e}"))?;
        let payload = &body[hlen..];
        if payload.len() != header.payload_len as usize {
            return Err(format!(
                "payload is {} bytes, header says {}",
                payload.len(),
                header.payload_len
            ));
        }
        Ok(Self {
            header,
            payload: payload.to_vec(),
        })
    }
}
