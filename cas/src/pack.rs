//! The embedded chunk store: frames appended to pack files, located through a sled index keyed
//! by chunk id.
//!
//! sled keeps values inside its tree nodes and rewrites a whole node on every change, so
//! frames of hundreds of KiB stored as sled values cost about twice their size on disk (measured:
//! 64 MiB of chunks took 120 MB of sled blob files). Frames therefore go to append-only pack
//! files, and sled holds only the 16-byte location of each.
//!
//! ```text
//! packs/<8 hex digits>.pack   "SLPK" version u32=1, then records:
//!                             chunk id [32], frame length u32 LE, frame
//! sled tree `chunks`          chunk id -> pack u32 BE, record offset u64 BE, frame length u32 BE
//! ```
//!
//! Durability: a put appends to the current pack and is visible in memory at once, but its
//! index entry reaches sled only in [`ChunkStore::sync`], after the pack has been fsynced. A
//! crash therefore loses at most frames that no durable index entry points at; every process
//! starts a new pack, so a torn tail is never appended to. Records carry their chunk id, so a
//! pack can be checked (and the index rebuilt) from the packs alone.
//!
//! Deleting removes the index entry; [`ChunkStore::compact`] later rewrites packs that are
//! mostly dead (live frames are copied to the current pack, the index is switched with
//! compare-and-swap so that a concurrent delete wins) and removes packs with nothing live.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

use crate::frame::{Frame, HEADER_LEN};
use crate::store::{ChunkStore, StoredChunk, blocking};
use crate::{ChunkId, Error, Result};

const PACK_MAGIC: &[u8; 4] = b"SLPK";
const PACK_VERSION: u32 = 1;
const PACK_HEADER_LEN: u64 = 8;
const RECORD_HEADER_LEN: u64 = 32 + 4;
/// A pack is closed and a new one started past this size.
const DEFAULT_PACK_TARGET: u64 = 256 << 20;
/// Compaction copies live frames in batches of this many bytes.
const COMPACT_BATCH_BYTES: usize = 16 << 20;
/// Compaction rewrites a closed pack when less than this share of it is live.
const COMPACT_LIVE_RATIO: f64 = 0.5;

/// Where a frame lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    pack: u32,
    /// Offset of the record (its header), not of the frame.
    offset: u64,
    frame_len: u32,
}

impl Loc {
    fn encode(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&self.pack.to_be_bytes());
        out[4..12].copy_from_slice(&self.offset.to_be_bytes());
        out[12..].copy_from_slice(&self.frame_len.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        Some(Self {
            pack: u32::from_be_bytes(bytes[..4].try_into().ok()?),
            offset: u64::from_be_bytes(bytes[4..12].try_into().ok()?),
            frame_len: u32::from_be_bytes(bytes[12..].try_into().ok()?),
        })
    }

    /// Bytes the record takes in its pack.
    fn record_len(self) -> u64 {
        RECORD_HEADER_LEN + u64::from(self.frame_len)
    }
}

#[derive(Debug)]
struct Writer {
    pack: u32,
    file: Arc<File>,
    len: u64,
    /// Where the last background sync of this pack started (see [`SYNC_BEHIND`]).
    kicked: u64,
}

/// Bytes appended to the current pack after which a background `fdatasync` of it starts (when
/// none is running), so that the disk works while an ingest runs and the sync before indexing
/// finds little left: for 1 GiB of new frames that final sync took ~0.37 s, all at the end.
/// 8 MiB rather than 32: first ingests of random data 5–7% faster (alternating pairs, both
/// orders; `benches/scripts/ab-ingest.sh`), the compressible tar unchanged.
const SYNC_BEHIND: u64 = 8 << 20;

#[derive(Debug, Default)]
struct WriteState {
    writer: Option<Writer>,
    /// Packs written since the last sync, to fsync before their index entries go to sled.
    unsynced: Vec<Arc<File>>,
    /// Frames appended but not yet indexed in sled.
    pending: HashMap<ChunkId, Loc>,
    next_pack: u32,
    /// The background sync of the current pack, while one runs or is not yet collected.
    behind: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    /// A background sync's failure, reported by the next sync (an fsync error is reported
    /// once: the foreground sync after it may well succeed).
    behind_failed: Option<std::io::Error>,
    /// Why a pack sync failed, once one has. After a failed fsync Linux may have dropped the
    /// dirty pages it could not write and report success on the next fsync, so no frame
    /// appended before it can be trusted to be durable: every later sync fails too, nothing
    /// more is indexed, and only reopening the store (whose index holds only frames synced
    /// before) clears it.
    poisoned: Option<String>,
}

impl WriteState {
    /// Starts a background sync of the current pack when enough was appended since the last.
    fn sync_behind(&mut self) {
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        if w.len - w.kicked < SYNC_BEHIND {
            return;
        }
        if let Some(done) = self.behind.take_if(|h| h.is_finished())
            && let Err(e) = collect(done)
        {
            self.behind_failed.get_or_insert(e);
        }
        if self.behind.is_none() {
            w.kicked = w.len;
            let file = Arc::clone(&w.file);
            self.behind = Some(std::thread::spawn(move || file.sync_data()));
        }
    }

    /// Folds in the outcome of a sync (with any background sync's failure): an error now and
    /// from then on when any sync ever failed (see [`WriteState::poisoned`]).
    fn record_sync(&mut self, synced: std::io::Result<()>) -> Result<()> {
        let synced = self.behind_failed.take().map_or(synced, Err);
        if let (Err(e), None) = (&synced, &self.poisoned) {
            self.poisoned = Some(e.to_string());
        }
        match &self.poisoned {
            Some(why) => Err(Error::Io(std::io::Error::other(format!(
                "syncing a pack file failed ({why}); chunks written since may not be on disk, \
                 so the store makes nothing durable until it is reopened"
            )))),
            None => Ok(()),
        }
    }
}

/// Waits for a background sync (when there is one), then syncs `files`.
fn sync_files(
    behind: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    files: &[Arc<File>],
) -> std::io::Result<()> {
    behind
        .map_or(Ok(()), collect)
        .and_then(|()| files.iter().try_for_each(|f| f.sync_data()))
}

fn collect(sync: std::thread::JoinHandle<std::io::Result<()>>) -> std::io::Result<()> {
    sync.join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the background pack sync panicked")))
}

#[derive(Debug)]
struct PackInner {
    dir: PathBuf,
    db: sled::Db,
    index: sled::Tree,
    state: Mutex<WriteState>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
    pack_target: u64,
    /// Compactions run one at a time: a second one, started before the first switched its
    /// index entries, would see the first one's new pack as dead and delete it.
    compacting: Mutex<()>,
}

/// The embedded [`ChunkStore`]: pack files under `<store>/packs`, index in sled. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PackStore {
    inner: Arc<PackInner>,
}

impl PackStore {
    /// Tree holding chunk id → location.
    pub const INDEX_TREE: &'static str = "chunks";

    /// Opens the pack store in `dir` (created if needed), indexed in `db`.
    pub fn open(dir: impl AsRef<Path>, db: &sled::Db) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let mut next_pack = 0;
        for entry in std::fs::read_dir(&dir)? {
            if let Some(n) = pack_number(&entry?.path()) {
                next_pack = next_pack.max(n + 1);
            }
        }
        Ok(Self {
            inner: Arc::new(PackInner {
                index: db.open_tree(Self::INDEX_TREE)?,
                db: db.clone(),
                dir,
                state: Mutex::new(WriteState {
                    next_pack,
                    ..WriteState::default()
                }),
                readers: RwLock::default(),
                pack_target: DEFAULT_PACK_TARGET,
                compacting: Mutex::new(()),
            }),
        })
    }

    /// The directory holding the packs.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Overwrites the stored frame of `id` in place (same length, or shorter), to simulate
    /// corruption in tests and harnesses.
    pub fn corrupt_in_place(&self, id: ChunkId, frame: &[u8]) -> Result<()> {
        let loc = self
            .inner
            .locate(id)?
            .ok_or_else(|| Error::Task(format!("chunk {id} not stored")))?;
        if frame.len() > loc.frame_len as usize {
            return Err(Error::Task(
                "replacement frame is longer than the stored one".into(),
            ));
        }
        let file = OpenOptions::new()
            .write(true)
            .open(self.inner.pack_path(loc.pack))?;
        file.write_all_at(frame, loc.offset + RECORD_HEADER_LEN)?;
        file.sync_all()?;
        Ok(())
    }

    /// Removes the index entry of `id` without any accounting, to simulate a lost chunk.
    pub fn remove_raw(&self, id: ChunkId) -> Result<()> {
        self.inner.lock().pending.remove(&id);
        self.inner.index.remove(id.as_bytes())?;
        Ok(())
    }
}

/// `len` bytes of `file` at `offset`, read straight into a new buffer's spare capacity: a
/// zeroed buffer, as `read_exact_at` needs, cost ~2% of a verified read's CPU in `memset`.
fn read_at(file: &File, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The spare capacity may exceed `len`; what was read beyond it belongs to the next record.
    buf.truncate(len);
    Ok(buf)
}

fn pack_number(path: &Path) -> Option<u32> {
    if path.extension()? != "pack" {
        return None;
    }
    u32::from_str_radix(path.file_stem()?.to_str()?, 16).ok()
}

impl PackInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriteState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pack_path(&self, pack: u32) -> PathBuf {
        self.dir.join(format!("{pack:08x}.pack"))
    }

    fn locate(&self, id: ChunkId) -> Result<Option<Loc>> {
        if let Some(loc) = self.lock().pending.get(&id) {
            return Ok(Some(*loc));
        }
        Ok(self.index.get(id.as_bytes())?.and_then(|v| Loc::decode(&v)))
    }

    fn contains(&self, state: &WriteState, id: &ChunkId) -> Result<bool> {
        Ok(state.pending.contains_key(id) || self.index.contains_key(id.as_bytes())?)
    }

    fn reader(&self, pack: u32) -> Result<Arc<File>> {
        if let Some(f) = self
            .readers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pack)
        {
            return Ok(Arc::clone(f));
        }
        let file = Arc::new(File::open(self.pack_path(pack))?);
        self.readers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pack, Arc::clone(&file));
        Ok(file)
    }

    /// Appends the frames not already stored (see [`ChunkStore::put_many`]).
    fn put(&self, frames: Vec<(ChunkId, Frame)>) -> Result<()> {
        let mut state = self.lock();
        for (id, frame) in frames {
            if self.contains(&state, &id)? {
                continue;
            }
            let loc = self.append(&mut state, &id, frame.header(), frame.payload())?;
            state.pending.insert(id, loc);
        }
        Ok(())
    }

    /// Appends one record to the current pack (starting a new one when needed). Its frame is
    /// `head` followed by `body`: a frame's header and payload, or nothing and a whole frame.
    fn append(
        &self,
        state: &mut WriteState,
        id: &ChunkId,
        head: &[u8],
        body: &[u8],
    ) -> Result<Loc> {
        let frame_len = u32::try_from(head.len() + body.len())
            .map_err(|_| Error::Task("frame over 4 GiB".into()))?;
        if head.len() > HEADER_LEN {
            return Err(Error::Task(format!(
                "a frame header of {} bytes (a header has {HEADER_LEN})",
                head.len()
            )));
        }
        if state
            .writer
            .as_ref()
            .is_none_or(|w| w.len >= self.pack_target)
        {
            self.start_pack(state)?;
        }
        let w = state.writer.as_mut().expect("started above");
        // The record's header and the frame's in one write, then the payload.
        let mut start = [0u8; RECORD_HEADER_LEN as usize + HEADER_LEN];
        let start_len = RECORD_HEADER_LEN as usize + head.len();
        start[..32].copy_from_slice(id.as_bytes());
        start[32..36].copy_from_slice(&frame_len.to_le_bytes());
        start[36..start_len].copy_from_slice(head);
        w.file.write_all_at(&start[..start_len], w.len)?;
        w.file.write_all_at(body, w.len + start_len as u64)?;
        let loc = Loc {
            pack: w.pack,
            offset: w.len,
            frame_len,
        };
        w.len += loc.record_len();
        state.sync_behind();
        Ok(loc)
    }

    fn start_pack(&self, state: &mut WriteState) -> Result<()> {
        let pack = state.next_pack;
        state.next_pack += 1;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.pack_path(pack))?;
        file.write_all(PACK_MAGIC)?;
        file.write_all(&PACK_VERSION.to_le_bytes())?;
        let file = Arc::new(file);
        state.unsynced.push(Arc::clone(&file));
        self.readers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pack, Arc::clone(&file));
        // A new pack file is durable only once its directory entry is.
        File::open(&self.dir)?.sync_all()?;
        state.writer = Some(Writer {
            pack,
            file,
            len: PACK_HEADER_LEN,
            kicked: 0,
        });
        Ok(())
    }

    /// fsyncs the packs written since the last sync, then indexes their frames in sled.
    fn sync(&self) -> Result<()> {
        let mut state = self.lock();
        if let Some(w) = &state.writer
            && !state.unsynced.iter().any(|f| Arc::ptr_eq(f, &w.file))
        {
            let file = Arc::clone(&w.file);
            state.unsynced.push(file);
        }
        let (files, behind) = (std::mem::take(&mut state.unsynced), state.behind.take());
        let synced = sync_files(behind, &files);
        state.record_sync(synced)?;
        let mut batch = sled::Batch::default();
        for (id, loc) in state.pending.drain() {
            batch.insert(&id.as_bytes()[..], &loc.encode()[..]);
        }
        self.index.apply_batch(batch)?;
        drop(state);
        self.db.flush()?;
        Ok(())
    }

    fn read_frame(&self, id: ChunkId, loc: Loc) -> Result<Bytes> {
        let file = self.reader(loc.pack)?;
        let record = read_at(&file, loc.record_len() as usize, loc.offset)?;
        if record[..32] != id.as_bytes()[..] {
            return Err(Error::CorruptChunk {
                id,
                reason: format!(
                    "pack {:08x} holds another chunk at offset {}",
                    loc.pack, loc.offset
                ),
            });
        }
        let stored_len = u32::from_le_bytes(record[32..36].try_into().expect("4 bytes"));
        if stored_len != loc.frame_len {
            return Err(Error::CorruptChunk {
                id,
                reason: format!(
                    "pack record says {stored_len} bytes, index says {}",
                    loc.frame_len
                ),
            });
        }
        let mut frame = Bytes::from(record);
        Ok(frame.split_off(RECORD_HEADER_LEN as usize))
    }

    fn get(&self, id: ChunkId) -> Result<Option<Bytes>> {
        // Compaction may move a frame and delete its old pack between the lookup and the read;
        // a second lookup then finds the new place.
        for attempt in 0..2 {
            let Some(loc) = self.locate(id)? else {
                return Ok(None);
            };
            match self.read_frame(id, loc) {
                Err(Error::Io(e)) if attempt == 0 && e.kind() == std::io::ErrorKind::NotFound => {
                    continue;
                }
                Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(Error::CorruptChunk {
                        id,
                        reason: format!("pack {:08x} is truncated", loc.pack),
                    });
                }
                other => return other.map(Some),
            }
        }
        Ok(None)
    }

    /// Appends new frames for stored chunks, makes them durable, then switches each index
    /// entry from the old location to the new one (compare-and-swap: a chunk deleted or moved
    /// meanwhile keeps what it has). The old frames become dead space for compaction.
    fn replace_many(&self, frames: Vec<(ChunkId, Frame)>) -> Result<u64> {
        let _one_at_a_time = self.compacting.lock().unwrap_or_else(|e| e.into_inner());
        // Index everything pending first, so every old location is in sled.
        self.sync()?;
        let mut moves = Vec::with_capacity(frames.len());
        for (id, frame) in frames {
            if let Some(old) = self.index.get(id.as_bytes())?.and_then(|v| Loc::decode(&v)) {
                moves.push((id, old, frame.to_bytes()));
            }
        }
        self.append_and_switch(moves)
    }

    /// Appends frames as new records, makes them durable, then points each index entry at its
    /// new record where it still points at the old one: a delete (or another move) in the
    /// meantime wins, and the copy is left dead. Returns how many entries were switched.
    fn append_and_switch(&self, moves: Vec<(ChunkId, Loc, Bytes)>) -> Result<u64> {
        let mut moved = Vec::with_capacity(moves.len());
        for (id, old, frame) in moves {
            let new = {
                let mut state = self.lock();
                self.append(&mut state, &id, &[], &frame)?
            };
            moved.push((id, old, new));
        }
        // The copies must be durable before the index points at them.
        self.sync_written()?;
        let mut switched = 0;
        for (id, old, new) in moved {
            let swapped = self.index.compare_and_swap(
                id.as_bytes(),
                Some(&old.encode()[..]),
                Some(&new.encode()[..]),
            )?;
            switched += u64::from(swapped.is_ok());
        }
        self.db.flush()?;
        Ok(switched)
    }

    /// fsyncs every pack written since the last sync (the current one and any the writer
    /// rotated away from), without indexing pending frames.
    fn sync_written(&self) -> Result<()> {
        let (files, behind) = {
            let mut state = self.lock();
            let mut files: Vec<Arc<File>> = state.unsynced.drain(..).collect();
            files.extend(state.writer.iter().map(|w| Arc::clone(&w.file)));
            (files, state.behind.take())
        };
        let synced = sync_files(behind, &files);
        self.lock().record_sync(synced)
    }

    fn compact(&self) -> Result<u64> {
        let _one_at_a_time = self.compacting.lock().unwrap_or_else(|e| e.into_inner());
        // Close the current pack; packs numbered from `limit` on are written after this point
        // (by puts running concurrently, or by this compaction's own copies) and are left alone.
        let limit = {
            let mut state = self.lock();
            if let Some(w) = state.writer.take() {
                state.unsynced.push(w.file);
            }
            state.next_pack
        };
        // Index everything written before: a frame still pending would look dead below.
        self.sync()?;

        let mut live: BTreeMap<u32, Vec<(ChunkId, Loc)>> = BTreeMap::new();
        for item in self.index.iter() {
            let (key, value) = item?;
            if let (Some(id), Some(loc)) = (ChunkId::from_slice(&key), Loc::decode(&value)) {
                live.entry(loc.pack).or_default().push((id, loc));
            }
        }
        let mut packs = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if let Some(n) = pack_number(&path).filter(|n| *n < limit) {
                packs.push((n, std::fs::metadata(&path)?.len()));
            }
        }
        let mut freed = 0;
        for (pack, size) in packs {
            let entries = live.remove(&pack).unwrap_or_default();
            let live_bytes: u64 =
                PACK_HEADER_LEN + entries.iter().map(|(_, l)| l.record_len()).sum::<u64>();
            if entries.is_empty() {
                self.remove_pack(pack)?;
                freed += size;
                continue;
            }
            if (live_bytes as f64) >= COMPACT_LIVE_RATIO * size as f64 {
                continue;
            }
            // In batches of about 16 MiB, so a large pack is never held in memory whole.
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            for (id, old) in entries {
                let frame = self.read_frame(id, old)?;
                batch_bytes += frame.len();
                batch.push((id, old, frame));
                if batch_bytes >= COMPACT_BATCH_BYTES {
                    self.append_and_switch(std::mem::take(&mut batch))?;
                    batch_bytes = 0;
                }
            }
            self.append_and_switch(batch)?;
            self.remove_pack(pack)?;
            freed += size.saturating_sub(live_bytes);
        }
        Ok(freed)
    }

    fn remove_pack(&self, pack: u32) -> Result<()> {
        self.readers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pack);
        std::fs::remove_file(self.pack_path(pack))?;
        Ok(())
    }
}

impl ChunkStore for PackStore {
    async fn has_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        let state = self.inner.lock();
        ids.iter()
            .map(|id| self.inner.contains(&state, id))
            .collect()
    }

    async fn put_many(&self, frames: Vec<(ChunkId, Frame)>) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.put(frames)).await
    }

    fn put_many_blocking(
        &self,
        frames: Vec<(ChunkId, Frame)>,
    ) -> std::result::Result<Result<()>, Vec<(ChunkId, Frame)>> {
        Ok(self.inner.put(frames))
    }

    async fn get(&self, id: ChunkId) -> Result<Option<Bytes>> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.get(id)).await
    }

    async fn delete_many(&self, ids: Vec<ChunkId>) -> Result<u64> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let mut freed = 0;
            let mut state = inner.lock();
            for id in ids {
                if let Some(loc) = state.pending.remove(&id) {
                    freed += u64::from(loc.frame_len);
                } else if let Some(v) = inner.index.remove(id.as_bytes())? {
                    freed += Loc::decode(&v).map_or(0, |l| u64::from(l.frame_len));
                }
            }
            Ok(freed)
        })
        .await
    }

    async fn list(&self, after: Option<ChunkId>, limit: usize) -> Result<Vec<StoredChunk>> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            // Pending frames are listed too: they are stored, only not yet indexed durably.
            let mut all: BTreeMap<ChunkId, u64> = {
                let state = inner.lock();
                state
                    .pending
                    .iter()
                    .filter(|(id, _)| after.is_none_or(|a| **id > a))
                    .map(|(id, loc)| (*id, u64::from(loc.frame_len)))
                    .collect()
            };
            let iter = match after {
                Some(a) => inner.index.range((
                    std::ops::Bound::Excluded(a.as_bytes().to_vec()),
                    std::ops::Bound::Unbounded,
                )),
                None => inner.index.iter(),
            };
            for item in iter.take(limit) {
                let (k, v) = item?;
                let id = ChunkId::from_slice(&k).ok_or_else(|| {
                    Error::Task(format!("bad key of {} bytes in the chunk index", k.len()))
                })?;
                let frame_len = Loc::decode(&v).map_or(0, |l| u64::from(l.frame_len));
                all.insert(id, frame_len);
            }
            Ok(all
                .into_iter()
                .take(limit)
                .map(|(id, frame_len)| StoredChunk { id, frame_len })
                .collect())
        })
        .await
    }

    async fn sync(&self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.sync()).await
    }

    async fn stored_bytes(&self) -> Result<u64> {
        // The pack files themselves: live and dead frames alike, which is what compaction
        // measures its gain against.
        let dir = self.inner.dir.clone();
        blocking(move || {
            let mut total = 0;
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                if pack_number(&entry.path()).is_some() {
                    total += entry.metadata()?.len();
                }
            }
            Ok(total)
        })
        .await
    }

    async fn compact(&self) -> Result<u64> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.compact()).await
    }

    async fn replace_many(&self, frames: Vec<(ChunkId, Frame)>) -> Result<u64> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.replace_many(frames)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;

    fn chunk(seed: u8) -> (ChunkId, Frame, Vec<u8>) {
        let data = vec![seed; 10_000];
        let frame = frame::encode(&Bytes::from(data.clone()), 3);
        (ChunkId::digest(&data), frame, data)
    }

    /// A failed pack sync (here a background one's error) fails that sync and every later one,
    /// and indexes nothing; a reopened store works and never lists the frames it could not
    /// make durable.
    #[tokio::test]
    async fn a_failed_sync_poisons_the_store_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let store = PackStore::open(dir.path().join("packs"), &db).unwrap();
        let (lost, lost_frame, _) = chunk(1);
        store.put_many(vec![(lost, lost_frame)]).await.unwrap();
        store.inner.lock().behind_failed = Some(std::io::Error::other("injected EIO"));

        let err = store.sync().await.unwrap_err().to_string();
        assert!(err.contains("injected EIO"), "{err}");
        let (later, later_frame, _) = chunk(2);
        store.put_many(vec![(later, later_frame)]).await.unwrap();
        let again = store.sync().await.unwrap_err().to_string();
        assert!(again.contains("injected EIO"), "{again}");
        assert_eq!(
            store.inner.index.len(),
            0,
            "nothing indexed after a failed sync"
        );

        drop(store);
        let store = PackStore::open(dir.path().join("packs"), &db).unwrap();
        assert_eq!(
            store.has_many(&[lost, later]).await.unwrap(),
            [false, false]
        );
        let (id, frame, data) = chunk(3);
        store.put_many(vec![(id, frame)]).await.unwrap();
        store.sync().await.unwrap();
        let got = store.get(id).await.unwrap().expect("stored");
        assert_eq!(frame::decode(&id, &got).unwrap(), data);
    }
}
