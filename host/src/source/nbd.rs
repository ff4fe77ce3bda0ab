//! A small NBD client (fixed newstyle, structured replies, metadata contexts)
//! for reading QEMU exports: data, `base:allocation` and
//! `qemu:dirty-bitmap:NAME` block status.
//!
//! Written here because no maintained Rust crate speaks structured replies
//! and block status (the `nbd` crate predates both); the protocol is the one
//! in NBD's `proto.md`. One request at a time per connection; a server that
//! allows several connections to an export (`NBD_FLAG_CAN_MULTI_CONN`, as
//! QEMU does for read-only exports) gets up to four, opened as concurrent
//! readers need them, so that the source mover's analysts read in parallel.

use super::DiskRead;
use crate::extent::{Extent, normalize};
use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_NONE: u16 = 0;
const REPLY_OFFSET_DATA: u16 = 1;
const REPLY_OFFSET_HOLE: u16 = 2;
const REPLY_BLOCK_STATUS: u16 = 5;
const REPLY_ERROR_BIT: u16 = 1 << 15;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag.
pub const STATE_DIRTY: u32 = 1;

/// Largest read per request; QEMU's limit is 32 MiB.
const MAX_READ: u64 = 16 << 20;
/// Largest block-status request (the length field is 32 bits).
const MAX_STATUS: u64 = 1 << 30;
/// A server that stops answering must not hang a backup forever.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Connections per client, when the server allows more than one.
const MAX_CONNS: usize = 4;
/// A server that takes one client at a time leaves a second connection's
/// handshake unanswered: after this, the client makes do with what it has.
const EXTRA_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD server {socket}: {source}")]
    Io { socket: String, source: io::Error },
    #[error("NBD server {socket}: {message}")]
    Protocol { socket: String, message: String },
    #[error("NBD export '{export}' on {socket}: {message}")]
    Refused {
        socket: String,
        export: String,
        message: String,
    },
}

/// Reply headers are a few fields of 2 to 8 bytes: read through a small
/// buffer they cost one `recv` per reply chunk, not one per field. Small,
/// so that what it takes ahead of a data chunk's payload (copied out of it,
/// where the rest goes straight into the caller's buffer) stays a few
/// hundred bytes.
const REPLY_BUFFER: usize = 512;

struct Conn {
    /// Read through the buffer, written through `get_mut`.
    stream: BufReader<UnixStream>,
    next_cookie: u64,
    /// Metadata context ids, which the server chooses per connection.
    contexts: HashMap<String, u32>,
}

/// Idle connections, and how many exist in all.
struct Pool {
    idle: Vec<Conn>,
    open: usize,
    /// Whether another connection may be opened.
    grow: bool,
}

pub struct NbdClient {
    pool: Mutex<Pool>,
    freed: Condvar,
    path: PathBuf,
    socket: String,
    export: String,
    wanted: Vec<String>,
    size: u64,
}

/// What a handshake learns besides the connection.
struct Export {
    size: u64,
    multi_conn: bool,
}

fn rd<const N: usize>(s: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}
fn rd_u16(s: &mut impl Read) -> io::Result<u16> {
    Ok(u16::from_be_bytes(rd(s)?))
}
fn rd_u32(s: &mut impl Read) -> io::Result<u32> {
    Ok(u32::from_be_bytes(rd(s)?))
}
fn rd_u64(s: &mut impl Read) -> io::Result<u64> {
    Ok(u64::from_be_bytes(rd(s)?))
}
/// Reads and drops `len` bytes.
fn skip(s: &mut impl Read, len: usize) -> io::Result<()> {
    let got = io::copy(&mut s.take(len as u64), &mut io::sink())?;
    if got < len as u64 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn rd_vec(s: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    s.read_exact(&mut v)?;
    Ok(v)
}

impl NbdClient {
    /// Connects to `export` on a unix socket and asks for the given metadata
    /// contexts (e.g. `base:allocation`, `qemu:dirty-bitmap:bm0`).
    pub fn connect(socket: &Path, export: &str, contexts: &[&str]) -> Result<Self, NbdError> {
        let (conn, info) = handshake(socket, export, contexts, IO_TIMEOUT)?;
        Ok(Self {
            pool: Mutex::new(Pool {
                idle: vec![conn],
                open: 1,
                grow: info.multi_conn,
            }),
            freed: Condvar::new(),
            path: socket.to_owned(),
            socket: socket.display().to_string(),
            export: export.to_owned(),
            wanted: contexts.iter().map(|c| (*c).to_owned()).collect(),
            size: info.size,
        })
    }

    /// Runs `f` on an idle connection, opening another one if none is idle
    /// and the server allows it. A connection `f` failed on is closed: it
    /// may be out of step with the server.
    fn with_conn<R>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<R, NbdError>,
    ) -> Result<R, NbdError> {
        let mut pool = self.pool.lock().expect("nbd pool lock");
        let mut conn = loop {
            if let Some(c) = pool.idle.pop() {
                break c;
            }
            if pool.grow && pool.open < MAX_CONNS {
                pool.open += 1;
                drop(pool);
                let extra = handshake(
                    &self.path,
                    &self.export,
                    &self.wanted,
                    EXTRA_HANDSHAKE_TIMEOUT,
                );
                pool = self.pool.lock().expect("nbd pool lock");
                match extra {
                    Ok((c, _)) => {
                        tracing::debug!("NBD {}: connection {} opened", self.socket, pool.open);
                        break c;
                    }
                    Err(e) => {
                        tracing::debug!("NBD {}: no further connection: {e}", self.socket);
                        pool.open -= 1;
                        pool.grow = false;
                        continue;
                    }
                }
            }
            if pool.open == 0 {
                // Every connection failed; the snapshot is gone or the
                // server is, and a task reading it must fail, not retry.
                return Err(NbdError::Io {
                    socket: self.socket.clone(),
                    source: io::Error::new(
                        io::ErrorKind::NotConnected,
                        "no connection left after an earlier failure (the error before \
                         this one says what failed); the task fails, and the next session \
                         reads a new snapshot",
                    ),
                });
            }
            pool = self.freed.wait(pool).expect("nbd pool lock");
        };
        drop(pool);
        let r = f(&mut conn);
        self.release(r.is_ok().then_some(conn));
        r
    }

    fn release(&self, conn: Option<Conn>) {
        let mut pool = self.pool.lock().expect("nbd pool lock");
        match conn {
            Some(c) => pool.idle.push(c),
            None => pool.open -= 1,
        }
        self.freed.notify_one();
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn io_err(&self) -> impl Fn(io::Error) -> NbdError + '_ {
        |source| NbdError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn proto(&self, message: String) -> NbdError {
        NbdError::Protocol {
            socket: self.socket.clone(),
            message,
        }
    }

    /// Reads `buf.len()` bytes at `offset` (holes come back as zeros).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        let mut done = 0usize;
        while done < buf.len() {
            let len = (buf.len() - done).min(MAX_READ as usize);
            let at = offset + done as u64;
            let part = &mut buf[done..done + len];
            // Where the reply's chunks landed: they must cover the request,
            // or the part left out would keep a pooled buffer's old bytes.
            let mut covered: Vec<(usize, usize)> = Vec::new();
            self.request(CMD_READ, at, len as u32, |ty, chunk, s, _| {
                // Data goes from the socket straight into `part`: no
                // staging buffer, no copy.
                let (o, n) = match ty {
                    REPLY_OFFSET_DATA if chunk >= 8 => (rd_u64(s)?, chunk - 8),
                    REPLY_OFFSET_HOLE if chunk == 12 => (rd_u64(s)?, rd_u32(s)? as usize),
                    _ => {
                        skip(s, chunk)?;
                        return Ok(Err("unexpected reply chunk to READ"));
                    }
                };
                // Checked arithmetic: the offset is the server's word, and
                // one near 2^64 must be refused, not overflow.
                let Some(range) = o
                    .checked_sub(at)
                    .and_then(|start| usize::try_from(start).ok())
                    .and_then(|start| Some(start..start.checked_add(n)?))
                    .filter(|r| r.end <= part.len())
                else {
                    if ty == REPLY_OFFSET_DATA {
                        skip(s, n)?;
                    }
                    return Ok(Err("reply chunk outside the request"));
                };
                covered.push((range.start, range.end));
                let dest = &mut part[range];
                if ty == REPLY_OFFSET_DATA {
                    s.read_exact(dest)?;
                } else {
                    dest.fill(0);
                }
                Ok(Ok(()))
            })?;
            if let Some(gap) = first_gap(&mut covered, len) {
                return Err(self.proto(format!(
                    "the reply to a read of {len} bytes at {at} left out {} bytes at {}",
                    gap.1 - gap.0,
                    at + gap.0 as u64
                )));
            }
            done += len;
        }
        Ok(())
    }

    /// Block status of `[offset, offset+length)` in one context, as
    /// `(extent, flags)` runs covering the whole range.
    pub fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<(Extent, u32)>, NbdError> {
        if !self.wanted.iter().any(|c| c == context) {
            return Err(self.proto(format!("context '{context}' was not negotiated")));
        }
        let end = offset.saturating_add(length).min(self.size);
        let mut out: Vec<(Extent, u32)> = Vec::new();
        let mut at = offset;
        while at < end {
            let len = (end - at).min(MAX_STATUS) as u32;
            let mut got = 0u64;
            self.request(CMD_BLOCK_STATUS, at, len, |ty, chunk, s, ids| {
                let payload = rd_vec(s, chunk)?;
                let Some(&id) = ids.get(context) else {
                    return Ok(Err("metadata context missing on this connection"));
                };
                if ty != REPLY_BLOCK_STATUS {
                    return Ok(Err("unexpected reply chunk to BLOCK_STATUS"));
                }
                let Some(ctx) = payload.get(..4) else {
                    return Ok(Err("short block status chunk"));
                };
                if u32::from_be_bytes(ctx.try_into().expect("4 bytes")) != id {
                    return Ok(Ok(())); // another context's answer
                }
                for d in payload[4..].chunks_exact(8) {
                    let n = u64::from(u32::from_be_bytes(d[..4].try_into().expect("4 bytes")));
                    let flags = u32::from_be_bytes(d[4..].try_into().expect("4 bytes"));
                    let start = at + got;
                    let n = n.min(end - start);
                    if n == 0 {
                        break;
                    }
                    match out.last_mut() {
                        Some((e, f)) if *f == flags && e.end() == start => e.length += n,
                        _ => out.push((Extent::new(start, n), flags)),
                    }
                    got += n;
                }
                Ok(Ok(()))
            })?;
            if got == 0 {
                return Err(self.proto(format!("block status at {at} made no progress")));
            }
            at += got;
        }
        Ok(out)
    }

    /// Ranges of a context whose flags intersect `mask` (`want = true`) or
    /// do not (`want = false`).
    pub fn ranges(&self, context: &str, mask: u32, want: bool) -> Result<Vec<Extent>, NbdError> {
        Ok(normalize(
            self.block_status(context, 0, self.size)?
                .into_iter()
                .filter(|(_, f)| (f & mask != 0) == want)
                .map(|(e, _)| e)
                .collect(),
            self.size,
        ))
    }

    /// Sends one request and hands each reply chunk to `on_chunk` (its
    /// type, its length, and the stream to read exactly that many bytes
    /// from) until the server says it is done. `on_chunk` answers `Err(why)`
    /// for a chunk it refuses, having consumed it all the same, so the
    /// connection stays in step.
    fn request(
        &self,
        cmd: u16,
        offset: u64,
        length: u32,
        mut on_chunk: impl FnMut(
            u16,
            usize,
            &mut BufReader<UnixStream>,
            &HashMap<String, u32>,
        ) -> io::Result<Result<(), &'static str>>,
    ) -> Result<(), NbdError> {
        self.with_conn(|conn| {
            let cookie = conn.next_cookie;
            conn.next_cookie += 1;
            let mut req = Vec::with_capacity(28);
            req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&cmd.to_be_bytes());
            req.extend_from_slice(&cookie.to_be_bytes());
            req.extend_from_slice(&offset.to_be_bytes());
            req.extend_from_slice(&length.to_be_bytes());
            let (s, ids) = (&mut conn.stream, &conn.contexts);
            s.get_mut().write_all(&req).map_err(self.io_err())?;
            let mut refused = None;
            loop {
                let magic = rd_u32(s).map_err(self.io_err())?;
                if magic == SIMPLE_REPLY_MAGIC {
                    let error = rd_u32(s).map_err(self.io_err())?;
                    let _cookie = rd_u64(s).map_err(self.io_err())?;
                    if error != 0 {
                        return Err(
                            self.proto(format!("request at {offset} failed with error {error}"))
                        );
                    }
                    return Err(
                        self.proto("simple reply where a structured one was negotiated".into())
                    );
                }
                if magic != STRUCTURED_REPLY_MAGIC {
                    return Err(self.proto(format!("bad reply magic {magic:#x}")));
                }
                let flags = rd_u16(s).map_err(self.io_err())?;
                let ty = rd_u16(s).map_err(self.io_err())?;
                let got_cookie = rd_u64(s).map_err(self.io_err())?;
                let len = rd_u32(s).map_err(self.io_err())? as usize;
                if got_cookie != cookie {
                    return Err(self.proto("reply for another request".into()));
                }
                if len > MAX_READ as usize + 64 {
                    return Err(self.proto(format!("reply chunk of {len} bytes is too large")));
                }
                if ty & REPLY_ERROR_BIT != 0 {
                    let payload = rd_vec(s, len).map_err(self.io_err())?;
                    let code = payload
                        .get(..4)
                        .map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
                    let msg = payload
                        .get(6..)
                        .map(|m| String::from_utf8_lossy(m).into_owned())
                        .unwrap_or_default();
                    return Err(
                        self.proto(format!("request at {offset} failed (error {code}): {msg}"))
                    );
                }
                if ty == REPLY_NONE {
                    skip(s, len).map_err(self.io_err())?;
                } else if let Err(why) = on_chunk(ty, len, s, ids).map_err(self.io_err())? {
                    refused.get_or_insert(why);
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    return match refused {
                        None => Ok(()),
                        Some(why) => Err(self.proto(why.to_owned())),
                    };
                }
            }
        })
    }
}

/// Opens a connection to `export` and negotiates structured replies and
/// the metadata `contexts`; `timeout` bounds each step of the handshake.
fn handshake(
    socket: &Path,
    export: &str,
    contexts: &[impl AsRef<str>],
    timeout: Duration,
) -> Result<(Conn, Export), NbdError> {
    let sock = socket.display().to_string();
    let io_err = |source| NbdError::Io {
        socket: sock.clone(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(io_err)?;
    s.set_read_timeout(Some(timeout)).map_err(io_err)?;
    s.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let proto = |message: String| NbdError::Protocol {
        socket: sock.clone(),
        message,
    };
    let refused = |message: String| NbdError::Refused {
        socket: sock.clone(),
        export: export.to_owned(),
        message,
    };

    if rd_u64(&mut s).map_err(io_err)? != NBDMAGIC || rd_u64(&mut s).map_err(io_err)? != IHAVEOPT {
        return Err(proto("not an NBD newstyle server".into()));
    }
    let flags = rd_u16(&mut s).map_err(io_err)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("server does not speak fixed newstyle".into()));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
    s.write_all(&client_flags.to_be_bytes()).map_err(io_err)?;

    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).map_err(io_err)?;
    let (ty, data) = opt_reply(&mut s, OPT_STRUCTURED_REPLY).map_err(io_err)?;
    if ty != REP_ACK {
        return Err(proto(format!(
            "server refused structured replies: {}",
            String::from_utf8_lossy(&data)
        )));
    }

    let mut ids = HashMap::new();
    if !contexts.is_empty() {
        let mut body = Vec::new();
        body.extend_from_slice(&(export.len() as u32).to_be_bytes());
        body.extend_from_slice(export.as_bytes());
        body.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for c in contexts.iter().map(AsRef::as_ref) {
            body.extend_from_slice(&(c.len() as u32).to_be_bytes());
            body.extend_from_slice(c.as_bytes());
        }
        send_opt(&mut s, OPT_SET_META_CONTEXT, &body).map_err(io_err)?;
        loop {
            let (ty, data) = opt_reply(&mut s, OPT_SET_META_CONTEXT).map_err(io_err)?;
            match ty {
                REP_META_CONTEXT if data.len() >= 4 => {
                    let id = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
                    ids.insert(String::from_utf8_lossy(&data[4..]).into_owned(), id);
                }
                REP_ACK => break,
                t if t & REP_ERR_BIT != 0 => {
                    return Err(refused(String::from_utf8_lossy(&data).into_owned()));
                }
                t => return Err(proto(format!("unexpected reply {t} to SET_META_CONTEXT"))),
            }
        }
        for c in contexts.iter().map(AsRef::as_ref) {
            if !ids.contains_key(c) {
                return Err(refused(format!("metadata context '{c}' is not offered")));
            }
        }
    }

    let mut body = Vec::new();
    body.extend_from_slice(&(export.len() as u32).to_be_bytes());
    body.extend_from_slice(export.as_bytes());
    body.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut s, OPT_GO, &body).map_err(io_err)?;
    let mut info = None;
    loop {
        let (ty, data) = opt_reply(&mut s, OPT_GO).map_err(io_err)?;
        match ty {
            REP_INFO
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
            {
                let flags = u16::from_be_bytes([data[10], data[11]]);
                info = Some(Export {
                    size: u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")),
                    multi_conn: flags & FLAG_CAN_MULTI_CONN != 0,
                });
            }
            REP_INFO => {}
            REP_ACK => break,
            t if t & REP_ERR_BIT != 0 => {
                return Err(refused(String::from_utf8_lossy(&data).into_owned()));
            }
            t => return Err(proto(format!("unexpected reply {t} to GO"))),
        }
    }
    let info = info.ok_or_else(|| proto("server sent no export size".into()))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    Ok((
        Conn {
            stream: BufReader::with_capacity(REPLY_BUFFER, s),
            next_cookie: 1,
            contexts: ids,
        },
        info,
    ))
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Ok(pool) = self.pool.get_mut() {
            let mut req = Vec::with_capacity(28);
            req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&CMD_DISC.to_be_bytes());
            req.extend_from_slice(&[0u8; 20]);
            for conn in &mut pool.idle {
                let _ = conn.stream.get_mut().write_all(&req);
            }
        }
    }
}

fn send_opt(s: &mut UnixStream, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

fn opt_reply(s: &mut UnixStream, opt: u32) -> io::Result<(u32, Vec<u8>)> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_owned());
    if rd_u64(s)? != OPT_REPLY_MAGIC {
        return Err(bad("bad option reply magic"));
    }
    if rd_u32(s)? != opt {
        return Err(bad("option reply for another option"));
    }
    let ty = rd_u32(s)?;
    let len = rd_u32(s)? as usize;
    if len > 1 << 20 {
        return Err(bad("option reply too large"));
    }
    Ok((ty, rd_vec(s, len)?))
}

/// A disk read over NBD: allocation from `base:allocation` (holes and
/// zero extents are never read).
pub struct NbdDisk {
    client: Option<NbdClient>,
}

impl NbdDisk {
    pub fn new(client: NbdClient) -> Self {
        Self {
            client: Some(client),
        }
    }

    /// A disk whose connection was released; every read fails.
    pub fn detached() -> Self {
        Self { client: None }
    }

    pub fn client(&self) -> io::Result<&NbdClient> {
        self.client
            .as_ref()
            .ok_or_else(|| io::Error::other("the snapshot export was released"))
    }
}

impl DiskRead for NbdDisk {
    fn size(&self) -> u64 {
        self.client.as_ref().map_or(0, NbdClient::size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let client = self.client()?;
        let size = client.size();
        if offset >= size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - offset) as usize;
        client
            .read(&mut buf[..n], offset)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(n)
    }

    fn allocation(&self) -> io::Result<Vec<Extent>> {
        self.client()?
            .ranges("base:allocation", STATE_HOLE | STATE_ZERO, false)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NbdClient({} on {})", self.export, self.socket)
    }
}

/// The first part of `0..len` that no range covers, if any.
fn first_gap(ranges: &mut [(usize, usize)], len: usize) -> Option<(usize, usize)> {
    ranges.sort_unstable();
    let mut end = 0;
    for &(from, to) in ranges.iter() {
        if from > end {
            return Some((end, from));
        }
        end = end.max(to);
    }
    (end < len).then_some((end, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    struct Server(Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn qemu_io(img: &Path, cmd: &str) {
        let ok = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(img)
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }

    fn serve(dir: &Path) -> (Server, std::path::PathBuf, std::path::PathBuf) {
        serve_shared(dir, 1)
    }

    /// qemu-nbd serving a qcow2 image with a dirty bitmap, started here,
    /// to at most `shared` clients at once.
    fn serve_shared(dir: &Path, shared: u32) -> (Server, std::path::PathBuf, std::path::PathBuf) {
        let img = dir.join("d.qcow2");
        let sock = dir.join("nbd.sock");
        assert!(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&img)
                .arg("64M")
                .status()
                .unwrap()
                .success()
        );
        qemu_io(&img, "write -P 0x11 1M 2M");
        assert!(
            Command::new("qemu-img")
                .args(["bitmap", "--add"])
                .arg(&img)
                .arg("bm0")
                .status()
                .unwrap()
                .success()
        );
        qemu_io(&img, "write -P 0x22 8M 64k");
        qemu_io(&img, "write -z 20M 1M");
        let child = Command::new("qemu-nbd")
            .args([
                "-t",
                "-r",
                "-f",
                "qcow2",
                "-x",
                "exp0",
                "--bitmap=bm0",
                "-A",
                &format!("--shared={shared}"),
                "-k",
            ])
            .arg(&sock)
            .arg(&img)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd (qemu-utils)");
        let server = Server(child);
        // The socket file appears at bind(), before qemu-nbd listens: wait
        // until a connection is accepted, not until the file exists.
        for _ in 0..500 {
            if UnixStream::connect(&sock).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (server, sock, img)
    }

    #[test]
    fn a_read_reply_must_cover_the_request() {
        assert_eq!(first_gap(&mut [(0, 10)], 10), None);
        assert_eq!(first_gap(&mut [(4, 10), (0, 4)], 10), None);
        assert_eq!(first_gap(&mut [(0, 6), (2, 10)], 10), None, "overlaps");
        assert_eq!(first_gap(&mut [(0, 4), (6, 10)], 10), Some((4, 6)));
        assert_eq!(first_gap(&mut [(0, 4)], 10), Some((4, 10)));
        assert_eq!(first_gap(&mut [], 10), Some((0, 10)));
        assert_eq!(first_gap(&mut [], 0), None);
    }

    #[test]
    fn reads_data_allocation_and_dirty_bitmap_from_qemu_nbd() {
        let dir = tempfile::tempdir().unwrap();
        let (_server, sock, _img) = serve(dir.path());
        let c = NbdClient::connect(&sock, "exp0", &["base:allocation", "qemu:dirty-bitmap:bm0"])
            .unwrap();
        assert_eq!(c.size(), 64 << 20);
        let mut buf = vec![0u8; 3 << 20];
        c.read(&mut buf, 512 << 10).unwrap();
        assert!(buf[..512 << 10].iter().all(|b| *b == 0));
        assert!(
            buf[512 << 10..(512 << 10) + (2 << 20)]
                .iter()
                .all(|b| *b == 0x11)
        );
        let disk = NbdDisk::new(c);
        let alloc = disk.allocation().unwrap();
        assert!(alloc.contains(&Extent::new(1 << 20, 2 << 20)), "{alloc:?}");
        assert!(
            alloc
                .iter()
                .all(|e| e.offset + e.length <= 9 << 20 || e.offset >= 21 << 20),
            "zero writes are not data: {alloc:?}"
        );
        let dirty = disk
            .client()
            .unwrap()
            .ranges("qemu:dirty-bitmap:bm0", STATE_DIRTY, true)
            .unwrap();
        let total: u64 = dirty.iter().map(|e| e.length).sum();
        assert!(
            dirty
                .iter()
                .any(|e| e.offset <= 8 << 20 && e.end() >= (8 << 20) + (64 << 10)),
            "{dirty:?}"
        );
        assert!(
            dirty.iter().all(|e| e.offset >= 8 << 20),
            "writes before the bitmap are not dirty: {dirty:?}"
        );
        assert!(total <= (2 << 20) + (1 << 20), "{dirty:?}");
    }

    #[test]
    fn concurrent_readers_get_connections_of_their_own_where_the_server_allows() {
        for (shared, many) in [(4, true), (1, false)] {
            let dir = tempfile::tempdir().unwrap();
            let (_server, sock, _img) = serve_shared(dir.path(), shared);
            let c = NbdClient::connect(&sock, "exp0", &["base:allocation"]).unwrap();
            let start = std::sync::Barrier::new(4);
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        start.wait();
                        let mut buf = vec![0u8; 2 << 20];
                        for _ in 0..20 {
                            c.read(&mut buf, 1 << 20).unwrap();
                            assert!(buf.iter().all(|b| *b == 0x11));
                        }
                    });
                }
            });
            // Block status works on whichever connection serves it: each
            // has its own context ids.
            for _ in 0..4 {
                let data = c.ranges("base:allocation", STATE_HOLE, false).unwrap();
                assert!(data.contains(&Extent::new(1 << 20, 2 << 20)), "{data:?}");
            }
            let open = c.pool.lock().unwrap().open;
            assert_eq!(open > 1, many, "{open} connections to a server of {shared}");
        }
    }

    #[test]
    fn unknown_exports_and_contexts_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let (_server, sock, _img) = serve(dir.path());
        let e = NbdClient::connect(&sock, "nope", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'nope'"), "{e}");
        let e = NbdClient::connect(&sock, "exp0", &["qemu:dirty-bitmap:other"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("qemu:dirty-bitmap:other"), "{e}");
    }

    #[test]
    fn a_vanished_server_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let (server, sock, _img) = serve(dir.path());
        let c = NbdClient::connect(&sock, "exp0", &[]).unwrap();
        drop(server);
        let mut buf = vec![0u8; 4096];
        assert!(c.read(&mut buf, 0).is_err());
        // The failed connection is closed; later reads fail at once.
        let t = std::time::Instant::now();
        let e = c.read(&mut buf, 0).unwrap_err().to_string();
        assert!(e.contains("no connection left"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    /// A server, written here, that answers the handshake and then every
    /// read with one data chunk at `offset`.
    fn hostile_server(sock: &Path, offset: u64) -> std::thread::JoinHandle<()> {
        let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let answer = |s: &mut UnixStream, opt: u32, ty: u32, data: &[u8]| {
                let mut m = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&opt.to_be_bytes());
                m.extend_from_slice(&ty.to_be_bytes());
                m.extend_from_slice(&(data.len() as u32).to_be_bytes());
                m.extend_from_slice(data);
                s.write_all(&m).unwrap();
            };
            let mut hello = NBDMAGIC.to_be_bytes().to_vec();
            hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
            hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            s.write_all(&hello).unwrap();
            rd_u32(&mut s).unwrap();
            loop {
                assert_eq!(rd_u64(&mut s).unwrap(), IHAVEOPT);
                let opt = rd_u32(&mut s).unwrap();
                let len = rd_u32(&mut s).unwrap() as usize;
                rd_vec(&mut s, len).unwrap();
                if opt == OPT_GO {
                    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                    info.extend_from_slice(&0u16.to_be_bytes());
                    answer(&mut s, opt, REP_INFO, &info);
                    answer(&mut s, opt, REP_ACK, &[]);
                    break;
                }
                answer(&mut s, opt, REP_ACK, &[]);
            }
            // Each request: magic, flags, type, cookie, offset, length.
            while let Ok(req) = rd::<28>(&mut s) {
                if u16::from_be_bytes([req[6], req[7]]) != CMD_READ {
                    return;
                }
                let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
                m.extend_from_slice(&REPLY_OFFSET_DATA.to_be_bytes());
                m.extend_from_slice(&req[8..16]);
                m.extend_from_slice(&12u32.to_be_bytes());
                m.extend_from_slice(&offset.to_be_bytes());
                m.extend_from_slice(&[0xAB; 4]);
                if s.write_all(&m).is_err() {
                    return;
                }
            }
        })
    }

    #[test]
    fn a_reply_chunk_at_an_offset_near_the_end_of_u64_is_refused_not_a_panic() {
        for offset in [u64::MAX - 2, u64::MAX, 1 << 40] {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("nbd.sock");
            let server = hostile_server(&sock, offset);
            let c = NbdClient::connect(&sock, "exp0", &[]).unwrap();
            let mut buf = vec![0u8; 4096];
            let e = c.read(&mut buf, 0).unwrap_err().to_string();
            assert!(e.contains("outside the request"), "{offset}: {e}");
            drop(c);
            server.join().unwrap();
        }
    }
}
