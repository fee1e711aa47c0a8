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
//! - In the same boot (only the process stopped; the kernel still holds every byte written),
//!   the list is renamed `.unsynced.settling` (uploads go on listing into a fresh one), the
//!   listed objects are synced on a thread of their own, and the list is removed. The next
//!   open does this, and a running agent every [`SETTLE_EVERY`] and when it stops; an engine
//!   that is dropped waits for the thread.
//! - An open in another boot (the machine went down; a listed object may have lost its
//!   tail), or after a sync failed, marks the layout stale, deletes the listed objects and
//!   then the lists; the repair that follows writes them again from the store. A running
//!   agent whose sync fails does the same at once.
//! - So does an open that finds `.unsynced.settling`: its settler stopped (a killed
//!   process) without saying how the sync went, and a sync that failed may have used up the
//!   report of the failure (Linux reports a failed writeback once), so syncing again could
//!   succeed over lost bytes.
//! - Until then `metadata.db` does not answer for the store (the paths it would print may
//!   show damaged copies; see `ProjectedCatalog`), so `list` and `show` open the store, which
//!   repairs it. Programs that read `artifacts/` directly should run after the agent (or any
//!   command on the store) has started once since the machine booted.
//!
//! The generation marker only moves forward from the generation the layout showed before
//! each change ([`Layout::advance`]): once an update failed, the layout stays marked behind
//! until a rebuild. Where the boot id cannot be read, every object is synced before it is
//! named.

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
/// A list a running agent is syncing.
const SETTLING: &str = ".unsynced.settling";
/// The first line of a list whose objects failed to sync: the next open rewrites them.
const FAILED: &str = "boot sync-failed\n";
/// What `.generation` holds while the layout must be rebuilt before it is trusted.
const STALE: &str = "stale";

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

/// What a list of unsynced objects calls for.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Started in this boot, every line whole (but perhaps a torn last one, appended when a
    /// crash came and before its object was named): the listed objects still have all their
    /// bytes in the page cache, and syncing them makes them durable.
    Sync(Vec<ManifestId>),
    /// From another boot, or its sync failed: the listed objects may have lost bytes.
    Rewrite(Vec<ManifestId>),
    /// A damaged line before others: which objects were listed is unknown.
    RewriteAll,
}

fn verdict(text: &str, boot: Option<&str>) -> Verdict {
    let mut lines = text.split_inclusive('\n');
    let header = lines.next().and_then(|l| l.strip_suffix('\n'));
    let mut listed = Vec::new();
    for line in lines {
        match line.strip_suffix('\n').map(str::parse) {
            Some(Ok(id)) => listed.push(id),
            Some(Err(_)) => return Verdict::RewriteAll,
            None => {} // the torn last line
        }
    }
    match (header.and_then(|h| h.strip_prefix("boot ")), boot) {
        (Some(theirs), Some(ours)) if theirs == ours => Verdict::Sync(listed),
        _ => Verdict::Rewrite(listed),
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(at(path)(e)),
        _ => Ok(()),
    }
}

/// `fdatasync`s each listed object that exists.
fn sync_objects(objects: &Path, listed: &[ManifestId]) -> Result<()> {
    for &manifest in listed {
        let object = object_in(objects, manifest);
        match File::open(&object) {
            Ok(file) => file.sync_data().map_err(at(&object))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(at(&object)(e)),
        }
    }
    Ok(())
}

fn object_in(objects: &Path, manifest: ManifestId) -> PathBuf {
    let hex = manifest.to_hex();
    objects.join(&hex[..2]).join(&hex)
}

/// Syncs the list a running agent set aside with [`Layout::begin_settling`] (on a blocking
/// thread, outside the catalog lock), then removes it. When a sync fails, a retry could not be
/// trusted (Linux reports a failed writeback once): the list is marked failed instead, and the
/// next open rewrites its objects.
pub(crate) fn finish_settling(objects: &Path, boot: &str) -> Result<()> {
    let path = objects.join(SETTLING);
    let text = std::fs::read_to_string(&path).map_err(at(&path))?;
    let Verdict::Sync(listed) = verdict(&text, Some(boot)) else {
        return Ok(()); // failed before: for the next open
    };
    if let Err(e) = sync_objects(objects, &listed) {
        let failed = format!(
            "{FAILED}{}",
            text.split_once('\n').map_or("", |(_, rest)| rest)
        );
        let tmp = objects.join(".unsynced.failed.tmp");
        let mark = File::create(&tmp)
            .and_then(|mut f| f.write_all(failed.as_bytes()).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(mark) = mark {
            tracing::error!(
                "marking {} as failed did not work either: {mark}",
                path.display()
            );
        }
        return Err(e);
    }
    std::fs::remove_file(&path).map_err(at(&path))
}

impl Layout {
    pub(crate) fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("artifacts"),
            objects: data_dir.join("objects"),
            boot: current_boot(),
        }
    }

    /// The lists of unsynced objects there are, with what each calls for.
    fn lists(&self) -> Result<Vec<(PathBuf, Verdict)>> {
        let mut found = Vec::new();
        for name in [SETTLING, UNSYNCED] {
            let path = self.objects.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => found.push((path, verdict(&text, self.boot.as_deref()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(at(&path)(e)),
            }
        }
        Ok(found)
    }

    /// Whether objects may have lost bytes (listed unsynced in another boot, or their sync
    /// failed) and no open has rewritten them yet.
    pub(crate) fn may_show_damage(&self) -> bool {
        self.lists().map_or(true, |lists| {
            lists.iter().any(|(_, v)| !matches!(v, Verdict::Sync(_)))
        })
    }

    /// Lists `manifest`'s object as unsynced, durably, before it is named. `false` when it
    /// cannot be listed (no boot id; a list from another boot waits for the next open) and
    /// must be synced before it is named instead.
    fn note_unsynced(&self, manifest: ManifestId) -> Result<bool> {
        let Some(boot) = &self.boot else {
            return Ok(false);
        };
        let header = format!("boot {boot}\n");
        let path = self.objects.join(UNSYNCED);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(at(&path))?;
        let old_len = file.metadata().map_err(at(&path))?.len();
        if old_len > 0 {
            let mut first = vec![0; header.len()];
            let read = std::io::Read::read_exact(&mut file, &mut first);
            if read.is_err() || first != header.as_bytes() {
                return Ok(false);
            }
        }
        let mut lines = if old_len == 0 { header } else { String::new() };
        lines.push_str(&manifest.to_hex());
        lines.push('\n');
        let written = file
            .write_all(lines.as_bytes())
            .and_then(|()| file.sync_data())
            // The list's name must be on disk too before any object it lists is named.
            .and_then(|()| match old_len {
                0 => File::open(&self.objects).and_then(|dir| dir.sync_all()),
                _ => Ok(()),
            });
        if let Err(e) = written {
            // No torn line in the middle of the list: the next append starts where this did.
            let _ = file.set_len(old_len);
            return Err(at(&path)(e));
        }
        Ok(true)
    }

    /// Deals with the lists of unsynced objects (see the module docs) when the store opens:
    /// rewrites what may have lost bytes ([`Layout::rewrite_untrusted`]) and sets the current
    /// list aside for [`finish_settling`], which the caller runs on a thread of its own: a
    /// command right after a large upload then does not wait for the upload's object to reach
    /// the disk before it starts. Returns what to give it, as [`Layout::begin_settling`] does.
    pub(crate) fn settle_at_open(&self) -> Result<Option<(PathBuf, String)>> {
        self.rewrite_untrusted()?;
        self.begin_settling()
    }

    /// Marks the layout stale and deletes the objects that may have lost bytes, then removes
    /// their lists, so that a rebuild writes them again from the store. Those are the objects
    /// of every list but the current one of this boot: lists from another boot or of a failed
    /// sync, and a list set aside for syncing whose settler did not finish (see the module
    /// docs). Returns whether there were any (the layout then needs a rebuild). Runs at open
    /// or under the catalog lock, while no sync of a list is running.
    pub(crate) fn rewrite_untrusted(&self) -> Result<bool> {
        let lists = self.lists()?;
        let mut rewrite = Vec::new();
        let mut all = false;
        let mut untrusted = Vec::new();
        for (path, verdict) in &lists {
            match verdict {
                Verdict::Sync(_) if path.ends_with(UNSYNCED) => continue,
                Verdict::Sync(listed) | Verdict::Rewrite(listed) => {
                    rewrite.extend_from_slice(listed);
                }
                Verdict::RewriteAll => all = true,
            }
            untrusted.push(path);
        }
        if untrusted.is_empty() {
            return Ok(false);
        }
        tracing::warn!(
            "objects of the artifacts/ layout were written before the machine restarted, or \
             their sync failed or was cut short, and may be incomplete: writing them again \
             from the store"
        );
        self.mark_stale()?;
        if all {
            self.remove_objects(|_| true)?;
        } else {
            for manifest in rewrite {
                remove_if_exists(&object_in(&self.objects, manifest))?;
            }
        }
        // The stale mark and the deletions must be on disk before the lists go.
        File::open(&self.objects)
            .and_then(|dir| rustix::fs::syncfs(&dir).map_err(std::io::Error::from))
            .map_err(at(&self.objects))?;
        for path in untrusted {
            remove_if_exists(path)?;
        }
        Ok(true)
    }

    /// Sets the current list aside for [`finish_settling`], under the catalog lock; returns
    /// the `objects/` directory and this boot's id when there is one to sync. A list left
    /// from another boot or a failed sync waits for the next open.
    pub(crate) fn begin_settling(&self) -> Result<Option<(PathBuf, String)>> {
        let Some(boot) = &self.boot else {
            return Ok(None);
        };
        let (settling, current) = (self.objects.join(SETTLING), self.objects.join(UNSYNCED));
        if settling.exists() {
            return Ok(None);
        }
        match std::fs::read_to_string(&current) {
            Ok(text) if matches!(verdict(&text, Some(boot)), Verdict::Sync(_)) => {
                std::fs::rename(&current, &settling).map_err(at(&current))?;
                Ok(Some((self.objects.clone(), boot.clone())))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(at(&current)(e)),
        }
    }

    /// Writes a generation marker that matches no generation: the next open rebuilds the
    /// layout, and nothing advances the marker before that.
    pub(crate) fn mark_stale(&self) -> Result<()> {
        self.write_marker(STALE)
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

    /// Records that the layout shows the catalog at `generation` (after a rebuild).
    fn set_generation(&self, generation: u64) -> Result<()> {
        self.write_marker(&generation.to_string())
    }

    /// Records that the layout shows the catalog at `to`, if it showed it at `from`, the
    /// generation before the change just applied to it; a layout left behind by an earlier
    /// failure (or marked stale) stays behind, for the next open to rebuild.
    pub(crate) fn advance(&self, from: u64, to: u64) -> Result<()> {
        if self.generation()? == Some(from) {
            self.set_generation(to)?;
        }
        Ok(())
    }

    fn write_marker(&self, text: &str) -> Result<()> {
        std::fs::create_dir_all(&self.objects).map_err(at(&self.objects))?;
        let tmp = self.objects.join(".generation.tmp");
        std::fs::write(&tmp, text).map_err(at(&tmp))?;
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

    /// Makes a complete staging file (`staged`, open as `file`) the object of `record`'s
    /// content, unless the layout has that object already (then the copy is thrown away,
    /// unsynced). It is listed as unsynced before it is named, or else synced.
    pub(crate) fn adopt(&self, staged: &Path, file: &File, record: &ArtifactRecord) -> Result<()> {
        let path = self.object_path(record);
        if path.exists() {
            std::fs::remove_file(staged).map_err(at(staged))?;
            return Ok(());
        }
        let dir = path.parent().expect("objects/<aa>");
        std::fs::create_dir_all(dir).map_err(at(dir))?;
        if !self.note_unsynced(record.manifest)? {
            file.sync_data().map_err(at(staged))?;
        }
        std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o444))
            .map_err(at(&staged))?;
        std::fs::rename(staged, &path).map_err(at(staged))?;
        Ok(())
    }

    fn object_path(&self, record: &ArtifactRecord) -> PathBuf {
        object_in(&self.objects, record.manifest)
    }

    /// Removes the materialized object of `record`'s content, if any, found not to match it.
    /// Links to it may still show the wrong bytes: the layout is marked stale until rebuilt.
    pub(crate) fn discard_object(&self, record: &ArtifactRecord) -> Result<()> {
        self.mark_stale()?;
        self.remove_object(&self.object_path(record))
    }

    /// Removes an object, and its `objects/<aa>` directory once empty.
    fn remove_object(&self, path: &Path) -> Result<()> {
        remove_if_exists(path)?;
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir(dir); // fails while other objects are there
        }
        Ok(())
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
                // names. Unique per process (layout changes run under the catalog lock), and
                // with `..` in it no artifact can be called so (see `Name::parse`).
                let tmp = dir.join(format!("..sloth-link-{}", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                std::fs::hard_link(&object, &tmp).map_err(at(&tmp))?;
                std::fs::rename(&tmp, &path).map_err(at(&tmp))?;
                // rename() between two links of one inode (same content as before) does
                // nothing at all, leaving the temporary name behind.
                remove_if_exists(&tmp)?;
            }
            None => {
                remove_if_exists(&path)?;
                // Empty task and stack directories go too (remove_dir fails on non-empty).
                if let Some(task_dir) = path.parent() {
                    let _ = std::fs::remove_dir(task_dir);
                    if let Some(stack_dir) = task_dir.parent() {
                        let _ = std::fs::remove_dir(stack_dir);
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes `record`'s object when no layout entry links to it any more (the previous
    /// version's content after an upload replaced it).
    pub(crate) fn remove_object_if_unused(&self, record: &ArtifactRecord) -> Result<()> {
        let path = self.object_path(record);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.nlink() == 1 => self.remove_object(&path)?,
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
        self.remove_objects(|meta| meta.nlink() == 1)
    }

    /// Deletes the objects whose metadata `doomed` picks, and the directories left empty.
    fn remove_objects(&self, doomed: impl Fn(&std::fs::Metadata) -> bool) -> Result<()> {
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
                if doomed(&std::fs::symlink_metadata(&path)?) {
                    std::fs::remove_file(&path).map_err(at(&path))?;
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        Ok(())
    }

    /// Removes a layout left from when it was turned on: stale links would show old content.
    /// Only a tree this module wrote (it has the generation marker) is touched. The objects
    /// go before the lists of unsynced ones and the marker: interrupted, this runs again at
    /// the next open, and a layout turned on again meanwhile never reuses an object that may
    /// have lost bytes unlisted.
    pub(crate) fn remove_if_present(&self) -> Result<()> {
        if self.marker().exists() {
            if self.root.exists() {
                std::fs::remove_dir_all(&self.root).map_err(at(&self.root))?;
            }
            self.remove_objects(|_| true)?;
            std::fs::remove_dir_all(&self.objects).map_err(at(&self.objects))?;
        }
        Ok(())
    }

    /// Recreates the whole layout from the newest version of every artifact. Objects that
    /// are there are reused: the caller deals with those that may have lost bytes first
    /// ([`Layout::settle_at_open`]).
    ///
    /// The layout is marked stale first: a rebuild that stops halfway (a full disk) leaves it
    /// so, never claiming a generation it does not show. A version whose content cannot be
    /// read (a damaged chunk `verify` has not marked yet) is left out and the rest rebuilt;
    /// the layout then stays stale and the error is returned.
    pub(crate) async fn rebuild(
        &self,
        cas: &Cas,
        newest: &[ArtifactRecord],
        generation: u64,
    ) -> Result<()> {
        self.mark_stale()?;
        if self.root.exists() {
            std::fs::remove_dir_all(&self.root).map_err(at(&self.root))?;
        }
        std::fs::create_dir_all(&self.root).map_err(at(&self.root))?;
        let mut unreadable = None;
        for record in newest {
            match self.replace(cas, &record.key()?, Some(record)).await {
                Err(e @ Error::Damaged { .. }) => {
                    unreadable.get_or_insert(e);
                }
                other => other?,
            }
        }
        self.remove_unused_objects()?;
        match unreadable {
            Some(e) => Err(e),
            None => self.set_generation(generation),
        }
    }
}
