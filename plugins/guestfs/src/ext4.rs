//! ext2, ext3 and ext4, read through the disk reader.
//!
//! Written here rather than with the `ext4-view` crate: that crate builds for
//! wasm32-wasip2 and reads through a custom reader, but it only offers files
//! by path and content; it exposes neither block bitmaps nor where a file's
//! blocks lie on the disk, which is all an exclusion stage needs. This
//! reader reads the superblock, the group descriptors (32- and 64-byte, with
//! `meta_bg`), block bitmaps (groups flagged `BLOCK_UNINIT` count as free but
//! for metadata), inodes, extent trees and ext2/3 block maps, and linear
//! directory blocks (htree directories read the same way).
//!
//! Safety rules: every field is checked against the filesystem geometry,
//! every read and allocation is bounded by sizes derived from the disk, and
//! checksums are verified when the filesystem has them (`metadata_csum`:
//! superblock, group descriptors, block bitmaps, inodes). Every block that
//! holds metadata (superblock and descriptor copies, reserved descriptor
//! blocks, bitmaps, inode tables, the journal, the MMP block, extent tree
//! and indirect blocks of the files looked at) is collected in a protected
//! set that is taken out of any answer, whatever a bitmap says. Directory
//! blocks are never excluded: only regular files' data blocks are.
//!
//! A filesystem whose journal still holds transactions (in use at the
//! snapshot and not frozen) is refused: its on-disk bitmaps and inodes may be
//! older than what a journal replay at mount will make of them.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use crate::crc32c::crc32c;
use crate::disk::{ReadAt, read_exact_at};
use crate::extent::Extent;
use crate::glob::Pattern;

pub const MAGIC_OFFSET: u64 = 1024 + 0x38;
const MAGIC: u16 = 0xEF53;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;

const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
const INCOMPAT_KNOWN: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

const RO_SPARSE_SUPER: u32 = 0x1;
const RO_GDT_CSUM: u32 = 0x10;
const RO_BIGALLOC: u32 = 0x200;
const RO_METADATA_CSUM: u32 = 0x400;
const RO_SHARED_BLOCKS: u32 = 0x4000;
/// sparse_super, large_file, btree_dir, huge_file, gdt_csum, dir_nlink,
/// extra_isize, quota, metadata_csum, readonly, project, verity,
/// orphan_present. Not bigalloc (bitmaps count clusters) nor shared_blocks.
const RO_KNOWN: u32 =
    0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x400 | 0x1000 | 0x2000 | 0x8000 | 0x10000;

const STATE_ERRORS: u16 = 0x2;
const BG_BLOCK_UNINIT: u16 = 0x2;

const INODE_FLAG_EXTENTS: u32 = 0x80000;
const INODE_FLAG_INLINE_DATA: u32 = 0x1000_0000;
const ROOT_INO: u32 = 2;

const EXTENT_MAGIC: u16 = 0xF30A;
const MAX_EXTENT_DEPTH: u16 = 5;
const JOURNAL_MAGIC: u32 = 0xC03B_3998;

/// At most this many groups (256 TiB with 4 KiB blocks).
const MAX_GROUPS: u64 = 1 << 21;
/// Tree nodes, indirect blocks and directory entries looked at per call.
const MAX_STEPS: u64 = 50_000_000;
/// A directory larger than this is not read (its files are kept).
const MAX_DIR_BYTES: u64 = 256 << 20;
const MAX_DEPTH: usize = 256;
const CACHE_CHUNK: u64 = 64 << 10;
const CACHE_CHUNKS: usize = 256;

/// A run of filesystem blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u64,
}

/// A run of a file's blocks: `logical` is the block index within the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapped {
    logical: u64,
    physical: u64,
    len: u64,
}

struct Super {
    block_size: u64,
    blocks_count: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    inodes_per_group: u64,
    inodes_count: u64,
    inode_size: u64,
    desc_size: u64,
    compat: u32,
    incompat: u32,
    ro_compat: u32,
    journal_inum: u32,
    first_meta_bg: u64,
    reserved_gdt: u64,
    backup_bgs: [u64; 2],
    mmp_block: u64,
    csum_seed: Option<u32>,
    groups: u64,
}

struct Group {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    flags: u16,
    bitmap_csum: u32,
    bitmap_csum_hi: bool,
}

struct Inode {
    mode: u16,
    flags: u32,
    links: u16,
    block: [u8; 60],
}

impl Inode {
    fn is_dir(&self) -> bool {
        self.mode & 0xF000 == 0x4000
    }
    fn is_file(&self) -> bool {
        self.mode & 0xF000 == 0x8000
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Whether an ext2/3/4 superblock magic is at byte 1080 of `disk`.
pub fn detect(disk: &(impl ReadAt + ?Sized)) -> Result<bool, String> {
    let b = disk.read_at(MAGIC_OFFSET, 2)?;
    Ok(b.len() == 2 && le16(&b, 0) == MAGIC)
}

pub struct Ext4<'a, D: ReadAt + ?Sized> {
    disk: &'a D,
    sb: Super,
    groups: Vec<Group>,
    /// Blocks that are never excluded, sorted and merged.
    protected: Vec<Run>,
    cache: RefCell<HashMap<u64, Vec<u8>>>,
    steps: RefCell<u64>,
}

impl<'a, D: ReadAt + ?Sized> Ext4<'a, D> {
    /// Reads and checks the superblock and group descriptors of the
    /// filesystem that fills `disk` (a partition or a whole disk).
    pub fn open(disk: &'a D) -> Result<Self, String> {
        let raw = read_exact_at(disk, 1024, 1024, "ext4 superblock")?;
        let sb = parse_super(&raw, disk.size())?;
        let mut fs = Ext4 {
            disk,
            sb,
            groups: Vec::new(),
            protected: Vec::new(),
            cache: RefCell::new(HashMap::new()),
            steps: RefCell::new(0),
        };
        fs.read_groups()?;
        fs.protect_metadata()?;
        fs.check_journal()?;
        Ok(fs)
    }

    pub fn block_size(&self) -> u64 {
        self.sb.block_size
    }

    fn step(&self, n: u64) -> Result<(), String> {
        let mut s = self.steps.borrow_mut();
        *s = s.saturating_add(n);
        if *s > MAX_STEPS {
            return Err(
                "ext4: the filesystem needs more work than any sane one (looping structures?)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Reads `len` bytes at byte `offset` of the filesystem through a small
    /// cache of 64 KiB chunks.
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.sb.blocks_count * self.sb.block_size)
            .ok_or_else(|| format!("ext4: read at byte {offset} lies outside the filesystem"))?;
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = offset;
        while pos < end {
            let chunk = pos / CACHE_CHUNK;
            let at = (pos % CACHE_CHUNK) as usize;
            let mut cache = self.cache.borrow_mut();
            if !cache.contains_key(&chunk) {
                if cache.len() >= CACHE_CHUNKS {
                    cache.clear();
                }
                let data = self.disk.read_at(chunk * CACHE_CHUNK, CACHE_CHUNK as u32)?;
                cache.insert(chunk, data);
            }
            let data = &cache[&chunk];
            let n = ((end - pos) as usize).min(data.len().saturating_sub(at));
            if n == 0 {
                return Err(format!("ext4: byte {pos} is past the end of the disk"));
            }
            out.extend_from_slice(&data[at..at + n]);
            pos += n as u64;
        }
        Ok(out)
    }

    fn read_block(&self, block: u64) -> Result<Vec<u8>, String> {
        self.check_block(block, 1)?;
        self.read(block * self.sb.block_size, self.sb.block_size)
    }

    fn check_block(&self, start: u64, len: u64) -> Result<(), String> {
        if start < self.sb.first_data_block
            || start
                .checked_add(len)
                .is_none_or(|e| e > self.sb.blocks_count)
        {
            return Err(format!(
                "ext4: blocks {start}+{len} lie outside the filesystem ({} blocks)",
                self.sb.blocks_count
            ));
        }
        Ok(())
    }

    fn group_first_block(&self, g: u64) -> u64 {
        self.sb.first_data_block + g * self.sb.blocks_per_group
    }

    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.sb.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return self.sb.backup_bgs.contains(&g);
        }
        if self.sb.ro_compat & RO_SPARSE_SUPER == 0 || g == 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&base| {
            let mut n = base;
            while n < g {
                n *= base;
            }
            n == g
        })
    }

    fn descs_per_block(&self) -> u64 {
        self.sb.block_size / self.sb.desc_size
    }

    /// Block holding descriptor block `i` (the primary copy).
    fn desc_block(&self, i: u64) -> u64 {
        if self.sb.incompat & INCOMPAT_META_BG == 0 || i < self.sb.first_meta_bg {
            return self.sb.first_data_block + 1 + i;
        }
        let g = i * self.descs_per_block();
        self.group_first_block(g) + u64::from(self.has_super(g))
    }

    fn read_groups(&mut self) -> Result<(), String> {
        let dpb = self.descs_per_block();
        let blocks = self.sb.groups.div_ceil(dpb);
        let mut groups = Vec::with_capacity(self.sb.groups as usize);
        for i in 0..blocks {
            let block = self.desc_block(i);
            let data = self.read_block(block)?;
            for j in 0..dpb {
                let g = i * dpb + j;
                if g >= self.sb.groups {
                    break;
                }
                let d =
                    &data[(j * self.sb.desc_size) as usize..((j + 1) * self.sb.desc_size) as usize];
                self.check_desc(g, d)?;
                let wide = self.sb.desc_size >= 64;
                let hi = |at: usize| {
                    if wide {
                        u64::from(le32(d, at)) << 32
                    } else {
                        0
                    }
                };
                let group = Group {
                    block_bitmap: u64::from(le32(d, 0)) | hi(0x20),
                    inode_bitmap: u64::from(le32(d, 4)) | hi(0x24),
                    inode_table: u64::from(le32(d, 8)) | hi(0x28),
                    flags: le16(d, 0x12),
                    bitmap_csum: u32::from(le16(d, 0x18))
                        | if wide {
                            u32::from(le16(d, 0x38)) << 16
                        } else {
                            0
                        },
                    bitmap_csum_hi: wide,
                };
                let itable_blocks =
                    (self.sb.inodes_per_group * self.sb.inode_size).div_ceil(self.sb.block_size);
                self.check_block(group.block_bitmap, 1)
                    .and_then(|_| self.check_block(group.inode_bitmap, 1))
                    .and_then(|_| self.check_block(group.inode_table, itable_blocks))
                    .map_err(|e| format!("{e} (group {g} descriptor)"))?;
                groups.push(group);
            }
        }
        self.groups = groups;
        Ok(())
    }

    fn check_desc(&self, g: u64, d: &[u8]) -> Result<(), String> {
        let stored = le16(d, 0x1E);
        let computed = if let Some(seed) = self.sb.csum_seed {
            let mut c = crc32c(seed, &(g as u32).to_le_bytes());
            c = crc32c(c, &d[..0x1E]);
            c = crc32c(c, &[0, 0]);
            c = crc32c(c, &d[0x20..]);
            (c & 0xFFFF) as u16
        } else if self.sb.ro_compat & RO_GDT_CSUM != 0 {
            return Ok(()); // crc16 descriptors: older filesystems; fields are range-checked
        } else {
            return Ok(());
        };
        if computed != stored {
            return Err(format!("ext4: group {g} descriptor fails its checksum"));
        }
        Ok(())
    }

    fn protect(&mut self, start: u64, len: u64) {
        if len > 0 {
            self.protected.push(Run { start, len });
        }
    }

    fn protect_metadata(&mut self) -> Result<(), String> {
        let sb = &self.sb;
        let bs = sb.block_size;
        // Boot block(s) and the primary superblock.
        let first = sb.first_data_block;
        let gdt_blocks = sb.groups.div_ceil(self.descs_per_block());
        let meta_bg = sb.incompat & INCOMPAT_META_BG != 0;
        let old_gdt = if meta_bg {
            gdt_blocks.min(sb.first_meta_bg)
        } else {
            gdt_blocks
        };
        let itable_blocks = (sb.inodes_per_group * sb.inode_size).div_ceil(bs);
        let mut runs = vec![Run {
            start: 0,
            len: first + 1,
        }];
        for g in 0..sb.groups {
            if self.has_super(g) {
                let s = self.group_first_block(g);
                runs.push(Run {
                    start: s,
                    len: 1 + old_gdt + sb.reserved_gdt,
                });
            }
            let grp = &self.groups[g as usize];
            runs.push(Run {
                start: grp.block_bitmap,
                len: 1,
            });
            runs.push(Run {
                start: grp.inode_bitmap,
                len: 1,
            });
            runs.push(Run {
                start: grp.inode_table,
                len: itable_blocks,
            });
        }
        if meta_bg {
            // Each meta group keeps its descriptor block in its first, second
            // and last group.
            let dpb = self.descs_per_block();
            for i in sb.first_meta_bg..gdt_blocks {
                for g in [i * dpb, i * dpb + 1, (i + 1) * dpb - 1] {
                    if g < sb.groups {
                        runs.push(Run {
                            start: self.group_first_block(g) + u64::from(self.has_super(g)),
                            len: 1,
                        });
                    }
                }
            }
        }
        if sb.incompat & INCOMPAT_MMP != 0 && sb.mmp_block < sb.blocks_count {
            runs.push(Run {
                start: sb.mmp_block,
                len: 1,
            });
        }
        for r in runs {
            self.protect(r.start, r.len);
        }
        // The journal, data and tree blocks alike.
        if self.sb.compat & COMPAT_HAS_JOURNAL != 0 && self.sb.journal_inum != 0 {
            let inode = self.inode(self.sb.journal_inum)?;
            let (data, meta) = self.map(&inode)?;
            for m in data {
                self.protect(m.physical, m.len);
            }
            for r in meta {
                self.protect(r.start, r.len);
            }
        }
        self.protected = merge(std::mem::take(&mut self.protected));
        Ok(())
    }

    fn check_journal(&self) -> Result<(), String> {
        if self.sb.incompat & INCOMPAT_RECOVER == 0 {
            return Ok(());
        }
        const BUSY: &str = "ext4: the journal holds transactions not yet written back (the filesystem was in use at the snapshot and not frozen), so its bitmaps and inodes may be out of date; freeze the guest's filesystems for the snapshot";
        if self.sb.compat & COMPAT_HAS_JOURNAL == 0 || self.sb.journal_inum == 0 {
            return Err(BUSY.into());
        }
        let inode = self.inode(self.sb.journal_inum)?;
        let (data, _) = self.map(&inode)?;
        let first = data
            .iter()
            .find(|m| m.logical == 0)
            .ok_or("ext4: the journal has no first block")?;
        let jsb = self.read_block(first.physical)?;
        if be32(&jsb, 0) != JOURNAL_MAGIC || !matches!(be32(&jsb, 4), 3 | 4) {
            return Err("ext4: the journal superblock is damaged".into());
        }
        // s_start = 0: every transaction has been written back.
        if be32(&jsb, 0x1C) != 0 {
            return Err(BUSY.into());
        }
        Ok(())
    }

    fn inode(&self, ino: u32) -> Result<Inode, String> {
        let ino64 = u64::from(ino);
        if ino == 0 || ino64 > self.sb.inodes_count {
            return Err(format!("ext4: inode {ino} does not exist"));
        }
        let g = (ino64 - 1) / self.sb.inodes_per_group;
        let index = (ino64 - 1) % self.sb.inodes_per_group;
        let group = self
            .groups
            .get(g as usize)
            .ok_or_else(|| format!("ext4: inode {ino} lies in a missing group"))?;
        let at = group.inode_table * self.sb.block_size + index * self.sb.inode_size;
        let raw = self.read(at, self.sb.inode_size)?;
        if let Some(seed) = self.sb.csum_seed {
            self.check_inode(ino, &raw, seed)?;
        }
        let mut block = [0u8; 60];
        block.copy_from_slice(&raw[0x28..0x28 + 60]);
        Ok(Inode {
            mode: le16(&raw, 0),
            flags: le32(&raw, 0x20),
            links: le16(&raw, 0x1A),
            block,
        })
    }

    fn check_inode(&self, ino: u32, raw: &[u8], seed: u32) -> Result<(), String> {
        let extra = if raw.len() > 128 {
            u64::from(le16(raw, 0x80))
        } else {
            0
        };
        let has_hi = raw.len() > 128 && extra >= 4;
        let mut copy = raw.to_vec();
        copy[0x7C..0x7E].fill(0);
        if has_hi {
            copy[0x82..0x84].fill(0);
        }
        let mut c = crc32c(seed, &ino.to_le_bytes());
        c = crc32c(c, &raw[0x64..0x68]);
        c = crc32c(c, &copy);
        let stored = u32::from(le16(raw, 0x7C))
            | if has_hi {
                u32::from(le16(raw, 0x82)) << 16
            } else {
                0
            };
        let ok = if has_hi {
            c == stored
        } else {
            c & 0xFFFF == stored
        };
        if !ok {
            return Err(format!("ext4: inode {ino} fails its checksum"));
        }
        Ok(())
    }

    /// A file's data blocks (with logical positions) and the tree or
    /// indirect blocks that map them.
    fn map(&self, inode: &Inode) -> Result<(Vec<Mapped>, Vec<Run>), String> {
        let mut data = Vec::new();
        let mut meta = Vec::new();
        if inode.flags & INODE_FLAG_INLINE_DATA != 0 {
            return Ok((data, meta));
        }
        if inode.flags & INODE_FLAG_EXTENTS != 0 {
            self.extent_node(&inode.block, None, &mut data, &mut meta)?;
        } else {
            let ptr = |i: usize| u64::from(le32(&inode.block, i * 4));
            let per = self.sb.block_size / 4;
            for i in 0..12 {
                self.map_indirect(ptr(i), 0, i as u64, &mut data, &mut meta)?;
            }
            let mut logical = 12u64;
            let mut span = per;
            for (i, level) in [(12, 1), (13, 2), (14, 3)] {
                self.map_indirect(ptr(i), level, logical, &mut data, &mut meta)?;
                logical = logical.saturating_add(span);
                span = span.saturating_mul(per);
            }
        }
        Ok((data, meta))
    }

    fn extent_node(
        &self,
        node: &[u8],
        expect_depth: Option<u16>,
        data: &mut Vec<Mapped>,
        meta: &mut Vec<Run>,
    ) -> Result<(), String> {
        self.step(1)?;
        if node.len() < 12 || le16(node, 0) != EXTENT_MAGIC {
            return Err("ext4: extent tree node has a bad magic".into());
        }
        let entries = u64::from(le16(node, 2));
        let max = u64::from(le16(node, 4));
        let depth = le16(node, 6);
        if entries > max || 12 + 12 * max > node.len() as u64 || depth > MAX_EXTENT_DEPTH {
            return Err("ext4: extent tree node header is damaged".into());
        }
        if expect_depth.is_some_and(|d| d != depth) {
            return Err("ext4: extent tree depth is inconsistent".into());
        }
        for e in 0..entries as usize {
            let at = 12 + 12 * e;
            let logical = u64::from(le32(node, at));
            if depth == 0 {
                let raw_len = u64::from(le16(node, at + 4));
                let len = if raw_len > 32768 {
                    raw_len - 32768
                } else {
                    raw_len
                };
                let start = (u64::from(le16(node, at + 6)) << 32) | u64::from(le32(node, at + 8));
                if len == 0 {
                    continue;
                }
                self.check_block(start, len)?;
                self.step(1)?;
                data.push(Mapped {
                    logical,
                    physical: start,
                    len,
                });
            } else {
                let child = (u64::from(le16(node, at + 8)) << 32) | u64::from(le32(node, at + 4));
                let block = self.read_block(child)?;
                meta.push(Run {
                    start: child,
                    len: 1,
                });
                self.extent_node(&block, Some(depth - 1), data, meta)?;
            }
        }
        Ok(())
    }

    fn map_indirect(
        &self,
        block: u64,
        level: u32,
        logical: u64,
        data: &mut Vec<Mapped>,
        meta: &mut Vec<Run>,
    ) -> Result<(), String> {
        if block == 0 {
            return Ok(());
        }
        self.step(1)?;
        if level == 0 {
            self.check_block(block, 1)?;
            match data.last_mut() {
                Some(last)
                    if last.physical + last.len == block && last.logical + last.len == logical =>
                {
                    last.len += 1
                }
                _ => data.push(Mapped {
                    logical,
                    physical: block,
                    len: 1,
                }),
            }
            return Ok(());
        }
        let bytes = self.read_block(block)?;
        meta.push(Run {
            start: block,
            len: 1,
        });
        let per = self.sb.block_size / 4;
        let span = per.saturating_pow(level - 1);
        for i in 0..per {
            let child = u64::from(le32(&bytes, (i * 4) as usize));
            self.map_indirect(
                child,
                level - 1,
                logical.saturating_add(i.saturating_mul(span)),
                data,
                meta,
            )?;
        }
        Ok(())
    }

    /// Entries of a directory as (name, inode).
    fn read_dir(&self, inode: &Inode) -> Result<Vec<(Vec<u8>, u32)>, String> {
        let mut out = Vec::new();
        if inode.flags & INODE_FLAG_INLINE_DATA != 0 {
            // Entries after the 4-byte parent inode; any that spill into an
            // extended attribute are not seen (their files are kept).
            self.parse_dirents(&inode.block[4..], &mut out)?;
            return Ok(out);
        }
        let (data, _) = self.map(inode)?;
        let total: u64 = data.iter().map(|m| m.len).sum();
        if total.saturating_mul(self.sb.block_size) > MAX_DIR_BYTES {
            return Err("ext4: a directory is larger than 256 MiB".into());
        }
        for m in data {
            for b in 0..m.len {
                let block = self.read_block(m.physical + b)?;
                self.parse_dirents(&block, &mut out)?;
            }
        }
        Ok(out)
    }

    fn parse_dirents(&self, b: &[u8], out: &mut Vec<(Vec<u8>, u32)>) -> Result<(), String> {
        let mut at = 0usize;
        while at + 8 <= b.len() {
            self.step(1)?;
            let ino = le32(b, at);
            let rec_len = usize::from(le16(b, at + 4));
            let name_len = usize::from(b[at + 6]);
            if rec_len < 8 || at + rec_len > b.len() || 8 + name_len > rec_len {
                // Inline directories end in zeros; block directories must not.
                if b[at..].iter().all(|&x| x == 0) {
                    break;
                }
                return Err("ext4: a directory entry is damaged".into());
            }
            if ino != 0 && name_len > 0 {
                let name = &b[at + 8..at + 8 + name_len];
                if name != b"." && name != b".." {
                    out.push((name.to_vec(), ino));
                }
            }
            at += rec_len;
        }
        Ok(())
    }

    fn lookup(&self, path: &str) -> Result<Option<(u32, Inode)>, String> {
        let mut ino = ROOT_INO;
        let mut inode = self.inode(ino)?;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !inode.is_dir() {
                return Ok(None);
            }
            let Some((_, next)) = self
                .read_dir(&inode)?
                .into_iter()
                .find(|(name, _)| name == part.as_bytes())
            else {
                return Ok(None);
            };
            ino = next;
            inode = self.inode(ino)?;
        }
        Ok(Some((ino, inode)))
    }

    /// Free blocks per the block bitmaps, less the protected set.
    pub fn free_blocks(&self) -> Result<Vec<Run>, String> {
        let mut free = Vec::new();
        let bits = self.sb.blocks_per_group;
        for (g, group) in self.groups.iter().enumerate() {
            let g = g as u64;
            let first = self.group_first_block(g);
            let count = bits.min(self.sb.blocks_count - first);
            let uninit = group.flags & BG_BLOCK_UNINIT != 0
                && self.sb.ro_compat & (RO_GDT_CSUM | RO_METADATA_CSUM) != 0;
            if uninit {
                free.push(Run {
                    start: first,
                    len: count,
                });
                continue;
            }
            let bitmap = self.read_block(group.block_bitmap)?;
            if let Some(seed) = self.sb.csum_seed {
                let c = crc32c(seed, &bitmap[..(bits / 8) as usize]);
                let ok = if group.bitmap_csum_hi {
                    c == group.bitmap_csum
                } else {
                    c & 0xFFFF == group.bitmap_csum
                };
                if !ok {
                    return Err(format!(
                        "ext4: block bitmap of group {g} fails its checksum"
                    ));
                }
            }
            let mut i = 0u64;
            while i < count {
                if bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                    i += 1;
                    continue;
                }
                let s = i;
                while i < count && bitmap[(i / 8) as usize] & (1 << (i % 8)) == 0 {
                    i += 1;
                }
                push_run(&mut free, first + s, i - s);
            }
        }
        Ok(subtract(free, &self.protected))
    }

    /// Data blocks of the swap files among `paths` (regular files whose
    /// first page carries the swap signature), all but the header page.
    pub fn swap_files(&self, paths: &[String]) -> Result<Vec<Run>, String> {
        let mut out = Vec::new();
        for path in paths {
            let Some((_, inode)) = self.lookup(path)? else {
                continue;
            };
            if !inode.is_file() {
                continue;
            }
            let (data, _) = self.map(&inode)?;
            let Some(page) = self.swap_page(&data)? else {
                continue;
            };
            let keep = page.div_ceil(self.sb.block_size);
            for m in data {
                let skip = keep.saturating_sub(m.logical).min(m.len);
                if skip < m.len {
                    out.push(Run {
                        start: m.physical + skip,
                        len: m.len - skip,
                    });
                }
            }
        }
        Ok(subtract(merge(out), &self.protected))
    }

    fn swap_page(&self, data: &[Mapped]) -> Result<Option<u64>, String> {
        let bs = self.sb.block_size;
        for page in [4096u64, 8192, 16384, 65536] {
            // The signature ends the first page; the page itself may have
            // holes (its zero parts), so look the block up by position.
            let at = page - crate::swap::SIGNATURE.len() as u64;
            let logical = at / bs;
            let Some(m) = data
                .iter()
                .find(|m| (m.logical..m.logical + m.len).contains(&logical))
            else {
                continue;
            };
            let byte = (m.physical + (logical - m.logical)) * bs + at % bs;
            if self.read(byte, crate::swap::SIGNATURE.len() as u64)? == crate::swap::SIGNATURE {
                return Ok(Some(page));
            }
        }
        Ok(None)
    }

    /// Data blocks of the regular files matching `patterns` (a matching
    /// directory covers every file below it). Directories' own blocks and
    /// all metadata are kept.
    pub fn matching_files(&self, patterns: &[Pattern]) -> Result<Vec<Run>, String> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let root = self.inode(ROOT_INO)?;
        self.walk(&root, &mut Vec::new(), patterns, false, &mut seen, &mut out)?;
        Ok(subtract(merge(out), &self.protected))
    }

    fn walk(
        &self,
        dir: &Inode,
        path: &mut Vec<String>,
        patterns: &[Pattern],
        covered: bool,
        seen: &mut HashSet<u32>,
        out: &mut Vec<Run>,
    ) -> Result<(), String> {
        if path.len() > MAX_DEPTH {
            return Err("ext4: directories nest deeper than 256 levels".into());
        }
        for (name, ino) in self.read_dir(dir)? {
            let name = String::from_utf8_lossy(&name).into_owned();
            path.push(name);
            let hit = covered || patterns.iter().any(|p| p.matches(path, false));
            let inode = self.inode(ino)?;
            // Files with more than one link are kept: another name may lie
            // outside the patterns.
            if inode.is_file() && hit && inode.links <= 1 {
                let (data, _) = self.map(&inode)?;
                out.extend(data.iter().map(|m| Run {
                    start: m.physical,
                    len: m.len,
                }));
            } else if inode.is_dir()
                && (hit || patterns.iter().any(|p| p.may_match_below(path, false)))
            {
                if !seen.insert(ino) {
                    return Err(format!("ext4: directory inode {ino} is reached twice"));
                }
                self.walk(&inode, path, patterns, hit, seen, out)?;
            }
            path.pop();
        }
        Ok(())
    }

    /// Byte ranges within the filesystem of a list of block runs.
    pub fn to_extents(&self, runs: &[Run]) -> Vec<Extent> {
        runs.iter()
            .map(|r| Extent {
                offset: r.start * self.sb.block_size,
                length: r.len * self.sb.block_size,
            })
            .collect()
    }
}

fn parse_super(b: &[u8], disk_size: u64) -> Result<Super, String> {
    if le16(b, 0x38) != MAGIC {
        return Err("ext4: no superblock magic".into());
    }
    let incompat = le32(b, 0x60);
    let ro_compat = le32(b, 0x64);
    let compat = le32(b, 0x5C);
    let rev = le32(b, 0x4C);
    if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        return Err("ext4: this is an external journal device, not a filesystem".into());
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(format!(
            "ext4: unsupported incompatible features {:#x}",
            incompat & !INCOMPAT_KNOWN
        ));
    }
    if ro_compat & RO_BIGALLOC != 0 {
        return Err("ext4: bigalloc filesystems are not supported".into());
    }
    if ro_compat & RO_SHARED_BLOCKS != 0 {
        return Err("ext4: filesystems with shared blocks are not supported".into());
    }
    if ro_compat & !RO_KNOWN != 0 {
        return Err(format!(
            "ext4: unsupported read-only features {:#x}",
            ro_compat & !RO_KNOWN
        ));
    }
    if le16(b, 0x3A) & STATE_ERRORS != 0 {
        return Err("ext4: the filesystem is marked as having errors (run e2fsck)".into());
    }
    let csum_seed = if ro_compat & RO_METADATA_CSUM != 0 {
        if b[0x175] != 1 {
            return Err("ext4: unknown metadata checksum type".into());
        }
        if crc32c(!0, &b[..0x3FC]) != le32(b, 0x3FC) {
            return Err("ext4: the superblock fails its checksum".into());
        }
        Some(if incompat & INCOMPAT_CSUM_SEED != 0 {
            le32(b, 0x270)
        } else {
            crc32c(!0, &b[0x68..0x78])
        })
    } else {
        None
    };
    let log = le32(b, 0x18);
    if log > 6 {
        return Err(format!("ext4: invalid block size 2^{}", log + 10));
    }
    let block_size = 1024u64 << log;
    let wide = incompat & INCOMPAT_64BIT != 0;
    let blocks_count = u64::from(le32(b, 4))
        | if wide {
            u64::from(le32(b, 0x150)) << 32
        } else {
            0
        };
    let first_data_block = u64::from(le32(b, 0x14));
    let blocks_per_group = u64::from(le32(b, 0x20));
    let inodes_per_group = u64::from(le32(b, 0x28));
    let inodes_count = u64::from(le32(b, 0));
    let inode_size = if rev == 0 {
        128
    } else {
        u64::from(le16(b, 0x58))
    };
    let desc_size = if wide { u64::from(le16(b, 0xFE)) } else { 32 };
    if first_data_block != u64::from(block_size == 1024) {
        return Err("ext4: invalid first data block".into());
    }
    if blocks_per_group == 0
        || blocks_per_group > 8 * block_size
        || !blocks_per_group.is_multiple_of(8)
    {
        return Err(format!("ext4: invalid blocks per group {blocks_per_group}"));
    }
    if inodes_per_group == 0 || inodes_per_group > 8 * block_size {
        return Err(format!("ext4: invalid inodes per group {inodes_per_group}"));
    }
    if !inode_size.is_power_of_two() || inode_size < 128 || inode_size > block_size {
        return Err(format!("ext4: invalid inode size {inode_size}"));
    }
    if wide && (!desc_size.is_power_of_two() || !(64..=1024).contains(&desc_size)) {
        return Err(format!("ext4: invalid group descriptor size {desc_size}"));
    }
    if blocks_count <= first_data_block
        || blocks_count
            .checked_mul(block_size)
            .is_none_or(|bytes| bytes > disk_size)
    {
        return Err(format!(
            "ext4: the filesystem ({blocks_count} blocks of {block_size} bytes) is larger than its volume ({disk_size} bytes)"
        ));
    }
    let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
    if groups > MAX_GROUPS || inodes_count > groups * inodes_per_group || inodes_count < 11 {
        return Err("ext4: group or inode counts are inconsistent".into());
    }
    let inodes_per_block = block_size / inode_size;
    if !inodes_per_group.is_multiple_of(inodes_per_block) {
        return Err("ext4: inodes per group is not a whole number of blocks".into());
    }
    Ok(Super {
        block_size,
        blocks_count,
        first_data_block,
        blocks_per_group,
        inodes_per_group,
        inodes_count,
        inode_size,
        desc_size,
        compat,
        incompat,
        ro_compat,
        journal_inum: le32(b, 0xE0),
        first_meta_bg: u64::from(le32(b, 0x104)),
        reserved_gdt: u64::from(le16(b, 0xCE)).min(block_size / 4),
        backup_bgs: [u64::from(le32(b, 0x24C)), u64::from(le32(b, 0x250))],
        mmp_block: u64::from(le32(b, 0x168)) | (u64::from(le32(b, 0x16C)) << 32),
        csum_seed,
        groups,
    })
}

fn push_run(v: &mut Vec<Run>, start: u64, len: u64) {
    match v.last_mut() {
        Some(last) if last.start + last.len == start => last.len += len,
        _ => v.push(Run { start, len }),
    }
}

/// Sorts and joins overlapping or touching runs.
pub fn merge(mut runs: Vec<Run>) -> Vec<Run> {
    runs.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    for r in runs {
        let end = r.start.saturating_add(r.len);
        match out.last_mut() {
            Some(last) if r.start <= last.start + last.len => {
                last.len = last.len.max(end - last.start);
            }
            _ => out.push(r),
        }
    }
    out
}

/// `runs` (sorted, disjoint) less `holes` (sorted, disjoint).
pub fn subtract(runs: Vec<Run>, holes: &[Run]) -> Vec<Run> {
    let mut out = Vec::with_capacity(runs.len());
    let mut h = 0;
    for r in runs {
        let (mut s, e) = (r.start, r.start + r.len);
        while h < holes.len() && holes[h].start + holes[h].len <= s {
            h += 1;
        }
        let mut k = h;
        while s < e && k < holes.len() && holes[k].start < e {
            let (hs, he) = (holes[k].start, holes[k].start + holes[k].len);
            if hs > s {
                out.push(Run {
                    start: s,
                    len: hs - s,
                });
            }
            s = s.max(he);
            k += 1;
        }
        if s < e {
            out.push(Run {
                start: s,
                len: e - s,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests;
