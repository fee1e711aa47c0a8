//! `sloth-cas`: the content-addressed chunk store under sloth-runner's artifacts.
//!
//! Content is cut into chunks with FastCDC 2020 ([`Chunker`], [`ChunkerParams`]); each chunk is
//! named by the BLAKE3 of its bytes ([`ChunkId`]) and stored once as a zstd-compressed (or raw)
//! [`frame`] in a [`ChunkStore`]. A [`Manifest`] lists a piece of content's chunks in order with
//! its whole-content BLAKE3 and SHA-256; it is named by the BLAKE3 of its encoding
//! ([`ManifestId`]). [`Cas`] ties these together over a sled database: streaming ingest that
//! stores only the chunks it lacks, verified streaming reads, reference counting, garbage
//! collection and scrubbing. The crate knows nothing of artifacts, stacks or the network.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> sloth_cas::Result<()> {
//! use sloth_cas::{Cas, CasConfig};
//!
//! let cas = Cas::temporary(CasConfig::default())?;
//! let staged = cas.ingest_bytes(b"release binary".to_vec()).await?;
//! let id = cas.commit(staged).await?;
//!
//! let mut out = Vec::new();
//! cas.read_to(id, &mut out).await?;
//! assert_eq!(out, b"release binary");
//!
//! // A second ingest of the same content stores nothing new.
//! let again = cas.ingest_bytes(b"release binary".to_vec()).await?;
//! assert_eq!(again.stats().new_chunks, 0);
//! # Ok(())
//! # }
//! ```
//!
//! # Durability
//!
//! [`Cas::ingest_reader`] stores chunks and syncs them before it returns a [`Staged`] value;
//! [`Cas::commit`] then writes the manifest and its reference counts in one sled transaction
//! and flushes. A manifest is therefore never visible before all its chunks are durable, and a
//! crash mid-ingest leaves at most unreferenced chunks, which [`Cas::gc`] reclaims.
//!
//! # Garbage collection protocol
//!
//! A chunk's reference count (tree `chunk_refs`) is the number of stored manifests that use it;
//! it changes only inside the commit and release transactions. GC must never delete a chunk
//! that an ingest in flight has found present and will reference at commit. So:
//!
//! 1. An ingest takes a *lease* on each chunk id **before** it asks the store whether the chunk
//!    exists, and holds every lease until its commit transaction has finished (or it gives up).
//!    Taking a lease holds the GC gate (an async read-write lock) in shared mode.
//! 2. GC lists stored chunks, and for the unreferenced ones takes the gate exclusively, then
//!    deletes exactly those that are still unreferenced *and* unleased, before releasing it.
//!
//! Why this is safe: suppose GC deletes chunk X at time T (inside its exclusive section) while
//! an ingest I will commit a manifest referencing X. I's lease on X was taken either before the
//! section, and then it is visible to GC, which skips X, or after it, and then I's existence
//! check comes after the deletion, finds X missing and stores it again. Leases cannot be taken
//! during the section. A commit only adds references to leased chunks, so "unreferenced and
//! unleased" cannot become false during the section either. `tests/gc_race.rs` races many
//! ingests, commits, releases and GC passes and checks that every committed manifest reads back.
//!
//! Leases live in memory: sled's directory lock means one process owns a store, and a crash
//! drops every ingest in flight together with its leases.
//!
//! # Layout
//!
//! `<store>/index` is the sled database, `<store>/packs/*.pack` hold the chunk frames
//! ([`PackStore`] says why frames are not sled values). The sled trees:
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `meta` | `format`, `avg_chunk` | u32 big-endian |
//! | `chunks` | chunk id | location of the frame in a pack file (see [`PackStore`]) |
//! | `chunk_refs` | chunk id | manifests referencing it, u64 big-endian |
//! | `manifests` | manifest id | encoded manifest |
//! | `manifest_refs` | manifest id | holds, u64 big-endian |

mod cas;
mod chunker;
mod error;
pub mod frame;
mod id;
mod manifest;
mod pack;
mod pool;
mod receive;
mod sink;
mod store;

pub use cas::{
    BadChunk, Cas, CasConfig, CasTrees, GcReport, IngestOptions, IngestStats, PreparedManifest,
    RecompressReport, ScrubReport, Staged, StoreStats, release_tx, retain_tx, tx_error,
};
pub use chunker::{Chunker, ChunkerParams, MAX_AVG_CHUNK, MAX_CHUNK_LEN, MIN_AVG_CHUNK};
pub use error::{Error, Result};
pub use id::{ChunkId, ManifestId, ParseIdError};
pub use manifest::{ChunkRef, Claim, ContentCheck, ContentDigests, ContentHasher, Manifest};
pub use pack::PackStore;
pub use receive::{MAX_RECEIVED_CHUNKS, Received, Receiver};
pub use sink::ContentSink;
pub use store::{ChunkStore, MemoryChunkStore, StoredChunk};
