//! Chunk frames: how one chunk is stored.
//!
//! ```text
//! byte 0     format version (1)
//! byte 1     codec: 0 = raw, 1 = zstd
//! byte 2     zstd level used (i8; 0 for raw), so a later pass knows what to recompress
//! byte 3     reserved, 0
//! bytes 4-7  uncompressed length, u32 little-endian (at most MAX_CHUNK_LEN)
//! bytes 8..  payload
//! ```
//!
//! Decoding trusts nothing: the declared length is bounded before anything is allocated, zstd
//! may not produce a byte more than declared, and the result must hash to the chunk's id.

use std::cell::RefCell;

use bytes::Bytes;

use crate::chunker::MAX_CHUNK_LEN;
use crate::{ChunkId, Error, Result};

/// Current frame format version.
pub const FRAME_VERSION: u8 = 1;
/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 8;

/// How a frame's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Stored as is: zstd did not make it smaller.
    Raw,
    /// A single zstd frame.
    Zstd,
}

/// The parsed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload encoding.
    pub codec: Codec,
    /// zstd level the payload was compressed with (0 for raw).
    pub level: i8,
    /// Length of the chunk once decoded.
    pub len: u32,
}

impl FrameHeader {
    /// Parses and bounds-checks the header at the start of `frame`.
    pub fn parse(frame: &[u8]) -> std::result::Result<Self, String> {
        let Some(head) = frame.get(..HEADER_LEN) else {
            return Err(format!(
                "frame of {} bytes is shorter than its header",
                frame.len()
            ));
        };
        if head[0] != FRAME_VERSION {
            return Err(format!("unknown frame version {}", head[0]));
        }
        let codec = match head[1] {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            other => return Err(format!("unknown codec {other}")),
        };
        if head[3] != 0 {
            return Err("reserved header byte is not zero".into());
        }
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_CHUNK_LEN {
            return Err(format!(
                "declared length {len} exceeds the maximum chunk size {MAX_CHUNK_LEN}"
            ));
        }
        Ok(Self {
            codec,
            level: head[2] as i8,
            len,
        })
    }
}

/// A frame as the chunk store takes it: its header and its payload, which need not share a
/// buffer.
///
/// A raw frame's payload is the chunk itself, shared rather than copied. Joining the two into
/// one buffer would copy every incompressible chunk once more on its way into a pack or onto
/// the wire (1 GiB of a random file's upload), where the pack writes a record's header and its
/// payload with separate writes anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    header: [u8; HEADER_LEN],
    payload: Bytes,
}

impl Frame {
    /// A frame held in one buffer (as a store reads it, or as a peer sends it), split without
    /// a copy. Fails only when it is shorter than a header: nothing else is checked until it
    /// is decoded.
    pub fn from_bytes(frame: Bytes) -> std::result::Result<Self, String> {
        let header = frame
            .get(..HEADER_LEN)
            .and_then(|h| <[u8; HEADER_LEN]>::try_from(h).ok())
            .ok_or_else(|| format!("frame of {} bytes is shorter than its header", frame.len()))?;
        Ok(Self {
            header,
            payload: frame.slice(HEADER_LEN..),
        })
    }

    /// A frame whose header and payload came apart (see `Frame` in `artifacts.proto`). Fails
    /// when `header` is not exactly a header's length.
    pub fn from_parts(header: &[u8], payload: Bytes) -> std::result::Result<Self, String> {
        let header = <[u8; HEADER_LEN]>::try_from(header).map_err(|_| {
            format!(
                "a frame header of {} bytes (a header has {HEADER_LEN})",
                header.len()
            )
        })?;
        Ok(Self { header, payload })
    }

    /// The header's bytes, unparsed.
    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    /// The payload: zstd's output or, for a raw frame, the chunk.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Bytes the frame occupies stored: header and payload.
    pub fn stored_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// The frame in one buffer, as a store returns it (a copy).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.stored_len());
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&self.payload);
        Bytes::from(out)
    }

    /// The chunk, checked against `id`; a raw frame's is its payload, without a copy. Never
    /// allocates more than the declared length.
    pub fn decode(&self, id: &ChunkId) -> Result<Bytes> {
        let corrupt = |reason| Error::CorruptChunk { id: *id, reason };
        let header = FrameHeader::parse(&self.header).map_err(corrupt)?;
        let data = match header.codec {
            Codec::Raw => {
                check_raw(&header, &self.payload).map_err(corrupt)?;
                self.payload.clone()
            }
            Codec::Zstd => Bytes::from(decompress(&header, &self.payload).map_err(corrupt)?),
        };
        if ChunkId::digest(&data) != *id {
            return Err(corrupt("content does not hash to the chunk id".into()));
        }
        Ok(data)
    }
}

/// A thread's zstd context (for one level) and the buffer it compresses into.
struct Encoder {
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
    scratch: Vec<u8>,
}

thread_local! {
    /// zstd contexts are costly to create (hundreds of KiB of tables): one per thread and level.
    static COMPRESSOR: RefCell<Encoder> = const { RefCell::new(Encoder { zstd: None, scratch: Vec::new() }) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Encodes `chunk` as a frame: zstd at `level`, or raw when zstd does not shrink it or the
/// chunk [looks incompressible](looks_incompressible) (then zstd is not tried). A raw frame
/// shares `chunk`.
///
/// # Panics
/// If `chunk` is longer than [`MAX_CHUNK_LEN`]; the chunker never produces such chunks.
pub fn encode(chunk: &Bytes, level: i32) -> Frame {
    let len = frame_len(chunk);
    if looks_incompressible(chunk) {
        return encode_raw(chunk);
    }
    COMPRESSOR.with(|cell| {
        let Encoder {
            zstd: slot,
            scratch,
        } = &mut *cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        // Compress into a buffer reused across calls: a fresh chunk-sized allocation per call
        // cost page faults worth ~8% of ingest CPU. Only a form that saves something is kept.
        scratch.clear();
        scratch.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
        let compressed = !chunk.is_empty()
            && slot
                .as_mut()
                .is_some_and(|(_, c)| c.compress_to_buffer(&chunk[..], scratch).is_ok())
            && scratch.len() < chunk.len();
        if !compressed {
            return encode_raw(chunk);
        }
        let level_byte = level.clamp(i8::MIN as i32, i8::MAX as i32) as i8;
        Frame {
            header: header(Codec::Zstd, level_byte, len),
            payload: Bytes::copy_from_slice(scratch),
        }
    })
}

/// A frame header's bytes.
fn header(codec: Codec, level: i8, len: u32) -> [u8; HEADER_LEN] {
    let codec = match codec {
        Codec::Raw => 0,
        Codec::Zstd => 1,
    };
    let [a, b, c, d] = len.to_le_bytes();
    [FRAME_VERSION, codec, level as u8, 0, a, b, c, d]
}

/// Bits per byte above which a chunk is stored raw without trying zstd: its entropy coder
/// could save under 0.6% of such a chunk.
const INCOMPRESSIBLE_BITS: f64 = 7.95;
/// Chunks shorter than this are always tried: the sample would be too small to judge, and
/// zstd is cheap on them.
const MIN_JUDGED_LEN: usize = 32 << 10;
/// The sample: the first 16 bytes of every `SAMPLE_STRIDE`.
const SAMPLE_STRIDE: usize = 1024;

/// Whether `chunk` is already compressed or random data (an archive, an image, encrypted
/// data), judged from a sample as ZFS's and btrfs's compression heuristics do: the Shannon
/// entropy of the bytes at 16 of every 1024 positions, with the Miller–Madow correction for
/// the sample's size, is near 8 bits per byte. zstd would spend up to a sixth of an upload's
/// CPU finding that out, and copying the chunk twice. The sample misses repeats farther apart
/// than a few bytes inside high-entropy data (two copies of one compressed file within a
/// chunk); such a chunk is stored raw, and chunking still deduplicates repeats larger than a
/// chunk.
pub fn looks_incompressible(chunk: &[u8]) -> bool {
    if chunk.len() < MIN_JUDGED_LEN {
        return false;
    }
    let mut counts = [0u32; 256];
    let mut sampled = 0u32;
    for window in chunk.chunks_exact(SAMPLE_STRIDE) {
        for &byte in &window[..16] {
            counts[usize::from(byte)] += 1;
        }
        sampled += 16;
    }
    let n = f64::from(sampled);
    let (mut entropy, mut seen) = (0.0, 0u32);
    for &count in counts.iter().filter(|&&c| c > 0) {
        let p = f64::from(count) / n;
        entropy -= p * p.log2();
        seen += 1;
    }
    let correction = f64::from(seen - 1) / (2.0 * n * std::f64::consts::LN_2);
    entropy + correction > INCOMPRESSIBLE_BITS
}

/// The length field of a frame for `chunk`, which must not exceed [`MAX_CHUNK_LEN`].
fn frame_len(chunk: &[u8]) -> u32 {
    u32::try_from(chunk.len())
        .ok()
        .filter(|&l| l <= MAX_CHUNK_LEN)
        .expect("chunk longer than MAX_CHUNK_LEN")
}

/// Encodes `chunk` as a raw (uncompressed) frame, sharing it.
pub fn encode_raw(chunk: &Bytes) -> Frame {
    Frame {
        header: header(Codec::Raw, 0, frame_len(chunk)),
        payload: chunk.clone(),
    }
}

/// Checks a raw payload's length against its header.
fn check_raw(header: &FrameHeader, payload: &[u8]) -> std::result::Result<(), String> {
    if payload.len() != header.len as usize {
        return Err(format!(
            "raw payload is {} bytes, header says {}",
            payload.len(),
            header.len
        ));
    }
    Ok(())
}

/// Decompresses a zstd payload into at most the header's declared length.
fn decompress(header: &FrameHeader, payload: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let len = header.len as usize;
    let mut out = Vec::with_capacity(len);
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        let d = slot.as_mut().ok_or("no zstd context")?;
        d.decompress_to_buffer(payload, &mut out)
            .map_err(|e| format!("zstd: {e}"))
    })?;
    if out.len() != len {
        return Err(format!("decoded {} bytes, header says {len}", out.len()));
    }
    Ok(out)
}

/// Decodes a frame held in one buffer without checking it against an id. Never allocates
/// more than the declared length (itself at most [`MAX_CHUNK_LEN`]).
pub fn decode_unverified(frame: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let header = FrameHeader::parse(frame)?;
    let payload = &frame[HEADER_LEN..];
    match header.codec {
        Codec::Raw => {
            check_raw(&header, payload)?;
            Ok(payload.to_vec())
        }
        Codec::Zstd => decompress(&header, payload),
    }
}

/// Decodes a frame held in one buffer and checks that its content hashes to `id`.
pub fn decode(id: &ChunkId, frame: &[u8]) -> Result<Bytes> {
    let data =
        decode_unverified(frame).map_err(|reason| Error::CorruptChunk { id: *id, reason })?;
    if ChunkId::digest(&data) != *id {
        return Err(Error::CorruptChunk {
            id: *id,
            reason: "content does not hash to the chunk id".into(),
        });
    }
    Ok(Bytes::from(data))
}

/// [`decode`] for a frame held in [`Bytes`]: a raw frame's content is returned as a slice of
/// it, without a copy (raw frames are the incompressible ones, often most of a binary).
pub fn decode_shared(id: &ChunkId, frame: &Bytes) -> Result<Bytes> {
    Frame::from_bytes(frame.clone())
        .map_err(|reason| Error::CorruptChunk { id: *id, reason })?
        .decode(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`encode`] of bytes held anywhere, joined into one buffer as a store returns it.
    fn encoded(chunk: &[u8], level: i32) -> Bytes {
        encode(&Bytes::copy_from_slice(chunk), level).to_bytes()
    }

    #[test]
    fn a_raw_frame_shares_its_chunk_and_reads_back_in_parts_or_whole() {
        let random: Bytes = (0..200_000u32)
            .map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[0])
            .collect::<Vec<u8>>()
            .into();
        let text = Bytes::from(b"sloth ".repeat(10_000));
        for (chunk, codec) in [(&random, Codec::Raw), (&text, Codec::Zstd)] {
            let id = ChunkId::digest(chunk);
            let frame = encode(chunk, 3);
            assert_eq!(FrameHeader::parse(frame.header()).unwrap().codec, codec);
            if codec == Codec::Raw {
                assert_eq!(
                    frame.payload().as_ptr(),
                    chunk.as_ptr(),
                    "shared, not copied"
                );
            }
            let whole = frame.to_bytes();
            assert_eq!(whole.len(), frame.stored_len());
            assert_eq!(Frame::from_bytes(whole.clone()).unwrap(), frame);
            let parts = Frame::from_parts(frame.header(), frame.payload().clone()).unwrap();
            for read in [
                parts.decode(&id).unwrap(),
                decode(&id, &whole).unwrap(),
                decode_shared(&id, &whole).unwrap(),
            ] {
                assert_eq!(read, chunk);
            }
            // One flipped bit anywhere, in the header or the payload, is refused.
            let mut header = *frame.header();
            header[4] ^= 1;
            let bad = Frame::from_parts(&header, frame.payload().clone()).unwrap();
            assert!(bad.decode(&id).is_err());
            let mut payload = frame.payload().to_vec();
            payload[frame.payload().len() / 2] ^= 1;
            let bad = Frame::from_parts(frame.header(), payload.into()).unwrap();
            assert!(bad.decode(&id).is_err());
        }
        assert!(Frame::from_bytes(Bytes::from_static(b"\x01\x00\x00")).is_err());
        let err = Frame::from_parts(b"\x01\x00", Bytes::new()).unwrap_err();
        assert!(err.contains("header"), "{err}");
    }

    #[test]
    fn shared_decoding_matches_copying_decoding() {
        for data in [
            b"sloth ".repeat(10_000),
            (0..50_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ] {
            let id = ChunkId::digest(&data);
            let frame = encoded(&data, 3);
            assert_eq!(
                decode_shared(&id, &frame).unwrap(),
                decode(&id, &frame).unwrap()
            );
            let mut bad = frame.to_vec();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(decode_shared(&id, &Bytes::from(bad)).is_err());
        }
    }

    #[test]
    fn compressible_round_trip() {
        let data = b"sloth ".repeat(10_000);
        let frame = encoded(&data, 3);
        let header = FrameHeader::parse(&frame).unwrap();
        assert_eq!(header.codec, Codec::Zstd);
        assert_eq!(header.level, 3);
        assert!(frame.len() < data.len() / 10);
        assert_eq!(decode(&ChunkId::digest(&data), &frame).unwrap(), &data[..]);
    }

    #[test]
    fn incompressible_is_raw() {
        let data: Vec<u8> = (0..4096u32)
            .map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[0])
            .collect();
        let frame = encoded(&data, 3);
        assert_eq!(FrameHeader::parse(&frame).unwrap().codec, Codec::Raw);
        assert_eq!(frame.len(), HEADER_LEN + data.len());
        assert_eq!(decode(&ChunkId::digest(&data), &frame).unwrap(), &data[..]);
    }

    /// A reproducible stream of uniformly random bytes.
    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 32);
        let mut block = 0u64;
        while out.len() < len {
            let mut hasher = blake3::Hasher::new();
            hasher
                .update(&seed.to_le_bytes())
                .update(&block.to_le_bytes());
            out.extend_from_slice(hasher.finalize().as_bytes());
            block += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn only_high_entropy_chunks_skip_zstd() {
        let random = random_bytes(256 << 10, 1);
        assert!(looks_incompressible(&random));
        // The smallest chunk the default chunker cuts (but the last).
        assert!(looks_incompressible(&random[..64 << 10]));
        // Too short to judge: zstd decides.
        assert!(!looks_incompressible(&random[..MIN_JUDGED_LEN - 1]));
        let text = b"fn main() { println!(\"sloth\"); }\n".repeat(8 << 10);
        assert!(!looks_incompressible(&text));
        // Random bytes drawn from 128 values: 7 bits each, and zstd saves an eighth.
        let narrow: Vec<u8> = random.iter().map(|b| b & 0x7f).collect();
        assert!(!looks_incompressible(&narrow));
        assert!(encoded(&narrow, 3).len() < narrow.len() * 15 / 16);
        // Half random, half text: the text half is worth compressing.
        let mut mixed = random[..128 << 10].to_vec();
        mixed.extend_from_slice(&text[..128 << 10]);
        assert!(!looks_incompressible(&mixed));
        assert_eq!(
            FrameHeader::parse(&encoded(&mixed, 3)).unwrap().codec,
            Codec::Zstd
        );
        // Whatever is judged, the frame reads back exact.
        for data in [&random, &text, &narrow, &mixed] {
            let frame = encoded(data, 3);
            assert_eq!(
                &decode(&ChunkId::digest(data), &frame).unwrap()[..],
                &data[..]
            );
        }
    }

    #[test]
    fn raw_frames_round_trip_uncompressed() {
        let data = vec![7u8; 100_000];
        let frame = encode_raw(&Bytes::from(data.clone())).to_bytes();
        assert_eq!(frame.len(), HEADER_LEN + data.len());
        assert_eq!(FrameHeader::parse(&frame).unwrap().codec, Codec::Raw);
        assert_eq!(decode(&ChunkId::digest(&data), &frame).unwrap(), &data[..]);
        // The same chunk through encode is compressed: raw is a choice, not a fallback here.
        assert!(encoded(&data, 3).len() < 1000);
    }

    #[test]
    fn empty_chunk_round_trips() {
        let frame = encoded(b"", 3);
        assert_eq!(decode(&ChunkId::digest(b""), &frame).unwrap(), &b""[..]);
    }

    #[test]
    fn wrong_id_is_corrupt() {
        let frame = encoded(b"abc", 3);
        let err = decode(&ChunkId::digest(b"abd"), &frame).unwrap_err();
        assert!(matches!(err, Error::CorruptChunk { .. }), "{err}");
    }

    #[test]
    fn declared_length_bounds_decompression() {
        let data = vec![0u8; 1 << 20];
        let mut frame = encoded(&data, 3).to_vec();
        // Claim the chunk is smaller than the zstd frame really expands to.
        frame[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(decode_unverified(&frame).is_err());
        // And a length past the limit is refused before any allocation.
        frame[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode_unverified(&frame).unwrap_err();
        assert!(err.contains("exceeds"), "{err}");
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [
            &b""[..],
            b"\x01\x01\x03\x00",
            b"\x02\x00\x00\x00\x00\x00\x00\x00",
            b"\x01\x07\x00\x00\x00\x00\x00\x00",
        ] {
            assert!(decode_unverified(bad).is_err(), "{bad:?}");
        }
    }
}
