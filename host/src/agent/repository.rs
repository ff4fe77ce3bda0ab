//! The repository role: a target mover per connection, and the newest
//! restore points, over the repository this agent serves.

use crate::repository::Repository;
use arca_transport::quic::{OpenTask, TargetService};
use arca_transport::{Manifest, TargetMover};

pub struct RepositoryService {
    repo: Repository,
}

impl RepositoryService {
    pub fn new(repo: Repository) -> Self {
        Self { repo }
    }
}

impl TargetService for RepositoryService {
    fn open(&self, _task: &OpenTask) -> Result<Box<dyn TargetMover>, String> {
        Ok(Box::new(self.repo.writer().map_err(|e| e.to_string())?))
    }

    fn describe(&self) -> String {
        self.repo.root().display().to_string()
    }

    fn latest(&self, task: &OpenTask) -> Result<Option<Manifest>, String> {
        let (job, vm, disk) = (&task.job, &task.vm, &task.disk);
        crate::repository::manifest::check_point_names(job, vm, disk)?;
        if task.header_only {
            self.repo.latest_header(job, vm, disk)
        } else {
            self.repo.latest_point(job, vm, disk)
        }
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_transport::{
        Chunk, CommitPoint, ExcludedRanges, MANIFEST_FORMAT_VERSION, StoreChunks,
    };

    #[test]
    fn a_header_only_query_leaves_the_block_list_behind() {
        let dir = tempfile::tempdir().unwrap();
        let service = RepositoryService::new(Repository::open_or_create(dir.path()).unwrap());
        let raw = vec![9u8; 4096];
        let hash = *blake3::hash(&raw).as_bytes();
        let task = OpenTask {
            job: "j".into(),
            vm: "v".into(),
            disk: "d".into(),
            ..Default::default()
        };
        let mover = service.open(&task).unwrap();
        mover
            .store(StoreChunks {
                chunks: vec![Chunk {
                    hash: hash.to_vec(),
                    codec: "none".into(),
                    codec_hash: Vec::new(),
                    raw_len: raw.len() as u32,
                    payload: raw.into(),
                }],
            })
            .unwrap();
        mover
            .commit(CommitPoint {
                manifest: Some(Manifest {
                    format_version: MANIFEST_FORMAT_VERSION,
                    job: "j".into(),
                    vm: "v".into(),
                    disk: "d".into(),
                    disk_size: 3 * 4096,
                    block_size: 4096,
                    block_hashes: [hash; 3].concat(),
                    cbt_bitmap: "arca.j.1".into(),
                    excluded: Some(ExcludedRanges::from_ranges([(100, 200)])),
                    ..Default::default()
                }),
                retention: None,
            })
            .unwrap();
        let whole = service.latest(&task).unwrap().unwrap();
        assert_eq!(whole.block_hashes.len(), 3 * 32);
        assert_eq!(
            whole.excluded.as_ref().unwrap().ranges(),
            Ok(vec![(100, 200)])
        );
        let header = service
            .latest(&OpenTask {
                header_only: true,
                ..task.clone()
            })
            .unwrap()
            .unwrap();
        assert!(header.block_hashes.is_empty() && header.excluded.is_none());
        // A name that is not one path component reads nothing.
        for bad in ["..", "a/b", ""] {
            let e = service
                .latest(&OpenTask {
                    disk: bad.into(),
                    ..task.clone()
                })
                .unwrap_err();
            assert!(e.contains("disk name"), "{e}");
        }
        assert_eq!(header, whole.into_header());
    }
}
