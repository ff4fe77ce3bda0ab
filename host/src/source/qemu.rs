//! QEMU/KVM VMs (seed steps 6, 8, 9, 11): live point-in-time snapshots by
//! image fleecing, and changed block tracking by persistent dirty bitmaps.
//!
//! Snapshot (all disks of a VM at one instant, in one QMP `transaction`):
//! a temporary qcow2 "fleece" node backed by the disk node, and a
//! `blockdev-backup sync=none` job from the disk into it, which copies old
//! data aside before the guest overwrites it. The fleece node is exported
//! read-only over NBD and read with `base:allocation`.
//!
//! CBT: each job keeps one recording bitmap per disk, `arca.<job>.<seq>`,
//! created at the snapshot of the restore point it counts from (the manifest
//! records its name). The same transaction disables it (freezing "changed
//! since the previous point") and adds `<seq+1>`. After success the frozen
//! bitmap is removed; after failure it is re-enabled and the new one merged
//! back into it and removed, so no change is ever lost and the names still
//! match the newest restore point. A missing or inconsistent bitmap (QEMU
//! killed) means a digest-based incremental, said in the report.
//!
//! Everything arca adds to QEMU is named `arca-*-<pid>-...`; whatever a
//! killed arca left behind is removed by the next session.

use super::image_file::process_alive;
use super::nbd::{NbdClient, NbdDisk, STATE_DIRTY};
use super::qmp::{Qmp, QmpError};
use super::{Changes, DiskRead};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Nbd(#[from] super::nbd::NbdError),
    #[error("hypervisor '{hypervisor}': block node '{node}' not found (nodes: {known})")]
    NoSuchNode {
        hypervisor: String,
        node: String,
        known: String,
    },
    #[error("fleece image {path}: {message}")]
    Fleece { path: PathBuf, message: String },
}

/// How to reach one QEMU (qemu-system or qemu-storage-daemon).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hypervisor {
    pub name: String,
    pub qmp: PathBuf,
    /// The socket of QEMU's NBD server (`--nbd-server` / `nbd-server-start`).
    pub nbd: PathBuf,
}

/// One disk to snapshot: its block node and what the newest restore point
/// says about CBT.
pub struct DiskRequest {
    pub node: String,
    /// `cbt_bitmap` of the newest restore point of this disk, if any.
    pub previous_bitmap: Option<String>,
    /// That restore point's id: what the bitmap's changes count from.
    pub previous_point: String,
}

/// The names of one disk's snapshot objects in QEMU. All derive from one
/// tag, `<pid>-<session>-<disk>`, so a later session can find what a killed
/// one left behind (`owner_pid`).
#[derive(Clone)]
struct Names {
    /// The qcow2 node that keeps the snapshot's old data, backed by the disk.
    fleece: String,
    /// The `file` node under it.
    file: String,
    /// The `blockdev-create` job that makes the file and formats it.
    create: String,
    /// The `blockdev-backup sync=none` job that copies old data aside.
    backup: String,
    export: String,
}

impl Names {
    fn new(tag: &str) -> Names {
        Names {
            fleece: format!("arca-fleece-{tag}"),
            file: format!("arca-fleecefile-{tag}"),
            create: format!("arca-create-{tag}"),
            backup: format!("arca-job-{tag}"),
            export: format!("arca-snap-{tag}"),
        }
    }
}

/// A CBT bitmap that the snapshot freezes: it counts the changes since the
/// snapshot of restore point `since`.
struct Frozen {
    bitmap: String,
    since: String,
}

/// A disk's snapshot objects, named before they exist: from planning on,
/// the fleece node exists; after the transaction, the backup job too.
struct Planned {
    node: String,
    names: Names,
    fleece_file: PathBuf,
    /// When CBT is used.
    frozen: Option<Frozen>,
    /// The bitmap this snapshot starts.
    started: String,
}

impl Planned {
    fn frozen_bitmap(&self) -> Option<&str> {
        self.frozen.as_ref().map(|f| f.bitmap.as_str())
    }
}

struct SnapDisk {
    plan: Planned,
    reader: Arc<NbdDisk>,
    changes: Option<Changes>,
}

/// Exports a disk's frozen view over NBD, connects to it, and reads the
/// changed ranges of its frozen bitmap, if any.
fn attach(
    qmp: &mut Qmp,
    hypervisor: &Hypervisor,
    p: &Planned,
) -> Result<(Arc<NbdDisk>, Option<Changes>), QemuError> {
    let export = &p.names.export;
    let mut args = json!({
        "type": "nbd", "id": export, "node-name": p.names.fleece, "name": export, "writable": false
    });
    let mut contexts = vec!["base:allocation".to_owned()];
    if let Some(f) = p.frozen_bitmap() {
        args["bitmaps"] = json!([f]);
        contexts.push(format!("qemu:dirty-bitmap:{f}"));
    }
    qmp.execute("block-export-add", args)?;
    let refs: Vec<&str> = contexts.iter().map(String::as_str).collect();
    let client = NbdClient::connect(&hypervisor.nbd, export, &refs)?;
    let changes = match &p.frozen {
        Some(f) => Some(Changes {
            since: f.since.clone(),
            extents: client.ranges(
                &format!("qemu:dirty-bitmap:{}", f.bitmap),
                STATE_DIRTY,
                true,
            )?,
        }),
        None => None,
    };
    Ok((Arc::new(NbdDisk::new(client)), changes))
}

/// A live snapshot of a QEMU VM; cleaned up when dropped, with each disk's
/// bitmaps rotated forward (success) or back (failure or never reported).
pub struct QemuSnapshot {
    hypervisor: Hypervisor,
    disks: Vec<SnapDisk>,
    succeeded: Mutex<Vec<bool>>,
    pub notices: Vec<String>,
}

fn bitmap_name(job: &str, seq: u64) -> String {
    format!("arca.{job}.{seq}")
}

fn bitmap_seq(job: &str, name: &str) -> Option<u64> {
    name.strip_prefix(&format!("arca.{job}."))?.parse().ok()
}

/// Names of our objects carry the pid, so orphans of dead processes can be found.
fn owner_pid(name: &str) -> Option<i32> {
    name.split('-').nth(2)?.parse().ok()
}

impl QemuSnapshot {
    pub fn take(
        hypervisor: &Hypervisor,
        job: &str,
        session: u64,
        disks: &[DiskRequest],
        work_dir: &Path,
    ) -> Result<Self, QemuError> {
        let mut qmp = Qmp::connect(&hypervisor.qmp)?;
        let (mut notices, nodes) = sweep(&mut qmp, hypervisor, job, work_dir)?;
        std::fs::create_dir_all(work_dir).map_err(|e| QemuError::Fleece {
            path: work_dir.to_owned(),
            message: e.to_string(),
        })?;

        let mut planned = Vec::new();
        let mut actions = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let tag = format!("{}-{session}-{i}", std::process::id());
            let plan = plan_disk(&mut qmp, hypervisor, job, d, &nodes, &tag, work_dir);
            match plan {
                Ok((p, mut a, mut n)) => {
                    planned.push(p);
                    actions.append(&mut a);
                    notices.append(&mut n);
                }
                Err(e) => {
                    undo_planned(&mut qmp, &planned);
                    return Err(e);
                }
            }
        }
        // The snapshot instant of every disk of the VM.
        if let Err(e) = qmp.execute("transaction", json!({ "actions": actions })) {
            undo_planned(&mut qmp, &planned);
            return Err(e.into());
        }

        let mut snap = QemuSnapshot {
            hypervisor: hypervisor.clone(),
            disks: Vec::new(),
            succeeded: Mutex::new(vec![false; planned.len()]),
            notices,
        };
        // From here on, dropping `snap` cleans up what exists: every disk of
        // the transaction has a backup job and a fleece node, so each is
        // recorded, attached or not, before any error returns.
        let detached = |plan| SnapDisk {
            plan,
            reader: Arc::new(NbdDisk::detached()),
            changes: None,
        };
        let mut planned = planned.into_iter();
        while let Some(p) = planned.next() {
            match attach(&mut qmp, hypervisor, &p) {
                Ok((reader, changes)) => snap.disks.push(SnapDisk {
                    plan: p,
                    reader,
                    changes,
                }),
                Err(e) => {
                    snap.disks.push(detached(p));
                    snap.disks.extend(planned.map(detached));
                    return Err(e);
                }
            }
        }
        Ok(snap)
    }

    pub fn disk(&self, i: usize) -> Arc<dyn DiskRead> {
        self.disks[i].reader.clone()
    }

    pub fn changes(&self, i: usize) -> Option<Changes> {
        self.disks[i].changes.clone()
    }

    /// The NBD server socket and export that serve disk `i`'s snapshot.
    pub fn export(&self, i: usize) -> (PathBuf, String) {
        (
            self.hypervisor.nbd.clone(),
            self.disks[i].plan.names.export.clone(),
        )
    }

    /// The bitmap to record in disk `i`'s restore point.
    pub fn started_bitmap(&self, i: usize) -> String {
        self.disks[i].plan.started.clone()
    }

    /// Marks disk `i`'s restore point as committed.
    pub fn task_succeeded(&self, i: usize) {
        self.succeeded.lock().expect("snapshot lock")[i] = true;
    }

    fn cleanup(&mut self) -> Result<(), QemuError> {
        let succeeded = self.succeeded.lock().expect("snapshot lock").clone();
        // Readers go first: an export with a connected client cannot be deleted.
        for d in &mut self.disks {
            d.reader = Arc::new(NbdDisk::detached());
        }
        let mut qmp = Qmp::connect(&self.hypervisor.qmp)?;
        // One disk's error does not stop the others' cleanup; the first is
        // reported.
        let mut first_error = None;
        for (d, ok) in self.disks.iter().map(|d| &d.plan).zip(succeeded) {
            remove_snapshot_objects(&mut qmp, &d.names, &d.fleece_file);
            let bitmaps = if ok {
                match d.frozen_bitmap() {
                    Some(f) => qmp
                        .execute(
                            "block-dirty-bitmap-remove",
                            json!({ "node": d.node, "name": f }),
                        )
                        .map(drop)
                        .map_err(QemuError::from),
                    None => Ok(()),
                }
            } else {
                roll_back_bitmaps(&mut qmp, &d.node, d.frozen_bitmap(), &d.started)
            };
            if let Err(e) = bitmaps {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for QemuSnapshot {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            tracing::warn!(
                "cleanup of the snapshot on hypervisor '{}': {e}",
                self.hypervisor.name
            );
        }
    }
}

fn remove_snapshot_objects(qmp: &mut Qmp, names: &Names, fleece_file: &Path) {
    let (export, job) = (&names.export, &names.backup);
    // Hard mode: a reader that did not disconnect must not keep the export.
    if qmp
        .execute("block-export-del", json!({ "id": export, "mode": "hard" }))
        .is_ok()
    {
        let _ = qmp.wait_event(
            "BLOCK_EXPORT_DELETED",
            |d| d["id"] == *export,
            EVENT_TIMEOUT,
        );
    }
    if qmp
        .execute("block-job-cancel", json!({ "device": job, "force": true }))
        .is_ok()
    {
        let _ = qmp.wait_event(
            "JOB_STATUS_CHANGE",
            |d| d["id"] == *job && d["status"] == "null",
            EVENT_TIMEOUT,
        );
    }
    remove_fleece(qmp, names, fleece_file);
}

/// Removes a fleece node, its file node and its file (what `create_fleece`
/// made), whichever of them exist.
fn remove_fleece(qmp: &mut Qmp, names: &Names, fleece_file: &Path) {
    // The file goes first: QEMU may keep it open, but a kill between the
    // steps below must not leave a file (possibly gigabytes of the guest's
    // old data) that no QEMU object names any more.
    let _ = std::fs::remove_file(fleece_file);
    let _ = qmp.execute("blockdev-del", json!({ "node-name": names.fleece }));
    let _ = qmp.execute("blockdev-del", json!({ "node-name": names.file }));
}

/// Ends a create job left behind (`create_fleece` failed, or its session
/// was killed): one that still runs (timed out) is cancelled, one that
/// concluded is dismissed, so that its file node can go. Errors only say
/// it is not there. A snapshot that was made has none: `run_job` dismissed it.
fn end_create_job(qmp: &mut Qmp, names: &Names) {
    if qmp
        .execute("job-cancel", json!({ "id": names.create }))
        .is_ok()
    {
        let _ = qmp.wait_event(
            "JOB_STATUS_CHANGE",
            |d| d["id"] == names.create.as_str() && d["status"] == "concluded",
            EVENT_TIMEOUT,
        );
    }
    let _ = qmp.execute("job-dismiss", json!({ "id": names.create }));
}

/// Where a snapshot's fleece file lives; the sweep finds leftovers by it.
fn fleece_path(work_dir: &Path, tag: &str) -> PathBuf {
    work_dir.join(format!("arca-fleece-{tag}.qcow2"))
}

/// The tag of a fleece file's name (`fleece_path`'s inverse).
fn fleece_tag(file_name: &str) -> Option<&str> {
    file_name
        .strip_prefix("arca-fleece-")
        .and_then(|n| n.strip_suffix(".qcow2"))
}

fn undo_planned(qmp: &mut Qmp, planned: &[Planned]) {
    for p in planned {
        remove_fleece(qmp, &p.names, &p.fleece_file);
    }
}

/// Plans one disk's snapshot: settles its CBT bitmaps, creates its fleece
/// node, and returns the transaction actions of its snapshot instant and
/// the notices for the report. On error, nothing of this disk is left.
fn plan_disk(
    qmp: &mut Qmp,
    hypervisor: &Hypervisor,
    job: &str,
    d: &DiskRequest,
    nodes: &[Value],
    tag: &str,
    work_dir: &Path,
) -> Result<(Planned, Vec<Value>, Vec<String>), QemuError> {
    let mut notices = Vec::new();
    let node = nodes
        .iter()
        .find(|n| n["node-name"] == d.node.as_str())
        .ok_or_else(|| QemuError::NoSuchNode {
            hypervisor: hypervisor.name.clone(),
            node: d.node.clone(),
            known: nodes
                .iter()
                .filter_map(|n| n["node-name"].as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let size = node["image"]["virtual-size"].as_u64().unwrap_or(0);
    let mut ours: Vec<(u64, Value)> = node["dirty-bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some((bitmap_seq(job, b["name"].as_str()?)?, b.clone())))
        .collect();
    ours.sort_by_key(|(s, _)| *s);
    let next_seq = ours.last().map_or(1, |(s, _)| s + 1);
    let mut frozen = None;
    for (seq, b) in &ours {
        let name = bitmap_name(job, *seq);
        let usable = b["recording"] == true
            && b["inconsistent"] != true
            && d.previous_bitmap.as_deref() == Some(name.as_str());
        if usable && frozen.is_none() {
            frozen = Some(name);
            continue;
        }
        if b["inconsistent"] == true {
            notices.push(format!(
                "disk {}: CBT bitmap {name} is inconsistent (QEMU stopped without saving it); removed, this backup compares digests instead",
                d.node
            ));
        }
        qmp.execute(
            "block-dirty-bitmap-remove",
            json!({ "node": d.node, "name": name }),
        )?;
    }
    if frozen.is_none() {
        match &d.previous_bitmap {
            Some(b) if !b.is_empty() => notices.push(format!(
                "disk {}: CBT bitmap {b} of the previous restore point is gone (QEMU restarted without saving it?); this backup compares digests instead",
                d.node
            )),
            _ => {}
        }
    }
    let started = bitmap_name(job, next_seq);
    let names = Names::new(tag);
    let fleece_file = fleece_path(work_dir, tag);
    create_fleece(qmp, &names, &fleece_file, &d.node, size).map_err(|e| {
        end_create_job(qmp, &names);
        remove_fleece(qmp, &names, &fleece_file);
        QemuError::Fleece {
            path: fleece_file.clone(),
            message: e.to_string(),
        }
    })?;
    let mut actions = Vec::new();
    if let Some(f) = &frozen {
        actions.push(
            json!({ "type": "block-dirty-bitmap-disable", "data": { "node": d.node, "name": f } }),
        );
    }
    actions.push(json!({
        "type": "block-dirty-bitmap-add",
        "data": { "node": d.node, "name": started, "persistent": true }
    }));
    actions.push(json!({
        "type": "blockdev-backup",
        "data": { "device": d.node, "target": names.fleece, "sync": "none", "job-id": names.backup }
    }));
    let planned = Planned {
        node: d.node.clone(),
        names,
        fleece_file,
        frozen: frozen.map(|bitmap| Frozen {
            bitmap,
            since: d.previous_point.clone(),
        }),
        started,
    };
    Ok((planned, actions, notices))
}

/// Makes the fleece node: an empty qcow2 file of the disk's size, backed
/// by the disk. QEMU creates the file itself (`blockdev-create`), so it
/// belongs to QEMU's user, and no `qemu-img` process is started: that took
/// 6–10 ms of every session's snapshot, against ~4 ms here.
fn create_fleece(
    qmp: &mut Qmp,
    names: &Names,
    file: &Path,
    disk_node: &str,
    size: u64,
) -> Result<(), QmpError> {
    let filename = file.to_string_lossy();
    qmp.run_job(
        "blockdev-create",
        json!({ "job-id": names.create, "options": { "driver": "file", "filename": filename, "size": 0 } }),
        &names.create,
        EVENT_TIMEOUT,
    )?;
    qmp.execute(
        "blockdev-add",
        json!({ "driver": "file", "node-name": names.file, "filename": filename }),
    )?;
    qmp.run_job(
        "blockdev-create",
        json!({ "job-id": names.create, "options": { "driver": "qcow2", "file": names.file, "size": size } }),
        &names.create,
        EVENT_TIMEOUT,
    )?;
    qmp.execute(
        "blockdev-add",
        json!({ "driver": "qcow2", "node-name": names.fleece, "backing": disk_node, "file": names.file }),
    )?;
    Ok(())
}

/// Puts the bitmaps back as they were before the snapshot, keeping every
/// change: the new bitmap's changes are merged into the frozen one, which
/// records again.
fn roll_back_bitmaps(
    qmp: &mut Qmp,
    node: &str,
    frozen: Option<&str>,
    started: &str,
) -> Result<(), QemuError> {
    match frozen {
        Some(f) => {
            qmp.execute(
                "transaction",
                json!({ "actions": [
                    { "type": "block-dirty-bitmap-merge", "data": { "node": node, "target": f, "bitmaps": [started] } },
                    { "type": "block-dirty-bitmap-enable", "data": { "node": node, "name": f } },
                    { "type": "block-dirty-bitmap-remove", "data": { "node": node, "name": started } }
                ]}),
            )?;
        }
        None => {
            // No restore point counts from this bitmap.
            let _ = qmp.execute(
                "block-dirty-bitmap-remove",
                json!({ "node": node, "name": started }),
            );
        }
    }
    Ok(())
}

/// The block nodes of a QEMU.
fn named_nodes(qmp: &mut Qmp) -> Result<Vec<Value>, QemuError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    Ok(nodes.as_array().cloned().unwrap_or_default())
}

/// Removes what dead arca processes left in this QEMU, and rolls their
/// bitmaps back; returns notices for the report and the block nodes as
/// they are afterwards.
fn sweep(
    qmp: &mut Qmp,
    hypervisor: &Hypervisor,
    job: &str,
    work_dir: &Path,
) -> Result<(Vec<String>, Vec<Value>), QemuError> {
    let mut notices = Vec::new();
    let dead = |name: &str| owner_pid(name).is_some_and(|p| !process_alive(p));
    let mut nodes = named_nodes(qmp)?;
    // A snapshot's objects may be left at any stage of its making: a
    // create job, a file node, a fleece node, an export.
    let mut tags: Vec<String> = Vec::new();
    let exports = qmp.execute("query-block-exports", json!({}))?;
    let jobs = qmp.execute("query-jobs", json!({}))?;
    let names = exports
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| &e["id"])
        .chain(jobs.as_array().into_iter().flatten().map(|j| &j["id"]))
        .chain(nodes.iter().map(|n| &n["node-name"]))
        .filter_map(Value::as_str);
    for name in names {
        let tag = [
            "arca-snap-",
            "arca-create-",
            "arca-fleece-",
            "arca-fleecefile-",
        ]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix));
        if let Some(tag) = tag
            && dead(name)
            && !tags.iter().any(|t| t == tag)
        {
            tags.push(tag.to_owned());
        }
    }
    let file_of = |name: &str| {
        nodes
            .iter()
            .find(|n| n["node-name"] == name)
            .and_then(|n| n["file"].as_str())
            .map(PathBuf::from)
    };
    for tag in &tags {
        let names = Names::new(tag);
        // The file node names the file; without one (killed before it was
        // added), the file is where this work folder puts it.
        let file = file_of(&names.file).unwrap_or_else(|| fleece_path(work_dir, tag));
        end_create_job(qmp, &names);
        remove_snapshot_objects(qmp, &names, &file);
        notices.push(format!(
            "hypervisor '{}': removed snapshot arca-*-{tag} left by an interrupted session",
            hypervisor.name
        ));
    }
    // Files whose QEMU objects are all gone (killed between the steps of
    // making or removing them).
    for entry in std::fs::read_dir(work_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(tag) = fleece_tag(&name)
            && dead(&name)
            && !tags.iter().any(|t| t == tag)
            && std::fs::remove_file(entry.path()).is_ok()
        {
            notices.push(format!(
                "removed fleece file {} left by an interrupted session",
                entry.path().display()
            ));
        }
    }
    if !tags.is_empty() {
        nodes = named_nodes(qmp)?;
    }
    // A session killed between its snapshot and its cleanup leaves the
    // previous bitmap disabled and a newer one recording: roll back.
    let mut rolled = false;
    for n in &nodes {
        let node = n["node-name"].as_str().unwrap_or_default().to_owned();
        let mut ours: Vec<(u64, bool)> = n["dirty-bitmaps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| {
                Some((
                    bitmap_seq(job, b["name"].as_str()?)?,
                    b["recording"] == true && b["inconsistent"] != true,
                ))
            })
            .collect();
        ours.sort();
        if let [.., (old, false), (new, true)] = ours.as_slice() {
            roll_back_bitmaps(
                qmp,
                &node,
                Some(&bitmap_name(job, *old)),
                &bitmap_name(job, *new),
            )?;
            rolled = true;
            notices.push(format!(
                "disk {node}: rolled CBT bitmaps back after an interrupted session; no change is lost"
            ));
        }
    }
    if rolled {
        nodes = named_nodes(qmp)?;
    }
    Ok((notices, nodes))
}

/// Block nodes of a hypervisor, for `arca inventory`.
pub fn inventory(hypervisor: &Hypervisor) -> Result<Value, QemuError> {
    let mut qmp = Qmp::connect(&hypervisor.qmp)?;
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    let exports = qmp.execute("query-block-exports", json!({}))?;
    let disks: Vec<Value> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["drv"] != "file" && !n["node-name"].as_str().unwrap_or("").starts_with("arca-"))
        .map(|n| {
            json!({
                "node": n["node-name"],
                "format": n["drv"],
                "size": n["image"]["virtual-size"],
                "file": n["file"],
                "bitmaps": n["dirty-bitmaps"].as_array().map(|b| b.iter().map(|x| x["name"].clone()).collect::<Vec<_>>()),
            })
        })
        .collect();
    Ok(json!({ "hypervisor": hypervisor.name, "disks": disks, "exports": exports }))
}
