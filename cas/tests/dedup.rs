//! Deduplication: a modified copy of a large file stores only what changed.

mod common;

use common::{random_bytes, read_all, small_chunks};
use sloth_cas::{Cas, CasConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modified_copy_adds_little() {
    let cas = Cas::temporary(CasConfig::default()).unwrap();
    let original = random_bytes(42, 64 << 20);
    let first = cas.ingest_bytes(original.clone()).await.unwrap();
    assert_eq!(first.stats().new_bytes, 64 << 20);
    let first_id = cas.commit(first).await.unwrap();

    // 1 MiB overwritten in the middle, 100 bytes inserted near the start.
    let mut modified = original.clone();
    let mid = modified.len() / 2;
    modified[mid..mid + (1 << 20)].copy_from_slice(&random_bytes(43, 1 << 20));
    modified.splice(4096..4096, random_bytes(44, 100));

    let second = cas.ingest_bytes(modified.clone()).await.unwrap();
    let added = second.stats().new_bytes;
    eprintln!(
        "modified copy: {} of {} chunks new, {added} bytes added",
        second.stats().new_chunks,
        second.stats().chunks
    );
    assert!(
        added <= 4 << 20,
        "second ingest added {added} bytes, more than 4 MiB"
    );
    let second_id = cas.commit(second).await.unwrap();

    assert_eq!(read_all(&cas, first_id).await.unwrap(), original);
    assert_eq!(read_all(&cas, second_id).await.unwrap(), modified);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_content_shares_one_manifest() {
    let cas = Cas::temporary(CasConfig::default()).unwrap();
    let data = random_bytes(1, 3 << 20);
    let a = cas
        .commit(cas.ingest_bytes(data.clone()).await.unwrap())
        .await
        .unwrap();
    let again = cas.ingest_bytes(data.clone()).await.unwrap();
    assert_eq!(again.stats().new_chunks, 0);
    assert_eq!(again.stats().new_stored_bytes, 0);
    let b = cas.commit(again).await.unwrap();
    assert_eq!(a, b);
    // Two holds: the first release keeps the content, the second deletes it.
    assert!(!cas.release(a).await.unwrap());
    assert_eq!(read_all(&cas, a).await.unwrap(), data);
    assert!(cas.release(a).await.unwrap());
    assert!(!cas.contains_manifest(a).unwrap());
    let gc = cas.gc().await.unwrap();
    assert!(gc.chunks_deleted > 0);
    assert_eq!(cas.stats().await.unwrap().chunks, 0);
    assert!(matches!(
        cas.release(a).await,
        Err(sloth_cas::Error::ManifestNotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_repeated_within_one_ingest_is_stored_once() {
    // All-zero content never finds a cut point before the maximum chunk size, so every chunk
    // is the same; a random block repeated resynchronises to the same chunks after its first
    // cut. Both repeats sit well inside one ingest's window of chunks in flight.
    let cas = Cas::temporary(small_chunks()).unwrap();
    let max = cas.params().max() as usize;
    let block = random_bytes(7, 256 << 10);
    let mut data = vec![0u8; 64 * max];
    for _ in 0..16 {
        data.extend_from_slice(&block);
    }
    let staged = cas.ingest_bytes(data.clone()).await.unwrap();
    let stats = staged.stats();
    let chunks = staged.manifest().chunks();
    let mut distinct = std::collections::HashSet::new();
    let distinct_bytes: u64 = chunks
        .iter()
        .filter(|c| distinct.insert(c.id))
        .map(|c| u64::from(c.len))
        .sum();
    assert!(
        distinct.len() < chunks.len() / 2,
        "the input must repeat chunks for this test to mean anything"
    );
    assert_eq!(stats.new_chunks, distinct.len() as u64);
    assert_eq!(stats.new_bytes, distinct_bytes);
    let id = cas.commit(staged).await.unwrap();
    assert_eq!(
        cas.stats().await.unwrap().stored_bytes,
        stats.new_stored_bytes,
        "stats must count exactly the frames written"
    );
    assert_eq!(read_all(&cas, id).await.unwrap(), data);
}
