//! `metadata.db` answering `list` and `show` for the catalog ([`ProjectedCatalog`]): the same
//! answers as the catalog after any sequence of changes, and no answer at all whenever it
//! cannot prove that it is current (the pending mark).

#![allow(clippy::unwrap_used)]

use std::path::Path;

use proptest::prelude::*;
use sloth_engine::{
    ArtifactKey, Engine, EngineConfig, ListQuery, ProjectedCatalog, Result, Selector,
};

const NAMES: [&str; 2] = ["app.bin", "lib.so"];
const PLACES: [&str; 2] = ["one", "two"];

#[derive(Debug, Clone)]
enum Op {
    Upload {
        name: usize,
        stack: usize,
        task: usize,
        len: usize,
    },
    Download {
        name: usize,
        stack: usize,
        task: usize,
    },
    DeleteVersion {
        name: usize,
        stack: usize,
        task: usize,
        version: u32,
    },
    DeleteAll {
        name: usize,
        stack: usize,
        task: usize,
    },
    Event,
}

fn op() -> impl Strategy<Value = Op> {
    let place = (0..NAMES.len(), 0..PLACES.len(), 0..PLACES.len());
    prop_oneof![
        4 => (place.clone(), 0..3000usize)
            .prop_map(|((name, stack, task), len)| Op::Upload { name, stack, task, len }),
        2 => place.clone().prop_map(|(name, stack, task)| Op::Download { name, stack, task }),
        1 => (place.clone(), 1..4u32).prop_map(|((name, stack, task), version)| {
            Op::DeleteVersion { name, stack, task, version }
        }),
        1 => place.prop_map(|(name, stack, task)| Op::DeleteAll { name, stack, task }),
        1 => Just(Op::Event),
    ]
}

fn exact(name: usize, stack: usize, task: usize, version: Option<u32>) -> Selector {
    Selector {
        name: NAMES[name].into(),
        stack: Some(PLACES[stack].into()),
        task: Some(PLACES[task].into()),
        version,
    }
}

/// Applies `op`; its failures (deleting what is not there) are part of the sequence.
async fn apply(engine: &Engine, op: &Op, out: &Path) {
    match *op {
        Op::Upload {
            name,
            stack,
            task,
            len,
        } => {
            let key =
                ArtifactKey::new(NAMES[name], Some(PLACES[stack]), Some(PLACES[task])).unwrap();
            let content: Vec<u8> = (0..len).map(|i| (i * 7 + name) as u8).collect();
            engine
                .upload(&key, std::io::Cursor::new(content), "alice")
                .await
                .unwrap();
        }
        Op::Download { name, stack, task } => {
            if let Ok(record) = engine.resolve(&exact(name, stack, task, None)) {
                engine.download_to(&record, out, "bob").await.unwrap();
            }
        }
        Op::DeleteVersion {
            name,
            stack,
            task,
            version,
        } => {
            let _ = engine
                .delete(&exact(name, stack, task, Some(version)), "carol")
                .await;
        }
        Op::DeleteAll { name, stack, task } => {
            let _ = engine
                .delete(&exact(name, stack, task, None), "carol")
                .await;
        }
        Op::Event => {
            engine
                .record_event("artifact.cleanup", "dave", "*", "keep-last", 0, 0)
                .await
                .unwrap();
        }
    }
}

/// An answer as text, so that records and errors compare alike.
fn shown<T: std::fmt::Debug>(answer: Result<T>) -> String {
    match answer {
        Ok(value) => format!("{value:?}"),
        Err(e) => format!("error: {e}"),
    }
}

/// Every query `list` and `show` can make of this small catalog, answered by both.
fn assert_same_answers(engine: &Engine, projected: &ProjectedCatalog) {
    let filters = || {
        [None, Some(0), Some(1)]
            .into_iter()
            .map(|i| i.map(|i: usize| PLACES[i].to_owned()))
    };
    for all_versions in [false, true] {
        for stack in filters() {
            for task in filters() {
                for limit in [None, Some(1), Some(3)] {
                    let query = ListQuery {
                        stack: stack.clone(),
                        task: task.clone(),
                        all_versions,
                        limit,
                    };
                    assert_eq!(
                        shown(projected.list(&query)),
                        shown(engine.list(&query)),
                        "list {query:?}"
                    );
                }
            }
        }
    }
    for pattern in [
        None,
        Some("artifact.*"),
        Some("*.d?wnload"),
        Some("artifact.cleanup"),
        Some("artifact.[u]pload"),
    ] {
        for limit in [None, Some(1), Some(3)] {
            assert_eq!(
                shown(projected.events(pattern, limit)),
                shown(engine.events(pattern, limit)),
                "events {pattern:?} {limit:?}"
            );
        }
    }
    for name in NAMES.iter().chain(&["missing", "bad/name"]) {
        for stack in filters() {
            for task in filters() {
                for version in [None, Some(1), Some(2), Some(9)] {
                    let selector = Selector {
                        name: (*name).into(),
                        stack: stack.clone(),
                        task: task.clone(),
                        version,
                    };
                    let from_catalog = engine.resolve(&selector);
                    if let Ok(record) = &from_catalog {
                        let key = record.key().unwrap();
                        let versions = engine.versions(&key).unwrap();
                        assert_eq!(
                            projected.version_figures(&key).unwrap(),
                            (versions.len() as u32, versions.last().unwrap().version)
                        );
                        assert_eq!(projected.layout_path(record), engine.layout_path(record));
                    }
                    assert_eq!(
                        shown(projected.resolve(&selector)),
                        shown(from_catalog),
                        "resolve {selector:?}"
                    );
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// After any sequence of uploads, downloads, deletes and events, with the layout on or
    /// off, the projection answers every list and show exactly as the catalog does.
    #[test]
    fn the_projection_answers_as_the_catalog(
        ops in proptest::collection::vec(op(), 1..14),
        layout in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            let config = EngineConfig { layout, ..EngineConfig::default() };
            let engine = Engine::open(&data, config.clone()).await.unwrap();
            for op in &ops {
                apply(&engine, op, &dir.path().join("out")).await;
            }
            let projected = ProjectedCatalog::open(&data, layout).expect("current");
            assert_same_answers(&engine, &projected);
            // A projection asked for with the other layout setting does not answer.
            assert!(ProjectedCatalog::open(&data, !layout).is_none());
            // Nor does it after a reopen with the other setting rebuilt it, and the answers
            // of the rebuilt file are the catalog's too.
            drop(engine);
            let engine = Engine::open(&data, EngineConfig { layout: !layout, ..config }).await.unwrap();
            assert!(ProjectedCatalog::open(&data, layout).is_none());
            assert_same_answers(&engine, &ProjectedCatalog::open(&data, !layout).expect("rebuilt"));
        });
    }
}

fn sqlite(data: &Path, sql: &str) {
    rusqlite::Connection::open(data.join("metadata.db"))
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

/// A projection update that fails after the catalog committed leaves the pending mark set:
/// the projection does not answer until an update rebuilds it, and then holds both changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_update_keeps_the_projection_from_answering_until_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), EngineConfig::default())
        .await
        .unwrap();
    let key = ArtifactKey::new("app.bin", None, None).unwrap();
    engine.upload(&key, &b"one"[..], "alice").await.unwrap();
    assert!(ProjectedCatalog::open(dir.path(), true).is_some());

    // Every projection update records an event: failing that insert fails the update, while
    // the pending mark (a `projection_meta` row) still goes in.
    sqlite(
        dir.path(),
        "CREATE TRIGGER fail_updates BEFORE INSERT ON events
         BEGIN SELECT RAISE(FAIL, 'injected failure'); END;",
    );
    let v2 = engine
        .upload(&key, &b"two"[..], "alice")
        .await
        .expect("committed");
    assert!(
        ProjectedCatalog::open(dir.path(), true).is_none(),
        "the mark stays set"
    );

    sqlite(dir.path(), "DROP TRIGGER fail_updates;");
    let v3 = engine.upload(&key, &b"three"[..], "alice").await.unwrap();
    let projected = ProjectedCatalog::open(dir.path(), true).expect("rebuilt, current");
    let all = ListQuery {
        all_versions: true,
        ..ListQuery::default()
    };
    let versions: Vec<_> = projected
        .list(&all)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(versions.len(), 3);
    assert_eq!(&versions[1..], [v2.id, v3.id]);
    assert_eq!(projected.list(&all).unwrap(), engine.list(&all).unwrap());

    // The same miss, then the process ends (as if killed before the update): the reopen
    // rebuilds the file, which then holds the missed version.
    sqlite(
        dir.path(),
        "CREATE TRIGGER fail_updates BEFORE INSERT ON events
         BEGIN SELECT RAISE(FAIL, 'injected failure'); END;",
    );
    let v4 = engine.upload(&key, &b"four"[..], "alice").await.unwrap();
    drop((engine, projected));
    sqlite(dir.path(), "DROP TRIGGER fail_updates;");
    assert!(ProjectedCatalog::open(dir.path(), true).is_none());
    let engine = Engine::open(dir.path(), EngineConfig::default())
        .await
        .unwrap();
    let projected = ProjectedCatalog::open(dir.path(), true).expect("rebuilt on open");
    assert_eq!(projected.list(&all).unwrap().last().unwrap().id, v4.id);
    assert_eq!(projected.list(&all).unwrap(), engine.list(&all).unwrap());
}

/// A pending mark found on open with the generations in agreement (the catalog never
/// committed the marked change) is cleared; a file from an older schema is rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_clears_a_stale_mark_and_rebuilds_an_old_schema() {
    let dir = tempfile::tempdir().unwrap();
    let key = ArtifactKey::new("app.bin", Some("production"), Some("build")).unwrap();
    {
        let engine = Engine::open(dir.path(), EngineConfig::default())
            .await
            .unwrap();
        engine.upload(&key, &b"one"[..], "alice").await.unwrap();
    }
    sqlite(
        dir.path(),
        "INSERT OR REPLACE INTO projection_meta (key, value) VALUES ('pending', 1);",
    );
    assert!(ProjectedCatalog::open(dir.path(), true).is_none());
    drop(
        Engine::open(dir.path(), EngineConfig::default())
            .await
            .unwrap(),
    );
    assert!(ProjectedCatalog::open(dir.path(), true).is_some());

    // As the first schema had it: no recorded schema, no `artifact_latest`.
    sqlite(
        dir.path(),
        "DELETE FROM projection_meta WHERE key = 'schema'; DROP TABLE artifact_latest;",
    );
    assert!(ProjectedCatalog::open(dir.path(), true).is_none());
    let engine = Engine::open(dir.path(), EngineConfig::default())
        .await
        .unwrap();
    let projected = ProjectedCatalog::open(dir.path(), true).expect("rebuilt");
    let sel = Selector {
        name: "app.bin".into(),
        ..Selector::default()
    };
    assert_eq!(
        projected.resolve(&sel).unwrap(),
        engine.resolve(&sel).unwrap()
    );
}

/// A metadata.db that SQLite calls damaged never keeps the store from opening: it is moved
/// aside, rebuilt from the catalog, and answers again. Until then the CLI's reader declines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_metadata_db_is_set_aside_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let key = ArtifactKey::new("app.bin", Some("production"), Some("build")).unwrap();
    let uploaded = {
        let engine = Engine::open(dir.path(), EngineConfig::default())
            .await
            .unwrap();
        engine.upload(&key, &b"one"[..], "alice").await.unwrap()
    };
    let garbage: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("metadata.db"), garbage).unwrap();
    assert!(ProjectedCatalog::open(dir.path(), true).is_none());

    let engine = Engine::open(dir.path(), EngineConfig::default())
        .await
        .expect("opens");
    assert!(dir.path().join("metadata.db.damaged").is_file());
    let projected = ProjectedCatalog::open(dir.path(), true).expect("rebuilt");
    let sel = Selector {
        name: "app.bin".into(),
        ..Selector::default()
    };
    assert_eq!(projected.resolve(&sel).unwrap(), uploaded);
    assert_eq!(engine.resolve(&sel).unwrap(), uploaded);
}
