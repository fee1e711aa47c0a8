//! Receiving content that was chunked elsewhere: the store's half of a dedup-aware upload.
//!
//! The sender cuts and hashes the content itself and offers the chunk list in batches; the
//! store answers which chunks it lacks and receives only those, as frames. Every frame is
//! decoded and checked against its id before it is stored, and [`Receiver::finish`] reads the
//! whole content back and checks it against the sender's length and digests before a
//! [`Staged`] value exists. A receive abandoned halfway leaves only unreferenced chunks; sent
//! again, it finds them present and they are not asked for twice.

use std::collections::HashMap;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::cas::{Lease, Staged};
use crate::manifest::{ChunkRef, ContentDigests};
use crate::store::ChunkStore;
use crate::{Cas, ChunkId, Error, IngestStats, MAX_CHUNK_LEN, Manifest, Result, frame};

/// Most chunks one received content may have (with the smallest average chunk size, 64 KiB,
/// this is 256 GiB of content). Bounds the memory a receive holds for its chunk list.
pub const MAX_RECEIVED_CHUNKS: usize = 4 << 20;

/// One content being received. Holds a lease on every chunk offered so far, so that GC cannot
/// delete a chunk the store said it has before the content is committed.
#[derive(Debug)]
pub struct Receiver<S: ChunkStore> {
    cas: Cas<S>,
    refs: Vec<ChunkRef>,
    /// Offered ids, with their declared lengths and leases.
    offered: HashMap<ChunkId, (u32, Lease)>,
    /// Chunks asked for that have not arrived yet.
    awaited: HashMap<ChunkId, u32>,
    stats: IngestStats,
}

impl<S: ChunkStore> Cas<S> {
    /// Starts receiving content chunked elsewhere.
    pub fn receive(&self) -> Receiver<S> {
        Receiver {
            cas: self.clone(),
            refs: Vec::new(),
            offered: HashMap::new(),
            awaited: HashMap::new(),
            stats: IngestStats::default(),
        }
    }
}

impl<S: ChunkStore> Receiver<S> {
    /// Appends `chunks` to the content and returns the indexes (into `chunks`) of those the
    /// store lacks and that this receive has not asked for already, ascending.
    pub async fn offer(&mut self, chunks: &[ChunkRef]) -> Result<Vec<u32>> {
        if self.refs.len() + chunks.len() > MAX_RECEIVED_CHUNKS {
            return Err(Error::Rejected(format!(
                "more than {MAX_RECEIVED_CHUNKS} chunks offered"
            )));
        }
        let mut fresh = Vec::new();
        for (index, chunk) in chunks.iter().enumerate() {
            if chunk.len == 0 || chunk.len > MAX_CHUNK_LEN {
                return Err(Error::Rejected(format!(
                    "chunk {} has length {}, outside 1..={MAX_CHUNK_LEN}",
                    chunk.id, chunk.len
                )));
            }
            match self.offered.get(&chunk.id) {
                Some((len, _)) if *len != chunk.len => {
                    return Err(Error::Rejected(format!(
                        "chunk {} offered with lengths {len} and {}",
                        chunk.id, chunk.len
                    )));
                }
                Some(_) => {}
                None => {
                    // Leased before the existence check, as in ingest (see the crate docs).
                    let lease = self.cas.lease(chunk.id).await;
                    self.offered.insert(chunk.id, (chunk.len, lease));
                    fresh.push((index as u32, chunk.id));
                }
            }
        }
        let ids: Vec<ChunkId> = fresh.iter().map(|(_, id)| *id).collect();
        let present = self.cas.store().has_many(&ids).await?;
        let mut missing = Vec::new();
        for ((index, id), present) in fresh.into_iter().zip(present) {
            if !present {
                self.awaited.insert(id, chunks[index as usize].len);
                missing.push(index);
            }
        }
        self.refs.extend_from_slice(chunks);
        Ok(missing)
    }

    /// Checks each frame against its chunk id and declared length and stores it as it came.
    /// Only chunks this receive asked for are accepted.
    pub async fn put(&mut self, frames: Vec<(ChunkId, Bytes)>) -> Result<()> {
        let mut checks = Vec::with_capacity(frames.len());
        for (id, data) in frames {
            let Some(len) = self.awaited.remove(&id) else {
                return Err(Error::Rejected(format!(
                    "chunk {id} was sent but not asked for (not offered, already present or sent twice)"
                )));
            };
            checks.push((id, len, data));
        }
        let cas = self.cas.clone();
        let checked: Vec<(ChunkId, Bytes)> = futures::stream::iter(checks)
            .map(|(id, len, data)| {
                let cas = cas.clone();
                async move {
                    let frame = data.clone();
                    let decoded = cas.on_cpu(move || frame::decode(&id, &frame)).await??;
                    if decoded.len() != len as usize {
                        return Err(Error::Rejected(format!(
                            "chunk {id} decodes to {} bytes, offered as {len}",
                            decoded.len()
                        )));
                    }
                    Ok((id, data))
                }
            })
            .buffered(self.cas.concurrency())
            .try_collect()
            .await?;
        for (id, data) in &checked {
            self.stats.new_chunks += 1;
            self.stats.new_bytes += u64::from(self.offered.get(id).map_or(0, |(len, _)| *len));
            self.stats.new_stored_bytes += data.len() as u64;
        }
        self.cas.store().put_many(checked).await?;
        Ok(())
    }

    /// Every chunk asked for arrived: reads the whole content back into `out`, verifying each
    /// chunk and the sender's `digests` and `length`, and returns it staged for commit.
    pub async fn finish<W: std::io::Write + Send + 'static>(
        self,
        length: u64,
        digests: ContentDigests,
        out: W,
    ) -> Result<(Staged, W)> {
        if let Some(id) = self.awaited.keys().next() {
            return Err(Error::Rejected(format!(
                "{} chunks asked for never arrived (one is {id})",
                self.awaited.len()
            )));
        }
        self.cas.store().sync().await?;
        let manifest = Manifest::new(self.refs, digests);
        if manifest.len() != length {
            return Err(Error::Rejected(format!(
                "the chunks add up to {} bytes, the commit says {length}",
                manifest.len()
            )));
        }
        let (_, out) = self.cas.write_verified(&manifest, out).await?;
        let stats = IngestStats {
            chunks: manifest.chunks().len() as u64,
            ..self.stats
        };
        let leases = self.offered.into_values().map(|(_, lease)| lease).collect();
        Ok((Staged::new(manifest, stats, leases), out))
    }
}
