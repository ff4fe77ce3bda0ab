//! Manifest files: magic, prost `Manifest`, BLAKE3 trailer over both, so a
//! damaged manifest is detected rather than restored.

use super::{RepositoryError, io_err};
use arca_transport::{MANIFEST_FORMAT_VERSION, Manifest};
use prost::Message;
use std::path::Path;

const MAGIC: &[u8; 8] = b"ARCAMAN1";

pub fn encode(m: &Manifest) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    m.encode(&mut out).expect("Vec grows as needed");
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

pub fn decode(bytes: &[u8], path: &Path) -> Result<Manifest, RepositoryError> {
    let bad = |reason: String| RepositoryError::Manifest {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < MAGIC.len() + 32 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("not a manifest (bad magic or truncated)".into()));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(bad("checksum mismatch: the manifest is damaged".into()));
    }
    let m = Manifest::decode(&body[MAGIC.len()..]).map_err(|e| bad(e.to_string()))?;
    if m.format_version > MANIFEST_FORMAT_VERSION {
        return Err(bad(format!(
            "manifest format {} is newer than this arca ({MANIFEST_FORMAT_VERSION})",
            m.format_version
        )));
    }
    if m.block_size == 0 || m.block_hashes.len() as u64 != m.block_count() * 32 {
        return Err(bad("block list does not match the disk size".into()));
    }
    Ok(m)
}

pub fn read(path: &Path) -> Result<Manifest, RepositoryError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    decode(&bytes, path)
}
