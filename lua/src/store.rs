//! What the runner needs of an artifact store, and the embedded engine's answer.

use std::future::Future;
use std::path::{Path, PathBuf};

use sloth_engine::{ArtifactKey, ArtifactRecord, Engine, IngestOptions, ListQuery};

/// The artifact operations a workflow run uses.
pub trait ArtifactStore: Sync {
    /// Stores the file at `path` as a new version of `key`.
    fn store(
        &self,
        key: &ArtifactKey,
        path: &Path,
        compress: bool,
        principal: &str,
    ) -> impl Future<Output = sloth_engine::Result<ArtifactRecord>> + Send;

    /// The newest version of an artifact called `name` anywhere in `stack`.
    fn newest_in_stack(
        &self,
        stack: &str,
        name: &str,
    ) -> sloth_engine::Result<Option<ArtifactRecord>>;

    /// Writes a verified copy of `record`'s content to `target`.
    fn fetch(
        &self,
        record: &ArtifactRecord,
        target: &Path,
        principal: &str,
    ) -> impl Future<Output = sloth_engine::Result<PathBuf>> + Send;
}

impl ArtifactStore for Engine {
    async fn store(
        &self,
        key: &ArtifactKey,
        path: &Path,
        compress: bool,
        principal: &str,
    ) -> sloth_engine::Result<ArtifactRecord> {
        let file = sloth_engine::open_upload(path)?;
        self.upload_with(key, file, principal, IngestOptions { compress })
            .await
    }

    fn newest_in_stack(
        &self,
        stack: &str,
        name: &str,
    ) -> sloth_engine::Result<Option<ArtifactRecord>> {
        let query = ListQuery {
            stack: Some(stack.to_owned()),
            ..ListQuery::default()
        };
        Ok(self
            .list(&query)?
            .into_iter()
            .filter(|r| r.name == name)
            .max_by_key(|r| (r.created_at, r.version)))
    }

    async fn fetch(
        &self,
        record: &ArtifactRecord,
        target: &Path,
        principal: &str,
    ) -> sloth_engine::Result<PathBuf> {
        self.download_to(record, target, principal).await
    }
}
