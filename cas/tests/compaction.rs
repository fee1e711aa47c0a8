//! Deleted content gives its disk space back, and what is still referenced survives the move.

mod common;

use common::{random_bytes, read_all, small_chunks};
use sloth_cas::Cas;

fn packs_bytes(cas: &Cas) -> u64 {
    std::fs::read_dir(cas.chunk_store().dir())
        .expect("packs dir")
        .map(|e| e.and_then(|e| e.metadata()).expect("pack metadata").len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_compacts_packs_and_keeps_live_content() {
    let dir = tempfile::tempdir().unwrap();
    let keep = random_bytes(1, 300_000);
    let drop_a = random_bytes(2, 2_000_000);
    let (keep_id, drop_id) = {
        let cas = Cas::open(dir.path(), small_chunks()).unwrap();
        // Both land in one pack: most of it will be dead after the release.
        let staged_keep = cas.ingest_bytes(keep.clone()).await.unwrap();
        let staged_drop = cas.ingest_bytes(drop_a.clone()).await.unwrap();
        (
            cas.commit(staged_keep).await.unwrap(),
            cas.commit(staged_drop).await.unwrap(),
        )
    };
    let cas = Cas::open(dir.path(), small_chunks()).unwrap();
    let before = packs_bytes(&cas);
    assert!(cas.release(drop_id).await.unwrap());
    let report = cas.gc().await.unwrap();
    let after = packs_bytes(&cas);
    eprintln!("{report:?}, packs {before} -> {after} bytes");
    assert!(report.bytes_reclaimed >= 1_900_000, "{report:?}");
    assert!(after < before / 4, "packs {before} -> {after}");
    assert_eq!(read_all(&cas, keep_id).await.unwrap(), keep);
    assert!(cas.scrub().await.unwrap().is_clean());
    drop(cas);

    // And after a reopen, the moved chunks are found where compaction put them.
    let cas = Cas::open(dir.path(), small_chunks()).unwrap();
    assert_eq!(read_all(&cas, keep_id).await.unwrap(), keep);
    cas.release(keep_id).await.unwrap();
    cas.gc().await.unwrap();
    assert_eq!(packs_bytes(&cas), 0, "nothing live, no pack left");
    assert_eq!(cas.stats().await.unwrap().chunks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_frees_only_unreferenced_candidates_and_compacts_when_worth_it() {
    let dir = tempfile::tempdir().unwrap();
    let cas = Cas::open(dir.path(), small_chunks()).unwrap();
    let shared = random_bytes(7, 200_000);
    let mut with_tail = shared.clone();
    with_tail.extend(random_bytes(8, 1_000_000));
    let keep = cas
        .commit(cas.ingest_bytes(shared.clone()).await.unwrap())
        .await
        .unwrap();
    let gone = cas
        .commit(cas.ingest_bytes(with_tail).await.unwrap())
        .await
        .unwrap();
    let candidates: Vec<_> = cas
        .manifest(gone)
        .await
        .unwrap()
        .chunks()
        .iter()
        .map(|c| c.id)
        .collect();
    let before = packs_bytes(&cas);
    assert!(cas.release(gone).await.unwrap());
    let report = cas.collect(candidates).await.unwrap();
    // The tail's chunks go; the ones shared with `keep` stay; most of the pack was dead, so
    // it was compacted.
    assert!(
        report.chunks_deleted > 0 && report.bytes_freed >= 900_000,
        "{report:?}"
    );
    assert!(
        report.bytes_reclaimed > 0 && packs_bytes(&cas) < before / 2,
        "{report:?}"
    );
    assert_eq!(read_all(&cas, keep).await.unwrap(), shared);
    assert!(cas.scrub().await.unwrap().is_clean());
    assert_eq!(
        cas.gc().await.unwrap().chunks_deleted,
        0,
        "nothing was left for a full GC"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recompression_shrinks_cold_data_and_changes_no_content() {
    let dir = tempfile::tempdir().unwrap();
    let fast = sloth_cas::CasConfig {
        zstd_level: 1,
        ..small_chunks()
    };
    let text = common::text_bytes(31, 3_000_000);
    let random = random_bytes(32, 500_000);
    let (a, b) = {
        let cas = Cas::open(dir.path(), fast.clone()).unwrap();
        let a = cas
            .commit(cas.ingest_bytes(text.clone()).await.unwrap())
            .await
            .unwrap();
        let b = cas
            .commit(cas.ingest_bytes(random.clone()).await.unwrap())
            .await
            .unwrap();
        (a, b)
    };
    let cas = Cas::open(dir.path(), fast).unwrap();
    let before = packs_bytes(&cas);
    let report = cas.recompress(12).await.unwrap();
    let after = packs_bytes(&cas);
    eprintln!("{report:?}: packs {before} -> {after}");
    assert!(
        report.chunks_recompressed > 0 && report.bytes_after < report.bytes_before,
        "{report:?}"
    );
    assert!(after < before, "packs {before} -> {after}");
    assert_eq!(read_all(&cas, a).await.unwrap(), text);
    assert_eq!(read_all(&cas, b).await.unwrap(), random);
    assert!(cas.scrub().await.unwrap().is_clean());
    // A second pass finds nothing left below the level.
    assert_eq!(cas.recompress(12).await.unwrap().chunks_recompressed, 0);
    drop(cas);
    let cas = Cas::open(dir.path(), small_chunks()).unwrap();
    assert_eq!(read_all(&cas, a).await.unwrap(), text);
}
