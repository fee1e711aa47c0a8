//! Where chunk frames live: the [`ChunkStore`] trait and its two implementations.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::RwLock;

use bytes::Bytes;

use crate::frame::Frame;
use crate::{ChunkId, Result};

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
/// them is the caller's job. They go in as [`Frame`]s (a header and a payload, which a store
/// writes one after the other) and come back as one buffer. `put_many` of an id that is
/// already present is a no-op (content addressing makes both frames decode to the same bytes).
pub trait ChunkStore: Send + Sync + 'static {
    /// For each id, in order, whether the store holds it.
    fn has_many(&self, ids: &[ChunkId]) -> impl Future<Output = Result<Vec<bool>>> + Send;

    /// Stores frames. They need not be durable until [`ChunkStore::sync`] returns.
    fn put_many(&self, frames: Vec<(ChunkId, Frame)>) -> impl Future<Output = Result<()>> + Send;

    /// Stores frames at once from a thread that may block (the store's CPU pool), for a store
    /// whose writes are local and short (an append to a file), so that a frame is stored by
    /// the thread that compressed it rather than after two more thread hand-offs. A store that
    /// cannot (every write a network round trip) hands the frames back, and they go through
    /// [`ChunkStore::put_many`]; that is the default.
    fn put_many_blocking(
        &self,
        frames: Vec<(ChunkId, Frame)>,
    ) -> std::result::Result<Result<()>, Vec<(ChunkId, Frame)>> {
        Err(frames)
    }

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

    /// Bytes the store occupies (for deciding when compaction is worth it). The default sums
    /// [`ChunkStore::list`]; stores that know it cheaply override this.
    fn stored_bytes(&self) -> impl Future<Output = Result<u64>> + Send {
        async {
            let mut total = 0;
            let mut after = None;
            loop {
                let page = self.list(after, 4096).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.id);
                total += page.iter().map(|c| c.frame_len).sum::<u64>();
            }
            Ok(total)
        }
    }

    /// Replaces stored frames with other encodings of the same chunks (a recompression), each
    /// only if the chunk is still stored. The caller guarantees every new frame decodes to its
    /// chunk. Returns how many were replaced; the default (a store that cannot) replaces none.
    fn replace_many(
        &self,
        frames: Vec<(ChunkId, Frame)>,
    ) -> impl Future<Output = Result<u64>> + Send {
        let _ = frames;
        async { Ok(0) }
    }

    /// Reclaims the space of deleted frames where the store cannot do so on delete (pack
    /// files). Returns the bytes of disk space given back.
    fn compact(&self) -> impl Future<Output = Result<u64>> + Send {
        async { Ok(0) }
    }
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

    async fn put_many(&self, frames: Vec<(ChunkId, Frame)>) -> Result<()> {
        let mut map = self.write();
        for (id, frame) in frames {
            map.entry(id).or_insert_with(|| frame.to_bytes());
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

/// Runs a blocking call off the async worker threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}
