//! The catalog end to end on a real data directory: versions, resolution, downloads, deletes,
//! events and both projections.

use std::path::Path;

use sloth_engine::{ArtifactKey, Engine, EngineConfig, Error, ListQuery, Selector};

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sel(name: &str) -> Selector {
    Selector {
        name: name.into(),
        ..Selector::default()
    }
}

async fn open(dir: &Path) -> Engine {
    Engine::open(dir, EngineConfig::default())
        .await
        .expect("open the engine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_newest_wins_and_old_stay_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let key = ArtifactKey::new("app.bin", Some("production"), Some("build")).unwrap();
    let v1 = engine
        .upload(&key, std::io::Cursor::new(bytes(1, 10_000)), "alice")
        .await
        .unwrap();
    let v2 = engine
        .upload(&key, std::io::Cursor::new(bytes(2, 20_000)), "alice")
        .await
        .unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    assert_eq!(engine.resolve(&sel("app.bin")).unwrap().id, v2.id);
    let old = engine
        .resolve(&Selector {
            version: Some(1),
            ..sel("app.bin")
        })
        .unwrap();
    assert_eq!(old.id, v1.id);
    assert_eq!(engine.list(&ListQuery::default()).unwrap().len(), 1);
    let all = engine
        .list(&ListQuery {
            all_versions: true,
            ..ListQuery::default()
        })
        .unwrap();
    assert_eq!(
        all.iter().map(|r| r.version).collect::<Vec<_>>(),
        vec![1, 2]
    );

    // Layout shows the newest; old versions download by number.
    let shown = engine.layout_path(&v2).unwrap();
    assert_eq!(std::fs::read(&shown).unwrap(), bytes(2, 20_000));
    let out = dir.path().join("v1.bin");
    engine.download_to(&old, &out, "bob").await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes(1, 10_000));

    // Deleting v2 makes v1 the newest again, in the layout too; the number is not reused.
    engine
        .delete(
            &Selector {
                version: Some(2),
                ..sel("app.bin")
            },
            "alice",
        )
        .await
        .unwrap();
    assert_eq!(std::fs::read(&shown).unwrap(), bytes(1, 10_000));
    let listed = engine.list(&ListQuery::default()).unwrap();
    assert_eq!(
        listed.iter().map(|r| r.version).collect::<Vec<_>>(),
        vec![1],
        "list follows the delete"
    );
    let v3 = engine
        .upload(&key, std::io::Cursor::new(bytes(3, 5_000)), "alice")
        .await
        .unwrap();
    assert_eq!(v3.version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_in_two_places_needs_a_choice() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    for stack in ["production", "staging"] {
        let key = ArtifactKey::new("app.bin", Some(stack), Some("build")).unwrap();
        engine
            .upload(&key, std::io::Cursor::new(bytes(1, 100)), "alice")
            .await
            .unwrap();
    }
    let err = engine.resolve(&sel("app.bin")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Ambiguous { .. }), "{text}");
    assert!(
        text.contains("--stack production --task build")
            && text.contains("--stack staging --task build"),
        "{text}"
    );
    let one = engine
        .resolve(&Selector {
            stack: Some("staging".into()),
            ..sel("app.bin")
        })
        .unwrap();
    assert_eq!(one.stack, "staging");
    assert!(matches!(
        engine.resolve(&sel("nope")),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        engine.resolve(&Selector {
            version: Some(9),
            stack: Some("staging".into()),
            ..sel("app.bin")
        }),
        Err(Error::NotFound {
            version: Some(9),
            ..
        })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_counts_only_success_and_writes_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let key = ArtifactKey::new("report.pdf", None, None).unwrap();
    let data = bytes(7, 3 << 20);
    let rec = engine
        .upload(&key, std::io::Cursor::new(data.clone()), "alice")
        .await
        .unwrap();
    assert_eq!(
        (rec.stack.as_str(), rec.task.as_str()),
        ("default", "default")
    );

    // Into a directory: the file lands under its name.
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let written = engine.download_to(&rec, &out_dir, "bob").await.unwrap();
    assert_eq!(written, out_dir.join("report.pdf"));
    assert_eq!(std::fs::read(&written).unwrap(), data);
    assert_eq!(
        engine.resolve(&sel("report.pdf")).unwrap().download_count,
        1
    );

    // Corrupt a chunk: the download fails naming the artifact, nothing appears at the target,
    // no temporary file is left, and the count does not move.
    let manifest = engine.cas().manifest(rec.manifest).await.unwrap();
    let victim = manifest.chunks()[manifest.chunks().len() / 2].id;
    let frame = sloth_cas::ChunkStore::get(engine.cas().chunk_store(), victim)
        .await
        .unwrap()
        .unwrap();
    let mut bad = frame.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    engine
        .cas()
        .chunk_store()
        .corrupt_in_place(victim, &bad)
        .unwrap();
    let target = out_dir.join("again.pdf");
    let err = engine.download_to(&rec, &target, "bob").await.unwrap_err();
    assert!(err.to_string().contains("report.pdf"), "{err}");
    assert!(!target.exists());
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        1,
        "no temporary file left"
    );
    assert_eq!(
        engine.resolve(&sel("report.pdf")).unwrap().download_count,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_reclaims_chunks_and_records_events() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let keep = ArtifactKey::new("keep.bin", Some("s"), Some("t")).unwrap();
    let gone = ArtifactKey::new("gone.bin", Some("s"), Some("t")).unwrap();
    engine
        .upload(&keep, std::io::Cursor::new(bytes(1, 500_000)), "alice")
        .await
        .unwrap();
    let before = engine.cas().stats().await.unwrap();
    engine
        .upload(&gone, std::io::Cursor::new(bytes(2, 2_000_000)), "alice")
        .await
        .unwrap();
    engine
        .upload(&gone, std::io::Cursor::new(bytes(3, 2_000_000)), "alice")
        .await
        .unwrap();
    let deleted = engine.delete(&sel("gone.bin"), "carol").await.unwrap();
    assert_eq!(deleted.len(), 2, "every version without --version");
    assert_eq!(
        engine.cas().stats().await.unwrap(),
        before,
        "the store is back where it was"
    );
    assert!(!dir.path().join("artifacts/s/t/gone.bin").exists());
    // Only keep.bin's object is left, and no empty directory beside it.
    let object_dirs: Vec<_> = std::fs::read_dir(dir.path().join("objects"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(object_dirs.len(), 1, "{object_dirs:?}");
    assert!(matches!(
        engine.resolve(&sel("gone.bin")),
        Err(Error::NotFound { .. })
    ));

    let kinds: Vec<String> = engine
        .events(Some("artifact.*"), None)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "artifact.upload",
            "artifact.upload",
            "artifact.upload",
            "artifact.delete",
            "artifact.delete"
        ]
    );
    let deletes = engine.events(Some("*.delete"), None).unwrap();
    assert!(
        deletes
            .iter()
            .all(|e| e.principal == "carol" && e.agent == "local")
    );
    assert_eq!(engine.events(Some("artifact.*"), Some(2)).unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    for (name, stack) in [
        ("a/b", "s"),
        ("x", "../etc"),
        ("..", "s"),
        ("nul\0", "s"),
        ("", "s"),
    ] {
        assert!(
            ArtifactKey::new(name, Some(stack), None).is_err(),
            "{name:?} {stack:?}"
        );
    }
    let missing = engine
        .upload_path(
            &ArtifactKey::new("x", None, None).unwrap(),
            &dir.path().join("nope"),
            "a",
        )
        .await
        .unwrap_err();
    assert!(matches!(missing, Error::BadInput { .. }), "{missing}");
    let directory = engine
        .upload_path(&ArtifactKey::new("x", None, None).unwrap(), dir.path(), "a")
        .await
        .unwrap_err();
    assert!(directory.to_string().contains("directory"), "{directory}");
    assert!(engine.list(&ListQuery::default()).unwrap().is_empty());
    assert_eq!(engine.cas().stats().await.unwrap().chunks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_are_rebuilt_when_missing() {
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(9, 100_000);
    {
        let engine = open(dir.path()).await;
        let key = ArtifactKey::new("app.bin", Some("production"), Some("build")).unwrap();
        engine
            .upload(&key, std::io::Cursor::new(data.clone()), "alice")
            .await
            .unwrap();
        engine
            .upload(
                &ArtifactKey::new("twin.bin", Some("production"), Some("test")).unwrap(),
                std::io::Cursor::new(data.clone()),
                "alice",
            )
            .await
            .unwrap();
    }
    let link = dir.path().join("artifacts/production/build/app.bin");
    let twin = dir.path().join("artifacts/production/test/twin.bin");
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(&link).unwrap().ino(),
            std::fs::metadata(&twin).unwrap().ino(),
            "identical content shares one inode"
        );
        assert!(std::fs::metadata(&link).unwrap().permissions().readonly());
    }
    std::fs::remove_file(dir.path().join("metadata.db")).unwrap();
    std::fs::remove_dir_all(dir.path().join("artifacts")).unwrap();
    std::fs::remove_dir_all(dir.path().join("objects")).unwrap();

    let _engine = open(dir.path()).await;
    assert_eq!(std::fs::read(&link).unwrap(), data);
    let conn = rusqlite::Connection::open(dir.path().join("metadata.db")).unwrap();
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM artifacts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 2);
    let (stack, artifacts, versions, logical): (String, i64, i64, i64) = conn
        .query_row(
            "SELECT stack, artifacts, versions, logical_bytes FROM stack_usage",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (stack.as_str(), artifacts, versions, logical),
        ("production", 2, 2, 200_000)
    );
    let events: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM events WHERE kind = 'artifact.upload'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(events, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_db_is_readable_by_sqlite3_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let key = ArtifactKey::new("app.bin", Some("production"), Some("build")).unwrap();
    let rec = engine
        .upload(&key, std::io::Cursor::new(bytes(4, 1234)), "alice")
        .await
        .unwrap();
    let out = std::process::Command::new("sqlite3")
        .arg(dir.path().join("metadata.db"))
        .arg("SELECT name, stack, task, size, checksum, download_count FROM latest_artifacts;")
        .output();
    let Ok(out) = out else {
        eprintln!("sqlite3 not installed; checked with rusqlite only");
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("app.bin|production|build|1234|{}|0", rec.checksum)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_data_dir_is_named() {
    let err = Engine::open("/proc/sloth-cannot-be-here", EngineConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DataDir { .. }), "{err}");
    assert!(
        err.to_string().contains("/proc/sloth-cannot-be-here"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_limits_to_the_most_recent_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    for i in 0..12u8 {
        let stack = if i % 3 == 0 { "prod" } else { "dev" };
        let key = ArtifactKey::new(&format!("a{i:02}"), Some(stack), Some("build")).unwrap();
        engine
            .upload(&key, std::io::Cursor::new(bytes(i, 100)), "alice")
            .await
            .unwrap();
    }
    let names = |q: &ListQuery| -> Vec<String> {
        engine
            .list(q)
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect()
    };
    assert_eq!(
        names(&ListQuery {
            limit: Some(3),
            ..ListQuery::default()
        }),
        ["a09", "a10", "a11"]
    );
    assert_eq!(
        names(&ListQuery {
            stack: Some("prod".into()),
            ..ListQuery::default()
        }),
        ["a00", "a03", "a06", "a09"]
    );
    assert_eq!(
        names(&ListQuery {
            stack: Some("prod".into()),
            limit: Some(2),
            ..ListQuery::default()
        }),
        ["a06", "a09"]
    );
    assert!(
        names(&ListQuery {
            task: Some("deploy".into()),
            ..ListQuery::default()
        })
        .is_empty()
    );
}

/// Regression: re-uploading identical content left a `.NAME.link-PID` file beside the entry,
/// because rename() between two links of the same inode does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_reupload_leaves_one_layout_entry() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let key = ArtifactKey::new("app.bin", Some("demo"), None).unwrap();
    for _ in 0..2 {
        engine
            .upload(&key, std::io::Cursor::new(bytes(5, 3000)), "alice")
            .await
            .unwrap();
    }
    let entries: Vec<_> = std::fs::read_dir(dir.path().join("artifacts/demo/default"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, ["app.bin"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_the_layout_off_and_on_again() {
    let dir = tempfile::tempdir().unwrap();
    let key = ArtifactKey::new("app.bin", Some("demo"), None).unwrap();
    open(dir.path())
        .await
        .upload(&key, std::io::Cursor::new(bytes(1, 100)), "a")
        .await
        .unwrap();
    let link = dir.path().join("artifacts/demo/default/app.bin");
    assert!(link.exists());
    let off = EngineConfig {
        layout: false,
        ..EngineConfig::default()
    };
    let engine = Engine::open(dir.path(), off).await.unwrap();
    assert!(!dir.path().join("artifacts").exists() && !dir.path().join("objects").exists());
    let rec = engine.resolve(&sel("app.bin")).unwrap();
    assert!(engine.layout_path(&rec).is_none());
    drop(engine);
    open(dir.path()).await;
    assert_eq!(
        std::fs::read(&link).unwrap(),
        bytes(1, 100),
        "rebuilt when turned back on"
    );
}

/// Regressions from review: a 255-byte name (temporary names once overflowed the file-name
/// limit after the commit, breaking every later command), the previous version's object
/// left behind, leftovers of an interrupted upload, downloads forcing layout rebuilds, and
/// two downloads to one target sharing a temporary file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_regressions() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let long = "n".repeat(255);
    let key = ArtifactKey::new(&long, Some("s"), Some("t")).unwrap();
    engine
        .upload(&key, std::io::Cursor::new(bytes(1, 1000)), "a")
        .await
        .unwrap();
    let v2 = engine
        .upload(&key, std::io::Cursor::new(bytes(2, 1000)), "a")
        .await
        .unwrap();
    let objects = || -> usize {
        std::fs::read_dir(dir.path().join("objects"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| std::fs::read_dir(e.path()).unwrap().count())
            .sum()
    };
    assert_eq!(objects(), 1, "only the newest version's object stays");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let (a, b) = tokio::join!(
        engine.download_to(&v2, &out, "a"),
        engine.download_to(&v2, &out, "b")
    );
    assert_eq!(std::fs::read(a.unwrap()).unwrap(), bytes(2, 1000));
    assert_eq!(std::fs::read(b.unwrap()).unwrap(), bytes(2, 1000));
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "no temporary file left"
    );
    drop(engine);

    // A sentinel inside artifacts/ survives the next open: downloads do not force a rebuild.
    let sentinel = dir.path().join("artifacts/s/t/.sentinel");
    std::fs::write(&sentinel, b"").unwrap();
    std::fs::write(dir.path().join("objects/.incoming-1-1"), b"half an upload").unwrap();
    let engine = open(dir.path()).await;
    assert!(
        sentinel.exists(),
        "the layout was rebuilt although nothing in it changed"
    );
    assert!(
        !dir.path().join("objects/.incoming-1-1").exists(),
        "leftovers are swept at open"
    );
    assert_eq!(engine.resolve(&sel(&long)).unwrap().download_count, 2);
    engine.delete(&sel(&long), "a").await.unwrap();
}

/// A projection that cannot be rebuilt (its content is damaged) does not keep the catalog
/// from opening: the damaged artifact can still be listed and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_projection_rebuild_does_not_lock_the_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path()).await;
        let key = ArtifactKey::new("a.bin", None, None).unwrap();
        let rec = engine
            .upload(&key, std::io::Cursor::new(bytes(3, 200_000)), "a")
            .await
            .unwrap();
        let chunk = engine.cas().manifest(rec.manifest).await.unwrap().chunks()[0].id;
        let frame = sloth_cas::ChunkStore::get(engine.cas().chunk_store(), chunk)
            .await
            .unwrap()
            .unwrap();
        let mut bad = frame.to_vec();
        bad[20] ^= 0xff;
        engine
            .cas()
            .chunk_store()
            .corrupt_in_place(chunk, &bad)
            .unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("objects")).unwrap();
    let engine = open(dir.path()).await;
    assert_eq!(engine.list(&ListQuery::default()).unwrap().len(), 1);
    engine.delete(&sel("a.bin"), "a").await.unwrap();
    assert!(engine.list(&ListQuery::default()).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_retention_rules_are_one_per_stack_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path()).await;
        let (rule, changed) = engine.register_workflow_retention("ci", "30d").unwrap();
        assert!(changed);
        assert_eq!(rule.policy, "older-than");
        assert_eq!(rule.params["older_than"], "30d");
        assert_eq!(rule.stack.as_deref(), Some("ci"));
        assert!(!engine.register_workflow_retention("ci", "30d").unwrap().1);
        assert!(engine.register_workflow_retention("ci", "7d").unwrap().1);
        engine.register_workflow_retention("nightly", "1d").unwrap();
        let err = engine
            .register_workflow_retention("ci", "a month")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "artifact_retention must be a duration like 7d, 30d, 6h or 45m, got 'a month'"
        );
        assert!(engine.register_workflow_retention("a/b", "1d").is_err());
    }
    let engine = open(dir.path()).await;
    let rules: Vec<(String, String)> = engine
        .workflow_retention_rules()
        .unwrap()
        .into_iter()
        .map(|r| (r.stack.unwrap(), r.params["older_than"].clone()))
        .collect();
    assert_eq!(
        rules,
        [("ci".into(), "7d".into()), ("nightly".into(), "1d".into())]
    );
}
