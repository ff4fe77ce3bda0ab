//! Access to the snapshot, abstracted so that tests can use a byte vector.

use std::io::{self, Read, Seek, SeekFrom};

/// Random-access reads of the disk; a read past the end returns fewer bytes.
pub trait ReadAt {
    fn size(&self) -> u64;
    fn read_at(&self, offset: u64, length: u32) -> Result<Vec<u8>, String>;
}

impl ReadAt for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, offset: u64, length: u32) -> Result<Vec<u8>, String> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let end = start.saturating_add(length as usize).min(self.len());
        Ok(self[start..end].to_vec())
    }
}

/// A window of a disk (a partition) that reads as a disk of its own.
pub struct Slice<'a, D: ReadAt + ?Sized> {
    disk: &'a D,
    offset: u64,
    length: u64,
}

impl<'a, D: ReadAt + ?Sized> Slice<'a, D> {
    /// `offset + length` must lie inside `disk` (checked by the caller).
    pub fn new(disk: &'a D, offset: u64, length: u64) -> Self {
        Slice {
            disk,
            offset,
            length,
        }
    }
}

impl<D: ReadAt + ?Sized> ReadAt for Slice<'_, D> {
    fn size(&self) -> u64 {
        self.length
    }
    fn read_at(&self, offset: u64, length: u32) -> Result<Vec<u8>, String> {
        if offset >= self.length {
            return Ok(Vec::new());
        }
        let n = u64::from(length).min(self.length - offset) as u32;
        let at = self.offset.checked_add(offset).ok_or("read past 2^64")?;
        self.disk.read_at(at, n)
    }
}

/// Reads exactly `length` bytes or fails naming `what`.
pub fn read_exact_at(
    disk: &(impl ReadAt + ?Sized),
    offset: u64,
    length: u32,
    what: &str,
) -> Result<Vec<u8>, String> {
    let bytes = disk.read_at(offset, length)?;
    if bytes.len() == length as usize {
        Ok(bytes)
    } else {
        Err(format!(
            "{what} at byte {offset} is cut short by the end of the disk"
        ))
    }
}

/// `Read + Seek` over a disk for crates that parse through `std::io`. They
/// read field by field, and each host read is a component call that copies,
/// so whole chunks are fetched and served from memory.
pub struct Cursor<'a, D: ReadAt + ?Sized> {
    disk: &'a D,
    pos: u64,
    chunk_start: u64,
    chunk: Vec<u8>,
    /// Chunk fetches left before reads fail; bounds the work a parser that
    /// follows on-disk links (and might be led in circles) can cause.
    fetches_left: u32,
}

const CHUNK: u64 = 64 << 10;

impl<'a, D: ReadAt + ?Sized> Cursor<'a, D> {
    pub fn new(disk: &'a D) -> Self {
        Cursor {
            disk,
            pos: 0,
            chunk_start: 0,
            chunk: Vec::new(),
            fetches_left: u32::MAX,
        }
    }

    /// Fails reads once `fetches` chunks have been fetched from the disk.
    pub fn with_seek_budget(mut self, fetches: u32) -> Self {
        self.fetches_left = fetches;
        self
    }
}

impl<D: ReadAt + ?Sized> Read for Cursor<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let cached = self.chunk_start..self.chunk_start + self.chunk.len() as u64;
        if !cached.contains(&self.pos) {
            self.fetches_left = self.fetches_left.checked_sub(1).ok_or_else(|| {
                io::Error::other(
                    "too many reads: the structure leads in circles or is absurdly large",
                )
            })?;
            self.chunk_start = self.pos - self.pos % CHUNK;
            self.chunk = self
                .disk
                .read_at(self.chunk_start, CHUNK as u32)
                .map_err(io::Error::other)?;
            if self.pos >= self.chunk_start + self.chunk.len() as u64 {
                return Ok(0);
            }
        }
        let at = (self.pos - self.chunk_start) as usize;
        let n = buf.len().min(self.chunk.len() - at);
        buf[..n].copy_from_slice(&self.chunk[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl<D: ReadAt + ?Sized> Seek for Cursor<'_, D> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.disk.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_reads_across_chunks_and_stops_at_the_end() {
        let disk: Vec<u8> = (0..(CHUNK as usize * 2 + 10)).map(|i| i as u8).collect();
        let mut c = Cursor::new(disk.as_slice());
        c.seek(SeekFrom::Start(CHUNK - 3)).unwrap();
        let mut buf = [0u8; 6];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, &disk[CHUNK as usize - 3..CHUNK as usize + 3]);
        assert_eq!(c.seek(SeekFrom::End(-4)).unwrap(), disk.len() as u64 - 4);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, &disk[disk.len() - 4..]);
    }
}
