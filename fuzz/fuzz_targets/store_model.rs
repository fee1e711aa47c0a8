//! Model-based fuzzing of [`Cas`] on a real sled directory, in the style of sled's own
//! `fuzz_model` target: a sequence of operations runs against the store and against a plain
//! in-memory model, and after every operation the two must agree.
//!
//! Content is built from slices of a few fixed base patterns, so that different puts share most
//! of their chunks and reference counting, leases and garbage collection get exercised.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::LazyLock;

use arbitrary::Arbitrary;
use futures::StreamExt as _;
use libfuzzer_sys::fuzz_target;
use sloth_cas::{
    Cas, CasConfig, ChunkId, ChunkerParams, ContentDigests, Error, ManifestId, Staged,
};

/// Operations run per input at most.
const MAX_OPS: usize = 64;
/// Pieces of base pattern concatenated into one content at most.
const MAX_PIECES: usize = 4;
/// Longest piece, so content stays within a few KiB (at most `MAX_PIECES` × this).
const MAX_PIECE_LEN: usize = 2048;
/// Length of each base pattern; pieces wrap around it.
const PATTERN_LEN: usize = 8192;
/// Average chunk size: the smallest the store accepts, so small content still has many chunks.
const AVG_CHUNK: u32 = 1024;

/// The base patterns: two incompressible (stored raw), one compressible text (stored as zstd)
/// and one run of zeros (cut only at the maximum chunk size).
static PATTERNS: LazyLock<[Vec<u8>; 4]> = LazyLock::new(|| {
    let noise = |mut state: u64| -> Vec<u8> {
        (0..PATTERN_LEN)
            .map(|_| {
                // splitmix64
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z ^ (z >> 31)) as u8
            })
            .collect()
    };
    let mut text = Vec::with_capacity(PATTERN_LEN);
    let mut line = 0u32;
    while text.len() < PATTERN_LEN {
        text.extend_from_slice(format!("sloth {line} hangs from branch {}\n", line % 7).as_bytes());
        line += 1;
    }
    text.truncate(PATTERN_LEN);
    [noise(1), noise(2), text, vec![0; PATTERN_LEN]]
});

/// A slice of one base pattern, wrapping around its end.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Piece {
    pattern: u8,
    start: u16,
    len: u16,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Ingest content built from these pieces; it stays staged (leased, invisible) until a
    /// `Commit` or an `Abandon` picks it.
    Put { pieces: Vec<Piece> },
    /// Commit one staged content.
    Commit { index: u8 },
    /// Drop one staged content without committing it.
    Abandon { index: u8 },
    /// Give back one hold on a stored manifest.
    Release { index: u8 },
    /// Release a manifest that is already gone: must fail with `ManifestNotFound`.
    ReleaseGone { index: u8 },
    /// Read one stored manifest chunk by chunk and check its chunk list.
    Get { index: u8 },
    /// Garbage collection, then a scrub.
    Gc,
    /// Drop the store (and every staged content) and open the directory again.
    Reopen,
    /// Recompress every chunk at a higher level: content, chunk set and counts stay as they
    /// are (the check after every op reads everything back).
    Recompress,
}

/// Committed content, with its expected chunks and the number of holds on it.
#[derive(Debug)]
struct Stored {
    content: Vec<u8>,
    chunks: Vec<(ChunkId, u32)>,
    holds: u64,
}

/// Content ingested but not committed.
#[derive(Debug)]
struct Pending {
    staged: Staged,
    content: Vec<u8>,
    chunks: Vec<(ChunkId, u32)>,
}

/// What the store should hold.
#[derive(Debug, Default)]
struct Model {
    /// Manifests with at least one hold.
    live: BTreeMap<ManifestId, Stored>,
    /// Manifests committed once and since released to zero holds.
    gone: BTreeSet<ManifestId>,
    /// Staged content, in ingest order.
    pending: Vec<Pending>,
    /// Every chunk the store holds, referenced or not.
    stored: BTreeSet<ChunkId>,
}

impl Model {
    /// Chunks that GC must keep: those of stored manifests and those leased by staged content.
    fn needed(&self) -> BTreeSet<ChunkId> {
        let live = self.live.values().flat_map(|s| &s.chunks);
        let pending = self.pending.iter().flat_map(|p| &p.chunks);
        live.chain(pending).map(|(id, _)| *id).collect()
    }
}

fn params() -> ChunkerParams {
    ChunkerParams::new(AVG_CHUNK).expect("valid average chunk size")
}

fn open(path: &Path) -> Cas {
    let config = CasConfig {
        chunker: Some(params()),
        concurrency: 2,
        cache_capacity: 1 << 20,
        ..CasConfig::default()
    };
    // Cas::open itself waits out sled's lock lingering after a drop.
    Cas::open(path, config).unwrap_or_else(|e| panic!("opening the store failed: {e}"))
}

fn build_content(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces.iter().take(MAX_PIECES) {
        let pattern = &PATTERNS[usize::from(piece.pattern) % PATTERNS.len()];
        let start = usize::from(piece.start) % PATTERN_LEN;
        let len = usize::from(piece.len) % (MAX_PIECE_LEN + 1);
        out.extend((start..start + len).map(|i| pattern[i % PATTERN_LEN]));
    }
    out
}

/// The chunks a manifest of `content` must list, computed independently of the store's
/// streaming chunker.
fn expected_chunks(content: &[u8]) -> Vec<(ChunkId, u32)> {
    let mut at = 0;
    params()
        .chunk_lengths(content)
        .into_iter()
        .map(|len| {
            let chunk = &content[at..at + len];
            at += len;
            (
                ChunkId::digest(chunk),
                u32::try_from(len).expect("small chunk"),
            )
        })
        .collect()
}

/// Picks the `index`-th element of a non-empty collection, wrapping around.
fn pick<T: Copy>(items: impl ExactSizeIterator<Item = T>, index: u8) -> Option<T> {
    let len = items.len();
    let mut items = items;
    if len == 0 {
        return None;
    }
    items.nth(usize::from(index) % len)
}

fn same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes, expected {}; first difference at {first_diff:?}",
            got.len(),
            want.len()
        );
    }
}

async fn put(cas: &Cas, model: &mut Model, pieces: &[Piece]) {
    let content = build_content(pieces);
    let chunks = expected_chunks(&content);
    let staged = cas
        .ingest_bytes(content.clone())
        .await
        .unwrap_or_else(|e| panic!("ingest of {} bytes failed: {e}", content.len()));

    let manifest = staged.manifest();
    assert_eq!(manifest.len(), content.len() as u64);
    assert_eq!(*manifest.digests(), ContentDigests::of(&content));
    let listed: Vec<(ChunkId, u32)> = manifest.chunks().iter().map(|c| (c.id, c.len)).collect();
    assert_eq!(
        listed, chunks,
        "the manifest's chunks differ from an independent chunking"
    );

    // Chunks already stored are never stored again; each new one is stored at least once (two
    // copies of a new chunk in one content may race and both count as new).
    let stats = staged.stats();
    assert_eq!(stats.chunks, chunks.len() as u64);
    let fresh: Vec<&(ChunkId, u32)> = chunks
        .iter()
        .filter(|(id, _)| !model.stored.contains(id))
        .collect();
    let fresh_distinct: BTreeSet<ChunkId> = fresh.iter().map(|(id, _)| *id).collect();
    assert!(
        (fresh_distinct.len() as u64..=fresh.len() as u64).contains(&stats.new_chunks),
        "{} new chunks reported, {} distinct chunks were missing ({} occurrences)",
        stats.new_chunks,
        fresh_distinct.len(),
        fresh.len()
    );

    model.stored.extend(chunks.iter().map(|(id, _)| *id));
    model.pending.push(Pending {
        staged,
        content,
        chunks,
    });
}

async fn commit(cas: &Cas, model: &mut Model, index: u8) {
    let Some(at) = pick(0..model.pending.len(), index) else {
        return;
    };
    let Pending {
        staged,
        content,
        chunks,
    } = model.pending.remove(at);
    let expected_id = staged.manifest().id();
    let id = cas
        .commit(staged)
        .await
        .unwrap_or_else(|e| panic!("commit failed: {e}"));
    assert_eq!(
        id, expected_id,
        "commit returned another id than the staged manifest's"
    );
    model.gone.remove(&id);
    let entry = model.live.entry(id).or_insert_with(|| Stored {
        content: content.clone(),
        chunks,
        holds: 0,
    });
    same_bytes(
        "content of a manifest committed twice",
        &entry.content,
        &content,
    );
    entry.holds += 1;
}

async fn release(cas: &Cas, model: &mut Model, index: u8) {
    let Some(id) = pick(model.live.keys().copied(), index) else {
        return;
    };
    let deleted = cas
        .release(id)
        .await
        .unwrap_or_else(|e| panic!("release of {id} failed: {e}"));
    let entry = model.live.get_mut(&id).expect("picked from the model");
    entry.holds -= 1;
    assert_eq!(
        deleted,
        entry.holds == 0,
        "release of {id} with {} holds left",
        entry.holds
    );
    if entry.holds == 0 {
        model.live.remove(&id);
        model.gone.insert(id);
    }
}

async fn release_gone(cas: &Cas, model: &Model, index: u8) {
    let Some(id) = pick(model.gone.iter().copied(), index) else {
        return;
    };
    match cas.release(id).await {
        Err(Error::ManifestNotFound(missing)) => assert_eq!(missing, id),
        other => panic!("release of the released manifest {id} gave {other:?}"),
    }
}

async fn get(cas: &Cas, model: &Model, index: u8) {
    let Some((id, stored)) = pick(model.live.iter(), index) else {
        return;
    };
    let manifest = cas
        .manifest(*id)
        .await
        .unwrap_or_else(|e| panic!("manifest {id} failed: {e}"));
    assert_eq!(manifest.id(), *id);
    let listed: Vec<(ChunkId, u32)> = manifest.chunks().iter().map(|c| (c.id, c.len)).collect();
    assert_eq!(listed, stored.chunks);

    let mut chunks = std::pin::pin!(cas.read_chunks(&manifest));
    let mut out = Vec::with_capacity(stored.content.len());
    let mut expected = stored.chunks.iter();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("reading a chunk of {id} failed: {e}"));
        let (chunk_id, len) = expected.next().expect("more chunks read than listed");
        assert_eq!(ChunkId::digest(&chunk), *chunk_id);
        assert_eq!(chunk.len(), *len as usize);
        out.extend_from_slice(&chunk);
    }
    assert!(expected.next().is_none(), "fewer chunks read than listed");
    same_bytes("content read chunk by chunk", &out, &stored.content);
}

async fn gc(cas: &Cas, model: &mut Model) {
    let needed = model.needed();
    assert!(
        needed.is_subset(&model.stored),
        "the model lost a needed chunk"
    );
    let doomed = model.stored.difference(&needed).count() as u64;

    let report = cas.gc().await.unwrap_or_else(|e| panic!("gc failed: {e}"));
    assert_eq!(
        report.chunks_scanned,
        model.stored.len() as u64,
        "{report:?}"
    );
    assert_eq!(report.chunks_deleted, doomed, "{report:?}");
    model.stored = needed;

    let scrub = cas
        .scrub()
        .await
        .unwrap_or_else(|e| panic!("scrub failed: {e}"));
    assert!(scrub.is_clean(), "scrub after gc is not clean: {scrub:?}");
    assert_eq!(scrub.chunks_checked, model.stored.len() as u64, "{scrub:?}");
    assert_eq!(
        scrub.manifests_checked,
        model.live.len() as u64,
        "{scrub:?}"
    );

    if model.live.is_empty() && model.pending.is_empty() {
        let stats = cas
            .stats()
            .await
            .unwrap_or_else(|e| panic!("stats failed: {e}"));
        assert_eq!(
            stats.chunks, 0,
            "chunks left after gc of an empty store: {stats:?}"
        );
        assert_eq!(stats.stored_bytes, 0, "{stats:?}");
    }
}

/// What must hold after every operation.
async fn check(cas: &Cas, model: &Model) {
    for (id, stored) in &model.live {
        assert!(
            cas.contains_manifest(*id)
                .unwrap_or_else(|e| panic!("contains_manifest failed: {e}")),
            "manifest {id} with {} holds is missing",
            stored.holds
        );
        let mut out = Vec::with_capacity(stored.content.len());
        let written = cas
            .read_to(*id, &mut out)
            .await
            .unwrap_or_else(|e| panic!("read_to of {id} failed: {e}"));
        assert_eq!(written, stored.content.len() as u64);
        same_bytes("content read back", &out, &stored.content);
    }
    for id in &model.gone {
        assert!(
            !cas.contains_manifest(*id)
                .unwrap_or_else(|e| panic!("contains_manifest failed: {e}")),
            "released manifest {id} is still stored"
        );
        match cas.manifest(*id).await {
            Err(Error::ManifestNotFound(missing)) => assert_eq!(missing, *id),
            other => panic!("released manifest {id} gave {other:?}"),
        }
    }
    let stats = cas
        .stats()
        .await
        .unwrap_or_else(|e| panic!("stats failed: {e}"));
    assert_eq!(stats.manifests, model.live.len() as u64, "{stats:?}");
    assert_eq!(stats.chunks, model.stored.len() as u64, "{stats:?}");
}

async fn run(path: &Path, ops: &[Op]) {
    let mut cas = open(path);
    let mut model = Model::default();
    for op in ops.iter().take(MAX_OPS) {
        match op {
            Op::Put { pieces } => put(&cas, &mut model, pieces).await,
            Op::Commit { index } => commit(&cas, &mut model, *index).await,
            Op::Abandon { index } => {
                if let Some(at) = pick(0..model.pending.len(), *index) {
                    // Its chunks stay stored, unreferenced, until the next GC.
                    model.pending.remove(at);
                }
            }
            Op::Release { index } => release(&cas, &mut model, *index).await,
            Op::ReleaseGone { index } => release_gone(&cas, &model, *index).await,
            Op::Get { index } => get(&cas, &model, *index).await,
            Op::Gc => gc(&cas, &mut model).await,
            Op::Recompress => {
                let before = cas.stats().await.expect("stats").chunks;
                cas.recompress(9).await.expect("recompress");
                assert_eq!(
                    cas.stats().await.expect("stats").chunks,
                    before,
                    "recompress changed the chunk set"
                );
                assert!(cas.scrub().await.expect("scrub").is_clean());
            }
            Op::Reopen => {
                // Leases live in memory: staged content does not survive its store.
                model.pending.clear();
                drop(cas);
                cas = open(path);
            }
        }
        check(&cas, &model).await;
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the runtime");
    runtime.block_on(run(dir.path(), &ops));
    drop(runtime);
});
