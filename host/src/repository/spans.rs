//! Reading many chunks at once, as a restore does: the records a batch
//! needs are sorted by pack and offset, and records that lie close together
//! are read in one request, with whatever lies between them.
//!
//! One record at a time took two `pread`s each (header, then payload). A
//! restore of the peers benchmark disk, its packs not cached, spent 0.7 to
//! 2.0 s of system time in them; read in spans it spends 0.55 to 0.66 s and
//! ends 8% sooner (docs/BENCHMARKS.md, "Restore reads"). The spans go
//! through the page cache: read past it (`O_DIRECT`), each worker waited
//! for every read, the kernel's readahead no longer ran ahead of it, and
//! the restore took 17% longer than before, 28% longer than with spans.

use super::index::Location;
use super::{Repository, RepositoryError, chunk, hex, pack_read_err};
use arca_transport::ChunkHash;
use std::os::unix::fs::FileExt;

/// Records of one pack at most this far apart are read in one request,
/// with the bytes between them (other chunks, mostly of the same batch).
const GAP: u64 = 64 << 10;
/// A request is not made longer than this by joining records (a record
/// longer than it, up to a whole 64 MiB block, is read alone).
const MAX_SPAN: u64 = 8 << 20;

/// A buffer reused from batch to batch for the spans read; it keeps the
/// size of the longest span its worker read.
#[derive(Default)]
pub struct SpanBuffer(Vec<u8>);

/// One request: records `first..last` of the sorted list, all in one pack,
/// covering `start..end` of it.
struct Span {
    records: std::ops::Range<usize>,
    start: u64,
    end: u64,
}

impl Repository {
    /// Reads the chunks `hashes` names and hands each one's header and
    /// payload to `each(i, header, payload)`, in the order they lie in the
    /// repository (not the order of `hashes`). The payload is checked
    /// against its header's length; nothing else is (the caller decodes and
    /// checks the address). Stops at the first chunk that cannot be read,
    /// with its position in `hashes`.
    pub fn read_payloads(
        &self,
        hashes: &[ChunkHash],
        buf: &mut SpanBuffer,
        mut each: impl FnMut(usize, &chunk::ChunkHeader, &[u8]),
    ) -> Result<(), (usize, RepositoryError)> {
        // One chunk read by itself, header then payload.
        let alone = |i: usize, each: &mut dyn FnMut(usize, &chunk::ChunkHeader, &[u8])| {
            let mut payload = Vec::new();
            let (header, range) = self
                .read_payload_into(&hashes[i], |_| &mut payload)
                .map_err(|e| (i, e))?;
            each(i, &header, &payload[range]);
            Ok(())
        };
        let mut packed: Vec<(usize, Location)> = Vec::with_capacity(hashes.len());
        for (i, hash) in hashes.iter().enumerate() {
            match self.indexed(hash) {
                Some(loc) => packed.push((i, loc)),
                // A format-1 chunk file.
                None => alone(i, &mut each)?,
            }
        }
        packed.sort_by_key(|(_, loc)| (loc.pack, loc.offset));
        for span in spans(&packed) {
            let (first, loc) = packed[span.records.start];
            let bytes = match self.read_span(&hashes[first], loc, &span, buf) {
                Ok(bytes) => bytes,
                // The span covers other records and the bytes between
                // them: read its records one at a time, so that the error
                // is the record's that fails, and bytes nobody asked for
                // (a bad sector between two records) fail nothing.
                Err(_) => {
                    for &(i, _) in &packed[span.records.clone()] {
                        alone(i, &mut each)?;
                    }
                    continue;
                }
            };
            for &(i, loc) in &packed[span.records.clone()] {
                let at = (loc.offset - span.start) as usize;
                let record = &bytes[at..at + loc.len as usize];
                let (header, payload) =
                    chunk::StoredChunk::parse_in_place(record).map_err(|reason| {
                        (
                            i,
                            RepositoryError::Chunk {
                                hash: hex(&hashes[i]),
                                reason,
                            },
                        )
                    })?;
                each(i, &header, &record[payload]);
            }
        }
        Ok(())
    }

    /// The bytes `span.start..span.end` of a pack (`loc` is one of its
    /// records, `hash` that record's address, for errors).
    fn read_span<'b>(
        &self,
        hash: &ChunkHash,
        loc: Location,
        span: &Span,
        buf: &'b mut SpanBuffer,
    ) -> Result<&'b [u8], RepositoryError> {
        let len = (span.end - span.start) as usize;
        // Grown, never shrunk: zeroing it again for every span would cost
        // a pass over its bytes.
        if buf.0.len() < len {
            buf.0.resize(len, 0);
        }
        let out = &mut buf.0[..len];
        self.pack_file(hash, loc)?
            .read_exact_at(out, span.start)
            .map_err(|e| pack_read_err(hash, e))?;
        Ok(out)
    }
}

/// Groups records sorted by pack and offset into requests.
fn spans(sorted: &[(usize, Location)]) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    for (k, &(_, loc)) in sorted.iter().enumerate() {
        let end = loc.offset + u64::from(loc.len);
        if let Some(last) = out.last_mut() {
            let (_, prev) = sorted[last.records.end - 1];
            if prev.pack == loc.pack
                && loc.offset <= last.end + GAP
                && end.max(last.end) - last.start <= MAX_SPAN
            {
                last.records.end = k + 1;
                last.end = last.end.max(end);
                continue;
            }
        }
        out.push(Span {
            records: k..k + 1,
            start: loc.offset,
            end,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores chunk `n` (its address all `n`), `len` bytes of `n`, in the
    /// pack being filled; `publish` seals the pack.
    fn put(repo: &Repository, n: u8, len: usize, publish: bool) {
        let header = chunk::ChunkHeader {
            codec: "none".into(),
            codec_hash: Vec::new(),
            raw_len: len as u32,
            payload_len: len as u32,
        };
        repo.stage_chunk(&[n; 32], &header, &vec![n; len]).unwrap();
        if publish {
            repo.publish_staged().unwrap();
        }
    }

    /// Cuts chunk `n`'s pack one byte short of the end of its record.
    fn cut_within(repo: &Repository, n: u8) {
        let (pack, offset, len) = repo.chunk_record(&[n; 32]).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&pack)
            .unwrap()
            .set_len(offset + len - 1)
            .unwrap();
    }

    /// Each chunk's place in the batch and payload, or the failing
    /// chunk's place and error.
    type Read = Result<Vec<(usize, Vec<u8>)>, (usize, String)>;

    fn read_all(repo: &Repository, wanted: &[u8]) -> Read {
        let hashes: Vec<ChunkHash> = wanted.iter().map(|&n| [n; 32]).collect();
        let mut got = Vec::new();
        repo.read_payloads(&hashes, &mut SpanBuffer::default(), |i, h, payload| {
            assert_eq!(h.raw_len as usize, payload.len());
            got.push((i, payload.to_vec()));
        })
        .map_err(|(i, e)| (i, e.to_string()))?;
        got.sort();
        Ok(got)
    }

    #[test]
    fn a_batch_gets_every_payload_whatever_its_order_and_a_bad_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        // Two packs: 1, 2 and 3 side by side, then 4 on its own.
        put(&repo, 1, 1000, false);
        put(&repo, 2, 70 << 10, false);
        put(&repo, 3, 10, true);
        put(&repo, 4, 5000, true);
        // Out of order, across both packs, with a chunk asked for twice.
        let got = read_all(&repo, &[4, 2, 1, 3, 2]).unwrap();
        assert_eq!(got.len(), 5);
        for (i, payload) in &got {
            let n = [4u8, 2, 1, 3, 2][*i];
            let len = [0, 1000, 70 << 10, 10, 5000][n as usize];
            assert_eq!(payload, &vec![n; len], "chunk {n}");
        }

        // A chunk nobody has is named by its place in the batch.
        let (i, e) = read_all(&repo, &[1, 9]).unwrap_err();
        assert_eq!(i, 1);
        assert!(e.contains("missing"), "{e}");

        // A damaged record header is named, and so is a pack cut short.
        let (pack, offset, _) = repo.chunk_record(&[2; 32]).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
        f.write_all_at(b"X", offset).unwrap();
        let (i, e) = read_all(&repo, &[1, 2, 3]).unwrap_err();
        assert_eq!(i, 1, "{e}");
        assert!(e.contains("bad magic") && e.contains(&hex(&[2; 32])), "{e}");
        cut_within(&repo, 4);
        let (i, e) = read_all(&repo, &[4]).unwrap_err();
        assert_eq!(i, 0);
        assert!(e.contains("truncated"), "{e}");

        // The last record of a span cut short: the failing read is the
        // span's, and the error is that record's, not the first one's.
        put(&repo, 5, 3000, false);
        put(&repo, 6, 3000, false);
        put(&repo, 7, 3000, true);
        assert_eq!(read_all(&repo, &[5, 6, 7]).unwrap().len(), 3);
        cut_within(&repo, 7);
        let (i, e) = read_all(&repo, &[5, 6, 7]).unwrap_err();
        assert_eq!(i, 2, "{e}");
        assert!(e.contains("truncated") && e.contains(&hex(&[7; 32])), "{e}");
        let got = read_all(&repo, &[5, 6]).unwrap();
        assert_eq!(got[1].1, vec![6; 3000]);
    }

    fn loc(pack: u32, offset: u64, len: u32) -> (usize, Location) {
        (0, Location { pack, offset, len })
    }

    #[test]
    fn close_records_of_a_pack_share_a_request_and_far_or_other_ones_do_not() {
        let sorted = [
            loc(0, 0, 100),
            loc(0, 100, 100),
            loc(0, 200 + GAP, 50), // just within the gap
            loc(0, 251 + 2 * GAP, 10),
            loc(1, 261 + 2 * GAP, 10),                     // another pack
            loc(1, MAX_SPAN, 1 << 20),                     // too far to join
            loc(1, MAX_SPAN + (1 << 20), MAX_SPAN as u32), // would make a span too long
        ];
        let got: Vec<_> = spans(&sorted)
            .into_iter()
            .map(|s| (s.records, s.start, s.end))
            .collect();
        assert_eq!(
            got,
            [
                (0..3, 0, 250 + GAP),
                (3..4, 251 + 2 * GAP, 261 + 2 * GAP),
                (4..5, 261 + 2 * GAP, 271 + 2 * GAP),
                (5..6, MAX_SPAN, MAX_SPAN + (1 << 20)),
                (6..7, MAX_SPAN + (1 << 20), 2 * MAX_SPAN + (1 << 20)),
            ]
        );
    }
}
