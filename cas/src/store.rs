//! Where chunk frames live: the [`ChunkStore`] trait and its two implementations.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::RwLock;

use bytes::Bytes;

use crate::{ChunkId, Error, Result};

/// A chunk id with the size of its stored frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChunk {
    /// The chunk.
    pub id: ChunkId,
    /// Bytes its frame occupies (header + payload).
    pub frame_len: u64,
}

/// Storage for chunk frames, keyed by [`ChunkId`].
///
/// Batch-oriented and async so that a remote object store can implement it as well as the
/// embedded one: every call may be a network round trip. Frames are opaque here; verifying
/// them is the caller's job. `put_many` of an id that is already present is a no-op (content
/// addressing makes both frames decode to the same bytes).
pub trait ChunkStore: Send + Sync + 'static {
    /// For each id, in order, whether the store holds it.
    fn has_many(&self, ids: &[ChunkId]) -> impl Future<Output = Result<Vec<bool>>> + Send;

    /// Stores frames. They need not be durable until [`ChunkStore::sync`] returns.
    fn put_many(&self, frames: Vec<(ChunkId, Bytes)>) -> impl Future<Output = Result<()>> + Send;

    /// The frame stored under `id`, if any.
    fn get(&self, id: ChunkId) -> impl Future<Output = Result<Option<Bytes>>> + Send;

    /// Removes frames; absent ids are skipped. Returns the frame bytes freed.
    fn delete_many(&self, ids: Vec<ChunkId>) -> impl Future<Output = Result<u64>> + Send;

    /// Up to `limit` stored chunks with ids greater than `after`, in id order.
    fn list(
        &self,
        after: Option<ChunkId>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredChunk>>> + Send;

    /// Makes every completed `put_many` and `delete_many` durable.
    fn sync(&self) -> impl Future<Output = Result<()>> + Send;
}

/// An in-memory [`ChunkStore`], for tests and for measuring the layers above storage.
#[derive(Debug, Default)]
pub struct MemoryChunkStore {
    frames: RwLock<BTreeMap<ChunkId, Bytes>>,
}

impl MemoryChunkStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<ChunkId, Bytes>> {
        self.frames.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<ChunkId, Bytes>> {
        self.frames.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces a stored frame as is, to simulate corruption in tests.
    pub fn overwrite_raw(&self, id: ChunkId, frame: Bytes) {
        self.write().insert(id, frame);
    }
}

impl ChunkStore for MemoryChunkStore {
    async fn has_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        let map = self.read();
        Ok(ids.iter().map(|id| map.contains_key(id)).collect())
    }

    async fn put_many(&self, frames: Vec<(ChunkId, Bytes)>) -> Result<()> {
        let mut map = self.write();
        for (id, frame) in frames {
            map.entry(id).or_insert(frame);
        }
        Ok(())
    }

    async fn get(&self, id: ChunkId) -> Result<Option<Bytes>> {
        Ok(self.read().get(&id).cloned())
    }

    async fn delete_many(&self, ids: Vec<ChunkId>) -> Result<u64> {
        let mut map = self.write();
        Ok(ids
            .iter()
            .filter_map(|id| map.remove(id))
            .map(|f| f.len() as u64)
            .sum())
    }

    async fn list(&self, after: Option<ChunkId>, limit: usize) -> Result<Vec<StoredChunk>> {
        use std::ops::Bound;
        let map = self.read();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(map
            .range((lower, Bound::Unbounded))
            .take(limit)
            .map(|(id, f)| StoredChunk {
                id: *id,
                frame_len: f.len() as u64,
            })
            .collect())
    }

    async fn sync(&self) -> Result<()> {
        Ok(())
    }
}

/// The embedded [`ChunkStore`]: frames in a sled tree, their sizes in a second small tree so
/// that listing and accounting never read a frame.
#[derive(Debug, Clone)]
pub struct SledChunkStore {
    db: sled::Db,
    frames: sled::Tree,
    sizes: sled::Tree,
}

impl SledChunkStore {
    /// Tree holding chunk id → frame.
    pub const FRAMES_TREE: &'static str = "chunks";
    /// Tree holding chunk id → frame length (u64 big-endian).
    pub const SIZES_TREE: &'static str = "chunk_sizes";

    /// Opens (creating if needed) the chunk trees in `db`.
    pub fn open(db: &sled::Db) -> Result<Self> {
        Ok(Self {
            db: db.clone(),
            frames: db.open_tree(Self::FRAMES_TREE)?,
            sizes: db.open_tree(Self::SIZES_TREE)?,
        })
    }

    /// Replaces a stored frame as is, to simulate corruption in tests and harnesses.
    pub fn overwrite_raw(&self, id: ChunkId, frame: &[u8]) -> Result<()> {
        self.frames.insert(id.as_bytes(), frame)?;
        Ok(())
    }

    /// Removes a frame but not its size entry, to simulate a lost chunk in tests.
    pub fn remove_raw(&self, id: ChunkId) -> Result<()> {
        self.frames.remove(id.as_bytes())?;
        Ok(())
    }

    fn put_blocking(&self, frames: &[(ChunkId, Bytes)]) -> Result<()> {
        use sled::Transactional;
        for (id, frame) in frames {
            if self.sizes.contains_key(id.as_bytes())? {
                continue;
            }
            // Frame first, then size: a crash in between leaves a frame that `list` does not
            // show yet; the next put of that chunk completes it, and scrub reports it.
            (&self.frames, &self.sizes)
                .transaction(|(f, s)| {
                    f.insert(&id.as_bytes()[..], frame.as_ref())?;
                    s.insert(&id.as_bytes()[..], &(frame.len() as u64).to_be_bytes())?;
                    Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(|e| match e {
                    sled::transaction::TransactionError::Storage(e) => Error::Database(e),
                    sled::transaction::TransactionError::Abort(()) => {
                        Error::Task("chunk put aborted".into())
                    }
                })?;
        }
        Ok(())
    }
}

/// Runs a blocking sled call off the async worker threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

impl ChunkStore for SledChunkStore {
    async fn has_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        // Only the small size tree is touched; its nodes stay in sled's cache.
        ids.iter()
            .map(|id| Ok(self.sizes.contains_key(id.as_bytes())?))
            .collect()
    }

    async fn put_many(&self, frames: Vec<(ChunkId, Bytes)>) -> Result<()> {
        let this = self.clone();
        blocking(move || this.put_blocking(&frames)).await
    }

    async fn get(&self, id: ChunkId) -> Result<Option<Bytes>> {
        let frames = self.frames.clone();
        blocking(move || Ok(frames.get(id.as_bytes())?.map(Bytes::from_owner))).await
    }

    async fn delete_many(&self, ids: Vec<ChunkId>) -> Result<u64> {
        let this = self.clone();
        blocking(move || {
            let mut freed = 0;
            for id in ids {
                // Size first: once it is gone the chunk is no longer "present" to has_many.
                if let Some(size) = this.sizes.remove(id.as_bytes())? {
                    freed += u64::from_be_bytes(size.as_ref().try_into().unwrap_or([0; 8]));
                }
                this.frames.remove(id.as_bytes())?;
            }
            Ok(freed)
        })
        .await
    }

    async fn list(&self, after: Option<ChunkId>, limit: usize) -> Result<Vec<StoredChunk>> {
        let sizes = self.sizes.clone();
        blocking(move || {
            let iter = match after {
                Some(a) => sizes.range((
                    std::ops::Bound::Excluded(a.as_bytes().to_vec()),
                    std::ops::Bound::Unbounded,
                )),
                None => sizes.iter(),
            };
            let mut out = Vec::with_capacity(limit.min(4096));
            for item in iter.take(limit) {
                let (k, v) = item?;
                let id = ChunkId::from_slice(&k).ok_or_else(|| {
                    Error::Task(format!("bad key of {} bytes in chunk_sizes", k.len()))
                })?;
                let frame_len = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
                out.push(StoredChunk { id, frame_len });
            }
            Ok(out)
        })
        .await
    }

    async fn sync(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }
}
