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
/// fill without zeroing it first. Memory held is the current block, up to four spare blocks,
/// and whatever chunks the caller still holds.
#[derive(Debug)]
pub struct Chunker<R> {
    reader: R,
    params: ChunkerParams,
    masks: (u64, u64),
    /// The block being cut; bytes from `pos` on have not been handed out yet.
    block: Bytes,
    pos: usize,
    block_len: usize,
    /// Earlier blocks, reused once every chunk cut from them has been dropped.
    spares: std::collections::VecDeque<Bytes>,
    eof: bool,
}

impl<R: Read> Chunker<R> {
    /// A chunker over `reader`.
    pub fn new(reader: R, params: ChunkerParams) -> Self {
        let masks = v2020::select_masks(params.avg() as usize, NORMALIZATION);
        let block_len = (params.max() as usize * 2).max(4 << 20);
        Self {
            reader,
            params,
            masks,
            block: Bytes::new(),
            pos: 0,
            block_len,
            spares: std::collections::VecDeque::new(),
            eof: false,
        }
    }

    /// An empty buffer for the next block: a recycled one whose chunks have all been dropped
    /// when there is one, else a new allocation. Recycling matters: a new multi-MiB block every
    /// few MiB of input cost page faults worth ~5% of ingest CPU.
    fn empty_block(&mut self) -> Vec<u8> {
        for _ in 0..self.spares.len() {
            let spare = self.spares.pop_front().expect("counted");
            // Succeeds only when no chunk cut from that block is alive any more.
            match spare.try_into_mut() {
                Ok(mut block) => {
                    block.clear();
                    let block = Vec::from(block);
                    if block.capacity() >= self.block_len {
                        return block;
                    }
                }
                Err(spare) => self.spares.push_back(spare),
            }
        }
        Vec::with_capacity(self.block_len)
    }

    /// Unless a whole maximum-size chunk is buffered or the input has ended, moves the uncut
    /// tail into a new block and reads until that block is full or the input ends.
    fn fill(&mut self) -> std::io::Result<()> {
        if self.eof || self.block.len() - self.pos >= self.params.max() as usize {
            return Ok(());
        }
        let mut next = self.empty_block();
        next.extend_from_slice(&self.block[self.pos..]);
        let room = (self.block_len - next.len()) as u64;
        let read = (&mut self.reader).take(room).read_to_end(&mut next)?;
        self.eof = (read as u64) < room;
        let old = std::mem::replace(&mut self.block, Bytes::from(next));
        self.pos = 0;
        if self.spares.len() < MAX_SPARE_BLOCKS {
            self.spares.push_back(old);
        }
        Ok(())
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

    /// A reader that hands out at most 7 bytes per call, to exercise refills.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(self.0.len()).min(7);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
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

    #[test]
    fn short_reads_give_the_same_chunks() {
        let params = ChunkerParams::new(1024).unwrap();
        let data: Vec<u8> = (0..50_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let a: Vec<Bytes> = Chunker::new(&data[..], params)
            .map(Result::unwrap)
            .collect();
        let b: Vec<Bytes> = Chunker::new(Trickle(&data), params)
            .map(Result::unwrap)
            .collect();
        assert_eq!(a, b);
        assert!(a.len() > 10);
    }
}
