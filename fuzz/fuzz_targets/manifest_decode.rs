//! Arbitrary bytes as an encoded manifest: decoding must never panic, and the encoding is
//! canonical, so whatever decodes encodes back to exactly the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sloth_cas::{MAX_CHUNK_LEN, Manifest, ManifestId};

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = Manifest::decode(data) else {
        return;
    };

    assert_eq!(
        manifest.encode(),
        data,
        "decode accepted a non-canonical encoding"
    );
    assert_eq!(manifest.id(), ManifestId::digest(data));

    let sum: u64 = manifest.chunks().iter().map(|c| u64::from(c.len)).sum();
    assert_eq!(
        manifest.len(),
        sum,
        "total length differs from the sum of chunk lengths"
    );
    assert_eq!(manifest.is_empty(), sum == 0);
    for chunk in manifest.chunks() {
        assert!(
            (1..=MAX_CHUNK_LEN).contains(&chunk.len),
            "chunk of length {}",
            chunk.len
        );
    }

    // Rebuilding from the parts gives the same manifest.
    let rebuilt = Manifest::new(manifest.chunks().to_vec(), *manifest.digests());
    assert_eq!(rebuilt, manifest);
});
