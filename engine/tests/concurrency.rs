//! Many uploads, downloads and deletes of overlapping artifacts at once, on one engine (as an
//! agent serves them): afterwards every live version reads back bit-exact, the store holds
//! exactly what the live versions need, and metadata.db agrees with the catalog.

use std::sync::Arc;

use sloth_engine::{ArtifactKey, Engine, EngineConfig, ListQuery, Selector};

fn content(worker: u64, round: u64) -> Vec<u8> {
    // Shared base plus a small distinct part, so versions deduplicate against each other.
    let mut v: Vec<u8> = (0..400_000u64).map(|i| (i * 7 % 251) as u8).collect();
    v.extend((0..5_000u64).map(|i| ((i + worker * 31 + round * 17) % 256) as u8));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_uploads_downloads_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(
        Engine::open(dir.path(), EngineConfig::default())
            .await
            .unwrap(),
    );
    let mut workers = Vec::new();
    for w in 0..6u64 {
        let engine = Arc::clone(&engine);
        let out = dir.path().join(format!("out-{w}"));
        std::fs::create_dir(&out).unwrap();
        workers.push(tokio::spawn(async move {
            for round in 0..8u64 {
                // Three names shared by all workers, in two stacks.
                let name = format!("shared-{}.bin", (w + round) % 3);
                let stack = if w % 2 == 0 { "even" } else { "odd" };
                let key = ArtifactKey::new(&name, Some(stack), Some("build")).unwrap();
                engine
                    .upload(&key, std::io::Cursor::new(content(w, round)), "w")
                    .await
                    .unwrap();
                let selector = Selector {
                    name: name.clone(),
                    stack: Some(stack.into()),
                    task: Some("build".into()),
                    version: None,
                };
                // Another worker may delete it between resolve and download: that is a
                // deliberate conflict, reported as not found, never as wrong bytes.
                if let Ok(record) = engine.resolve(&selector) {
                    match engine.download_to(&record, &out, "w").await {
                        Ok(path) => {
                            let got = std::fs::read(&path).unwrap();
                            assert_eq!(
                                sloth_cas::ContentDigests::of(&got).sha256_hex(),
                                record.checksum[7..]
                            );
                        }
                        Err(e) => assert!(
                            e.to_string().contains("not found")
                                || e.to_string().contains("missing"),
                            "{e:?}"
                        ),
                    }
                }
                if round % 3 == 2 {
                    let _ = engine
                        .delete(
                            &Selector {
                                version: None,
                                ..selector
                            },
                            "w",
                        )
                        .await;
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }

    let live = engine
        .list(&ListQuery {
            all_versions: true,
            ..ListQuery::default()
        })
        .unwrap();
    assert!(!live.is_empty());
    for record in &live {
        let path = engine
            .download_to(record, &dir.path().join("check.bin"), "check")
            .await
            .unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(
            format!(
                "sha256:{}",
                sloth_cas::ContentDigests::of(&got).sha256_hex()
            ),
            record.checksum
        );
    }
    // GC keeps exactly what the live versions need: a scrub is clean, and a GC finds nothing.
    let report = engine.cas().scrub().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(engine.cas().gc().await.unwrap().chunks_deleted, 0);
    // metadata.db agrees with the catalog.
    let conn = rusqlite::Connection::open(dir.path().join("metadata.db")).unwrap();
    let (rows, bytes): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM artifacts",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rows as usize, live.len());
    assert_eq!(bytes as u64, live.iter().map(|r| r.size).sum::<u64>());
    let usage: i64 = conn
        .query_row("SELECT SUM(versions) FROM stack_usage", [], |r| r.get(0))
        .unwrap();
    assert_eq!(usage as usize, live.len());
}

/// `list` walks a time index and then reads each record; a delete removes both in one
/// transaction, but the walk may still show the entry it removed. Such an entry is skipped,
/// never reported as a corrupt catalog (the load harness once saw exactly that).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lists_racing_deletes_never_see_a_corrupt_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(
        Engine::open(
            dir.path(),
            EngineConfig {
                layout: false,
                ..EngineConfig::default()
            },
        )
        .await
        .unwrap(),
    );
    // Many live artifacts, so that each list walks a long index while deletes land in it.
    let names: Vec<String> = (0..300).map(|i| format!("a{i}.bin")).collect();
    for (i, name) in names.iter().enumerate() {
        let key = ArtifactKey::new(name, Some("s"), Some("t")).unwrap();
        let bytes = (i as u32).to_le_bytes().repeat(16);
        engine
            .upload(&key, std::io::Cursor::new(bytes), "w")
            .await
            .unwrap();
    }
    let churn = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move {
            for name in names {
                let selector = Selector {
                    name,
                    stack: Some("s".into()),
                    task: Some("t".into()),
                    version: None,
                };
                engine.delete(&selector, "w").await.unwrap();
            }
        })
    };
    let mut lists = Vec::new();
    for all_versions in [false, true] {
        let engine = Arc::clone(&engine);
        lists.push(tokio::task::spawn_blocking(move || {
            let query = ListQuery {
                all_versions,
                ..ListQuery::default()
            };
            while !engine.list(&query).unwrap().is_empty() {}
        }));
    }
    churn.await.unwrap();
    for list in lists {
        list.await.unwrap();
    }
}
