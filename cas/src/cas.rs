//! The content-addressed store: ingest, commit, read, release, garbage collection, scrub.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::chunker::Chunker;
use crate::manifest::{ChunkRef, ContentCheck, ContentDigests};
use crate::pack::PackStore;
use crate::pool::CpuPool;
use crate::sink::ContentSink;
use crate::store::ChunkStore;
use crate::{ChunkId, ChunkerParams, Error, Manifest, ManifestId, Result, frame};

/// Version of the on-disk layout of the store's own trees.
const FORMAT_VERSION: u32 = 1;
/// Chunks listed per page by GC and scrub.
const PAGE: usize = 4096;

const META_TREE: &str = "meta";
const MANIFESTS_TREE: &str = "manifests";
const MANIFEST_REFS_TREE: &str = "manifest_refs";
const CHUNK_REFS_TREE: &str = "chunk_refs";

/// Options for one ingest.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Compress new chunks with zstd at the store's level (default). Off stores them raw, for
    /// content known not to compress; chunks the store already has keep their stored form.
    pub compress: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self { compress: true }
    }
}

/// How a store is opened. Every field has a sensible default.
#[derive(Debug, Clone)]
pub struct CasConfig {
    /// Chunker parameters for a new store. `None` uses what an existing store recorded, or the
    /// default for a new one. Giving parameters that differ from the recorded ones is an error.
    pub chunker: Option<ChunkerParams>,
    /// zstd level for new chunks (default 3; 1–19 are sensible).
    pub zstd_level: i32,
    /// Chunks processed at once during ingest and read (default: 8 × cores, at least 16).
    /// Results are consumed in order, so a slow chunk at the head stalls the rest: a deep window
    /// keeps both cores busy (measured on 2 cores: 6 → 247 MB/s, 16 → 285 MB/s). Bounds memory:
    /// at most this many chunks (each ≤ 4 × the average size) are in flight.
    pub concurrency: usize,
    /// sled's page cache, in bytes (default 64 MiB; sled's own default is 1 GiB).
    pub cache_capacity: u64,
    /// How long [`Cas::open`] waits for another process (or a just-dropped handle) to release
    /// the store's lock before failing with [`Error::Locked`] (default 3 s).
    pub lock_wait: std::time::Duration,
}

impl Default for CasConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            chunker: None,
            zstd_level: 3,
            concurrency: (8 * cores).max(16),
            cache_capacity: 64 << 20,
            lock_wait: std::time::Duration::from_secs(3),
        }
    }
}

/// What one ingest did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Chunks in the content.
    pub chunks: u64,
    /// Chunks the store did not have yet.
    pub new_chunks: u64,
    /// Uncompressed bytes of the new chunks.
    pub new_bytes: u64,
    /// Frame bytes written for the new chunks (after compression).
    pub new_stored_bytes: u64,
}

/// Content that has been chunked and stored but is not yet visible: [`Cas::commit`] makes it so.
///
/// While a `Staged` is alive its chunks are leased, so garbage collection leaves them alone.
/// Dropping it without committing leaves at most unreferenced chunks that GC reclaims.
#[derive(Debug)]
pub struct Staged {
    manifest: Manifest,
    stats: IngestStats,
    _leases: Vec<Lease>,
}

impl Staged {
    pub(crate) fn new(manifest: Manifest, stats: IngestStats, leases: Vec<Lease>) -> Self {
        Self {
            manifest,
            stats,
            _leases: leases,
        }
    }

    /// The manifest that commit will store.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// What the ingest stored.
    pub fn stats(&self) -> IngestStats {
        self.stats
    }
}

/// What a garbage collection pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunks examined.
    pub chunks_scanned: u64,
    /// Unreferenced chunks removed.
    pub chunks_deleted: u64,
    /// Frame bytes removed.
    pub bytes_freed: u64,
    /// Disk space given back by compacting the chunk store (pack files) afterwards.
    pub bytes_reclaimed: u64,
}

/// What a recompression pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecompressReport {
    /// Chunks looked at.
    pub chunks_examined: u64,
    /// Chunks whose frame was replaced by a smaller one.
    pub chunks_recompressed: u64,
    /// Frame bytes of the replaced chunks before.
    pub bytes_before: u64,
    /// Frame bytes of the replaced chunks after.
    pub bytes_after: u64,
    /// Disk space compaction gave back afterwards.
    pub bytes_reclaimed: u64,
}

/// A chunk that failed verification, with everything that needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadChunk {
    /// The chunk.
    pub id: ChunkId,
    /// Why it failed (`missing` when it is not stored at all).
    pub reason: String,
    /// Manifests that reference it.
    pub manifests: Vec<ManifestId>,
}

/// What a scrub found. An empty `bad_chunks`, `bad_manifests` and `ref_mismatches` is a
/// healthy store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Chunks read and rehashed.
    pub chunks_checked: u64,
    /// Frame bytes read.
    pub bytes_checked: u64,
    /// Manifests checked.
    pub manifests_checked: u64,
    /// Corrupt or missing chunks.
    pub bad_chunks: Vec<BadChunk>,
    /// Manifests that could not be decoded or whose id does not match their content.
    pub bad_manifests: Vec<(ManifestId, String)>,
    /// Chunks whose recorded reference count differs from the manifests that use them.
    pub ref_mismatches: u64,
}

impl ScrubReport {
    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.bad_chunks.is_empty() && self.bad_manifests.is_empty() && self.ref_mismatches == 0
    }
}

/// Store-wide figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Distinct chunks stored.
    pub chunks: u64,
    /// Bytes of all stored frames.
    pub stored_bytes: u64,
    /// Manifests stored.
    pub manifests: u64,
}

/// Chunks that an ingest in flight will reference; GC never deletes a leased chunk.
#[derive(Debug, Default)]
struct Leases {
    held: Mutex<HashMap<ChunkId, u32>>,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkId, u32>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One leased chunk; released on drop.
#[derive(Debug)]
pub(crate) struct Lease {
    leases: Arc<Leases>,
    id: ChunkId,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut held = self.leases.lock();
        if let Some(n) = held.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.id);
            }
        }
    }
}

#[derive(Debug)]
struct Inner<S> {
    db: sled::Db,
    manifests: sled::Tree,
    manifest_refs: sled::Tree,
    chunk_refs: sled::Tree,
    chunks: S,
    params: ChunkerParams,
    config: CasConfig,
    leases: Arc<Leases>,
    /// GC holds this exclusively while it decides and deletes; taking a lease holds it shared.
    /// See the crate docs for why this makes GC safe against concurrent ingests.
    gc_gate: tokio::sync::RwLock<()>,
    /// Held for a whole GC pass.
    gc_running: tokio::sync::Mutex<()>,
    /// Frame bytes deleted since the chunk store was last compacted (this process only).
    freed_since_compaction: std::sync::atomic::AtomicU64,
    /// Hashing, compression and decoding run here, one thread per core.
    cpu: CpuPool,
    location: String,
    /// Keeps a temporary store's directory alive as long as the store.
    _temp: Option<tempfile::TempDir>,
}

impl<S> Inner<S> {
    /// Leases `id` so that GC leaves it alone (see the crate docs); taken before asking the
    /// store whether the chunk exists.
    async fn lease(&self, id: ChunkId) -> Lease {
        let _gate = self.gc_gate.read().await;
        *self.leases.lock().entry(id).or_insert(0) += 1;
        Lease {
            leases: Arc::clone(&self.leases),
            id,
        }
    }
}

/// A content-addressed store of chunks and manifests. Cheap to clone; clones share the store.
#[derive(Debug)]
pub struct Cas<S = PackStore> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Cas<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl Cas<PackStore> {
    /// Opens (creating if needed) the store in directory `path`: the sled database (metadata
    /// and chunk index) in `path/index`, chunk frames in pack files under `path/packs`.
    ///
    /// sled locks its directory: a second open of the same path, from this process or
    /// another, waits up to [`CasConfig::lock_wait`] for the first to close and then fails with
    /// [`Error::Locked`].
    pub fn open(path: impl AsRef<Path>, config: CasConfig) -> Result<Self> {
        Self::open_in(path.as_ref(), config, None)
    }

    /// A store in a fresh temporary directory, deleted when the last clone is dropped.
    pub fn temporary(config: CasConfig) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_path_buf();
        Self::open_in(&path, config, Some(dir))
    }

    fn open_in(path: &Path, config: CasConfig, temp: Option<tempfile::TempDir>) -> Result<Self> {
        let db = open_sled(&path.join("index"), config.cache_capacity, config.lock_wait)?;
        let chunks = PackStore::open(path.join("packs"), &db)?;
        let mut cas = Self::with_store(db, chunks, config, path.display().to_string())?;
        Arc::get_mut(&mut cas.inner).expect("not shared yet")._temp = temp;
        Ok(cas)
    }

    /// The chunk store, for tests and harnesses that damage it on purpose.
    pub fn chunk_store(&self) -> &PackStore {
        &self.inner.chunks
    }
}

impl<S: ChunkStore> Cas<S> {
    /// A store whose metadata lives in `db` and whose chunk frames live in `chunks`.
    /// `location` names the store in error messages.
    pub fn with_store(
        db: sled::Db,
        chunks: S,
        config: CasConfig,
        location: String,
    ) -> Result<Self> {
        let meta = db.open_tree(META_TREE)?;
        let mut changed = false;
        let version = read_u32(&meta, "format")?;
        match version {
            None => {
                meta.insert("format", &FORMAT_VERSION.to_be_bytes())?;
                changed = true;
            }
            Some(FORMAT_VERSION) => {}
            Some(found) => {
                return Err(Error::UnsupportedFormat {
                    path: location,
                    found,
                    supported: FORMAT_VERSION,
                });
            }
        }
        let params = match (read_u32(&meta, "avg_chunk")?, config.chunker) {
            (Some(stored), Some(requested)) if stored != requested.avg() => {
                return Err(Error::ParamsMismatch {
                    path: location,
                    stored,
                    requested: requested.avg(),
                });
            }
            (Some(stored), _) => ChunkerParams::new(stored)?,
            (None, requested) => {
                let params = requested.unwrap_or_default();
                meta.insert("avg_chunk", &params.avg().to_be_bytes())?;
                changed = true;
                params
            }
        };
        // Only a new store writes here: an open of an existing one stays read-only.
        if changed {
            meta.flush()?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                manifests: db.open_tree(MANIFESTS_TREE)?,
                manifest_refs: db.open_tree(MANIFEST_REFS_TREE)?,
                chunk_refs: db.open_tree(CHUNK_REFS_TREE)?,
                db,
                chunks,
                params,
                config: CasConfig {
                    concurrency: config.concurrency.max(1),
                    ..config
                },
                leases: Arc::default(),
                gc_gate: tokio::sync::RwLock::new(()),
                gc_running: tokio::sync::Mutex::new(()),
                freed_since_compaction: std::sync::atomic::AtomicU64::new(0),
                cpu: CpuPool::new(std::thread::available_parallelism().map_or(2, |n| n.get()))?,
                location,
                _temp: None,
            }),
        })
    }

    /// The chunker parameters this store uses.
    pub fn params(&self) -> ChunkerParams {
        self.inner.params
    }

    /// The zstd level new chunks are compressed with.
    pub fn zstd_level(&self) -> i32 {
        self.inner.config.zstd_level
    }

    /// The sled database holding the store's metadata, so that callers can keep their own
    /// trees beside it and commit them atomically with manifests (see [`CasTrees`]).
    pub fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// The metadata trees, for transactions that span the store and the caller's own trees.
    pub fn trees(&self) -> CasTrees {
        CasTrees {
            manifests: self.inner.manifests.clone(),
            manifest_refs: self.inner.manifest_refs.clone(),
            chunk_refs: self.inner.chunk_refs.clone(),
        }
    }

    /// Chunks and stores everything `reader` yields, without making it visible.
    ///
    /// Runs as a pipeline: a thread reads one block ahead, another cuts chunks and computes the
    /// whole-content BLAKE3, a third the whole-content SHA-256 and each chunk's id, while up to
    /// `concurrency` chunks are looked up and (when new) compressed and stored on the CPU pool.
    /// Only chunks the store lacks are compressed and written.
    pub async fn ingest_reader<R: Read + Send + 'static>(&self, reader: R) -> Result<Staged> {
        self.ingest_reader_with(reader, IngestOptions::default())
            .await
    }

    /// [`Cas::ingest_reader`] with per-ingest options (compression on or off).
    pub async fn ingest_reader_with<R: Read + Send + 'static>(
        &self,
        reader: R,
        options: IngestOptions,
    ) -> Result<Staged> {
        self.ingest_inner(reader, options, None).await
    }

    /// [`Cas::ingest_reader_with`] that also writes the content into `copy` as it is cut, on
    /// the thread that reads it. A failed write fails the ingest ([`Error::Output`]).
    ///
    /// Unlike a reader that copies what passes through it, this leaves the chunker reading
    /// straight into uninitialised buffers (see [`Chunker`]).
    pub async fn ingest_reader_copying<R, W>(
        &self,
        reader: R,
        options: IngestOptions,
        copy: W,
    ) -> Result<Staged>
    where
        R: Read + Send + 'static,
        W: std::io::Write + Send + 'static,
    {
        self.ingest_inner(reader, options, Some(Box::new(copy)))
            .await
    }

    async fn ingest_inner<R: Read + Send + 'static>(
        &self,
        reader: R,
        options: IngestOptions,
        mut copy: Option<Box<dyn std::io::Write + Send>>,
    ) -> Result<Staged> {
        let level = options.compress.then_some(self.inner.config.zstd_level);
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<(ChunkId, Bytes)>(self.inner.config.concurrency);
        let params = self.inner.params;
        // The cutter (read, cut points, whole-content BLAKE3) hands each chunk to the digester
        // (whole-content SHA-256, the chunk's id), which passes it on with its id. Neither
        // thread carries more than about a fifth of a first ingest's work, and on a re-ingest,
        // where nothing is compressed, the two share what is left about evenly: the longer of
        // them is that pipeline's critical path. Ids computed here rather than on the CPU pool
        // save each chunk a round trip through it.
        let (digest_tx, digest_rx) =
            std::sync::mpsc::sync_channel::<Bytes>(self.inner.config.concurrency);
        let digester = tokio::task::spawn_blocking(move || {
            let mut check = ContentCheck::default();
            for chunk in digest_rx {
                check.update(&chunk);
                if tx.blocking_send((ChunkId::digest(&chunk), chunk)).is_err() {
                    break; // the store failed and reports why
                }
            }
            check.sha256()
        });
        let cutter = tokio::task::spawn_blocking(move || {
            let mut blake3 = blake3::Hasher::new();
            for chunk in Chunker::reading_ahead(reader, params) {
                let chunk = chunk.map_err(Error::Input)?;
                if let Some(copy) = copy.as_mut() {
                    copy.write_all(&chunk).map_err(Error::Output)?;
                }
                blake3.update(&chunk);
                if digest_tx.send(chunk).is_err() {
                    break; // a consumer failed and reports why
                }
            }
            Ok::<_, Error>(*blake3.finalize().as_bytes())
        });
        let chunks = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let claimed = std::sync::Mutex::new(HashSet::new());
        let stored: Result<Vec<_>> = chunks
            .map(|(id, chunk)| store_chunk(Arc::clone(&self.inner), id, chunk, level, &claimed))
            .buffered(self.inner.config.concurrency)
            .try_collect()
            .await;
        // The cutter's error (a failed read) explains a short stream better than anything else.
        let blake3 = cutter.await??;
        let digests = ContentDigests {
            blake3,
            sha256: digester.await?,
        };
        let stored = stored?;
        self.inner.chunks.sync().await?;

        let mut stats = IngestStats::default();
        let mut refs = Vec::with_capacity(stored.len());
        let mut leases = Vec::with_capacity(stored.len());
        for (chunk_ref, lease, new_stored) in stored {
            stats.chunks += 1;
            if let Some(frame_len) = new_stored {
                stats.new_chunks += 1;
                stats.new_bytes += u64::from(chunk_ref.len);
                stats.new_stored_bytes += frame_len;
            }
            refs.push(chunk_ref);
            leases.push(lease);
        }
        Ok(Staged {
            manifest: Manifest::new(refs, digests),
            stats,
            _leases: leases,
        })
    }

    /// [`Cas::ingest_reader`] for an async reader.
    pub async fn ingest<R: AsyncRead + Unpin + Send + 'static>(&self, reader: R) -> Result<Staged> {
        self.ingest_reader(tokio_util::io::SyncIoBridge::new(reader))
            .await
    }

    /// [`Cas::ingest_reader`] for bytes already in memory.
    pub async fn ingest_bytes(&self, data: impl Into<Bytes>) -> Result<Staged> {
        self.ingest_reader(std::io::Cursor::new(data.into())).await
    }

    /// Makes staged content visible: stores its manifest (or adds a holder to an identical one)
    /// and counts a reference on each of its chunks, in one transaction, then flushes.
    ///
    /// Each commit is one hold on the manifest; [`Cas::release`] gives it back.
    pub async fn commit(&self, staged: Staged) -> Result<ManifestId> {
        let prepared = self.prepare(&staged.manifest).await?;
        let trees = self.trees();
        (&trees.manifests, &trees.manifest_refs, &trees.chunk_refs)
            .transaction(|(m, mr, cr)| {
                retain_tx(m, mr, cr, &prepared)?;
                Ok(())
            })
            .map_err(tx_error)?;
        self.inner.db.flush_async().await?;
        drop(staged);
        Ok(prepared.id)
    }

    /// Checks that every chunk of a staged manifest is present and encodes it for a commit
    /// transaction built by the caller (see [`CasTrees`]). The staged value must stay alive
    /// until that transaction has committed: its leases are what keep GC away.
    pub async fn prepare(&self, manifest: &Manifest) -> Result<PreparedManifest> {
        let id = manifest.id();
        let distinct: Vec<ChunkId> = manifest
            .chunks()
            .iter()
            .map(|c| c.id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // Leases guarantee presence; checking again turns a broken invariant or a damaged
        // store into an error instead of a manifest with holes.
        for batch in distinct.chunks(PAGE) {
            let present = self.inner.chunks.has_many(batch).await?;
            if let Some((id_missing, _)) = batch.iter().zip(present).find(|(_, p)| !p) {
                return Err(Error::MissingChunk {
                    manifest: id,
                    chunk: *id_missing,
                });
            }
        }
        Ok(PreparedManifest {
            id,
            encoded: manifest.encode(),
            distinct,
        })
    }

    /// Gives back one hold on a manifest. When the last is gone the manifest is deleted and its
    /// chunks lose a reference; chunks left with none are reclaimed by the next [`Cas::gc`].
    /// Returns whether the manifest was deleted.
    pub async fn release(&self, id: ManifestId) -> Result<bool> {
        let trees = self.trees();
        let deleted = (&trees.manifests, &trees.manifest_refs, &trees.chunk_refs)
            .transaction(|(m, mr, cr)| release_tx(m, mr, cr, id))
            .map_err(tx_error)?;
        self.inner.db.flush_async().await?;
        Ok(deleted)
    }

    /// The stored manifest with this id.
    pub async fn manifest(&self, id: ManifestId) -> Result<Manifest> {
        let bytes = self
            .inner
            .manifests
            .get(id.as_bytes())?
            .ok_or(Error::ManifestNotFound(id))?;
        Manifest::decode(&bytes)
    }

    /// Whether a manifest is stored.
    pub fn contains_manifest(&self, id: ManifestId) -> Result<bool> {
        Ok(self.inner.manifest_refs.contains_key(id.as_bytes())?)
    }

    /// The content's chunks in order, each fetched, decoded and checked against its id, with
    /// up to `concurrency` fetched ahead. A bad or missing chunk ends the stream with an error;
    /// none of its bytes are returned.
    pub fn read_chunks(
        &self,
        manifest: &Manifest,
    ) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
        let inner = Arc::clone(&self.inner);
        let manifest_id = manifest.id();
        let refs = manifest.chunks().to_vec();
        let depth = inner.config.concurrency;
        futures::stream::iter(refs)
            .map(move |c| load_chunk(Arc::clone(&inner), manifest_id, c))
            .buffered(depth)
    }

    /// Writes the content of manifest `id` to `out`, verifying every chunk against its id and
    /// then the whole content's length and SHA-256 ([`ContentCheck`]). Returns the bytes
    /// written.
    ///
    /// On error some bytes may already have been written: callers that must not expose partial
    /// content write to a temporary file and rename it only on success.
    pub async fn read_to<W: AsyncWrite + Unpin>(&self, id: ManifestId, out: &mut W) -> Result<u64> {
        let manifest = self.manifest(id).await?;
        let mut check = ContentCheck::default();
        let mut chunks = std::pin::pin!(self.read_chunks(&manifest));
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            check.update(&chunk);
            out.write_all(&chunk).await.map_err(Error::Output)?;
        }
        out.flush().await.map_err(Error::Output)?;
        verify_whole(id, &manifest, check)
    }

    /// [`Cas::read_to`] into a blocking writer (a file), which then runs on its own thread
    /// together with the whole-content hashing, overlapping the chunk fetching and decoding.
    /// Returns the bytes written and the writer.
    pub async fn read_to_writer<W: std::io::Write + Send + 'static>(
        &self,
        id: ManifestId,
        out: W,
    ) -> Result<(u64, W)> {
        let manifest = self.manifest(id).await?;
        self.write_verified(&manifest, out).await
    }

    /// Writes the content `manifest` describes to `out`, verifying each chunk and then the
    /// whole content against the manifest's length and SHA-256 (computed beside the writing,
    /// see [`ContentSink`]).
    pub(crate) async fn write_verified<W: std::io::Write + Send + 'static>(
        &self,
        manifest: &Manifest,
        out: W,
    ) -> Result<(u64, W)> {
        let sink = ContentSink::spawn(out, self.inner.config.concurrency);
        let mut chunks = std::pin::pin!(self.read_chunks(manifest));
        let mut failed = None;
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(chunk) => {
                    if !sink.send(chunk).await {
                        break; // the writer failed; it says why below
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let finished = sink.finish().await;
        if let Some(e) = failed {
            return Err(e);
        }
        let (out, check) = finished.map_err(Error::Output)?;
        Ok((verify_whole(manifest.id(), manifest, check)?, out))
    }

    /// Deletes every chunk that no manifest references and no ingest in flight has leased,
    /// then compacts the chunk store.
    pub async fn gc(&self) -> Result<GcReport> {
        let inner = &self.inner;
        // One pass at a time: two compactions at once could each judge the other's fresh
        // copies dead (see `tests/gc_race.rs::concurrent_gc_passes_lose_nothing`).
        let _one_pass = inner.gc_running.lock().await;
        let mut report = GcReport::default();
        let mut after = None;
        loop {
            let page = inner.chunks.list(after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            report.chunks_scanned += page.len() as u64;
            self.delete_unreferenced(page.iter().map(|c| c.id).collect(), &mut report)
                .await?;
        }
        inner.chunks.sync().await?;
        report.bytes_reclaimed = inner.chunks.compact().await?;
        inner.freed_since_compaction.store(0, Ordering::Relaxed);
        Ok(report)
    }

    /// GC limited to `candidates` (the chunks of manifests just released): deletes those no
    /// manifest references and no ingest has leased. Costs what the candidates cost, not what
    /// the store holds; the chunk store is compacted only once the bytes freed since the last
    /// compaction reach a quarter of what it holds.
    pub async fn collect(&self, candidates: Vec<ChunkId>) -> Result<GcReport> {
        let inner = &self.inner;
        let _one_pass = inner.gc_running.lock().await;
        let mut report = GcReport {
            chunks_scanned: candidates.len() as u64,
            ..GcReport::default()
        };
        for batch in candidates.chunks(PAGE) {
            self.delete_unreferenced(batch.to_vec(), &mut report)
                .await?;
        }
        inner.chunks.sync().await?;
        let freed = inner
            .freed_since_compaction
            .fetch_add(report.bytes_freed, Ordering::Relaxed)
            + report.bytes_freed;
        if freed > 0 && freed >= inner.chunks.stored_bytes().await? / 4 {
            report.bytes_reclaimed = inner.chunks.compact().await?;
            inner.freed_since_compaction.store(0, Ordering::Relaxed);
        }
        Ok(report)
    }

    /// Deletes those of `candidates` that are unreferenced and unleased.
    async fn delete_unreferenced(
        &self,
        candidates: Vec<ChunkId>,
        report: &mut GcReport,
    ) -> Result<()> {
        let inner = &self.inner;
        let unreferenced =
            |id: &ChunkId| -> Result<bool> { Ok(!inner.chunk_refs.contains_key(id.as_bytes())?) };
        let mut maybe = Vec::new();
        for id in candidates {
            if unreferenced(&id)? {
                maybe.push(id);
            }
        }
        if maybe.is_empty() {
            return Ok(());
        }
        // Decide and delete with no lease able to start: a chunk unleased and unreferenced
        // now cannot gain a reference before it is gone, and an ingest that looks for it
        // afterwards finds it missing and stores it again.
        let _gate = inner.gc_gate.write().await;
        let doomed = {
            let held = inner.leases.lock();
            let mut doomed = Vec::with_capacity(maybe.len());
            for id in maybe {
                if !held.contains_key(&id) && unreferenced(&id)? {
                    doomed.push(id);
                }
            }
            doomed
        };
        report.chunks_deleted += doomed.len() as u64;
        report.bytes_freed += inner.chunks.delete_many(doomed).await?;
        Ok(())
    }

    /// Re-encodes every zstd chunk stored at a lower level than `level` at `level`, keeping the
    /// new frame only when it is smaller, then compacts. For cold data: ingest stays fast at
    /// the configured level and a maintenance pass buys the space back later. Every new frame
    /// is decoded and checked against the chunk id before it replaces the old one.
    pub async fn recompress(&self, level: i32) -> Result<RecompressReport> {
        let inner = &self.inner;
        let _one_pass = inner.gc_running.lock().await;
        let mut report = RecompressReport::default();
        let mut after = None;
        loop {
            let page = inner.chunks.list(after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            let jobs = futures::stream::iter(page)
                .map(|c| {
                    let inner = Arc::clone(inner);
                    async move {
                        let Some(old) = inner.chunks.get(c.id).await? else {
                            return Ok::<_, Error>(None);
                        };
                        inner
                            .cpu
                            .run(move || {
                                let header = frame::FrameHeader::parse(&old)
                                    .map_err(|reason| Error::CorruptChunk { id: c.id, reason })?;
                                if header.codec != frame::Codec::Zstd
                                    || i32::from(header.level) >= level
                                {
                                    return Ok(None);
                                }
                                let data = frame::decode(&c.id, &old)?;
                                let new = frame::encode(&data, level);
                                // Belt and braces: what replaces a good frame must decode to
                                // the same chunk.
                                new.decode(&c.id)?;
                                Ok::<_, Error>((new.stored_len() < old.len()).then_some((
                                    c.id,
                                    old.len() as u64,
                                    new,
                                )))
                            })
                            .await?
                    }
                })
                .buffer_unordered(inner.config.concurrency);
            let mut jobs = std::pin::pin!(jobs);
            let mut batch = Vec::new();
            while let Some(job) = jobs.next().await {
                report.chunks_examined += 1;
                if let Some((id, old_len, new)) = job? {
                    report.bytes_before += old_len;
                    report.bytes_after += new.stored_len() as u64;
                    batch.push((id, new));
                }
            }
            report.chunks_recompressed += inner.chunks.replace_many(batch).await?;
        }
        report.bytes_reclaimed = inner.chunks.compact().await?;
        Ok(report)
    }

    /// Reads and rehashes every chunk, decodes every manifest, checks that each manifest's
    /// chunks are present and sound, and that reference counts match the manifests.
    pub async fn scrub(&self) -> Result<ScrubReport> {
        let inner = &self.inner;
        let mut report = ScrubReport::default();
        let mut bad: HashMap<ChunkId, String> = HashMap::new();
        let mut present: HashSet<ChunkId> = HashSet::new();
        let mut after = None;
        loop {
            let page = inner.chunks.list(after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            let checks = futures::stream::iter(page)
                .map(|c| {
                    let inner = Arc::clone(inner);
                    async move {
                        let verdict = match inner.chunks.get(c.id).await {
                            Err(Error::CorruptChunk { reason, .. }) => Err(reason),
                            Err(e) => return Err(e),
                            Ok(None) => Err("listed but not stored".to_string()),
                            Ok(Some(frame)) => {
                                tokio::task::spawn_blocking(move || {
                                    frame::decode(&c.id, &frame)
                                        .map(|_| frame.len() as u64)
                                        .map_err(|e| match e {
                                            Error::CorruptChunk { reason, .. } => reason,
                                            other => other.to_string(),
                                        })
                                })
                                .await?
                            }
                        };
                        Ok::<_, Error>((c.id, verdict))
                    }
                })
                .buffer_unordered(inner.config.concurrency);
            let mut checks = std::pin::pin!(checks);
            while let Some(check) = checks.next().await {
                let (id, verdict) = check?;
                report.chunks_checked += 1;
                present.insert(id);
                match verdict {
                    Ok(len) => report.bytes_checked += len,
                    Err(reason) => {
                        bad.insert(id, reason);
                    }
                }
            }
        }

        let mut expected_refs: HashMap<ChunkId, u64> = HashMap::new();
        let mut users: HashMap<ChunkId, Vec<ManifestId>> = HashMap::new();
        for item in inner.manifests.iter() {
            let (key, value) = item?;
            let id = ManifestId::from_slice(&key).unwrap_or_else(|| ManifestId::digest(&key));
            report.manifests_checked += 1;
            if ManifestId::digest(&value) != id {
                report
                    .bad_manifests
                    .push((id, "content does not hash to the manifest id".into()));
                continue;
            }
            let manifest = match Manifest::decode(&value) {
                Ok(m) => m,
                Err(e) => {
                    report.bad_manifests.push((id, e.to_string()));
                    continue;
                }
            };
            let distinct: BTreeSet<ChunkId> = manifest.chunks().iter().map(|c| c.id).collect();
            for chunk in distinct {
                *expected_refs.entry(chunk).or_default() += 1;
                if !present.contains(&chunk) {
                    bad.entry(chunk).or_insert_with(|| "missing".into());
                }
                if bad.contains_key(&chunk) {
                    users.entry(chunk).or_default().push(id);
                }
            }
        }
        for item in inner.chunk_refs.iter() {
            let (key, value) = item?;
            let recorded = decode_u64(&value);
            let id = ChunkId::from_slice(&key);
            let expected = id.and_then(|id| expected_refs.remove(&id)).unwrap_or(0);
            if recorded != expected {
                report.ref_mismatches += 1;
            }
        }
        report.ref_mismatches += expected_refs.len() as u64;

        let mut bad_chunks: Vec<BadChunk> = bad
            .into_iter()
            .map(|(id, reason)| BadChunk {
                id,
                reason,
                manifests: users.remove(&id).unwrap_or_default(),
            })
            .collect();
        bad_chunks.sort_by_key(|b| b.id);
        report.bad_chunks = bad_chunks;
        Ok(report)
    }

    /// Counts chunks, their stored bytes and manifests.
    pub async fn stats(&self) -> Result<StoreStats> {
        let mut stats = StoreStats {
            manifests: self.inner.manifests.len() as u64,
            ..StoreStats::default()
        };
        let mut after = None;
        loop {
            let page = self.inner.chunks.list(after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            stats.chunks += page.len() as u64;
            stats.stored_bytes += page.iter().map(|c| c.frame_len).sum::<u64>();
        }
        Ok(stats)
    }

    /// Flushes everything to disk.
    pub async fn flush(&self) -> Result<()> {
        self.inner.chunks.sync().await?;
        self.inner.db.flush_async().await?;
        Ok(())
    }

    /// Where the store lives, for messages.
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    pub(crate) async fn lease(&self, id: ChunkId) -> Lease {
        self.inner.lease(id).await
    }

    /// Fetches one chunk and checks it against its id and length.
    pub(crate) async fn read_chunk(&self, c: ChunkRef) -> Result<Bytes> {
        let frame = self
            .inner
            .chunks
            .get(c.id)
            .await?
            .ok_or_else(|| Error::CorruptChunk {
                id: c.id,
                reason: "missing from the store".into(),
            })?;
        let data = self
            .on_cpu(move || frame::decode_shared(&c.id, &frame))
            .await??;
        if data.len() != c.len as usize {
            return Err(Error::CorruptChunk {
                id: c.id,
                reason: format!("{} bytes decoded, {} expected", data.len(), c.len),
            });
        }
        Ok(data)
    }

    pub(crate) fn concurrency(&self) -> usize {
        self.inner.config.concurrency
    }

    pub(crate) fn store(&self) -> &S {
        &self.inner.chunks
    }

    pub(crate) async fn on_cpu<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        self.inner.cpu.run(f).await
    }
}

/// Checks what was read against the manifest's length and SHA-256.
fn verify_whole(id: ManifestId, manifest: &Manifest, check: ContentCheck) -> Result<u64> {
    let len = check.len();
    if len != manifest.len() || check.sha256() != manifest.digests().sha256 {
        return Err(Error::DigestMismatch {
            manifest: id,
            algorithm: "sha256",
        });
    }
    Ok(len)
}

/// Hashes one chunk, leases it and stores it unless the store already has it or an earlier
/// chunk of the same ingest (`claimed`) is storing it. Returns the chunk's reference, its
/// lease and, when it was new, the bytes its frame took.
///
/// Skipping a repeat that is still in flight is safe because the ingest returns only after
/// every one of its chunks is stored and synced, and fails as a whole if any is not. Without
/// the claim, repeats inside the window of chunks in flight were all compressed (the store
/// kept one) and all counted as new.
async fn store_chunk<S: ChunkStore>(
    inner: Arc<Inner<S>>,
    id: ChunkId,
    chunk: Bytes,
    level: Option<i32>,
    claimed: &std::sync::Mutex<HashSet<ChunkId>>,
) -> Result<(ChunkRef, Lease, Option<u64>)> {
    let lease = inner.lease(id).await;
    let chunk_ref = ChunkRef {
        id,
        len: chunk.len() as u32,
    };
    let first = claimed.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
    if !first || inner.chunks.has_many(&[id]).await?[0] {
        return Ok((chunk_ref, lease, None));
    }
    let store = Arc::clone(&inner);
    let (frame_len, put) = inner
        .cpu
        .run(move || {
            let frame = match level {
                Some(level) => frame::encode(&chunk, level),
                None => frame::encode_raw(&chunk),
            };
            let frame_len = frame.stored_len() as u64;
            (frame_len, store.chunks.put_many_blocking(vec![(id, frame)]))
        })
        .await?;
    match put {
        Ok(put) => put?,
        Err(frames) => inner.chunks.put_many(frames).await?,
    }
    Ok((chunk_ref, lease, Some(frame_len)))
}

/// Fetches and verifies one chunk of a manifest.
async fn load_chunk<S: ChunkStore>(
    inner: Arc<Inner<S>>,
    manifest: ManifestId,
    c: ChunkRef,
) -> Result<Bytes> {
    let frame = inner.chunks.get(c.id).await?.ok_or(Error::MissingChunk {
        manifest,
        chunk: c.id,
    })?;
    let data = inner
        .cpu
        .run(move || frame::decode_shared(&c.id, &frame))
        .await??;
    if data.len() != c.len as usize {
        return Err(Error::CorruptChunk {
            id: c.id,
            reason: format!("{} bytes decoded, manifest says {}", data.len(), c.len),
        });
    }
    Ok(data)
}

/// The store's metadata trees, for a transaction that also writes the caller's own trees.
#[derive(Debug, Clone)]
pub struct CasTrees {
    /// Manifest id → encoded manifest.
    pub manifests: sled::Tree,
    /// Manifest id → number of holds (u64 big-endian).
    pub manifest_refs: sled::Tree,
    /// Chunk id → number of manifests referencing it (u64 big-endian).
    pub chunk_refs: sled::Tree,
}

/// A manifest checked and encoded, ready for [`retain_tx`].
#[derive(Debug, Clone)]
pub struct PreparedManifest {
    id: ManifestId,
    encoded: Vec<u8>,
    distinct: Vec<ChunkId>,
}

impl PreparedManifest {
    /// The manifest's id.
    pub fn id(&self) -> ManifestId {
        self.id
    }
}

/// Inside a transaction over [`CasTrees`]: adds one hold on a manifest, storing it and
/// referencing its chunks if it is new.
pub fn retain_tx(
    manifests: &TransactionalTree,
    manifest_refs: &TransactionalTree,
    chunk_refs: &TransactionalTree,
    prepared: &PreparedManifest,
) -> std::result::Result<(), ConflictableTransactionError<Error>> {
    let key = prepared.id.as_bytes();
    let holds = manifest_refs.get(key)?.map_or(0, |v| decode_u64(&v));
    if holds == 0 {
        manifests.insert(&key[..], prepared.encoded.as_slice())?;
        for chunk in &prepared.distinct {
            let n = chunk_refs
                .get(chunk.as_bytes())?
                .map_or(0, |v| decode_u64(&v));
            chunk_refs.insert(&chunk.as_bytes()[..], &(n + 1).to_be_bytes())?;
        }
    }
    manifest_refs.insert(&key[..], &(holds + 1).to_be_bytes())?;
    Ok(())
}

/// Inside a transaction over [`CasTrees`]: gives back one hold on a manifest, deleting it and
/// dereferencing its chunks when it was the last. Returns whether it was deleted.
pub fn release_tx(
    manifests: &TransactionalTree,
    manifest_refs: &TransactionalTree,
    chunk_refs: &TransactionalTree,
    id: ManifestId,
) -> std::result::Result<bool, ConflictableTransactionError<Error>> {
    let key = id.as_bytes();
    let holds = manifest_refs.get(key)?.map(|v| decode_u64(&v)).ok_or(
        ConflictableTransactionError::Abort(Error::ManifestNotFound(id)),
    )?;
    if holds > 1 {
        manifest_refs.insert(&key[..], &(holds - 1).to_be_bytes())?;
        return Ok(false);
    }
    manifest_refs.remove(&key[..])?;
    let encoded = manifests
        .remove(&key[..])?
        .ok_or(ConflictableTransactionError::Abort(
            Error::ManifestNotFound(id),
        ))?;
    let manifest = Manifest::decode(&encoded).map_err(ConflictableTransactionError::Abort)?;
    let distinct: BTreeSet<ChunkId> = manifest.chunks().iter().map(|c| c.id).collect();
    for chunk in distinct {
        let n = chunk_refs
            .get(chunk.as_bytes())?
            .map_or(0, |v| decode_u64(&v));
        if n <= 1 {
            chunk_refs.remove(&chunk.as_bytes()[..])?;
        } else {
            chunk_refs.insert(&chunk.as_bytes()[..], &(n - 1).to_be_bytes())?;
        }
    }
    Ok(true)
}

/// Flattens a sled transaction error into this crate's error.
pub fn tx_error(e: TransactionError<Error>) -> Error {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => Error::Database(e),
    }
}

/// Opens the sled database, waiting up to `lock_wait` for its lock.
///
/// sled's background flusher can hold the lock file for a moment after the last handle of a
/// database is dropped, so a drop followed at once by an open in the same process fails now and
/// then (sled issues 1234, 1289). sled reports it only as an `Other` error whose text says
/// `WouldBlock`, hence the match on the message.
fn open_sled(dir: &Path, cache_capacity: u64, lock_wait: std::time::Duration) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + lock_wait;
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .open()
        {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(Error::Locked {
                    path: dir.display().to_string(),
                    waited: lock_wait,
                });
            }
            other => return Ok(other?),
        }
    }
}

fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

fn read_u32(tree: &sled::Tree, key: &str) -> Result<Option<u32>> {
    Ok(tree
        .get(key)?
        .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
        .map(u32::from_be_bytes))
}
