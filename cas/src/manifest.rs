//! Manifests: what a piece of content is made of.
//!
//! Encoding, version 1 (all integers little-endian):
//!
//! ```text
//! "SLMF"  version=1 u8  reserved [0;3]
//! total length u64   BLAKE3 [32]   SHA-256 [32]   chunk count u32
//! count × (chunk id [32], chunk length u32)
//! ```
//!
//! The version byte lets later formats add fields (signatures, encryption) without
//! reinterpreting old manifests. A [`ManifestId`] is the BLAKE3 of this encoding.

use crate::chunker::MAX_CHUNK_LEN;
use crate::{ChunkId, Error, ManifestId, Result};

const MAGIC: &[u8; 4] = b"SLMF";
const VERSION: u8 = 1;
const FIXED_LEN: usize = 4 + 4 + 8 + 32 + 32 + 4;
const ENTRY_LEN: usize = 32 + 4;

/// One chunk of a manifest, in content order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// The chunk's id.
    pub id: ChunkId,
    /// Its uncompressed length in bytes.
    pub len: u32,
}

/// Digests of a whole piece of content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentDigests {
    /// BLAKE3 of the content.
    pub blake3: [u8; 32],
    /// SHA-256 of the content; users see it as `sha256:<hex>`.
    pub sha256: [u8; 32],
}

impl ContentDigests {
    /// Digests of an in-memory buffer.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Self {
            blake3: *blake3::hash(data).as_bytes(),
            sha256: sha2::Sha256::digest(data).into(),
        }
    }

    /// The SHA-256 as lowercase hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// What the sender of content chunked elsewhere claims about it (see
/// [`Receiver::finish`](crate::Receiver::finish)): its SHA-256, checked end to end, and
/// optionally its BLAKE3. The store computes the BLAKE3 its manifest records itself, and every
/// chunk was checked against its BLAKE3 id, so a sender need not hash the content twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
    /// BLAKE3 of the content, when the sender has it at hand; checked when given.
    pub blake3: Option<[u8; 32]>,
}

impl From<ContentDigests> for Claim {
    fn from(d: ContentDigests) -> Self {
        Self {
            sha256: d.sha256,
            blake3: Some(d.blake3),
        }
    }
}

impl Claim {
    /// Whether `digests` are what this claims.
    pub fn matches(&self, digests: &ContentDigests) -> bool {
        self.sha256 == digests.sha256 && self.blake3.is_none_or(|b| b == digests.blake3)
    }
}

/// Computes [`ContentDigests`] over data fed in pieces: a [`ContentCheck`] plus BLAKE3.
#[derive(Debug, Clone, Default)]
pub struct ContentHasher {
    blake3: blake3::Hasher,
    check: ContentCheck,
}

impl ContentHasher {
    /// Feeds the next piece of content.
    pub fn update(&mut self, data: &[u8]) {
        self.blake3.update(data);
        self.check.update(data);
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.check.len()
    }

    /// Whether nothing has been fed.
    pub fn is_empty(&self) -> bool {
        self.check.is_empty()
    }

    /// The digests of everything fed.
    pub fn finish(self) -> ContentDigests {
        ContentDigests {
            blake3: *self.blake3.finalize().as_bytes(),
            sha256: self.check.sha256(),
        }
    }
}

/// Length and SHA-256 of content as a verified read hands it out: the whole-content check
/// of every read ([`Cas::read_to`](crate::Cas::read_to), downloads).
///
/// Such a read has checked each chunk against its BLAKE3 id already, so the content is exactly
/// the manifest's chunks in order; a whole-content BLAKE3 would hash verified bytes a second
/// time (a quarter of a CPU-second per GiB). The SHA-256 is the checksum users see and compare,
/// and it is checked end to end.
#[derive(Debug, Clone, Default)]
pub struct ContentCheck {
    sha256: sha2::Sha256,
    len: u64,
}

impl ContentCheck {
    /// Feeds the next piece of content.
    pub fn update(&mut self, data: &[u8]) {
        use sha2::Digest as _;
        self.sha256.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing has been fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The SHA-256 of everything fed.
    pub fn sha256(self) -> [u8; 32] {
        use sha2::Digest as _;
        self.sha256.finalize().into()
    }
}

/// The ordered list of chunks that make up a piece of content, with its digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    chunks: Vec<ChunkRef>,
    len: u64,
    digests: ContentDigests,
}

impl Manifest {
    /// Builds a manifest; the total length is the sum of the chunk lengths.
    pub fn new(chunks: Vec<ChunkRef>, digests: ContentDigests) -> Self {
        let len = chunks.iter().map(|c| u64::from(c.len)).sum();
        Self {
            chunks,
            len,
            digests,
        }
    }

    /// The chunks in content order.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// Total content length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the content is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whole-content digests.
    pub fn digests(&self) -> &ContentDigests {
        &self.digests
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + self.chunks.len() * ENTRY_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[VERSION, 0, 0, 0]);
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.digests.blake3);
        out.extend_from_slice(&self.digests.sha256);
        let count = u32::try_from(self.chunks.len()).expect("more than 2^32 chunks");
        out.extend_from_slice(&count.to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(c.id.as_bytes());
            out.extend_from_slice(&c.len.to_le_bytes());
        }
        out
    }

    /// The manifest's id: BLAKE3 of its encoding.
    pub fn id(&self) -> ManifestId {
        ManifestId::digest(&self.encode())
    }

    /// Parses an encoding, checking every length and count against the bytes present.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |why: String| Error::MalformedManifest(why);
        if bytes.len() < FIXED_LEN {
            return Err(bad(format!(
                "{} bytes is shorter than the fixed header",
                bytes.len()
            )));
        }
        if &bytes[..4] != MAGIC {
            return Err(bad("bad magic".into()));
        }
        if bytes[4] != VERSION {
            return Err(bad(format!("unknown manifest version {}", bytes[4])));
        }
        if bytes[5..8] != [0, 0, 0] {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let digests = ContentDigests {
            blake3: bytes[16..48].try_into().expect("32 bytes"),
            sha256: bytes[48..80].try_into().expect("32 bytes"),
        };
        let count = u32_at(80) as usize;
        let body = &bytes[FIXED_LEN..];
        if body.len() / ENTRY_LEN != count || !body.len().is_multiple_of(ENTRY_LEN) {
            return Err(bad(format!(
                "{count} chunks declared but {} bytes of entries",
                body.len()
            )));
        }
        let mut chunks = Vec::with_capacity(count);
        let mut sum = 0u64;
        for entry in body.chunks_exact(ENTRY_LEN) {
            let id = ChunkId::from_slice(&entry[..32]).expect("32 bytes");
            let clen = u32::from_le_bytes(entry[32..36].try_into().expect("4 bytes"));
            if clen == 0 || clen > MAX_CHUNK_LEN {
                return Err(bad(format!("chunk {id} has invalid length {clen}")));
            }
            sum += u64::from(clen);
            chunks.push(ChunkRef { id, len: clen });
        }
        if sum != len {
            return Err(bad(format!(
                "chunk lengths add up to {sum}, total says {len}"
            )));
        }
        Ok(Self {
            chunks,
            len,
            digests,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let a = b"hello ";
        let b = b"world";
        Manifest::new(
            vec![
                ChunkRef {
                    id: ChunkId::digest(a),
                    len: 6,
                },
                ChunkRef {
                    id: ChunkId::digest(b),
                    len: 5,
                },
            ],
            ContentDigests::of(b"hello world"),
        )
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let enc = m.encode();
        assert_eq!(Manifest::decode(&enc).unwrap(), m);
        assert_eq!(m.id(), ManifestId::digest(&enc));
        assert_eq!(m.len(), 11);
    }

    #[test]
    fn empty_round_trip() {
        let m = Manifest::new(vec![], ContentDigests::of(b""));
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn rejects_inconsistent_input() {
        let enc = sample().encode();
        assert!(
            Manifest::decode(&enc[..enc.len() - 1]).is_err(),
            "truncated"
        );
        let mut wrong_total = enc.clone();
        wrong_total[8] ^= 1;
        assert!(Manifest::decode(&wrong_total).is_err(), "total mismatch");
        let mut huge_count = enc.clone();
        huge_count[80..84].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Manifest::decode(&huge_count).is_err(), "count mismatch");
        let mut zero_len = enc;
        zero_len[FIXED_LEN + 32..FIXED_LEN + 36].copy_from_slice(&0u32.to_le_bytes());
        assert!(Manifest::decode(&zero_len).is_err(), "empty chunk");
    }
}
