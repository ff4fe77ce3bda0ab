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
        self.repo
            .latest_point(&task.job, &task.vm, &task.disk)
            .map_err(|e| e.to_string())
    }
}
