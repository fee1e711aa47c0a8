//! The layout projection: `artifacts/<stack>/<task>/<name>` as read-only hardlinks into
//! `objects/<aa>/<manifest id>`, one materialized file per distinct content.
//!
//! A projection like `metadata.db`: rebuilt when `objects/.generation` is missing or behind
//! the catalog. Its disk cost is one uncompressed copy of the newest version of each distinct
//! content (identical content shares one inode), on top of the deduplicated, compressed store.
//!
//! # Durability
//!
//! The store is the truth; an object is a copy of content the store holds durably. An upload
//! therefore does not wait for its object's bytes to reach the disk (that would double what
//! the upload makes durable, and the disk bounds a large upload). Instead, before the object
//! gets its name, its manifest id is appended to `objects/.unsynced` and that file is synced.
//! The file's first line is the boot it was started in (`/proc/sys/kernel/random/boot_id`):
//!
//! - The next open in the same boot (only the process stopped; the kernel still holds every
//!   byte written) syncs the listed objects and removes the file. A running agent does the
//!   same every [`SETTLE_EVERY`] and when it stops.
//! - An open in another boot (the machine went down; a listed object may have lost its tail)
//!   deletes the listed objects and rebuilds the layout, which writes them again from the
//!   store, synced. Until that open, `metadata.db` does not answer for the store (the paths it
//!   would print may show damaged copies), so `list` and `show` open the store and repair it.
//!
//! Where the boot id cannot be read, every object is synced before it is named.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sloth_cas::{Cas, ManifestId};

use crate::error::at;
use crate::sync_behind::SyncBehind;
use crate::{ArtifactKey, ArtifactRecord, Error, Result};

/// How often a running agent makes the objects uploads left unsynced durable.
pub const SETTLE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The list of objects named before their bytes were known to be on disk (see the module docs).
const UNSYNCED: &str = ".unsynced";

#[derive(Debug)]
pub(crate) struct Layout {
    root: PathBuf,
    objects: PathBuf,
    /// This boot's id; `None` where it cannot be read (then objects are synced before naming).
    boot: Option<String>,
}

/// The id of the running boot of the machine, when the kernel tells it.
fn current_boot() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// What `objects/.unsynced` holds: the boot it was started in (`None` when its first line is
/// torn or unreadable) and the manifests listed after it. A torn last line (a crash mid-append,
/// before its object was named) is skipped.
fn parse_unsynced(text: &str) -> (Option<&str>, Vec<ManifestId>) {
    let mut lines = text.lines();
    let boot = lines.next().and_then(|l| l.strip_prefix("boot "));
    let listed = lines.filter_map(|l| l.parse().ok()).collect();
    (boot, listed)
}

impl Layout {
    pub(crate) fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("artifacts"),
            objects: data_dir.join("objects"),
            boot: current_boot(),
        }
    }

    /// Whether an upload's object may be named before its bytes are synced (see the module
    /// docs); else the upload syncs it first.
    pub(crate) fn defers_sync(&self) -> bool {
        self.boot.is_some()
    }

    fn unsynced(&self) -> PathBuf {
        self.objects.join(UNSYNCED)
    }

    /// Whether objects were left unsynced in another boot than this one: until an open of the
    /// store settles them, what the layout shows may be damaged.
    pub(crate) fn unsettled_from_another_boot(&self) -> bool {
        match std::fs::read_to_string(self.unsynced()) {
            Ok(text) => self.boot.is_none() || parse_unsynced(&text).0 != self.boot.as_deref(),
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        }
    }

    /// Lists `manifest`'s object as unsynced, durably, before it is named.
    fn note_unsynced(&self, manifest: ManifestId, boot: &str) -> Result<()> {
        let path = self.unsynced();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(at(&path))?;
        let fresh = file.metadata().map_err(at(&path))?.len() == 0;
        let mut lines = if fresh {
            format!("boot {boot}\n")
        } else {
            String::new()
        };
        lines.push_str(&manifest.to_hex());
        lines.push('\n');
        file.write_all(lines.as_bytes()).map_err(at(&path))?;
        file.sync_data().map_err(at(&path))?;
        if fresh {
            // The file's name must be on disk too before any object it lists is named.
            File::open(&self.objects)
                .and_then(|dir| dir.sync_all())
                .map_err(at(&self.objects))?;
        }
        Ok(())
    }

    /// Deals with the objects `objects/.unsynced` lists (see the module docs): syncs them when
    /// they were written in this boot; deletes them and marks the layout stale (the next
    /// repair rebuilds it from the store) when they were written in another, or in a boot the
    /// torn first line no longer tells. Run at open and, in a running agent, under the
    /// catalog lock.
    pub(crate) fn settle(&self) -> Result<()> {
        let path = self.unsynced();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(at(&path)(e)),
        };
        let (boot, listed) = parse_unsynced(&text);
        if boot.is_some() && boot == self.boot.as_deref() {
            for manifest in listed {
                let object = self.manifest_path(manifest);
                match File::open(&object) {
                    Ok(file) => file.sync_data().map_err(at(&object))?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(at(&object)(e)),
                }
            }
        } else if !listed.is_empty() {
            tracing::warn!(
                "{} objects of the artifacts/ layout were written before the machine restarted \
                 and may be incomplete: writing them again from the store",
                listed.len()
            );
            match std::fs::remove_file(self.marker()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(at(&self.marker())(e));
                }
                _ => {}
            }
            for manifest in listed {
                let object = self.manifest_path(manifest);
                match std::fs::remove_file(&object) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(at(&object)(e));
                    }
                    _ => {}
                }
            }
            // The deletions and the stale mark must be on disk before the list goes.
            File::open(&self.objects)
                .and_then(|dir| rustix::fs::syncfs(&dir).map_err(std::io::Error::from))
                .map_err(at(&self.objects))?;
        }
        std::fs::remove_file(&path).map_err(at(&path))
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

    /// Makes a complete staging file the object of `record`'s content. Its bytes are synced
    /// already unless [`Layout::defers_sync`]; then it is listed as unsynced first.
    pub(crate) fn adopt(&self, staged: &Path, record: &ArtifactRecord) -> Result<()> {
        let path = self.object_path(record);
        if path.exists() {
            std::fs::remove_file(staged).map_err(at(staged))?;
            return Ok(());
        }
        let dir = path.parent().expect("objects/<aa>");
        std::fs::create_dir_all(dir).map_err(at(dir))?;
        if let Some(boot) = &self.boot {
            self.note_unsynced(record.manifest, boot)?;
        }
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
