//! GC racing ingests, commits and releases never deletes a chunk a committed manifest needs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{read_all, small_chunks, text_bytes};
use sloth_cas::Cas;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_races_ingests_and_releases() {
    let cas = Cas::temporary(small_chunks()).unwrap();
    // A small pool of contents that share most chunks, so that releases keep making shared
    // chunks unreferenced while other ingests are about to reuse them.
    let base = text_bytes(100, 120_000);
    let variants: Vec<Vec<u8>> = (0..6u64)
        .map(|i| {
            let mut v = base.clone();
            let at = (i as usize * 17_000) % v.len();
            v.splice(at..at, text_bytes(200 + i, 3000));
            v
        })
        .collect();
    let variants = Arc::new(variants);
    let stop = Arc::new(AtomicBool::new(false));

    let gc = {
        let (cas, stop) = (cas.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut passes = 0u32;
            let mut deleted = 0u64;
            while !stop.load(Ordering::Relaxed) {
                deleted += cas.gc().await.unwrap().chunks_deleted;
                passes += 1;
                tokio::task::yield_now().await;
            }
            (passes, deleted)
        })
    };

    let mut workers = Vec::new();
    for w in 0..6u64 {
        let (cas, variants) = (cas.clone(), Arc::clone(&variants));
        workers.push(tokio::spawn(async move {
            for round in 0..25u64 {
                let mut data = variants[((w + round) % variants.len() as u64) as usize].clone();
                let release = round % 2 == 0;
                if release {
                    // A tail no other content has: once released, its chunks are garbage for
                    // sure, so the GC passes of the race always find something to delete.
                    data.extend(text_bytes(1000 + w * 100 + round, 3000));
                }
                let data = &data;
                let staged = cas.ingest_bytes(data.clone()).await.unwrap();
                // Give GC a window between the presence check and the commit.
                tokio::task::yield_now().await;
                let id = cas.commit(staged).await.unwrap();
                assert_eq!(
                    &read_all(&cas, id).await.unwrap(),
                    data,
                    "worker {w} round {round}"
                );
                if release {
                    cas.release(id).await.unwrap();
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let (passes, deleted) = gc.await.unwrap();
    eprintln!("gc passes: {passes}, chunks deleted during the race: {deleted}");
    assert!(passes > 5, "GC must actually have raced the workers");
    assert!(
        deleted > 0,
        "releases must have made chunks collectable during the race"
    );

    // Every manifest still held reads back; the store is consistent; a final GC keeps exactly
    // what the surviving manifests need.
    cas.gc().await.unwrap();
    let report = cas.scrub().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    let survivors = cas.db().open_tree("manifest_refs").unwrap();
    assert!(!survivors.is_empty());
    for item in survivors.iter() {
        let (key, _) = item.unwrap();
        let id = sloth_cas::ManifestId::from_slice(&key).unwrap();
        let bytes = read_all(&cas, id).await.unwrap();
        assert!(variants.contains(&bytes));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_chunks_survive_gc_until_dropped() {
    let cas = Cas::temporary(small_chunks()).unwrap();
    let data = text_bytes(300, 80_000);
    let staged = cas.ingest_bytes(data.clone()).await.unwrap();
    let report = cas.gc().await.unwrap();
    assert_eq!(report.chunks_deleted, 0, "leased chunks must survive");
    let id = cas.commit(staged).await.unwrap();
    assert_eq!(read_all(&cas, id).await.unwrap(), data);

    // An abandoned ingest leaves chunks that the next GC reclaims.
    let before = cas.stats().await.unwrap().chunks;
    let abandoned = cas.ingest_bytes(text_bytes(301, 80_000)).await.unwrap();
    assert!(cas.stats().await.unwrap().chunks > before);
    drop(abandoned);
    cas.gc().await.unwrap();
    assert_eq!(cas.stats().await.unwrap().chunks, before);
}

/// Regression: two GC passes at once (the engine starts one after every delete) could each
/// compact the same packs, and the second judged the first one's fresh copies dead and deleted
/// their pack, losing chunks that live manifests still needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_gc_passes_lose_nothing() {
    let cas = Cas::temporary(small_chunks()).unwrap();
    let mut keep = Vec::new();
    for round in 0..6u64 {
        // Each round: content to keep and content to drop, in the same packs, so that every
        // GC has mostly-dead packs to compact.
        let kept = text_bytes(1000 + round, 60_000);
        let id = cas
            .commit(cas.ingest_bytes(kept.clone()).await.unwrap())
            .await
            .unwrap();
        keep.push((id, kept));
        let dropped = cas
            .commit(
                cas.ingest_bytes(text_bytes(2000 + round, 400_000))
                    .await
                    .unwrap(),
            )
            .await
            .unwrap();
        cas.release(dropped).await.unwrap();
        let passes: Vec<_> = (0..3)
            .map(|_| {
                let cas = cas.clone();
                tokio::spawn(async move { cas.gc().await.unwrap() })
            })
            .collect();
        for p in passes {
            p.await.unwrap();
        }
        for (id, data) in &keep {
            assert_eq!(&read_all(&cas, *id).await.unwrap(), data, "round {round}");
        }
    }
    assert!(cas.scrub().await.unwrap().is_clean());
}
