//! NTFS through the `ntfs` crate, which reads through `Read + Seek`: the disk
//! reader is wrapped in a chunked cursor with a read budget.
//!
//! What is read: the boot sector, `$MFT` records by number, `$Bitmap` (free
//! clusters), `$LogFile`'s restart page (a volume whose log still has
//! clients, i.e. was not cleanly dismounted, is refused: its `$Bitmap` and
//! file records may be older than what a log replay will make of them),
//! `$Volume` (a dirty volume is refused), directory indexes (by walking
//! every entry) and files' non-resident `$DATA` runs, including the pieces
//! an `$ATTRIBUTE_LIST` spreads over several records. Every cluster of the
//! system files (records 0-11) is protected and taken out of any answer.

use std::io::Read;

use ntfs::structured_values::{
    NtfsAttributeList, NtfsFileName, NtfsFileNamespace, NtfsVolumeFlags,
};
use ntfs::{Ntfs, NtfsAttributeType, NtfsFile};

use crate::disk::{Cursor, ReadAt};
use crate::ext4::{Run, merge, subtract};
use crate::glob::Pattern;

/// Chunk fetches (64 KiB each) one call may make: 64 GiB of reading.
const READ_BUDGET: u32 = 1 << 20;
const MAX_DEPTH: usize = 256;
const MAX_ENTRIES: u64 = 20_000_000;
const SYSTEM_RECORDS: u64 = 12;
/// Records below this are reserved for the system.
const FIRST_USER_RECORD: u64 = 24;

pub fn detect(disk: &(impl ReadAt + ?Sized)) -> Result<bool, String> {
    let b = disk.read_at(3, 8)?;
    Ok(b == b"NTFS    ")
}

fn err(e: ntfs::NtfsError) -> String {
    format!("ntfs: {e}")
}

pub struct Volume<'a, D: ReadAt + ?Sized> {
    ntfs: Ntfs,
    st: State<'a, D>,
    protected: Vec<Run>,
}

/// The mutable part, apart from `Ntfs` which files borrow.
struct State<'a, D: ReadAt + ?Sized> {
    fs: Cursor<'a, D>,
    cluster: u64,
    clusters: u64,
    entries: u64,
}

impl<'a, D: ReadAt + ?Sized> Volume<'a, D> {
    pub fn open(disk: &'a D) -> Result<Self, String> {
        let mut fs = Cursor::new(disk).with_seek_budget(READ_BUDGET);
        let mut ntfs = Ntfs::new(&mut fs).map_err(err)?;
        let cluster = u64::from(ntfs.cluster_size());
        if ntfs.size() > disk.size() {
            return Err(format!(
                "ntfs: the volume ({} bytes) is larger than its partition ({} bytes)",
                ntfs.size(),
                disk.size()
            ));
        }
        ntfs.read_upcase_table(&mut fs).map_err(err)?;
        let clusters = ntfs.size() / cluster;
        let mut v = Volume {
            ntfs,
            st: State {
                fs,
                cluster,
                clusters,
                entries: 0,
            },
            protected: Vec::new(),
        };
        v.check_clean()?;
        v.protect_system_files()?;
        Ok(v)
    }

    pub fn cluster_size(&self) -> u64 {
        self.st.cluster
    }

    fn check_clean(&mut self) -> Result<(), String> {
        let info = self.ntfs.volume_info(&mut self.st.fs).map_err(err)?;
        if info.flags().contains(NtfsVolumeFlags::IS_DIRTY) {
            return Err("ntfs: the volume is marked dirty (run chkdsk)".into());
        }
        let page = read_data(&self.ntfs, &mut self.st, 2, 4096)?;
        if page.iter().all(|&b| b == 0xFF) {
            return Ok(()); // emptied log: nothing to replay
        }
        let unclean = "ntfs: $LogFile says the volume was not cleanly dismounted (in use at the snapshot); its bitmap and records may be out of date";
        if page.len() < 0x40 || &page[..4] != b"RSTR" {
            return Err(unclean.into());
        }
        let area = usize::from(u16::from_le_bytes([page[0x18], page[0x19]]));
        if area + 16 > page.len() {
            return Err(unclean.into());
        }
        let in_use = u16::from_le_bytes([page[area + 12], page[area + 13]]);
        let flags = u16::from_le_bytes([page[area + 14], page[area + 15]]);
        if in_use == 0xFFFF || flags & 0x2 != 0 {
            Ok(())
        } else {
            Err(unclean.into())
        }
    }

    fn protect_system_files(&mut self) -> Result<(), String> {
        let mut runs = vec![Run { start: 0, len: 1 }];
        for n in 0..SYSTEM_RECORDS {
            let file = self.ntfs.file(&mut self.st.fs, n).map_err(err)?;
            runs.extend(runs_of(&self.ntfs, &mut self.st, &file, false)?);
        }
        self.protected = merge(runs);
        Ok(())
    }

    /// Free clusters per `$Bitmap`, less the system files' clusters.
    pub fn free_clusters(&mut self) -> Result<Vec<Run>, String> {
        let clusters = self.st.clusters;
        let bytes = clusters.div_ceil(8);
        if bytes > (1u64 << 31) {
            return Err("ntfs: the bitmap is absurdly large".into());
        }
        let bitmap = read_data(&self.ntfs, &mut self.st, 6, bytes as usize)?;
        if (bitmap.len() as u64) < bytes {
            return Err("ntfs: $Bitmap is shorter than the volume".into());
        }
        let mut free: Vec<Run> = Vec::new();
        let mut i = 0u64;
        while i < clusters {
            let byte = bitmap[(i / 8) as usize];
            if byte == 0xFF && i.is_multiple_of(8) {
                i += 8;
                continue;
            }
            if byte & (1 << (i % 8)) == 0 {
                match free.last_mut() {
                    Some(last) if last.start + last.len == i => last.len += 1,
                    _ => free.push(Run { start: i, len: 1 }),
                }
            }
            i += 1;
        }
        Ok(subtract(free, &self.protected))
    }

    fn lookup(&mut self, path: &str) -> Result<Option<u64>, String> {
        let mut record = 5u64;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let dir = self.ntfs.file(&mut self.st.fs, record).map_err(err)?;
            if !dir.is_directory() {
                return Ok(None);
            }
            let index = dir.directory_index(&mut self.st.fs).map_err(err)?;
            let mut finder = index.finder();
            let found = ntfs::indexes::NtfsFileNameIndex::find(
                &mut finder,
                &self.ntfs,
                &mut self.st.fs,
                part,
            );
            match found {
                None => return Ok(None),
                Some(entry) => {
                    record = entry.map_err(err)?.file_reference().file_record_number();
                }
            }
        }
        Ok(Some(record))
    }

    /// Clusters of Windows' paging, hibernation and swap files (and any
    /// other path named): all of their unnamed `$DATA` runs. A hibernation
    /// file that holds a hibernated system ("hibr") is refused: the
    /// volume's state lives in it.
    pub fn swap_files(&mut self, paths: &[String]) -> Result<Vec<Run>, String> {
        let mut out = Vec::new();
        for path in paths {
            let Some(record) = self.lookup(path)? else {
                continue;
            };
            if record < FIRST_USER_RECORD {
                continue;
            }
            let file = self.ntfs.file(&mut self.st.fs, record).map_err(err)?;
            if file.is_directory() {
                continue;
            }
            if path.eq_ignore_ascii_case("/hiberfil.sys") {
                let head = read_data(&self.ntfs, &mut self.st, record, 4)?;
                if head.eq_ignore_ascii_case(b"hibr") {
                    return Err("ntfs: Windows is hibernated on this volume (hiberfil.sys holds a hibernated system, e.g. after a fast-startup shutdown); the volume is not consistent on disk".into());
                }
            }
            out.extend(runs_of(&self.ntfs, &mut self.st, &file, true)?);
        }
        Ok(subtract(merge(out), &self.protected))
    }

    /// Clusters of the files matching `patterns` (case-insensitively, as
    /// Windows names them); directories, system files and files with more
    /// than one name outside the DOS namespace are kept.
    pub fn matching_files(&mut self, patterns: &[Pattern]) -> Result<Vec<Run>, String> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        walk(
            &self.ntfs,
            &mut self.st,
            5,
            &mut Vec::new(),
            patterns,
            false,
            &mut seen,
            &mut out,
        )?;
        Ok(subtract(merge(out), &self.protected))
    }

    pub fn to_extents(&self, runs: &[Run]) -> Vec<crate::extent::Extent> {
        runs.iter()
            .map(|r| crate::extent::Extent {
                offset: r.start * self.st.cluster,
                length: r.len * self.st.cluster,
            })
            .collect()
    }
}

impl<D: ReadAt + ?Sized> State<'_, D> {
    fn count(&mut self) -> Result<(), String> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(
                "ntfs: the volume needs more work than any sane one (looping structures?)".into(),
            );
        }
        Ok(())
    }
}

/// Up to `max` bytes of the unnamed `$DATA` of record `n`.
fn read_data<D: ReadAt + ?Sized>(
    ntfs: &Ntfs,
    st: &mut State<'_, D>,
    n: u64,
    max: usize,
) -> Result<Vec<u8>, String> {
    let file = ntfs.file(&mut st.fs, n).map_err(err)?;
    let item = file
        .data(&mut st.fs, "")
        .ok_or_else(|| format!("ntfs: record {n} has no data"))?
        .map_err(err)?;
    let attr = item.to_attribute().map_err(err)?;
    let len = attr.value_length().min(max as u64) as usize;
    let value = attr.value(&mut st.fs).map_err(err)?;
    let mut buf = vec![0u8; len];
    value
        .attach(&mut st.fs)
        .read_exact(&mut buf)
        .map_err(|e| format!("ntfs: record {n}: {e}"))?;
    Ok(buf)
}

/// Cluster runs of the non-resident attribute values of `file` (only the
/// unnamed `$DATA` when `data_only`), including pieces kept in other
/// records through an `$ATTRIBUTE_LIST`.
fn runs_of<D: ReadAt + ?Sized>(
    ntfs: &Ntfs,
    st: &mut State<'_, D>,
    file: &NtfsFile<'_>,
    data_only: bool,
) -> Result<Vec<Run>, String> {
    let mut out = Vec::new();
    let mut list = None;
    for attr in file.attributes_raw() {
        let attr = attr.map_err(err)?;
        let ty = attr.ty().map_err(err)?;
        if ty == NtfsAttributeType::AttributeList {
            list = Some(
                attr.structured_value::<_, NtfsAttributeList>(&mut st.fs)
                    .map_err(err)?,
            );
            continue;
        }
        if data_only && (ty != NtfsAttributeType::Data || !attr.name().map_err(err)?.is_empty()) {
            continue;
        }
        if !attr.is_resident() {
            push_runs(st, &attr, &mut out)?;
        }
    }
    if let Some(list) = list {
        let mut entries = list.entries();
        while let Some(entry) = entries.next(&mut st.fs) {
            let entry = entry.map_err(err)?;
            st.count()?;
            let ty = entry.ty().map_err(err)?;
            if data_only && (ty != NtfsAttributeType::Data || !entry.name().is_empty()) {
                continue;
            }
            if entry.base_file_reference().file_record_number() == file.file_record_number() {
                continue; // seen above
            }
            let other = entry.to_file(ntfs, &mut st.fs).map_err(err)?;
            let attr = entry.to_attribute(&other).map_err(err)?;
            if !attr.is_resident() {
                push_runs(st, &attr, &mut out)?;
            }
        }
    }
    Ok(out)
}

fn push_runs<D: ReadAt + ?Sized>(
    st: &mut State<'_, D>,
    attr: &ntfs::NtfsAttribute<'_, '_>,
    out: &mut Vec<Run>,
) -> Result<(), String> {
    let runs = attr.non_resident_value_runs(&mut st.fs)?;
    for (position, size) in runs {
        st.count()?;
        let (start, len) = (position / st.cluster, size.div_ceil(st.cluster));
        if position % st.cluster != 0 || start.checked_add(len).is_none_or(|e| e > st.clusters) {
            return Err(format!(
                "ntfs: a data run ({position}+{size}) lies outside the volume"
            ));
        }
        out.push(Run { start, len });
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn walk<D: ReadAt + ?Sized>(
    ntfs: &Ntfs,
    st: &mut State<'_, D>,
    dir_record: u64,
    path: &mut Vec<String>,
    patterns: &[Pattern],
    covered: bool,
    seen: &mut std::collections::HashSet<u64>,
    out: &mut Vec<Run>,
) -> Result<(), String> {
    if path.len() > MAX_DEPTH {
        return Err("ntfs: directories nest deeper than 256 levels".into());
    }
    let mut children = Vec::new();
    {
        let dir = ntfs.file(&mut st.fs, dir_record).map_err(err)?;
        let index = dir.directory_index(&mut st.fs).map_err(err)?;
        let mut entries = index.entries();
        while let Some(entry) = entries.next(&mut st.fs) {
            let entry = entry.map_err(err)?;
            st.count()?;
            let Some(key) = entry.key() else { continue };
            let key: NtfsFileName = key.map_err(err)?;
            if key.namespace() == NtfsFileNamespace::Dos {
                continue;
            }
            let name = key.name().to_string_lossy();
            let record = entry.file_reference().file_record_number();
            children.push((name, record, key.is_directory()));
        }
    }
    for (name, record, is_dir) in children {
        if record < FIRST_USER_RECORD || record == dir_record {
            continue;
        }
        path.push(name);
        let hit = covered || patterns.iter().any(|p| p.matches(path, true));
        if is_dir {
            if hit || patterns.iter().any(|p| p.may_match_below(path, true)) {
                if !seen.insert(record) {
                    return Err(format!("ntfs: directory record {record} is reached twice"));
                }
                walk(ntfs, st, record, path, patterns, hit, seen, out)?;
            }
        } else if hit {
            let file = ntfs.file(&mut st.fs, record).map_err(err)?;
            if !file.is_directory() && single_name(&mut st.fs, &file)? {
                out.extend(runs_of(ntfs, st, &file, true)?);
            }
        }
        path.pop();
    }
    Ok(())
}

/// Whether `file` has one name (a DOS short name beside a long one does not
/// count): a hard link elsewhere would share the data.
fn single_name<D: ReadAt + ?Sized>(
    fs: &mut Cursor<'_, D>,
    file: &NtfsFile<'_>,
) -> Result<bool, String> {
    if file.hard_link_count() <= 1 {
        return Ok(true);
    }
    let mut names = 0;
    for attr in file.attributes_raw() {
        let attr = attr.map_err(err)?;
        if attr.ty().map_err(err)? != NtfsAttributeType::FileName {
            continue;
        }
        let name = attr.structured_value::<_, NtfsFileName>(fs).map_err(err)?;
        if name.namespace() != NtfsFileNamespace::Dos {
            names += 1;
        }
    }
    Ok(names <= 1)
}

trait RunsOf {
    fn non_resident_value_runs<T: std::io::Read + std::io::Seek>(
        &self,
        fs: &mut T,
    ) -> Result<Vec<(u64, u64)>, String>;
}

impl RunsOf for ntfs::NtfsAttribute<'_, '_> {
    /// (byte position, allocated bytes) of each non-sparse data run.
    fn non_resident_value_runs<T: std::io::Read + std::io::Seek>(
        &self,
        fs: &mut T,
    ) -> Result<Vec<(u64, u64)>, String> {
        let mut out = Vec::new();
        match self.value(fs).map_err(err)? {
            ntfs::attribute_value::NtfsAttributeValue::NonResident(v) => {
                for run in v.data_runs() {
                    let run = run.map_err(err)?;
                    if let Some(pos) = run.data_position().value() {
                        out.push((pos.get(), run.allocated_size()));
                    }
                    if out.len() > MAX_ENTRIES as usize {
                        return Err("ntfs: too many data runs".into());
                    }
                }
            }
            ntfs::attribute_value::NtfsAttributeValue::Resident(_) => {}
            ntfs::attribute_value::NtfsAttributeValue::AttributeListNonResident(_) => {
                return Err("ntfs: unexpected attribute-list value".into());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
