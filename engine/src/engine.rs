//! The catalog: artifact versions over the chunk store, in the same sled database.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sloth_cas::{
    Cas, CasConfig, Claim, IngestOptions, PackStore, Receiver, Staged, release_tx, retain_tx,
    tx_error,
};

use crate::error::at;
use crate::layout::Layout;
use crate::record::{Event, now_secs};
use crate::sqlite::SqliteProjection;
use crate::sync_behind::SyncBehind;
use crate::{ArtifactId, ArtifactKey, ArtifactRecord, Error, Result, RetentionRule, glob_match};

const ARTIFACTS_TREE: &str = "artifacts";
const LATEST_TREE: &str = "artifact_latest";
const BY_NAME_TREE: &str = "artifact_by_name";
const EVENTS_TREE: &str = "events";
const META_TREE: &str = "engine_meta";
const BY_TIME_ALL_TREE: &str = "artifact_by_time";
const BY_TIME_LATEST_TREE: &str = "artifact_latest_by_time";
/// Set in `engine_meta` once the time indexes cover every record.
const TIME_INDEX_READY: &[u8] = b"time_index";
const GENERATION: &[u8] = b"generation";
/// `engine_meta` key prefix of the retention rules workflows registered, by stack.
const WORKFLOW_RETENTION: &str = "workflow_retention:";

/// How the engine is opened.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The agent name recorded in events (`local` for the embedded store).
    pub agent: String,
    /// Keep the `artifacts/<stack>/<task>/<name>` layout projection (default on).
    pub layout: bool,
    /// The chunk store's settings.
    pub cas: CasConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            agent: "local".into(),
            layout: true,
            cas: CasConfig::default(),
        }
    }
}

/// Which artifacts `list` returns.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this stack.
    pub stack: Option<String>,
    /// Only this task.
    pub task: Option<String>,
    /// Every version instead of the newest of each artifact.
    pub all_versions: bool,
    /// At most this many, the most recent ones (`None`: all).
    pub limit: Option<usize>,
}

/// Which artifact a command means: a name, narrowed by stack, task and version.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// Artifact name.
    pub name: String,
    /// Stack, when given.
    pub stack: Option<String>,
    /// Task, when given.
    pub task: Option<String>,
    /// Version, when given; else the newest.
    pub version: Option<u32>,
}

/// Per-stack figures for `stack_usage`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackUsage {
    /// The stack.
    pub stack: String,
    /// Distinct artifacts (stack/task/name).
    pub artifacts: u64,
    /// Versions.
    pub versions: u64,
    /// Sum of content sizes.
    pub logical_bytes: u64,
    /// Bytes the versions added to the store when uploaded, after dedup and compression.
    pub stored_bytes: u64,
}

/// The artifact catalog of one agent: records, versions, events and their projections.
#[derive(Debug)]
pub struct Engine {
    cas: Cas,
    artifacts: sled::Tree,
    latest: sled::Tree,
    by_name: sled::Tree,
    events: sled::Tree,
    meta: sled::Tree,
    /// created_at + id → version key, for every version (`list --all-versions`).
    by_time_all: sled::Tree,
    /// The same for the newest version of each artifact only (`list`), so that the most recent
    /// N come from walking N index entries instead of decoding the whole catalog.
    by_time_latest: sled::Tree,
    data_dir: PathBuf,
    agent: String,
    sqlite: SqliteProjection,
    layout: Option<Layout>,
    /// Serializes catalog changes, and the projection updates that follow each, so that what
    /// is read before a transaction still holds in it and projections apply in commit order.
    write: tokio::sync::Mutex<()>,
    /// The thread syncing the layout objects uploads left unsynced, while one runs (see
    /// [`Engine::settle_layout`]).
    settling: std::sync::Mutex<Option<std::thread::JoinHandle<Result<()>>>>,
}

impl Drop for Engine {
    /// Waits for a sync of layout objects still running: cut short by the process's exit, it
    /// would leave the next open unable to tell whether it failed, and so writing its objects
    /// again (see `layout.rs`).
    fn drop(&mut self) {
        let slot = self.settling.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(Ok(Err(e))) = slot.take().map(std::thread::JoinHandle::join) {
            tracing::warn!(
                "syncing the layout's new objects failed (the next open rewrites them): {e}"
            );
        }
    }
}

impl Engine {
    /// Opens (creating if needed) the catalog in `data_dir`: the store in `store/`,
    /// `metadata.db`, and the layout in `artifacts/` + `objects/`. Stale projections are
    /// rebuilt.
    pub async fn open(data_dir: impl AsRef<Path>, config: EngineConfig) -> Result<Self> {
        let data_dir = data_dir.as_ref().to_path_buf();
        check_writable(&data_dir)?;
        // Opening may wait for another process's lock: off the async worker threads.
        let (store, cas_config) = (data_dir.join("store"), config.cas.clone());
        let cas = tokio::task::spawn_blocking(move || Cas::open(store, cas_config))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        let db = cas.db().clone();
        let engine = Self {
            artifacts: db.open_tree(ARTIFACTS_TREE)?,
            latest: db.open_tree(LATEST_TREE)?,
            by_name: db.open_tree(BY_NAME_TREE)?,
            events: db.open_tree(EVENTS_TREE)?,
            meta: db.open_tree(META_TREE)?,
            by_time_all: db.open_tree(BY_TIME_ALL_TREE)?,
            by_time_latest: db.open_tree(BY_TIME_LATEST_TREE)?,
            sqlite: SqliteProjection::open(&data_dir, config.layout),
            layout: config.layout.then(|| Layout::new(&data_dir)),
            data_dir,
            agent: config.agent,
            cas,
            write: tokio::sync::Mutex::new(()),
            settling: std::sync::Mutex::new(None),
        };
        engine.build_time_indexes()?;
        match &engine.layout {
            Some(layout) => {
                layout.sweep_leftovers()?;
                // A failure leaves the lists for the next open; the layout is not rebuilt
                // while they may name damaged objects.
                match layout.settle_at_open() {
                    Ok(Some((objects, boot))) => {
                        let thread = std::thread::spawn(move || {
                            crate::layout::finish_settling(&objects, &boot)
                        });
                        *engine.settling.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
                    }
                    Ok(None) => {}
                    Err(e) => warn_stale(Err(e)),
                }
            }
            None => Layout::new(&engine.data_dir).remove_if_present()?,
        }
        engine.repair_projections().await?;
        Ok(engine)
    }

    /// The chunk store underneath.
    pub fn cas(&self) -> &Cas {
        &self.cas
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where the layout projection shows a record, or `None` when the layout is turned off.
    pub fn layout_path(&self, record: &ArtifactRecord) -> Option<PathBuf> {
        self.layout.as_ref().map(|l| l.path_of(record))
    }

    /// Stores the file at `path` as a new version of `key`.
    pub async fn upload_path(
        &self,
        key: &ArtifactKey,
        path: &Path,
        principal: &str,
    ) -> Result<ArtifactRecord> {
        let file = open_upload(path)?;
        self.upload(key, file, principal).await
    }

    /// Stores everything `reader` yields as a new version of `key`. The chunks, the manifest,
    /// the record and the event are committed in one transaction: a failure leaves no version.
    pub async fn upload<R: std::io::Read + Send + 'static>(
        &self,
        key: &ArtifactKey,
        reader: R,
        principal: &str,
    ) -> Result<ArtifactRecord> {
        self.upload_with(key, reader, principal, IngestOptions::default())
            .await
    }

    /// [`Engine::upload`] with ingest options (compression on or off for this content).
    pub async fn upload_with<R: std::io::Read + Send + 'static>(
        &self,
        key: &ArtifactKey,
        reader: R,
        principal: &str,
        options: IngestOptions,
    ) -> Result<ArtifactRecord> {
        // With the layout on, the bytes are copied into a staging object as they are read.
        let copy = self.layout.as_ref().map(|l| l.staging_file()).transpose()?;
        let result = self
            .upload_inner(key, reader, principal, copy.as_ref(), options)
            .await;
        if let (Err(_), Some((path, _))) = (&result, &copy) {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    async fn upload_inner<R: std::io::Read + Send + 'static>(
        &self,
        key: &ArtifactKey,
        reader: R,
        principal: &str,
        copy: Option<&(PathBuf, std::fs::File)>,
        options: IngestOptions,
    ) -> Result<ArtifactRecord> {
        let staged = match copy {
            Some((path, file)) => {
                let copy = LayoutCopy(file.try_clone().map_err(at(path))?);
                self.cas
                    .ingest_reader_copying(reader, options, copy)
                    .await?
            }
            None => self.cas.ingest_reader_with(reader, options).await?,
        };
        self.commit_version(key, staged, principal, copy).await
    }

    /// Starts receiving content chunked by a client (see [`Receiver`]); with the layout on,
    /// the content is copied into a staging object as it is assembled.
    pub fn receive(&self) -> Result<Receiving> {
        let (writer, copy): (Box<dyn std::io::Write + Send>, _) =
            match self.layout.as_ref().map(|l| l.staging_file()).transpose()? {
                Some((path, file)) => {
                    let writer = file.try_clone().map_err(at(&path))?;
                    (Box::new(writer), Some((path, file)))
                }
                None => (Box::new(std::io::sink()), None),
            };
        Ok(Receiving {
            receiver: Some(self.cas.receive(writer)),
            copy,
        })
    }

    /// Makes received content a new version of `key`, once the whole content matched
    /// `length` and the `claim`. No claim is accepted only when no chunk had to be sent (see
    /// `sloth_cas::Receiver::finish`).
    pub async fn commit_received(
        &self,
        key: &ArtifactKey,
        mut receiving: Receiving,
        length: u64,
        claim: Option<Claim>,
        principal: &str,
    ) -> Result<ArtifactRecord> {
        let receiver = receiving
            .receiver
            .take()
            .ok_or_else(|| Error::CorruptRecord("receive committed twice".into()))?;
        // Content the store holds whole without a full claim is most often a re-upload of the
        // newest version: its manifest lends the digests when the chunk lists agree. Looked up
        // only then: a commit after chunks were sent (every first upload) reads no catalog.
        let newest = if receiver.sent_nothing() && claim.is_none_or(|c| c.blake3.is_none()) {
            self.versions(key)?.pop()
        } else {
            None
        };
        let like = match newest {
            Some(newest) => self.cas.manifest(newest.manifest).await.ok(),
            None => None,
        };
        let received = receiver.finish(length, claim, like.as_ref()).await?;
        // The content is written into the copy unless the store already had it whole.
        let copy = receiving.copy.as_ref().filter(|_| received.written);
        let record = self
            .commit_version(key, received.staged, principal, copy)
            .await?;
        if received.written {
            // Adopted (or removed) by the commit: nothing for the drop to clean up.
            receiving.copy = None;
        }
        Ok(record)
    }

    /// Makes the layout objects uploads named without waiting for their bytes durable, so
    /// that a machine crash no longer has to rewrite them (see `layout.rs`). A running agent
    /// calls this every [`crate::SETTLE_EVERY`] and when it stops; an open starts it itself.
    /// The syncing runs on a thread of its own, outside the catalog lock. When a sync fails,
    /// its objects are written again from the store at once (a retry could not be trusted),
    /// and the failure is returned.
    ///
    /// Safe to cancel: a sync under way is waited for by the next call, or by the drop.
    pub async fn settle_layout(&self) -> Result<()> {
        let Some(layout) = &self.layout else {
            return Ok(());
        };
        // A sync started earlier (at open, or by a call cancelled since) finishes first.
        let mut synced = self.join_settling().await;
        if synced.is_ok() {
            let set_aside = {
                let _write = self.write.lock().await;
                layout.begin_settling()?
            };
            if let Some((objects, boot)) = set_aside {
                let thread =
                    std::thread::spawn(move || crate::layout::finish_settling(&objects, &boot));
                *self.settling.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
                synced = self.join_settling().await;
            }
        }
        if synced.is_err() {
            let rewritten = {
                let _write = self.write.lock().await;
                layout.rewrite_untrusted()
            };
            match rewritten {
                Ok(true) => warn_stale(self.rebuild_projections().await),
                Ok(false) => {}
                Err(e) => warn_stale(Err(e)),
            }
        }
        synced
    }

    /// Waits for the thread in `self.settling`, if any, and returns how its sync went. The
    /// thread stays in the slot until it has finished, so a cancelled wait leaves it for the
    /// next.
    async fn join_settling(&self) -> Result<()> {
        loop {
            {
                let mut slot = self.settling.lock().unwrap_or_else(|e| e.into_inner());
                match slot.take() {
                    None => return Ok(()),
                    Some(thread) if thread.is_finished() => {
                        return thread.join().map_err(|_| {
                            Error::Io(std::io::Error::other("the settling thread panicked"))
                        })?;
                    }
                    running => *slot = running,
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Commits staged content as a new version of `key`: manifest, record and event in one
    /// transaction, then the projections.
    async fn commit_version(
        &self,
        key: &ArtifactKey,
        staged: Staged,
        principal: &str,
        copy: Option<&(PathBuf, std::fs::File)>,
    ) -> Result<ArtifactRecord> {
        let prepared = self.cas.prepare(staged.manifest()).await?;
        let manifest = staged.manifest();
        let now = now_secs();
        let _write = self.write.lock().await;
        let previous = self.versions(key)?.pop();
        let before = self.generation()?;
        self.sqlite.mark_pending()?;
        let trees = self.cas.trees();
        let (record, event) = (
            &trees.manifests,
            &trees.manifest_refs,
            &trees.chunk_refs,
            &self.artifacts,
            &self.latest,
            &self.by_name,
            &self.events,
            &self.meta,
            &self.by_time_all,
            &self.by_time_latest,
        )
            .transaction(
                |(
                    m,
                    mr,
                    cr,
                    artifacts,
                    latest,
                    by_name,
                    events,
                    meta,
                    by_time_all,
                    by_time_latest,
                )| {
                    let prefix = key.prefix();
                    let version = latest.get(&prefix)?.map_or(0, |v| decode_u32(&v)) + 1;
                    latest.insert(prefix.as_slice(), &version.to_be_bytes())?;
                    let record = ArtifactRecord {
                        id: ArtifactId::generate(key, version),
                        name: key.name.to_string(),
                        stack: key.stack.to_string(),
                        task: key.task.to_string(),
                        version,
                        size: manifest.len(),
                        checksum: format!("sha256:{}", manifest.digests().sha256_hex()),
                        manifest: prepared.id(),
                        stored_bytes: staged.stats().new_stored_bytes,
                        created_at: now,
                        modified_at: now,
                        download_count: 0,
                        last_download_at: None,
                        damaged: None,
                    };
                    artifacts.insert(key.version_key(version), record.encode())?;
                    by_name.insert(by_name_key(key), &[])?;
                    by_time_all.insert(&time_key(&record), key.version_key(version))?;
                    if let Some(previous) = &previous {
                        by_time_latest.remove(&time_key(previous))?;
                    }
                    by_time_latest.insert(&time_key(&record), key.version_key(version))?;
                    retain_tx(m, mr, cr, &prepared)?;
                    let event =
                        self.event_tx(events, meta, "artifact.upload", &record, principal, now)?;
                    Ok((record, event))
                },
            )
            .map_err(tx_error)
            .map_err(Error::from)?;
        self.cas.flush().await?;
        drop(staged);
        // The version is committed: what follows only updates projections, whose failure must
        // not make the upload look failed (a retry would add another version). They stay stale
        // and the next open rebuilds them.
        // The transaction recorded one event, which bumped the generation by one (read back
        // instead, a failed read would make the committed upload look failed).
        let generation = before + 1;
        warn_stale(self.project_sqlite(generation, |sqlite| {
            sqlite.upsert(&record, &event, generation)
        }));
        if let Some(layout) = &self.layout {
            let projected = async {
                if let Some((path, file)) = copy {
                    layout.adopt(path, file, &record)?;
                }
                layout.replace(&self.cas, key, Some(&record)).await?;
                layout.advance(before, generation)?;
                if let Some(previous) = &previous {
                    layout.remove_object_if_unused(previous)?;
                }
                Ok(())
            };
            warn_stale(projected.await);
        }
        Ok(record)
    }

    /// Artifacts matching `query`, oldest first (the most recent `limit` of them), ordered by
    /// upload time. Walks a time index from the newest end, so `--limit 50` reads about 50
    /// records however large the catalog is (more when stack/task filters skip some).
    pub fn list(&self, query: &ListQuery) -> Result<Vec<ArtifactRecord>> {
        let index = if query.all_versions {
            &self.by_time_all
        } else {
            &self.by_time_latest
        };
        let mut out = Vec::new();
        for item in index.iter().rev() {
            if query.limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            let (time_key, version_key) = item?;
            let Some(bytes) = self.artifacts.get(&version_key)? else {
                // The iterator may still show an entry that a delete (one transaction with
                // the record) removed meanwhile: only an entry that is still there is damage.
                if index.contains_key(&time_key)? {
                    return Err(Error::CorruptRecord(
                        "time index points at a missing record".into(),
                    ));
                }
                continue;
            };
            let record = ArtifactRecord::decode(&bytes)?;
            if query.stack.as_ref().is_some_and(|s| *s != record.stack)
                || query.task.as_ref().is_some_and(|t| *t != record.task)
            {
                continue;
            }
            out.push(record);
        }
        out.reverse();
        Ok(out)
    }

    /// Every version (of `stack`, or all), in catalog key order (stack, task, name, version):
    /// one sequential scan of the records, for whole-catalog work like cleanup.
    pub fn all_versions(&self, stack: Option<&str>) -> Result<Vec<ArtifactRecord>> {
        // Reading the values is quick; decoding 100,000 JSON records is not, so that part runs
        // on every core.
        parallel_map(&self.stored_versions(stack)?, |v| ArtifactRecord::decode(v))
            .into_iter()
            .collect()
    }

    /// The stored (JSON) records of every version of `stack` (or all), undecoded, in catalog
    /// key order.
    pub(crate) fn stored_versions(&self, stack: Option<&str>) -> Result<Vec<sled::IVec>> {
        let prefix = stack
            .map(|s| [s.as_bytes(), &[0]].concat())
            .unwrap_or_default();
        Ok(self
            .artifacts
            .scan_prefix(prefix)
            .values()
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Builds the time indexes from the records when they were never built (a catalog from
    /// before they existed).
    fn build_time_indexes(&self) -> Result<()> {
        if self.meta.contains_key(TIME_INDEX_READY)? {
            return Ok(());
        }
        self.by_time_all.clear()?;
        self.by_time_latest.clear()?;
        let mut newest: Option<(Vec<u8>, Vec<u8>, ArtifactRecord)> = None;
        for item in self.artifacts.iter() {
            let (k, v) = item?;
            let record = ArtifactRecord::decode(&v)?;
            self.by_time_all.insert(time_key(&record), k.as_ref())?;
            let prefix = k[..k.len().saturating_sub(4)].to_vec();
            if let Some((p, vk, r)) = &newest
                && *p != prefix
            {
                self.by_time_latest.insert(time_key(r), vk.as_slice())?;
            }
            newest = Some((prefix, k.to_vec(), record));
        }
        if let Some((_, vk, r)) = &newest {
            self.by_time_latest.insert(time_key(r), vk.as_slice())?;
        }
        self.meta.insert(TIME_INDEX_READY, &[1])?;
        self.meta.flush()?;
        Ok(())
    }

    /// Every version of one artifact, oldest first.
    pub fn versions(&self, key: &ArtifactKey) -> Result<Vec<ArtifactRecord>> {
        self.artifacts
            .scan_prefix(key.prefix())
            .map(|item| ArtifactRecord::decode(&item?.1))
            .collect()
    }

    /// The one artifact version `selector` means. A name found under several stacks/tasks
    /// without `stack`/`task` to choose is [`Error::Ambiguous`], listing the candidates.
    pub fn resolve(&self, selector: &Selector) -> Result<ArtifactRecord> {
        resolve_with(
            selector,
            |name| {
                let mut places = BTreeSet::new();
                let mut prefix = name.as_str().as_bytes().to_vec();
                prefix.push(0);
                for item in self.by_name.scan_prefix(&prefix) {
                    let (k, _) = item?;
                    let mut parts = k[prefix.len()..].split(|b| *b == 0);
                    if let (Some(stack), Some(task)) = (parts.next(), parts.next()) {
                        places.insert((
                            String::from_utf8_lossy(stack).into_owned(),
                            String::from_utf8_lossy(task).into_owned(),
                        ));
                    }
                }
                Ok(places)
            },
            |key, version| match version {
                Some(v) => self
                    .artifacts
                    .get(key.version_key(v))?
                    .map(|b| ArtifactRecord::decode(&b))
                    .transpose(),
                None => self
                    .artifacts
                    .scan_prefix(key.prefix())
                    .next_back()
                    .transpose()?
                    .map(|(_, b)| ArtifactRecord::decode(&b))
                    .transpose(),
            },
        )
    }

    /// Writes a version's content to `target` (a file path, or a directory to put it in under
    /// its name), verifying every chunk and the whole SHA-256. The content goes to a temporary
    /// file beside the target that is renamed into place only when every check passed; the
    /// download count goes up only then. Returns the path written.
    pub async fn download_to(
        &self,
        record: &ArtifactRecord,
        target: &Path,
        principal: &str,
    ) -> Result<PathBuf> {
        refuse_damaged(record)?;
        let target = if target.is_dir() {
            target.join(&record.name)
        } else {
            target.to_path_buf()
        };
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let out_err = |source: std::io::Error| Error::Output {
            path: target.clone(),
            source,
        };
        // A fresh, exclusively created temporary name: short whatever the artifact's name (a
        // 255-byte name plus a suffix would pass the file-name limit), and never shared by two
        // downloads to the same target. Dropped (deleted) on every path but the final rename.
        let tmp = tempfile::Builder::new()
            .prefix(".sloth-download-")
            .tempfile_in(&dir)
            .map_err(out_err)?;
        let file = tmp.as_file().try_clone().map_err(out_err)?;
        // Chunks arrive in pieces of hundreds of KiB: no buffering needed in front of the file.
        let written = self
            .cas
            .read_to_writer(record.manifest, SyncBehind::new(file))
            .await;
        let synced = match written {
            Ok((_, file)) => tokio::task::spawn_blocking(move || file.finish().map(drop))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e))),
            Err(e) => {
                let still_there = self
                    .artifacts
                    .get(record.key()?.version_key(record.version))?
                    .is_some();
                return Err(match e {
                    sloth_cas::Error::Output(io) => out_err(io),
                    // Deleted (and its chunks collected) while it was being read: say so,
                    // rather than calling the store damaged.
                    _ if !still_there => Error::NotFound {
                        name: record.name.clone(),
                        stack: Some(record.stack.clone()),
                        task: Some(record.task.clone()),
                        version: Some(record.version),
                    },
                    other => Error::Damaged {
                        name: record.name.clone(),
                        version: record.version,
                        source: other,
                    },
                });
            }
        };
        synced.map_err(out_err)?;
        // tempfile creates 0600; a downloaded artifact gets the usual 0644.
        std::fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .map_err(out_err)?;
        tmp.persist(&target).map_err(|e| out_err(e.error))?;
        self.count_download(record, principal).await?;
        Ok(target)
    }

    /// Counts a successful download of `record` (done by [`Engine::download_to`] itself; for
    /// a client that fetched the content and verified it on its own). A record deleted
    /// meanwhile is not counted.
    pub async fn count_download(&self, record: &ArtifactRecord, principal: &str) -> Result<()> {
        let _write = self.write.lock().await;
        let before = self.generation()?;
        // Deleted meanwhile (`None`): the bytes were delivered, there is nothing to count on.
        let result = self.amend(record, "artifact.download", principal, |current, now| {
            current.download_count += 1;
            current.last_download_at = Some(now);
        })?;
        if let Some((current, event)) = result {
            // Durable before the projection shows it (see the pending mark in `sqlite.rs`); a
            // failed flush leaves the mark set, and the delivered download stays a success.
            let flushed = self.cas.flush().await.map_err(Error::from);
            let projected = flushed.and_then(|()| {
                let generation = self.generation()?;
                self.project_sqlite(generation, |sqlite| {
                    sqlite.upsert(&current, &event, generation)
                })?;
                // A download changes nothing the layout shows: it is current at this generation
                // too (otherwise every download would make the next open rebuild it).
                match &self.layout {
                    Some(layout) => layout.advance(before, generation),
                    None => Ok(()),
                }
            });
            warn_stale(projected);
        }
        Ok(())
    }

    /// Deletes one version (when `selector.version` is given) or every version of the artifact
    /// `selector` means. Chunks nothing else uses are reclaimed by a GC pass right after.
    pub async fn delete(
        &self,
        selector: &Selector,
        principal: &str,
    ) -> Result<Vec<ArtifactRecord>> {
        let _write = self.write.lock().await;
        // Resolved under the lock: a concurrent delete of the same artifact makes this one
        // "not found" instead of a success that deleted nothing.
        let target = self.resolve(selector)?;
        let key = target.key()?;
        let all = self.versions(&key)?;
        let doomed: Vec<ArtifactRecord> = match selector.version {
            Some(v) => all.iter().filter(|r| r.version == v).cloned().collect(),
            None => all.clone(),
        };
        let remaining: Vec<&ArtifactRecord> = all.iter().filter(|r| !doomed.contains(r)).collect();
        let newest_after = remaining.last().copied();
        // The chunks that may lose their last reference: GC looks at these only.
        let mut candidates = Vec::new();
        for record in &doomed {
            candidates.extend(
                self.cas
                    .manifest(record.manifest)
                    .await?
                    .chunks()
                    .iter()
                    .map(|c| c.id),
            );
        }
        candidates.sort();
        candidates.dedup();
        let now = now_secs();
        let before = self.generation()?;
        self.sqlite.mark_pending()?;
        let trees = self.cas.trees();
        let events = (
            &trees.manifests,
            &trees.manifest_refs,
            &trees.chunk_refs,
            &self.artifacts,
            &self.by_name,
            &self.events,
            &self.meta,
            &self.by_time_all,
            &self.by_time_latest,
        )
            .transaction(
                |(m, mr, cr, artifacts, by_name, events, meta, by_time_all, by_time_latest)| {
                    let mut out = Vec::with_capacity(doomed.len());
                    for record in &doomed {
                        artifacts.remove(key.version_key(record.version))?;
                        by_time_all.remove(&time_key(record))?;
                        by_time_latest.remove(&time_key(record))?;
                        release_tx(m, mr, cr, record.manifest)?;
                        out.push(self.event_tx(
                            events,
                            meta,
                            "artifact.delete",
                            record,
                            principal,
                            now,
                        )?);
                    }
                    match newest_after {
                        Some(newest) => {
                            by_time_latest
                                .insert(&time_key(newest), key.version_key(newest.version))?;
                        }
                        None => {
                            by_name.remove(by_name_key(&key))?;
                        }
                    }
                    Ok(out)
                },
            )
            .map_err(tx_error)
            .map_err(Error::from)?;
        self.cas.flush().await?;
        // Committed: projection and GC failures from here on are reported, not returned.
        let projected = async {
            let generation = self.generation()?;
            self.project_sqlite(generation, |sqlite| {
                doomed
                    .iter()
                    .zip(&events)
                    .try_for_each(|(record, event)| sqlite.delete(record, event, generation))
            })?;
            if let Some(layout) = &self.layout {
                let newest = self.versions(&key)?.pop();
                layout.replace(&self.cas, &key, newest.as_ref()).await?;
                layout.advance(before, generation)?;
                // Under the catalog lock like every layout change: an upload adopting an
                // object must not see it removed before it links it. Only the deleted
                // versions' objects can have become unused.
                for record in &doomed {
                    layout.remove_object_if_unused(record)?;
                }
            }
            Ok(())
        };
        warn_stale(projected.await);
        drop(_write);
        if let Err(e) = self.cas.collect(candidates).await {
            tracing::warn!(
                "freeing the deleted artifact's chunks failed; they stay until a full GC: {}",
                error_chain(&e)
            );
        }
        Ok(doomed)
    }

    /// Events whose kind matches the glob `pattern` (all when `None`), oldest first, the most
    /// recent `limit` of them.
    pub fn events(&self, pattern: Option<&str>, limit: Option<usize>) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        for item in self.events.iter().rev() {
            let event = Event::decode(&item?.1)?;
            if pattern.is_none_or(|p| glob_match(p, &event.kind)) {
                out.push(event);
                if limit.is_some_and(|l| out.len() >= l) {
                    break;
                }
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Per-stack usage figures.
    pub fn stack_usage(&self) -> Result<Vec<StackUsage>> {
        let mut usage: std::collections::BTreeMap<
            String,
            (StackUsage, BTreeSet<(String, String)>),
        > = Default::default();
        for record in self.list(&ListQuery {
            all_versions: true,
            ..ListQuery::default()
        })? {
            let (u, names) = usage.entry(record.stack.clone()).or_default();
            u.stack = record.stack.clone();
            u.versions += 1;
            u.logical_bytes += record.size;
            u.stored_bytes += record.stored_bytes;
            names.insert((record.task, record.name));
            u.artifacts = names.len() as u64;
        }
        Ok(usage.into_values().map(|(u, _)| u).collect())
    }

    /// Records an event that is not about one artifact version — a cleanup run, a failed
    /// policy: `name` carries what it is about (a policy), `stack` the stack it covered (`*`
    /// for all), `count` a number of versions (in the version column) and `size` a byte count
    /// (freed bytes for a cleanup run).
    pub async fn record_event(
        &self,
        kind: &str,
        principal: &str,
        stack: &str,
        name: &str,
        count: u32,
        size: u64,
    ) -> Result<Event> {
        let now = now_secs();
        let _write = self.write.lock().await;
        let before = self.generation()?;
        self.sqlite.mark_pending()?;
        let event = (&self.events, &self.meta)
            .transaction(|(events, meta)| {
                let seq = events.generate_id()?;
                let event = Event {
                    seq,
                    time: now,
                    kind: kind.into(),
                    agent: self.agent.clone(),
                    principal: principal.into(),
                    artifact_id: ArtifactId::from_u128(0),
                    stack: stack.into(),
                    task: String::new(),
                    name: name.into(),
                    version: count,
                    size,
                };
                events.insert(&seq.to_be_bytes(), event.encode())?;
                let generation = meta.get(GENERATION)?.map_or(0, |v| decode_u64(&v)) + 1;
                meta.insert(GENERATION, &generation.to_be_bytes())?;
                Ok(event)
            })
            .map_err(|e: sled::transaction::TransactionError<sloth_cas::Error>| {
                Error::from(tx_error(e))
            })?;
        self.cas.flush().await?;
        let generation = self.generation()?;
        let projected =
            self.project_sqlite(generation, |sqlite| sqlite.event_only(&event, generation));
        warn_stale(projected);
        if let Some(layout) = &self.layout {
            // No record changed: the layout is current at this generation too.
            warn_stale(layout.advance(before, generation));
        }
        Ok(event)
    }

    /// Registers the retention rule a workflow's `artifact_retention` declares for `stack`
    /// (the built-in `older-than`, hourly), replacing the stack's previous one. Agents serving
    /// this store run registered rules on schedule next to those of their config. Returns the
    /// rule, and whether it is new or changed.
    pub fn register_workflow_retention(
        &self,
        stack: &str,
        older_than: &str,
    ) -> Result<(RetentionRule, bool)> {
        crate::Name::parse("stack", stack)?;
        let rule = RetentionRule::workflow(stack, older_than)?;
        let key = format!("{WORKFLOW_RETENTION}{stack}");
        let encoded = serde_json::to_vec(&rule).map_err(|e| Error::Io(std::io::Error::other(e)))?;
        let previous = self.meta.insert(key, encoded.as_slice())?;
        self.meta.flush()?;
        Ok((rule, previous.as_deref() != Some(encoded.as_slice())))
    }

    /// The retention rules workflows registered, one per stack.
    pub fn workflow_retention_rules(&self) -> Result<Vec<RetentionRule>> {
        self.meta
            .scan_prefix(WORKFLOW_RETENTION)
            .map(|item| {
                let (_, value) = item?;
                serde_json::from_slice(&value).map_err(|e| Error::Io(std::io::Error::other(e)))
            })
            .collect()
    }

    /// Whether a retention rule (by its fingerprint) has run on this store before.
    pub fn retention_rule_seen(&self, fingerprint: &str) -> Result<bool> {
        Ok(self
            .meta
            .contains_key(format!("retention_seen:{fingerprint}"))?)
    }

    /// Remembers that a retention rule has run on this store.
    pub fn mark_retention_rule_seen(&self, fingerprint: &str) -> Result<()> {
        self.meta
            .insert(format!("retention_seen:{fingerprint}"), &[])?;
        self.meta.flush()?;
        Ok(())
    }

    /// Records an event inside a catalog transaction and bumps the catalog generation.
    fn event_tx(
        &self,
        events: &TransactionalTree,
        meta: &TransactionalTree,
        kind: &str,
        record: &ArtifactRecord,
        principal: &str,
        now: i64,
    ) -> std::result::Result<Event, ConflictableTransactionError<sloth_cas::Error>> {
        let seq = events.generate_id()?;
        let event = Event {
            seq,
            time: now,
            kind: kind.into(),
            agent: self.agent.clone(),
            principal: principal.into(),
            artifact_id: record.id,
            stack: record.stack.clone(),
            task: record.task.clone(),
            name: record.name.clone(),
            version: record.version,
            size: record.size,
        };
        events.insert(&seq.to_be_bytes(), event.encode())?;
        let generation = meta.get(GENERATION)?.map_or(0, |v| decode_u64(&v)) + 1;
        meta.insert(GENERATION, &generation.to_be_bytes())?;
        Ok(event)
    }

    /// The catalog generation: bumped by every change, recorded in the projections so that a
    /// stale one (a crash between the catalog commit and its update) is noticed and rebuilt.
    fn generation(&self) -> Result<u64> {
        Ok(self.meta.get(GENERATION)?.map_or(0, |v| decode_u64(&v)))
    }

    /// The catalog's generation; `metadata.db`'s with its number of artifact rows, or why the
    /// file cannot be read (a problem of the projection, not of the catalog).
    pub(crate) fn projection_figures(&self) -> Result<(u64, ProjectionFigures)> {
        let projection = self
            .sqlite
            .generation()
            .and_then(|g| Ok((g, self.sqlite.rows()?)));
        Ok((self.generation()?, projection))
    }

    /// Applies one committed change to `metadata.db` with `update`, or rebuilds the file when
    /// an earlier update failed: an update on top of a missed one would record the current
    /// generation (and clear the pending mark) over content that lacks the missed change.
    fn project_sqlite(
        &self,
        generation: u64,
        update: impl FnOnce(&SqliteProjection) -> Result<()>,
    ) -> Result<()> {
        if self.sqlite.is_behind() {
            tracing::info!(
                "rebuilding metadata.db at generation {generation} after a failed update"
            );
            return self.rebuild_sqlite(generation);
        }
        update(&self.sqlite)
    }

    /// Rewrites `metadata.db` from every version and event of the catalog.
    fn rebuild_sqlite(&self, generation: u64) -> Result<()> {
        let all = self.list(&ListQuery {
            all_versions: true,
            ..ListQuery::default()
        })?;
        let events = self.events(None, None)?;
        self.sqlite.rebuild(&all, &events, generation)
    }

    /// Rebuilds `metadata.db` and the layout from the catalog, whatever their state.
    pub(crate) async fn rebuild_projections(&self) -> Result<()> {
        let _write = self.write.lock().await;
        let generation = self.generation()?;
        // One projection failing does not keep the other from being repaired.
        let sqlite = self.rebuild_sqlite(generation);
        if let Some(layout) = &self.layout {
            layout
                .rebuild(&self.cas, &self.shown_in_layout()?, generation)
                .await?;
        }
        sqlite
    }

    /// Removes the layout's materialized object of `record`'s content (found not to match it).
    pub(crate) fn discard_layout_object(&self, record: &ArtifactRecord) -> Result<()> {
        match &self.layout {
            Some(layout) => layout.discard_object(record),
            None => Ok(()),
        }
    }

    /// What the layout shows: the newest version of each artifact, unless it is damaged.
    fn shown_in_layout(&self) -> Result<Vec<ArtifactRecord>> {
        Ok(self
            .list(&ListQuery::default())?
            .into_iter()
            .filter(|r| r.damaged.is_none())
            .collect())
    }

    /// Changes one version's record and records a `kind` event about it, in one transaction;
    /// `None` when the version is gone. The caller holds the write lock (and keeps it while it
    /// updates the projections, so that they apply in commit order).
    fn amend(
        &self,
        record: &ArtifactRecord,
        kind: &str,
        principal: &str,
        change: impl Fn(&mut ArtifactRecord, i64),
    ) -> Result<Option<(ArtifactRecord, Event)>> {
        let key = record.key()?;
        let now = now_secs();
        self.sqlite.mark_pending()?;
        (&self.artifacts, &self.events, &self.meta)
            .transaction(|(artifacts, events, meta)| {
                let Some(bytes) = artifacts.get(key.version_key(record.version))? else {
                    return Ok(None);
                };
                let mut current = ArtifactRecord::decode(&bytes).map_err(|e| {
                    ConflictableTransactionError::Abort(sloth_cas::Error::Task(e.to_string()))
                })?;
                change(&mut current, now);
                artifacts.insert(key.version_key(record.version), current.encode())?;
                let event = self.event_tx(events, meta, kind, &current, principal, now)?;
                Ok(Some((current, event)))
            })
            .map_err(tx_error)
            .map_err(Error::from)
    }

    /// Marks a version damaged (see [`ArtifactRecord::damaged`]) or, with `None`, restored,
    /// recording an `artifact.damaged` / `artifact.restored` event. The caller rebuilds the
    /// projections afterwards.
    pub(crate) async fn set_damaged(
        &self,
        record: &ArtifactRecord,
        reason: Option<&str>,
        principal: &str,
    ) -> Result<()> {
        let kind = if reason.is_some() {
            "artifact.damaged"
        } else {
            "artifact.restored"
        };
        let _write = self.write.lock().await;
        let result = self.amend(record, kind, principal, |current, now| {
            current.damaged = reason.map(str::to_owned);
            current.modified_at = now;
        })?;
        self.cas.flush().await?;
        if result.is_some() {
            tracing::warn!(
                "{} {} v{} ({}/{}){}",
                if reason.is_some() {
                    "marked damaged:"
                } else {
                    "restored:"
                },
                record.name,
                record.version,
                record.stack,
                record.task,
                reason.map(|r| format!(": {r}")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Rebuilds `metadata.db` and the layout when they are missing or behind the catalog. A
    /// failed rebuild (a damaged chunk, a full disk) is reported and leaves the projection
    /// stale for the next open to retry: it never keeps the catalog itself from opening.
    async fn repair_projections(&self) -> Result<()> {
        warn_stale(self.rebuild_stale_projections().await);
        Ok(())
    }

    async fn rebuild_stale_projections(&self) -> Result<()> {
        // Only the generations are compared on every open: reading the catalog is for repairs.
        let generation = self.generation()?;
        // One projection failing does not keep the other from being repaired.
        let sqlite = match (self.sqlite.generation(), self.sqlite.layout_flag()) {
            (Ok(g), Ok(flag)) if g == Some(generation) && flag == Some(self.layout.is_some()) => {
                self.sqlite.confirm_current()
            }
            _ => {
                tracing::info!("rebuilding metadata.db at generation {generation}");
                self.rebuild_sqlite(generation)
            }
        };
        if let Some(layout) = &self.layout
            && layout.generation()? != Some(generation)
        {
            if layout.may_show_damage() {
                // Settling failed: a rebuild would reuse objects that may have lost bytes.
                return Err(Error::Io(std::io::Error::other(
                    "objects of the artifacts/ layout may have lost bytes and could not be \
                     removed; the layout is not rebuilt until they are",
                )));
            }
            tracing::info!("rebuilding the artifacts/ layout at generation {generation}");
            layout
                .rebuild(&self.cas, &self.shown_in_layout()?, generation)
                .await?;
        }
        sqlite
    }
}

/// `metadata.db`'s generation and number of artifact rows, or why it cannot be read.
pub(crate) type ProjectionFigures = Result<(Option<u64>, u64)>;

/// A version `verify --repair` marked damaged is never served.
pub fn refuse_damaged(record: &ArtifactRecord) -> Result<()> {
    match &record.damaged {
        Some(reason) => Err(Error::MarkedDamaged {
            name: record.name.clone(),
            version: record.version,
            reason: reason.clone(),
        }),
        None => Ok(()),
    }
}

/// Content being received from a client: feed it with [`Receiving::offer`] and
/// [`Receiving::put`], then [`Engine::commit_received`]. Dropped uncommitted, it leaves only
/// unreferenced chunks (for GC) and removes its layout copy.
#[derive(Debug)]
pub struct Receiving {
    receiver: Option<Receiver<PackStore, Box<dyn std::io::Write + Send>>>,
    copy: Option<(PathBuf, std::fs::File)>,
}

impl Receiving {
    /// See [`Receiver::offer`].
    pub async fn offer(&mut self, chunks: &[sloth_cas::ChunkRef]) -> Result<Vec<u32>> {
        Ok(self.receiver_mut()?.offer(chunks).await?)
    }

    /// See [`Receiver::put`].
    pub async fn put(
        &mut self,
        frames: Vec<(sloth_cas::ChunkId, sloth_cas::frame::Frame)>,
    ) -> Result<()> {
        Ok(self.receiver_mut()?.put(frames).await?)
    }

    fn receiver_mut(&mut self) -> Result<&mut Receiver<PackStore, Box<dyn std::io::Write + Send>>> {
        self.receiver
            .as_mut()
            .ok_or_else(|| Error::CorruptRecord("receive already committed".into()))
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        if let Some((path, _)) = &self.copy {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Opens a file to upload, refusing what cannot be one (missing, unreadable, a directory)
/// with an error naming the path. Callers that wrap the file (a progress counter) use this
/// and then [`Engine::upload`].
pub fn open_upload(path: &Path) -> Result<std::fs::File> {
    let bad = |reason: String| Error::BadInput {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.is_dir() {
        return Err(bad("it is a directory".into()));
    }
    std::fs::File::open(path).map_err(|e| bad(e.to_string()))
}

/// Reports a projection that could not be brought up to date. The catalog is committed and
/// the projection's generation stays behind, so the next open rebuilds it.
fn warn_stale(result: Result<()>) {
    if let Err(e) = result {
        tracing::warn!(
            "a projection (metadata.db or artifacts/) is stale and will be rebuilt on the next open: {}",
            error_chain(&e)
        );
    }
}

/// An error and its causes, `: `-separated, skipping causes the text already shows (some
/// errors repeat their cause in their own message): for log lines and error statuses.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The layout's copy of an upload, written as the ingest cuts the content; a failed write
/// says what was being written.
struct LayoutCopy(std::fs::File);

impl std::io::Write for LayoutCopy {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("writing the layout copy in objects/ failed: {e}"),
            )
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Time-index key: upload time (u64 BE) then id (u128 BE, itself time-ordered), so entries
/// sort by upload time and never collide.
fn time_key(record: &ArtifactRecord) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&(record.created_at.max(0) as u64).to_be_bytes());
    k[8..].copy_from_slice(&record.id.as_u128().to_be_bytes());
    k
}

fn by_name_key(key: &ArtifactKey) -> Vec<u8> {
    let mut k = Vec::new();
    for part in [&key.name, &key.stack, &key.task] {
        k.extend_from_slice(part.as_str().as_bytes());
        k.push(0);
    }
    k
}

fn decode_u32(bytes: &[u8]) -> u32 {
    bytes.try_into().map(u32::from_be_bytes).unwrap_or(0)
}

fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// Creates `dir` if needed and proves it writable, so that a bad `--data-dir` fails up front
/// with its name instead of deep inside sled.
fn check_writable(dir: &Path) -> Result<()> {
    let fail = |e: std::io::Error| Error::DataDir {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".sloth-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)?;
    Ok(())
}

/// How a [`Selector`] is resolved, by the catalog and by its projection alike: `places` gives
/// every (stack, task) holding an artifact of the name, `fetch` one version of one artifact
/// (the newest for `None`). A name in several of the places the selector allows is
/// [`Error::Ambiguous`].
pub(crate) fn resolve_with(
    selector: &Selector,
    places: impl FnOnce(&crate::Name) -> Result<BTreeSet<(String, String)>>,
    fetch: impl FnOnce(&ArtifactKey, Option<u32>) -> Result<Option<ArtifactRecord>>,
) -> Result<ArtifactRecord> {
    let not_found = || Error::NotFound {
        name: selector.name.clone(),
        stack: selector.stack.clone(),
        task: selector.task.clone(),
        version: selector.version,
    };
    let name = crate::Name::parse("artifact name", &selector.name)?;
    let mut places = places(&name)?;
    places.retain(|(stack, task)| {
        selector.stack.as_ref().is_none_or(|s| s == stack)
            && selector.task.as_ref().is_none_or(|t| t == task)
    });
    let (stack, task) = match places.len() {
        0 => return Err(not_found()),
        1 => places.pop_first().expect("one"),
        _ => {
            return Err(Error::Ambiguous {
                name: selector.name.clone(),
                candidates: places.into_iter().collect(),
            });
        }
    };
    let key = ArtifactKey::new(&selector.name, Some(&stack), Some(&task))?;
    fetch(&key, selector.version)?.ok_or_else(not_found)
}

/// `items.iter().map(f).collect()`, on up to four threads when there are many items.
pub(crate) fn parallel_map<T: Sync, U: Send>(items: &[T], f: impl Fn(&T) -> U + Sync) -> Vec<U> {
    /// Fewer items are mapped on the calling thread.
    const SPLIT_FROM: usize = 16_384;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if items.len() < SPLIT_FROM || threads == 1 {
        return items.iter().map(f).collect();
    }
    let f = &f;
    std::thread::scope(|scope| {
        let parts: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<U>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|part| part.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}
