//! Receiving content that was chunked elsewhere: the store's half of a dedup-aware upload.
//!
//! The sender cuts and hashes the content itself and offers the chunk list in batches; the
//! store answers which chunks it lacks and receives only those, as frames. Every frame is
//! decoded and checked against its id before it is stored. Meanwhile an assembler walks the
//! content in order — chunks the store already had are read back and verified, received ones
//! are taken as they arrive — hashing it whole and writing it to the receiver's output (an
//! artifact's layout copy), so that by the time the sender commits, the check of its length and
//! claimed digests is nearly done. Only then does a [`Staged`] value exist. A receive
//! abandoned halfway leaves only unreferenced chunks; sent again, it finds them present and
//! they are not asked for twice.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::cas::{Lease, Staged};
use crate::frame::Frame;
use crate::manifest::{ChunkRef, Claim, ContentDigests, ContentHasher};
use crate::store::ChunkStore;
use crate::{Cas, ChunkId, Error, IngestStats, MAX_CHUNK_LEN, Manifest, Result};

/// Most chunks one received content may have (with the smallest average chunk size, 64 KiB,
/// this is 256 GiB of content). Bounds the memory a receive holds for its chunk list.
pub const MAX_RECEIVED_CHUNKS: usize = 4 << 20;

/// Received bytes waiting for the assembler, at most: a sender that outruns the hashing and
/// writing waits in [`Receiver::put`].
const BACKLOG_BYTES: usize = 64 << 20;

/// How long [`Receiver::put`] waits for the assembler to make room.
const BACKLOG_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// A received chunk's content on its way to the assembler, holding its share of the backlog.
type Delivery = (Bytes, OwnedSemaphorePermit);

/// Where the assembler gets each chunk of the content, in order.
enum Slot {
    /// The store had it: read it back, verified.
    Stored(ChunkRef),
    /// Asked for: comes from [`Receiver::put`].
    Arriving(oneshot::Receiver<Delivery>),
}

/// What the assembler did.
enum Assembled<W> {
    /// Hashed and wrote the whole content: its length and digests.
    Whole(u64, ContentDigests, W),
    /// Told to skip: the content is a manifest the store already holds.
    Skipped(W),
}

/// What a finished receive gives back.
#[derive(Debug)]
pub struct Received<W> {
    /// The content, ready for commit.
    pub staged: Staged,
    /// The output the content was assembled into.
    pub out: W,
    /// Whether `out` holds the content. It does not when the store already held a manifest
    /// with exactly this chunk list and these digests, verified when it was stored: then the
    /// content is neither read back nor hashed again (a re-upload costs the store no reads).
    pub written: bool,
}

/// One content being received. Holds a lease on every chunk offered so far, so that GC cannot
/// delete a chunk the store said it has before the content is committed.
pub struct Receiver<S: ChunkStore, W> {
    cas: Cas<S>,
    refs: Vec<ChunkRef>,
    /// Offered ids, with their declared lengths and leases.
    offered: HashMap<ChunkId, (u32, Lease)>,
    /// Chunks asked for that have not arrived, with the content positions waiting for them.
    awaited: HashMap<ChunkId, (u32, Vec<oneshot::Sender<Delivery>>)>,
    slots: mpsc::UnboundedSender<Slot>,
    assembler: tokio::task::JoinHandle<Result<Assembled<W>>>,
    /// Starts the assembler (`true`) or tells it to skip (`false`). It waits until a chunk
    /// is missing, since content whose chunks are all stored may be a manifest the store
    /// already holds, which needs no second verification.
    start: Option<oneshot::Sender<bool>>,
    backlog: Arc<Semaphore>,
    stats: IngestStats,
}

impl<S: ChunkStore, W> std::fmt::Debug for Receiver<S, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("chunks", &self.refs.len())
            .field("awaited", &self.awaited.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Slot::Stored(c) => write!(f, "Stored({})", c.id),
            Slot::Arriving(_) => f.write_str("Arriving"),
        }
    }
}

impl<S: ChunkStore> Cas<S> {
    /// Starts receiving content chunked elsewhere; the content is written to `out` as it is
    /// assembled (give [`std::io::sink`] when no copy is wanted).
    pub fn receive<W: Write + Send + 'static>(&self, out: W) -> Receiver<S, W> {
        let (slots, queue) = mpsc::unbounded_channel();
        let (start, started) = oneshot::channel();
        Receiver {
            cas: self.clone(),
            refs: Vec::new(),
            offered: HashMap::new(),
            awaited: HashMap::new(),
            slots,
            assembler: tokio::spawn(assemble(self.clone(), started, queue, out)),
            start: Some(start),
            backlog: Arc::new(Semaphore::new(BACKLOG_BYTES)),
            stats: IngestStats::default(),
        }
    }
}

/// Walks the content in order, hashing it and writing it to `out` on a blocking thread.
async fn assemble<S: ChunkStore, W: Write + Send + 'static>(
    cas: Cas<S>,
    started: oneshot::Receiver<bool>,
    mut queue: mpsc::UnboundedReceiver<Slot>,
    mut out: W,
) -> Result<Assembled<W>> {
    if started.await != Ok(true) {
        return Ok(Assembled::Skipped(out));
    }
    let (tx, mut rx) = mpsc::channel::<Bytes>(cas.concurrency());
    let writer = tokio::task::spawn_blocking(move || {
        let mut hasher = ContentHasher::default();
        while let Some(chunk) = rx.blocking_recv() {
            hasher.update(&chunk);
            out.write_all(&chunk).map_err(Error::Output)?;
        }
        out.flush().map_err(Error::Output)?;
        Ok::<_, Error>(Assembled::Whole(hasher.len(), hasher.finish(), out))
    });
    let slots = futures::stream::poll_fn(move |cx| queue.poll_recv(cx));
    let chunks = slots
        .map(|slot| {
            let cas = cas.clone();
            async move {
                match slot {
                    Slot::Stored(c) => Ok((cas.read_chunk(c).await?, None)),
                    Slot::Arriving(rx) => {
                        rx.await.map(|(b, permit)| (b, Some(permit))).map_err(|_| {
                            Error::Rejected("the upload ended before all its chunks arrived".into())
                        })
                    }
                }
            }
        })
        .buffered(cas.concurrency());
    let mut chunks = std::pin::pin!(chunks);
    let mut failed = None;
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok((chunk, permit)) => {
                if tx.send(chunk).await.is_err() {
                    break; // the writer failed; it says why below
                }
                drop(permit);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await?;
    match failed {
        Some(e) => Err(e),
        None => written,
    }
}

impl<S: ChunkStore, W> Receiver<S, W> {
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
                    fresh.push(index);
                }
            }
        }
        let ids: Vec<ChunkId> = fresh.iter().map(|&i| chunks[i].id).collect();
        let present = self.cas.store().has_many(&ids).await?;
        let mut lacking = vec![false; chunks.len()];
        for (&index, present) in fresh.iter().zip(present) {
            lacking[index] = !present;
        }
        let mut missing = Vec::new();
        for (index, chunk) in chunks.iter().enumerate() {
            let slot = if lacking[index] {
                let (tx, rx) = oneshot::channel();
                self.awaited.insert(chunk.id, (chunk.len, vec![tx]));
                missing.push(index as u32);
                Slot::Arriving(rx)
            } else if let Some((_, waiting)) = self.awaited.get_mut(&chunk.id) {
                // Repeated in the content before it arrived: it fills both places.
                let (tx, rx) = oneshot::channel();
                waiting.push(tx);
                Slot::Arriving(rx)
            } else {
                Slot::Stored(*chunk)
            };
            // A failed assembler reports itself in `finish`.
            let _ = self.slots.send(slot);
        }
        self.refs.extend_from_slice(chunks);
        if !missing.is_empty() {
            self.start_assembling(true);
        }
        Ok(missing)
    }

    /// Whether no chunk offered so far had to be sent: the store holds the content whole.
    pub fn sent_nothing(&self) -> bool {
        self.start.is_some()
    }

    fn start_assembling(&mut self, assemble: bool) {
        if let Some(start) = self.start.take() {
            // A failed assembler reports itself in `finish`.
            let _ = start.send(assemble);
        }
    }

    /// Checks each frame against its chunk id and declared length, stores it as it came and
    /// hands its content to the assembler. Only chunks this receive asked for are accepted.
    pub async fn put(&mut self, frames: Vec<(ChunkId, Frame)>) -> Result<()> {
        let mut checks = Vec::with_capacity(frames.len());
        for (id, data) in frames {
            let Some((len, waiting)) = self.awaited.remove(&id) else {
                return Err(Error::Rejected(format!(
                    "chunk {id} was sent but not asked for (not offered, already present or sent twice)"
                )));
            };
            checks.push((id, len, data, waiting));
        }
        let cas = self.cas.clone();
        let checked: Vec<_> = futures::stream::iter(checks)
            .map(|(id, len, data, waiting)| {
                let cas = cas.clone();
                async move {
                    let frame = data.clone();
                    let decoded = cas.on_cpu(move || frame.decode(&id)).await??;
                    if decoded.len() != len as usize {
                        return Err(Error::Rejected(format!(
                            "chunk {id} decodes to {} bytes, offered as {len}",
                            decoded.len()
                        )));
                    }
                    Ok((id, data, decoded, waiting))
                }
            })
            .buffered(self.cas.concurrency())
            .try_collect()
            .await?;
        let mut frames = Vec::with_capacity(checked.len());
        let mut deliveries = Vec::with_capacity(checked.len());
        for (id, data, decoded, waiting) in checked {
            self.stats.new_chunks += 1;
            self.stats.new_bytes += decoded.len() as u64;
            self.stats.new_stored_bytes += data.stored_len() as u64;
            frames.push((id, data));
            deliveries.push((decoded, waiting));
        }
        // Stored before the assembler sees them: a later repeat of a chunk reads it back.
        self.cas.store().put_many(frames).await?;
        for (decoded, waiting) in deliveries {
            for tx in waiting {
                let permit = tokio::time::timeout(
                    BACKLOG_WAIT,
                    Arc::clone(&self.backlog).acquire_many_owned(decoded.len() as u32),
                )
                .await
                .map_err(|_| {
                    Error::Rejected(
                        "chunks sent out of order, or the store stopped taking them".into(),
                    )
                })?
                .map_err(|_| Error::Task("the receive backlog closed".into()))?;
                // A failed assembler reports itself in `finish`.
                let _ = tx.send((decoded.clone(), permit));
            }
        }
        Ok(())
    }

    /// Every chunk asked for arrived: waits for the assembler to finish the content and checks
    /// it against the sender's `length` and `claim`. Returns the content staged for commit,
    /// with the digests hashed here (a claim need not carry the BLAKE3; see [`Claim`]).
    ///
    /// A sender may claim nothing when the store had every chunk (it then need not hash the
    /// content at all: a re-upload costs it only cutting and chunk ids). Every chunk was
    /// verified against its id when it was stored, so the content is exactly these chunks: if
    /// the store holds a manifest of these chunks with the claimed digests, or (unclaimed)
    /// `like`'s when it has exactly this chunk list, those digests were verified when it was
    /// stored, and the content is not read back. Else it is read back and hashed here. A
    /// sender that had to send chunks must claim its SHA-256.
    pub async fn finish(
        mut self,
        length: u64,
        claim: Option<Claim>,
        like: Option<&Manifest>,
    ) -> Result<Received<W>> {
        if let Some(id) = self.awaited.keys().next() {
            return Err(Error::Rejected(format!(
                "{} chunks asked for never arrived (one is {id})",
                self.awaited.len()
            )));
        }
        self.cas.store().sync().await?;
        let refs = std::mem::take(&mut self.refs);
        let total: u64 = refs.iter().map(|c| u64::from(c.len)).sum();
        if total != length {
            return Err(Error::Rejected(format!(
                "the chunks add up to {total} bytes, the commit says {length}"
            )));
        }
        let nothing_missing = self.sent_nothing();
        if claim.is_none() && !nothing_missing {
            return Err(Error::Rejected(
                "the commit claims no digests, but chunks had to be sent: only content the \
                 store holds whole may be committed without them"
                    .into(),
            ));
        }
        let known = if nothing_missing {
            let candidate = match claim {
                Some(Claim {
                    sha256,
                    blake3: Some(blake3),
                }) => Some(ContentDigests { blake3, sha256 }),
                _ => like
                    .filter(|m| m.chunks() == refs.as_slice())
                    .map(|m| *m.digests())
                    .filter(|d| claim.is_none_or(|c| c.matches(d))),
            };
            match candidate {
                Some(d)
                    if self
                        .cas
                        .contains_manifest(Manifest::new(refs.clone(), d).id())? =>
                {
                    Some(d)
                }
                _ => None,
            }
        } else {
            None
        };
        self.start_assembling(known.is_none());
        drop(self.slots);
        let (out, written, digests) = match (self.assembler.await??, known) {
            (Assembled::Skipped(out), Some(known)) => (out, false, known),
            (Assembled::Skipped(_), None) => {
                return Err(Error::Task("the assembler skipped unknown content".into()));
            }
            (Assembled::Whole(len, got, out), _) => {
                if len != length {
                    return Err(Error::Rejected(format!(
                        "the content assembled to {len} bytes, the commit says {length}"
                    )));
                }
                if let Some(claim) = claim.filter(|c| !c.matches(&got)) {
                    // Named by the manifest the sender claimed.
                    let claimed = ContentDigests {
                        sha256: claim.sha256,
                        blake3: claim.blake3.unwrap_or(got.blake3),
                    };
                    return Err(Error::DigestMismatch {
                        manifest: Manifest::new(refs, claimed).id(),
                        algorithm: if claim.sha256 == got.sha256 {
                            "blake3"
                        } else {
                            "sha256"
                        },
                    });
                }
                (out, true, got)
            }
        };
        let manifest = Manifest::new(refs, digests);
        let stats = IngestStats {
            chunks: manifest.chunks().len() as u64,
            ..self.stats
        };
        let leases = self.offered.into_values().map(|(_, lease)| lease).collect();
        Ok(Received {
            staged: Staged::new(manifest, stats, leases),
            out,
            written,
        })
    }
}
