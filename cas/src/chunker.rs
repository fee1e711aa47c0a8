//! Content-defined chunking: FastCDC 2020, shaped as in REAPI (min = avg/4, max = avg×4,
//! normalization level 2).

use std::io::Read;

use bytes::Bytes;
use fastcdc::v2020::{self, Normalization};

use crate::{Error, Result};

/// Normalization level 2: most chunks land near the average, as REAPI specifies.
const NORMALIZATION: Normalization = Normalization::Level2;

/// Smallest average chunk size accepted (min = 256 B, well above FastCDC's 64 B floor).
pub const MIN_AVG_CHUNK: u32 = 1024;
/// Largest average chunk size accepted: FastCDC's own limit, giving max chunks of 16 MiB.
pub const MAX_AVG_CHUNK: u32 = 4 * 1024 * 1024;
/// No chunk, and therefore no frame, is ever larger than this.
pub const MAX_CHUNK_LEN: u32 = MAX_AVG_CHUNK * 4;

/// Chunking parameters. Only the average is free; min and max follow from it.
///
/// These are recorded in the store when it is created: chunks cut with other parameters would
/// never deduplicate against the existing ones, so a store refuses to mix them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerParams {
    avg: u32,
}

impl ChunkerParams {
    /// The default average chunk size, in bytes (256 KiB).
    ///
    /// Chosen from the storage-efficiency measurement in `docs/benchmarks.md`.
    pub const DEFAULT_AVG: u32 = 256 * 1024;

    /// Parameters with the given average chunk size in bytes: a power of two from 1 KiB to 4 MiB.
    pub fn new(avg: u32) -> Result<Self> {
        if !avg.is_power_of_two() || !(MIN_AVG_CHUNK..=MAX_AVG_CHUNK).contains(&avg) {
            return Err(Error::InvalidParams(format!(
                "average chunk size must be a power of two from {MIN_AVG_CHUNK} to {MAX_AVG_CHUNK} bytes, got {avg}"
            )));
        }
        Ok(Self { avg })
    }

    /// Average chunk size in bytes.
    pub fn avg(&self) -> u32 {
        self.avg
    }

    /// Minimum chunk size in bytes (avg / 4); only the last chunk of a stream can be smaller.
    pub fn min(&self) -> u32 {
        self.avg / 4
    }

    /// Maximum chunk size in bytes (avg × 4).
    pub fn max(&self) -> u32 {
        self.avg * 4
    }

    /// The chunk boundaries of an in-memory buffer, as lengths in order.
    pub fn chunk_lengths(&self, data: &[u8]) -> Vec<usize> {
        v2020::FastCDC::with_level(
            data,
            self.min() as usize,
            self.avg() as usize,
            self.max() as usize,
            NORMALIZATION,
        )
        .map(|c| c.length)
        .collect()
    }
}

impl Default for ChunkerParams {
    fn default() -> Self {
        Self {
            avg: Self::DEFAULT_AVG,
        }
    }
}

/// Blocks kept for reuse: with chunks of the ingest window still in flight from the last one
/// or two blocks, a few spares let one whose chunks are all done come round again.
const MAX_SPARE_BLOCKS: usize = 4;

/// Splits a byte stream into content-defined chunks without copying them one by one.
///
/// Reads in large blocks and hands out each chunk as a [`Bytes`] view of its block, so the only
/// copy is the tail carried over when a new block starts. A block is read with
/// [`Read::read_to_end`] into a `Vec`'s spare capacity, which readers such as [`std::fs::File`]
/// fill without zeroing it first. Each block's buffer keeps room at its front for the tail, so
/// that the next block can be read before the tail is known: [`Chunker::reading_ahead`] reads
/// it on a thread of its own while this one cuts. Memory held is the current block, up to four
/// spare blocks (two more when reading ahead), and whatever chunks the caller still holds.
#[derive(Debug)]
pub struct Chunker<R> {
    source: Source<R>,
    params: ChunkerParams,
    masks: (u64, u64),
    /// The block being cut, a view of its buffer past the unused part of the room in front;
    /// bytes from `pos` on have not been handed out yet.
    block: Bytes,
    pos: usize,
    /// The whole buffer `block` is a view of.
    buffer: Bytes,
    layout: Layout,
    /// Earlier buffers, reused once every chunk cut from them has been dropped.
    spares: std::collections::VecDeque<Bytes>,
    eof: bool,
}

/// Where blocks come from.
#[derive(Debug)]
enum Source<R> {
    /// Read on the cutting thread.
    Inline(R),
    /// Read by a thread of its own, one block ahead; empty buffers go back to it for reuse.
    Ahead {
        filled: std::sync::mpsc::Receiver<std::io::Result<(Vec<u8>, bool)>>,
        empties: std::sync::mpsc::SyncSender<Vec<u8>>,
    },
}

/// A block buffer: `room` bytes for the tail carried over (less than one maximum chunk), then
/// up to `read` bytes read.
#[derive(Debug, Clone, Copy)]
struct Layout {
    room: usize,
    read: usize,
}

impl Layout {
    fn of(params: ChunkerParams) -> Self {
        let max = params.max() as usize;
        Self {
            room: max,
            read: (max * 2).max(4 << 20),
        }
    }

    /// `buffer` (a fresh or a reused one) with its room in place and nothing read yet.
    fn reset(self, mut buffer: Vec<u8>) -> Vec<u8> {
        if buffer.len() >= self.room {
            buffer.truncate(self.room);
        } else {
            buffer.reserve(self.room + self.read);
            buffer.resize(self.room, 0);
        }
        buffer
    }

    /// Reads the next block's bytes into `buffer` (as [`Layout::reset`] left it); returns it and
    /// whether the input ended.
    fn read_into(
        self,
        reader: &mut impl Read,
        buffer: Vec<u8>,
    ) -> std::io::Result<(Vec<u8>, bool)> {
        let mut buffer = self.reset(buffer);
        let read = reader.take(self.read as u64).read_to_end(&mut buffer)?;
        Ok((buffer, read < self.read))
    }
}

impl<R: Read> Chunker<R> {
    /// A chunker over `reader`.
    pub fn new(reader: R, params: ChunkerParams) -> Self {
        Self::with_source(Source::Inline(reader), params)
    }

    fn with_source(source: Source<R>, params: ChunkerParams) -> Self {
        Self {
            source,
            params,
            masks: v2020::select_masks(params.avg() as usize, NORMALIZATION),
            block: Bytes::new(),
            pos: 0,
            buffer: Bytes::new(),
            layout: Layout::of(params),
            spares: std::collections::VecDeque::new(),
            eof: false,
        }
    }

    /// A buffer whose chunks have all been dropped, if a spare is one. Recycling matters: a
    /// new multi-MiB block every few MiB of input cost page faults worth ~5% of ingest CPU.
    fn spare(&mut self) -> Option<Vec<u8>> {
        for _ in 0..self.spares.len() {
            let spare = self.spares.pop_front()?;
            // Succeeds only when no chunk cut from that buffer is alive any more.
            match spare.try_into_mut() {
                Ok(buffer) => return Some(Vec::from(buffer)),
                Err(spare) => self.spares.push_back(spare),
            }
        }
        None
    }

    /// Unless a whole maximum-size chunk is buffered or the input has ended, takes the next
    /// block and moves the uncut tail into the room in front of it.
    fn fill(&mut self) -> std::io::Result<()> {
        if self.eof || self.block.len() - self.pos >= self.params.max() as usize {
            return Ok(());
        }
        let spare = self.spare();
        let layout = self.layout;
        let (mut next, eof) = match &mut self.source {
            Source::Inline(reader) => layout.read_into(reader, spare.unwrap_or_default())?,
            Source::Ahead { filled, empties } => {
                if let Some(spare) = spare {
                    let _ = empties.try_send(spare); // the reader has enough when full
                }
                filled.recv().map_err(|_| {
                    std::io::Error::other("the reading thread stopped after an error")
                })??
            }
        };
        let tail = &self.block[self.pos..];
        let start = layout.room - tail.len();
        next[start..layout.room].copy_from_slice(tail);
        self.eof = eof;
        let buffer = Bytes::from(next);
        self.block = buffer.slice(start..);
        self.pos = 0;
        let old = std::mem::replace(&mut self.buffer, buffer);
        if self.spares.len() < MAX_SPARE_BLOCKS && !old.is_empty() {
            self.spares.push_back(old);
        }
        Ok(())
    }
}

impl<R: Read + Send + 'static> Chunker<R> {
    /// A chunker over `reader` that reads on a thread of its own, one block ahead of the
    /// cutting: reading a file from the page cache is a copy that then runs beside FastCDC
    /// instead of before it. The thread ends when the input does, on a read error (which the
    /// chunker then returns), or soon after the chunker is dropped.
    pub fn reading_ahead(mut reader: R, params: ChunkerParams) -> Self {
        let layout = Layout::of(params);
        let (filled_tx, filled) = std::sync::mpsc::sync_channel(1);
        let (empties, empties_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
        std::thread::spawn(move || {
            loop {
                let buffer = empties_rx.try_recv().unwrap_or_default();
                let read = layout.read_into(&mut reader, buffer);
                let last = !matches!(read, Ok((_, false)));
                if filled_tx.send(read).is_err() || last {
                    return;
                }
            }
        });
        Self::with_source(Source::Ahead { filled, empties }, params)
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = std::io::Result<Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Err(e) = self.fill() {
            return Some(Err(e));
        }
        let rest = &self.block[self.pos..];
        if rest.is_empty() {
            return None;
        }
        let (mask_s, mask_l) = self.masks;
        let (_, len) = v2020::cut(
            rest,
            self.params.min() as usize,
            self.params.avg() as usize,
            self.params.max() as usize,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        let chunk = self.block.slice(self.pos..self.pos + len);
        self.pos += len;
        Some(Ok(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_validation() {
        assert!(
            ChunkerParams::new(512 * 1024).is_ok(),
            "REAPI's 512 KiB is valid"
        );
        assert!(ChunkerParams::new(1000).is_err());
        assert!(ChunkerParams::new(512).is_err());
        assert!(ChunkerParams::new(8 << 20).is_err());
        let p = ChunkerParams::new(64 * 1024).unwrap();
        assert_eq!((p.min(), p.max()), (16 * 1024, 256 * 1024));
    }

    #[test]
    fn empty_input_has_no_chunks() {
        let mut c = Chunker::new(&b""[..], ChunkerParams::default());
        assert!(c.next().is_none());
    }

    /// Blocks are recycled only when no chunk of theirs is alive: chunks kept while later
    /// ones are cut must keep their bytes, and dropping them early must not change the cuts.
    #[test]
    fn recycled_blocks_never_change_live_chunks() {
        let params = ChunkerParams::new(64 * 1024).unwrap();
        let data: Vec<u8> = (0..24u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let expected = params.chunk_lengths(&data);
        // Keep every chunk: nothing can be recycled; the concatenation is the input.
        let kept: Vec<Bytes> = Chunker::new(&data[..], params)
            .map(Result::unwrap)
            .collect();
        assert_eq!(kept.iter().map(Bytes::len).collect::<Vec<_>>(), expected);
        assert_eq!(kept.concat(), data);
        // Keep only a sliding window of 8, as the ingest pipeline does: blocks come round.
        let mut window = std::collections::VecDeque::new();
        let mut offset = 0;
        for chunk in Chunker::new(&data[..], params) {
            let chunk = chunk.unwrap();
            window.push_back((offset, chunk.clone()));
            offset += chunk.len();
            if window.len() > 8 {
                let (at, old): (usize, Bytes) = window.pop_front().unwrap();
                assert_eq!(
                    &old[..],
                    &data[at..at + old.len()],
                    "a live chunk was overwritten"
                );
            }
        }
        assert_eq!(offset, data.len());
    }

    /// Reads `data` in at most 7-byte pieces (to exercise refills), then fails with `error`
    /// if given.
    struct Trickle {
        data: std::io::Cursor<Vec<u8>>,
        error: Option<std::io::ErrorKind>,
    }
    impl Trickle {
        fn new(data: &[u8]) -> Self {
            Self {
                data: std::io::Cursor::new(data.to_vec()),
                error: None,
            }
        }
    }
    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(7);
            match self.data.read(&mut out[..n])? {
                0 => match self.error.take() {
                    Some(kind) => Err(std::io::Error::new(kind, "the disk went away")),
                    None => Ok(0),
                },
                n => Ok(n),
            }
        }
    }

    #[test]
    fn reading_ahead_gives_the_same_chunks() {
        let params = ChunkerParams::new(64 * 1024).unwrap();
        for len in [0, 1, 100_000, 13 << 20] {
            let data: Vec<u8> = (0..len as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
                .collect();
            let ahead: Vec<Bytes> =
                Chunker::reading_ahead(std::io::Cursor::new(data.clone()), params)
                    .map(Result::unwrap)
                    .collect();
            assert_eq!(
                ahead.iter().map(Bytes::len).collect::<Vec<_>>(),
                params.chunk_lengths(&data)
            );
            assert_eq!(ahead.concat(), data);
        }
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
            .collect();
        let trickled: Vec<Bytes> =
            Chunker::reading_ahead(Trickle::new(&data), ChunkerParams::new(1024).unwrap())
                .map(Result::unwrap)
                .collect();
        assert_eq!(trickled.concat(), data);
    }

    #[test]
    fn a_read_error_ends_the_chunks_with_it() {
        for ahead in [false, true] {
            let reader = Trickle {
                error: Some(std::io::ErrorKind::BrokenPipe),
                ..Trickle::new(&[9; 50_000])
            };
            let params = ChunkerParams::new(1024).unwrap();
            let mut chunks: Box<dyn Iterator<Item = std::io::Result<Bytes>>> = if ahead {
                Box::new(Chunker::reading_ahead(reader, params))
            } else {
                Box::new(Chunker::new(reader, params))
            };
            let err = chunks
                .find_map(Result::err)
                .expect("the error comes through");
            assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "ahead: {ahead}");
        }
    }

    #[test]
    fn short_reads_give_the_same_chunks() {
        let params = ChunkerParams::new(1024).unwrap();
        let data: Vec<u8> = (0..50_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let a: Vec<Bytes> = Chunker::new(&data[..], params)
            .map(Result::unwrap)
            .collect();
        let b: Vec<Bytes> = Chunker::new(Trickle::new(&data), params)
            .map(Result::unwrap)
            .collect();
        assert_eq!(a, b);
        assert!(a.len() > 10);
    }
}
