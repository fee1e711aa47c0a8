//! Receiving content chunked elsewhere: only missing chunks travel, lies are rejected, an
//! abandoned receive resumes for free.

mod common;

use bytes::Bytes;
use common::{random_bytes, read_all, small_chunks, text_bytes};
use sloth_cas::frame::{self, Frame};
use sloth_cas::{Cas, ChunkId, ChunkRef, Claim, ContentDigests, Error, Manifest};

/// What a sender computes: the chunk list and each chunk's frame.
fn cut(cas: &Cas, data: &[u8]) -> (Vec<ChunkRef>, Vec<Frame>) {
    let mut refs = Vec::new();
    let mut frames = Vec::new();
    let mut at = 0;
    for len in cas.params().chunk_lengths(data) {
        let chunk = &data[at..at + len];
        at += len;
        refs.push(ChunkRef {
            id: ChunkId::digest(chunk),
            len: len as u32,
        });
        frames.push(frame::encode(&Bytes::copy_from_slice(chunk), 3));
    }
    (refs, frames)
}

/// Offers `data` in batches of 7 and sends what is asked for; returns the frames sent.
async fn send(cas: &Cas, data: &[u8]) -> sloth_cas::Result<(sloth_cas::ManifestId, usize)> {
    let (refs, frames) = cut(cas, data);
    let mut receiver = cas.receive(Vec::new());
    let mut sent = 0;
    for (batch, batch_frames) in refs.chunks(7).zip(frames.chunks(7)) {
        let missing = receiver.offer(batch).await?;
        let wanted: Vec<_> = missing
            .iter()
            .map(|&i| (batch[i as usize].id, batch_frames[i as usize].clone()))
            .collect();
        sent += wanted.len();
        receiver.put(wanted).await?;
    }
    let received = receiver
        .finish(
            data.len() as u64,
            Some(ContentDigests::of(data).into()),
            None,
        )
        .await?;
    if received.written {
        assert_eq!(received.out, data, "the assembled copy is the content");
    } else {
        assert!(received.out.is_empty());
        assert_eq!(sent, 0, "skipped only when nothing was missing");
    }
    Ok((cas.commit(received.staged).await?, sent))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn received_content_reads_back_and_dedups() {
    runtime().block_on(async {
        let cas = Cas::temporary(small_chunks()).unwrap();
        let data = text_bytes(1, 300_000);
        let (id, sent) = send(&cas, &data).await.unwrap();
        assert_eq!(read_all(&cas, id).await.unwrap(), data);
        let chunks = cas.manifest(id).await.unwrap().chunks().len();
        assert!(sent > 0 && sent <= chunks);
        // The same content again: nothing travels, and the store, holding this very manifest,
        // neither reads nor hashes it again.
        let (again, sent) = send(&cas, &data).await.unwrap();
        assert_eq!((again, sent), (id, 0));
        let (refs, _) = cut(&cas, &data);
        let mut receiver = cas.receive(Vec::new());
        assert!(receiver.offer(&refs).await.unwrap().is_empty());
        let received = receiver
            .finish(
                data.len() as u64,
                Some(ContentDigests::of(&data).into()),
                None,
            )
            .await
            .unwrap();
        assert!(!received.written);
        // Stored chunks under a false claim: no such manifest, so it is checked, and refused.
        let mut receiver = cas.receive(Vec::new());
        receiver.offer(&refs).await.unwrap();
        let lie = receiver
            .finish(
                data.len() as u64,
                Some(ContentDigests::of(b"something else").into()),
                None,
            )
            .await
            .unwrap_err();
        assert!(matches!(lie, Error::DigestMismatch { .. }), "{lie}");
        // Empty content.
        let (empty, sent) = send(&cas, b"").await.unwrap();
        assert_eq!(
            (read_all(&cas, empty).await.unwrap(), sent),
            (Vec::new(), 0)
        );
    });
}

/// Offers all of `data` and sends what is asked for, then finishes with `claim` and `like`;
/// returns the committed manifest and whether the content was read back and hashed.
async fn send_claiming(
    cas: &Cas,
    data: &[u8],
    claim: Option<Claim>,
    like: Option<&Manifest>,
) -> sloth_cas::Result<(Manifest, bool)> {
    let (refs, frames) = cut(cas, data);
    let mut receiver = cas.receive(Vec::new());
    let missing = receiver.offer(&refs).await?;
    let wanted = missing
        .iter()
        .map(|&i| (refs[i as usize].id, frames[i as usize].clone()))
        .collect();
    receiver.put(wanted).await?;
    let received = receiver.finish(data.len() as u64, claim, like).await?;
    let written = received.written;
    let id = cas.commit(received.staged).await?;
    Ok((cas.manifest(id).await?, written))
}

#[test]
fn a_claim_of_the_sha256_alone_is_checked_and_enough() {
    runtime().block_on(async {
        let cas = Cas::temporary(small_chunks()).unwrap();
        let data = random_bytes(7, 400_000);
        let truth = ContentDigests::of(&data);
        let sha256_only = |sha256| Claim {
            sha256,
            blake3: None,
        };
        // A lie in either digest is refused, and names the digest.
        let wrong = ContentDigests::of(b"other content");
        for (claim, algorithm) in [
            (sha256_only(wrong.sha256), "sha256"),
            (
                Claim {
                    sha256: truth.sha256,
                    blake3: Some(wrong.blake3),
                },
                "blake3",
            ),
        ] {
            let err = send_claiming(&cas, &data, Some(claim), None)
                .await
                .unwrap_err();
            assert!(
                matches!(err, Error::DigestMismatch { algorithm: a, .. } if a == algorithm),
                "{err}"
            );
        }
        // The SHA-256 alone commits the content; the store hashes the BLAKE3 itself.
        let (stored, written) = send_claiming(&cas, &data, Some(sha256_only(truth.sha256)), None)
            .await
            .unwrap();
        assert!(written);
        assert_eq!(*stored.digests(), truth);
        // Held whole: with a like manifest of the same chunks, nothing is read back; without
        // one, the content is read back and hashed, and the result is the same manifest.
        let again = send_claiming(&cas, &data, Some(sha256_only(truth.sha256)), Some(&stored))
            .await
            .unwrap();
        assert_eq!(again, (stored.clone(), false));
        let again = send_claiming(&cas, &data, Some(sha256_only(truth.sha256)), None)
            .await
            .unwrap();
        assert_eq!(again, (stored.clone(), true));
        // A like manifest whose SHA-256 differs from the claim lends nothing.
        let err = send_claiming(&cas, &data, Some(sha256_only(wrong.sha256)), Some(&stored))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    });
}

#[test]
fn only_content_held_whole_may_be_committed_without_digests() {
    runtime().block_on(async {
        let cas = Cas::temporary(small_chunks()).unwrap();
        let data = text_bytes(3, 300_000);
        let (id, _) = send(&cas, &data).await.unwrap();
        let stored = cas.manifest(id).await.unwrap();
        let (refs, _) = cut(&cas, &data);
        let len = data.len() as u64;
        let unclaimed = |like: Option<sloth_cas::Manifest>| {
            let (cas, refs) = (cas.clone(), refs.clone());
            async move {
                let mut receiver = cas.receive(Vec::new());
                assert!(receiver.offer(&refs).await.unwrap().is_empty());
                receiver.finish(len, None, like.as_ref()).await
            }
        };
        // A version with the same chunk list lends its digests: nothing is read or hashed.
        let received = unclaimed(Some(stored.clone())).await.unwrap();
        assert!(!received.written);
        assert_eq!(cas.commit(received.staged).await.unwrap(), id);
        // Without one (identical content under another name), the store hashes its chunks.
        let other = cas
            .manifest(send(&cas, b"another content entirely").await.unwrap().0)
            .await
            .unwrap();
        for like in [None, Some(other)] {
            let received = unclaimed(like).await.unwrap();
            assert!(received.written);
            assert_eq!(received.out, data);
            assert_eq!(cas.commit(received.staged).await.unwrap(), id);
        }
        // A chunk had to be sent: digests must be claimed, and nothing is committed.
        let mut changed = data.clone();
        changed[1000] ^= 1;
        let (changed_refs, changed_frames) = cut(&cas, &changed);
        let mut receiver = cas.receive(Vec::new());
        let missing = receiver.offer(&changed_refs).await.unwrap();
        assert!(!missing.is_empty());
        let wanted = missing
            .iter()
            .map(|&i| {
                (
                    changed_refs[i as usize].id,
                    changed_frames[i as usize].clone(),
                )
            })
            .collect();
        receiver.put(wanted).await.unwrap();
        let refused = receiver
            .finish(changed.len() as u64, None, Some(&stored))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("claims no digests"),
            "{refused}"
        );
    });
}

#[test]
fn an_abandoned_receive_resumes_with_only_the_rest() {
    runtime().block_on(async {
        let cas = Cas::temporary(small_chunks()).unwrap();
        let data = random_bytes(2, 200_000);
        let (refs, frames) = cut(&cas, &data);
        let half = refs.len() / 2;
        {
            let mut receiver = cas.receive(Vec::new());
            let missing = receiver.offer(&refs[..half]).await.unwrap();
            assert_eq!(missing.len(), half);
            let wanted = missing
                .iter()
                .map(|&i| (refs[i as usize].id, frames[i as usize].clone()))
                .collect();
            receiver.put(wanted).await.unwrap();
            // Dropped: the connection broke.
        }
        let (id, sent) = send(&cas, &data).await.unwrap();
        assert_eq!(sent, refs.len() - half);
        assert_eq!(read_all(&cas, id).await.unwrap(), data);
    });
}

#[test]
fn lies_are_rejected_and_leave_nothing_visible() {
    runtime().block_on(async {
        let cas = Cas::temporary(small_chunks()).unwrap();
        let data = random_bytes(3, 50_000);
        let other = random_bytes(4, 50_000);
        let (refs, frames) = cut(&cas, &data);
        let (_, other_frames) = cut(&cas, &other);

        // A frame whose content is not the chunk it claims to be.
        let mut receiver = cas.receive(Vec::new());
        receiver.offer(&refs).await.unwrap();
        let err = receiver
            .put(vec![(refs[0].id, other_frames[0].clone())])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::CorruptChunk { .. }), "{err}");

        // A chunk nobody asked for.
        let mut receiver = cas.receive(Vec::new());
        let err = receiver
            .put(vec![(refs[0].id, frames[0].clone())])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not asked for"), "{err}");

        // A length that does not match the frame.
        let mut receiver = cas.receive(Vec::new());
        let mut lying = refs.clone();
        lying[0].len += 1;
        receiver.offer(&lying).await.unwrap();
        let err = receiver
            .put(vec![(refs[0].id, frames[0].clone())])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("offered as"), "{err}");

        // Chunks asked for that never came.
        let mut receiver = cas.receive(Vec::new());
        receiver.offer(&refs).await.unwrap();
        let err = receiver
            .finish(
                data.len() as u64,
                Some(ContentDigests::of(&data).into()),
                None,
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("never arrived"), "{err}");

        // Every chunk right, but the commit's digest is of other content, or the length lies.
        for (length, digests) in [
            (data.len() as u64, ContentDigests::of(&other)),
            (data.len() as u64 + 1, ContentDigests::of(&data)),
        ] {
            let mut receiver = cas.receive(Vec::new());
            let missing = receiver.offer(&refs).await.unwrap();
            let wanted = missing
                .iter()
                .map(|&i| (refs[i as usize].id, frames[i as usize].clone()))
                .collect();
            receiver.put(wanted).await.unwrap();
            assert!(
                receiver
                    .finish(length, Some(digests.into()), None)
                    .await
                    .is_err()
            );
        }

        // Out-of-range lengths.
        let mut receiver = cas.receive(Vec::new());
        let zero = [ChunkRef {
            id: refs[0].id,
            len: 0,
        }];
        assert!(receiver.offer(&zero).await.is_err());

        assert_eq!(
            cas.stats().await.unwrap().manifests,
            0,
            "nothing became visible"
        );
    });
}
