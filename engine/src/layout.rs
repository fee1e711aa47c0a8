//! The layout projection: `artifacts/<stack>/<task>/<name>` as read-only hardlinks into
//! `objects/<aa>/<manifest id>`, one materialized file per distinct content.
//!
//! A projection like `metadata.db`: rebuilt when `objects/.generation` is missing or behind
//! the catalog. Its disk cost is one uncompressed copy of the newest version of each distinct
//! content (identical content shares one inode), on top of the deduplicated, compressed store.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sloth_cas::{Cas, ManifestId};

use crate::error::at;
use crate::sync_behind::SyncBehind;
use crate::{ArtifactKey, ArtifactRecord, Error, Result};

#[derive(Debug)]
pub(crate) struct Layout {
    root: PathBuf,
    objects: PathBuf,
}

impl Layout {
    pub(crate) fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("artifacts"),
            objects: data_dir.join("objects"),
        }
    }

    pub(crate) fn path_of(&self, r: &ArtifactRecord) -> PathBuf {
        self.root.join(&r.stack).join(&r.task).join(&r.name)
    }

    fn marker(&self) -> PathBuf {
        self.objects.join(".generation")
    }

    pub(crate) fn generation(&self) -> Result<Option<u64>> {
        match std::fs::read_to_string(self.marker()) {
            Ok(text) => Ok(text.trim().parse().ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn set_generation(&self, generation: u64) -> Result<()> {
        std::fs::create_dir_all(&self.objects).map_err(at(&self.objects))?;
        let tmp = self.objects.join(".generation.tmp");
        std::fs::write(&tmp, generation.to_string()).map_err(at(&tmp))?;
        std::fs::rename(&tmp, self.marker()).map_err(at(&tmp))?;
        Ok(())
    }

    /// A fresh file in `objects/` for an upload to copy its bytes into as they are read, so
    /// the object does not have to be read back out of the store afterwards.
    pub(crate) fn staging_file(&self) -> Result<(PathBuf, File)> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(&self.objects).map_err(at(&self.objects))?;
        let path = self.objects.join(format!(
            ".incoming-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&path).map_err(at(&path))?;
        Ok((path, file))
    }

    /// Makes a staging file (complete and synced) the object of `record`'s content.
    pub(crate) fn adopt(&self, staged: &Path, record: &ArtifactRecord) -> Result<()> {
        let path = self.object_path(record);
        if path.exists() {
            std::fs::remove_file(staged).map_err(at(staged))?;
            return Ok(());
        }
        let dir = path.parent().expect("objects/<aa>");
        std::fs::create_dir_all(dir).map_err(at(dir))?;
        std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o444))
            .map_err(at(&staged))?;
        std::fs::rename(staged, &path).map_err(at(staged))?;
        Ok(())
    }

    fn object_path(&self, record: &ArtifactRecord) -> PathBuf {
        self.manifest_path(record.manifest)
    }

    fn manifest_path(&self, manifest: ManifestId) -> PathBuf {
        let hex = manifest.to_hex();
        self.objects.join(&hex[..2]).join(&hex)
    }

    /// Removes the materialized object of `record`'s content, if any.
    pub(crate) fn discard_object(&self, record: &ArtifactRecord) -> Result<()> {
        let path = self.object_path(record);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(at(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Whether the content of `manifest` is already materialized.
    pub(crate) fn has_object(&self, manifest: ManifestId) -> bool {
        self.manifest_path(manifest).exists()
    }

    /// The materialized object of a version's content, written (verified) if missing.
    async fn object(&self, cas: &Cas, record: &ArtifactRecord) -> Result<PathBuf> {
        let path = self.object_path(record);
        if path.exists() {
            return Ok(path);
        }
        let dir = path.parent().expect("objects/<aa>").to_path_buf();
        let hex = record.manifest.to_hex();
        std::fs::create_dir_all(&dir).map_err(at(&dir))?;
        let tmp = dir.join(format!(".{hex}.tmp-{}", std::process::id()));
        let file = std::fs::File::create(&tmp).map_err(at(&tmp))?;
        let file = match cas
            .read_to_writer(record.manifest, SyncBehind::new(file))
            .await
        {
            Ok((_, file)) => file,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::Damaged {
                    name: record.name.clone(),
                    version: record.version,
                    source: e,
                });
            }
        };
        drop(file.finish().map_err(at(&tmp))?);
        // Read-only: every link shares this inode, so a write through one would change all.
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444)).map_err(at(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(at(&tmp))?;
        Ok(path)
    }

    /// Points `key`'s entry at `newest` (or removes it when `None`).
    pub(crate) async fn replace(
        &self,
        cas: &Cas,
        key: &ArtifactKey,
        newest: Option<&ArtifactRecord>,
        generation: u64,
    ) -> Result<()> {
        let path = self
            .root
            .join(key.stack.as_str())
            .join(key.task.as_str())
            .join(key.name.as_str());
        match newest {
            Some(record) => {
                let object = self.object(cas, record).await?;
                let dir = path.parent().expect("has a parent");
                std::fs::create_dir_all(dir).map_err(at(&dir))?;
                // A short temporary name: `.{name}…` would pass the file-name limit for long
                // names. Unique per process, and layout changes run under the catalog lock.
                let tmp = dir.join(format!(".sloth-link-{}", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                std::fs::hard_link(&object, &tmp).map_err(at(&tmp))?;
                std::fs::rename(&tmp, &path).map_err(at(&tmp))?;
                // rename() between two links of one inode (same content as before) does
                // nothing at all, leaving the temporary name behind.
                match std::fs::remove_file(&tmp) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
            }
            None => {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
                // Empty task and stack directories go too (remove_dir fails on non-empty).
                if let Some(task_dir) = path.parent() {
                    let _ = std::fs::remove_dir(task_dir);
                    if let Some(stack_dir) = task_dir.parent() {
                        let _ = std::fs::remove_dir(stack_dir);
                    }
                }
            }
        }
        self.set_generation(generation)
    }

    /// Deletes `record`'s object when no layout entry links to it any more (the previous
    /// version's content after an upload replaced it).
    pub(crate) fn remove_object_if_unused(&self, record: &ArtifactRecord) -> Result<()> {
        let path = self.object_path(record);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.nlink() == 1 => std::fs::remove_file(&path).map_err(at(&path))?,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Removes what an interrupted process left: staging copies and temporary links. Called
    /// at open, when sled's lock guarantees no other process is writing here.
    pub(crate) fn sweep_leftovers(&self) -> Result<()> {
        if let Ok(entries) = std::fs::read_dir(&self.objects) {
            for entry in entries {
                let path = entry?.path();
                if path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".incoming-"))
                {
                    std::fs::remove_file(&path).map_err(at(&path))?;
                }
            }
        }
        Ok(())
    }

    /// Deletes objects no layout entry links to any more.
    pub(crate) fn remove_unused_objects(&self) -> Result<()> {
        let Ok(dirs) = std::fs::read_dir(&self.objects) else {
            return Ok(());
        };
        for dir in dirs {
            let dir = dir?.path();
            if !dir.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                if std::fs::symlink_metadata(&path)?.nlink() == 1 {
                    std::fs::remove_file(&path).map_err(at(&path))?;
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        Ok(())
    }

    /// Removes a layout left from when it was turned on: stale links would show old content.
    /// Only a tree this module wrote (it has the generation marker) is touched.
    pub(crate) fn remove_if_present(&self) -> Result<()> {
        if self.marker().exists() {
            if self.root.exists() {
                std::fs::remove_dir_all(&self.root).map_err(at(&self.root))?;
            }
            std::fs::remove_dir_all(&self.objects).map_err(at(&self.objects))?;
        }
        Ok(())
    }

    /// Recreates the whole layout from the newest version of every artifact.
    pub(crate) async fn rebuild(
        &self,
        cas: &Cas,
        newest: &[ArtifactRecord],
        generation: u64,
    ) -> Result<()> {
        if self.root.exists() {
            std::fs::remove_dir_all(&self.root).map_err(at(&self.root))?;
        }
        std::fs::create_dir_all(&self.root).map_err(at(&self.root))?;
        for record in newest {
            self.replace(cas, &record.key()?, Some(record), generation)
                .await?;
        }
        self.remove_unused_objects()?;
        self.set_generation(generation)
    }
}
