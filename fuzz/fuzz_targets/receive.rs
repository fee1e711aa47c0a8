//! The receiving half of an upload against arbitrary, possibly lying, senders: offers with
//! wrong lengths, frames of other chunks, chunks never asked for, false claims at the end.
//! Whatever the sequence, the store must never panic, and a receive that finishes must hold
//! exactly the offered content under exactly the claimed digests (read back, verified).

#![no_main]

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sloth_cas::{Cas, CasConfig, ChunkId, ChunkRef, ChunkerParams, ContentDigests, frame};

/// The pieces a sender may offer: distinct contents of a few hundred bytes to a few KiB, raw
/// and compressible.
static PIECES: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    (0u8..8)
        .map(|i| {
            let len = 200 + usize::from(i) * 700;
            if i % 2 == 0 {
                (0..len)
                    .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i))
                    .collect()
            } else {
                let mut state = u64::from(i) + 1;
                (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state as u8
                    })
                    .collect()
            }
        })
        .collect()
});

#[derive(Debug, Arbitrary)]
enum Op {
    /// Offer these pieces; a length lie adds to the declared length.
    Offer(Vec<(u8, u8)>),
    /// Send frame of piece `.1` claiming to be piece `.0`.
    Put(Vec<(u8, u8)>),
    /// Finish, claiming the digests of the offered content (honest) or of some piece, and a
    /// length off by the given amount.
    Finish { claim: Option<u8>, len_delta: i8 },
}

fn piece(i: u8) -> &'static [u8] {
    &PIECES[usize::from(i) % PIECES.len()]
}

fn id(i: u8) -> ChunkId {
    ChunkId::digest(piece(i))
}

fuzz_target!(|ops: Vec<Op>| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let config = CasConfig {
            chunker: Some(ChunkerParams::new(1024).expect("valid")),
            cache_capacity: 1 << 20,
            ..CasConfig::default()
        };
        let cas = Cas::temporary(config).expect("store");
        let mut receiver = cas.receive(Vec::new());
        let mut offered: Vec<u8> = Vec::new();
        let mut lied = false;
        for op in ops.into_iter().take(32) {
            match op {
                Op::Offer(list) => {
                    let refs: Vec<ChunkRef> = list
                        .iter()
                        .take(16)
                        .map(|&(p, lie)| ChunkRef {
                            id: id(p),
                            len: piece(p).len() as u32 + u32::from(lie % 4),
                        })
                        .collect();
                    if list.iter().take(16).any(|&(_, lie)| lie % 4 != 0) {
                        lied = true;
                    }
                    if receiver.offer(&refs).await.is_err() {
                        return;
                    }
                    for &(p, _) in list.iter().take(16) {
                        offered.extend_from_slice(piece(p));
                    }
                }
                Op::Put(list) => {
                    let frames = list
                        .iter()
                        .take(16)
                        .map(|&(claimed, actual)| {
                            let chunk = bytes::Bytes::from_static(piece(actual));
                            (id(claimed), frame::encode(&chunk, 3))
                        })
                        .collect();
                    if receiver.put(frames).await.is_err() {
                        return;
                    }
                }
                Op::Finish { claim, len_delta } => {
                    let digests = match claim {
                        None => ContentDigests::of(&offered),
                        Some(p) => ContentDigests::of(piece(p)),
                    };
                    let length = (offered.len() as i64 + i64::from(len_delta)).max(0) as u64;
                    let Ok(received) = receiver.finish(length, Some(digests.into()), None).await
                    else {
                        return;
                    };
                    assert!(!lied, "a receive with a length lie finished");
                    assert_eq!(length, offered.len() as u64, "a length lie was accepted");
                    assert_eq!(
                        digests,
                        ContentDigests::of(&offered),
                        "a false claim was accepted"
                    );
                    if received.written {
                        assert_eq!(received.out, offered, "the assembled copy differs");
                    }
                    let id = cas.commit(received.staged).await.expect("commit");
                    let mut back = Vec::new();
                    cas.read_to(id, &mut back).await.expect("read back");
                    assert_eq!(back, offered, "the stored content differs");
                    return;
                }
            }
        }
    });
});
