//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use rand::{Rng, SeedableRng, rngs::StdRng};
use sloth_cas::{Cas, CasConfig, ChunkStore, ChunkerParams, ManifestId};

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    rng.fill(&mut out[..]);
    out
}

/// Text-like, compressible bytes.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "sloth ",
        "runner ",
        "artifact ",
        "chunk ",
        "stack ",
        "task\n",
        "build ",
        "deploy ",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(words[rng.random_range(0..words.len())].as_bytes());
    }
    out.truncate(len);
    out
}

/// A store config with small chunks so modest inputs have many of them.
pub fn small_chunks() -> CasConfig {
    CasConfig {
        chunker: Some(ChunkerParams::new(4096).expect("valid")),
        cache_capacity: 8 << 20,
        ..CasConfig::default()
    }
}

/// Reads manifest `id` back into memory, fully verified.
pub async fn read_all<S: ChunkStore>(cas: &Cas<S>, id: ManifestId) -> sloth_cas::Result<Vec<u8>> {
    let mut out = Vec::new();
    cas.read_to(id, &mut out).await?;
    Ok(out)
}
