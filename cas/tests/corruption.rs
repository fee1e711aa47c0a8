//! A damaged chunk is reported by read and scrub, and none of its bytes are returned as good.

mod common;

use common::{read_all, small_chunks, text_bytes};
use futures::StreamExt;
use sloth_cas::{Cas, ChunkId, Error};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_is_reported_everywhere() {
    let cas = Cas::temporary(small_chunks()).unwrap();
    let data = text_bytes(11, 200_000);
    let other = text_bytes(12, 50_000);
    let id = cas
        .commit(cas.ingest_bytes(data.clone()).await.unwrap())
        .await
        .unwrap();
    let other_id = cas
        .commit(cas.ingest_bytes(other.clone()).await.unwrap())
        .await
        .unwrap();
    let manifest = cas.manifest(id).await.unwrap();
    let other_chunks: Vec<ChunkId> = cas
        .manifest(other_id)
        .await
        .unwrap()
        .chunks()
        .iter()
        .map(|c| c.id)
        .collect();
    let victim_index = manifest.chunks().len() / 2;
    let victim = manifest.chunks()[victim_index].id;
    assert!(!other_chunks.contains(&victim));

    let store = cas.chunk_store();
    let mut frame = sloth_cas::ChunkStore::get(store, victim)
        .await
        .unwrap()
        .unwrap()
        .to_vec();
    let last = frame.len() - 1;
    frame[last] ^= 0x01;
    store.corrupt_in_place(victim, &frame).unwrap();

    // The stream yields every chunk before the victim, then an error naming it; nothing of it.
    let mut chunks = std::pin::pin!(cas.read_chunks(&manifest));
    let mut good = 0;
    let err = loop {
        match chunks.next().await.expect("stream ends with the error") {
            Ok(_) => good += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(good, victim_index);
    assert!(
        matches!(err, Error::CorruptChunk { id, .. } if id == victim),
        "{err}"
    );

    let err = read_all(&cas, id).await.unwrap_err();
    assert!(err.to_string().contains(&victim.to_string()), "{err}");
    assert_eq!(
        read_all(&cas, other_id).await.unwrap(),
        other,
        "unaffected content still reads"
    );

    let report = cas.scrub().await.unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.bad_chunks.len(), 1);
    assert_eq!(report.bad_chunks[0].id, victim);
    assert_eq!(report.bad_chunks[0].manifests, vec![id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_chunk_is_reported() {
    let cas = Cas::temporary(small_chunks()).unwrap();
    let id = cas
        .commit(cas.ingest_bytes(text_bytes(13, 100_000)).await.unwrap())
        .await
        .unwrap();
    let victim = cas.manifest(id).await.unwrap().chunks()[0].id;
    cas.chunk_store().remove_raw(victim).unwrap();
    let err = read_all(&cas, id).await.unwrap_err();
    assert!(
        matches!(err, Error::MissingChunk { chunk, .. } if chunk == victim),
        "{err}"
    );
    let report = cas.scrub().await.unwrap();
    assert_eq!(report.bad_chunks.len(), 1);
    assert_eq!(report.bad_chunks[0].manifests, vec![id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_pack_is_reported_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let cas = Cas::open(dir.path(), small_chunks()).unwrap();
    let data = text_bytes(15, 100_000);
    let id = cas
        .commit(cas.ingest_bytes(data).await.unwrap())
        .await
        .unwrap();
    let pack = std::fs::read_dir(cas.chunk_store().dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .next()
        .unwrap();
    let len = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let err = read_all(&cas, id).await.unwrap_err();
    assert!(matches!(err, Error::CorruptChunk { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    assert_eq!(cas.scrub().await.unwrap().bad_chunks.len(), 1);
}

/// The whole-content check of a read is the manifest's length and SHA-256: a manifest whose
/// recorded SHA-256 is wrong fails every verified read, although each chunk matches its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_whose_sha256_lies_fails_every_read() {
    let cas = Cas::temporary(small_chunks()).unwrap();
    let data = text_bytes(21, 150_000);
    let id = cas
        .commit(cas.ingest_bytes(data.clone()).await.unwrap())
        .await
        .unwrap();
    let honest = cas.manifest(id).await.unwrap();
    let mut digests = *honest.digests();
    digests.sha256[0] ^= 1;
    let lying = sloth_cas::Manifest::new(honest.chunks().to_vec(), digests);
    cas.db()
        .open_tree("manifests")
        .unwrap()
        .insert(id.as_bytes(), lying.encode())
        .unwrap();

    let errors = [
        cas.read_to(id, &mut Vec::new()).await.map(drop),
        cas.read_to_writer(id, Vec::new()).await.map(drop),
    ];
    for err in errors.into_iter().map(Result::unwrap_err) {
        let lie = matches!(err, Error::DigestMismatch { algorithm, .. } if algorithm == "sha256");
        assert!(lie, "{err}");
    }
    // Each chunk is sound: the chunk stream alone reads back the content.
    let chunks: Vec<_> = cas.read_chunks(&lying).collect().await;
    let content: Vec<u8> = chunks
        .into_iter()
        .flat_map(|c| c.unwrap().to_vec())
        .collect();
    assert_eq!(content, data);
}
