//! The layout's objects are named before their bytes are synced (the store holds the content
//! durably); `objects/.unsynced` lists them until they are, and an open after a restart writes
//! them again from the store (see `engine/src/layout.rs`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sloth_cas::ChunkStore;
use sloth_engine::{ArtifactKey, ArtifactRecord, Engine, EngineConfig, ProjectedCatalog};

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn open(dir: &Path) -> Engine {
    Engine::open(dir, EngineConfig::default())
        .await
        .expect("open the engine")
}

fn unsynced(dir: &Path) -> PathBuf {
    dir.join("objects").join(".unsynced")
}

fn this_boot() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("the kernel's boot id")
        .trim()
        .to_owned()
}

/// What tells a file apart from one written in its place later: inode numbers are reused
/// once freed, so the modification time (nanoseconds) goes with it.
fn identity(path: &Path) -> (u64, i64, i64) {
    let meta = std::fs::metadata(path).expect("a file");
    (meta.ino(), meta.mtime(), meta.mtime_nsec())
}

async fn upload(engine: &Engine, name: &str, content: &[u8]) -> ArtifactRecord {
    let key = ArtifactKey::new(name, Some("production"), Some("build")).expect("a valid key");
    engine
        .upload(&key, std::io::Cursor::new(content.to_vec()), "alice")
        .await
        .expect("upload")
}

/// Overwrites an object (and so every link to it) with zeros from its middle on, as a crash
/// before the kernel wrote its tail back would leave it.
fn tear(path: &Path) {
    let mode = |m| std::fs::set_permissions(path, std::fs::Permissions::from_mode(m));
    mode(0o644).expect("make the object writable");
    let mut torn = std::fs::read(path).expect("read the object");
    let half = torn.len() / 2;
    torn[half..].fill(0);
    std::fs::write(path, torn).expect("tear the object");
    mode(0o444).expect("make the object read-only again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_list_their_objects_until_they_are_synced() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let a = upload(&engine, "a.bin", &bytes(1, 300_000)).await;
    let b = upload(&engine, "b.bin", &bytes(2, 300_000)).await;
    assert_eq!(
        std::fs::read_to_string(unsynced(dir.path())).unwrap(),
        format!(
            "boot {}\n{}\n{}\n",
            this_boot(),
            a.manifest.to_hex(),
            b.manifest.to_hex()
        )
    );
    // An identical re-upload names no new object.
    upload(&engine, "a.bin", &bytes(1, 300_000)).await;
    assert_eq!(
        std::fs::read_to_string(unsynced(dir.path()))
            .unwrap()
            .lines()
            .count(),
        3
    );
    // metadata.db still answers in this boot.
    assert!(ProjectedCatalog::open(dir.path(), true).is_some());

    // A running agent settles them itself.
    engine.settle_layout().await.unwrap();
    assert!(!unsynced(dir.path()).exists());
    let c = upload(&engine, "c.bin", &bytes(3, 300_000)).await;
    assert!(unsynced(dir.path()).exists());

    // So does the next open in the same boot, keeping every object as it was.
    let before = identity(&engine.layout_path(&c).unwrap());
    drop(engine);
    let engine = open(dir.path()).await;
    // It syncs them on a thread of its own, having set the list aside.
    assert!(!unsynced(dir.path()).exists());
    engine.settle_layout().await.unwrap();
    assert!(!dir.path().join("objects/.unsynced.settling").exists());
    let shown = engine.layout_path(&c).unwrap();
    assert_eq!(identity(&shown), before);
    assert_eq!(std::fs::read(&shown).unwrap(), bytes(3, 300_000));

    // A list whose settler was killed is not trusted: the sync may have failed with nobody
    // left to say so, and a second one would not report it. Its objects are written again.
    upload(&engine, "d.bin", &bytes(4, 300_000)).await;
    drop(engine);
    let settling = dir.path().join("objects/.unsynced.settling");
    std::fs::write(
        &settling,
        format!("boot {}\n{}\n", this_boot(), c.manifest.to_hex()),
    )
    .unwrap();
    let engine = open(dir.path()).await;
    engine.settle_layout().await.unwrap();
    assert!(!settling.exists() && !unsynced(dir.path()).exists());
    let rewritten = engine.layout_path(&c).unwrap();
    assert_ne!(identity(&rewritten), before);
    assert_eq!(std::fs::read(&rewritten).unwrap(), bytes(3, 300_000));
    assert!(ProjectedCatalog::open(dir.path(), true).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_whose_sync_fails_writes_the_objects_again() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    engine.settle_layout().await.unwrap();
    let a = upload(&engine, "a.bin", &bytes(1, 200_000)).await;
    // Something that cannot be opened, let alone synced, where a's object is listed (the
    // link in artifacts/ keeps the old inode).
    let object = dir
        .path()
        .join("objects")
        .join(&a.manifest.to_hex()[..2])
        .join(a.manifest.to_hex());
    std::fs::remove_file(&object).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(&object).unwrap();

    let err = engine.settle_layout().await.unwrap_err();
    assert!(err.to_string().contains(&a.manifest.to_hex()), "{err}");
    // Written again from the store at once, and no list left to settle.
    assert!(std::fs::metadata(&object).unwrap().is_file());
    let shown = engine.layout_path(&a).unwrap();
    assert_eq!(identity(&shown), identity(&object));
    assert_eq!(std::fs::read(&shown).unwrap(), bytes(1, 200_000));
    assert!(!dir.path().join("objects/.unsynced.settling").exists());
    assert!(ProjectedCatalog::open(dir.path(), true).is_some());
    engine.settle_layout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_that_fails_leaves_the_layout_marked_stale() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let a = upload(&engine, "a.bin", &bytes(1, 200_000)).await;
    engine.settle_layout().await.unwrap();
    let shown = engine.layout_path(&a).unwrap();
    tear(&shown);
    // The repair's rewrite of a's object cannot create its temporary file.
    let hex = a.manifest.to_hex();
    let blocker = dir
        .path()
        .join("objects")
        .join(&hex[..2])
        .join(format!(".{hex}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    assert!(engine.verify(None, true, "alice").await.is_err());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("objects/.generation")).unwrap(),
        "stale"
    );
    assert!(ProjectedCatalog::open(dir.path(), true).is_none());

    // Out of the way, the next open rebuilds it.
    std::fs::remove_dir_all(&blocker).unwrap();
    drop(engine);
    let engine = open(dir.path()).await;
    assert_eq!(
        std::fs::read(engine.layout_path(&a).unwrap()).unwrap(),
        bytes(1, 200_000)
    );
    assert!(ProjectedCatalog::open(dir.path(), true).is_some());

    // Missing rather than wrong, nothing is discarded: the rebuild itself marks the layout
    // stale before it takes artifacts/ down, and a failure leaves it so.
    std::fs::remove_file(engine.layout_path(&a).unwrap()).unwrap();
    std::fs::remove_file(blocker.with_file_name(&hex)).unwrap();
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    assert!(engine.verify(None, true, "alice").await.is_err());
    assert!(ProjectedCatalog::open(dir.path(), true).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_named_like_a_temporary_link_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let dotted = format!(".sloth-link-{}", std::process::id());
    let hidden = upload(&engine, &dotted, &bytes(1, 1000)).await;
    upload(&engine, "b.bin", &bytes(2, 1000)).await;
    upload(&engine, "b.bin", &bytes(3, 1000)).await;
    assert_eq!(
        std::fs::read(engine.layout_path(&hidden).unwrap()).unwrap(),
        bytes(1, 1000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_unsynced_before_a_restart_are_written_again_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let kept = upload(&engine, "kept.bin", &bytes(1, 400_000)).await;
    engine.settle_layout().await.unwrap();
    let a = upload(&engine, "a.bin", &bytes(2, 400_000)).await;
    let b = upload(&engine, "b.bin", &bytes(3, 400_000)).await;
    let (kept_path, a_path, b_path) = (
        engine.layout_path(&kept).unwrap(),
        engine.layout_path(&a).unwrap(),
        engine.layout_path(&b).unwrap(),
    );
    let (kept_before, b_before) = (identity(&kept_path), identity(&b_path));
    drop(engine);

    // The machine went down before a's tail reached the disk; the list was started in that
    // boot, and its last line was being appended when it stopped.
    tear(&a_path);
    let list = std::fs::read_to_string(unsynced(dir.path())).unwrap();
    let entries: Vec<&str> = list.lines().skip(1).collect();
    std::fs::write(
        unsynced(dir.path()),
        format!("boot not-this-boot\n{}\n{}\n3f2a", entries[0], entries[1]),
    )
    .unwrap();

    // Until the store is opened, metadata.db does not answer: its paths may show damage.
    assert!(ProjectedCatalog::open(dir.path(), true).is_none());

    let engine = open(dir.path()).await;
    assert!(!unsynced(dir.path()).exists());
    assert_eq!(std::fs::read(&a_path).unwrap(), bytes(2, 400_000));
    assert_eq!(std::fs::read(&b_path).unwrap(), bytes(3, 400_000));
    // Every listed object was written again, damaged or not; those synced before were not.
    assert_ne!(identity(&b_path), b_before);
    assert_eq!(identity(&kept_path), kept_before);
    assert_eq!(std::fs::read(&kept_path).unwrap(), bytes(1, 400_000));
    assert!(ProjectedCatalog::open(dir.path(), true).is_some());
    drop(engine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_torn_before_its_first_line_names_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let a = upload(&engine, "a.bin", &bytes(1, 100_000)).await;
    engine.settle_layout().await.unwrap();
    let before = identity(&engine.layout_path(&a).unwrap());
    drop(engine);
    // A crash while the list's first append was being written: no object was named after it.
    std::fs::write(unsynced(dir.path()), "boo").unwrap();
    assert!(ProjectedCatalog::open(dir.path(), true).is_none());
    let engine = open(dir.path()).await;
    assert!(!unsynced(dir.path()).exists());
    let shown = engine.layout_path(&a).unwrap();
    assert_eq!(identity(&shown), before);
    assert_eq!(std::fs::read(&shown).unwrap(), bytes(1, 100_000));
}

/// The objects of the store opened in `dir`: path → identity.
fn objects(dir: &Path) -> std::collections::BTreeMap<PathBuf, (u64, i64, i64)> {
    let entries = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .expect("list a directory")
            .map(|e| e.expect("a directory entry").path())
            .collect()
    };
    let mut found = std::collections::BTreeMap::new();
    for sub in entries(&dir.join("objects")) {
        if sub.is_dir() {
            for object in entries(&sub) {
                let id = identity(&object);
                found.insert(object, id);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_that_cannot_be_trusted_have_their_objects_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let a = upload(&engine, "a.bin", &bytes(1, 200_000)).await;
    let b = upload(&engine, "b.bin", &bytes(2, 200_000)).await;
    engine.settle_layout().await.unwrap();
    let c = upload(&engine, "c.bin", &bytes(3, 200_000)).await;
    drop(engine);
    let before = objects(dir.path());
    assert_eq!(before.len(), 3);

    // A running agent's sync of a's object failed: its list was marked so, and waits for the
    // next open, which writes a's object again and leaves the others.
    std::fs::write(
        dir.path().join("objects/.unsynced.settling"),
        format!("boot sync-failed\n{}\n", a.manifest.to_hex()),
    )
    .unwrap();
    assert!(ProjectedCatalog::open(dir.path(), true).is_none());
    let engine = open(dir.path()).await;
    let after = objects(dir.path());
    let changed: Vec<_> = before
        .iter()
        .filter(|(path, id)| after.get(*path) != Some(id))
        .map(|(path, _)| path.clone())
        .collect();
    let a_object = std::fs::canonicalize(engine.layout_path(&a).unwrap()).unwrap();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(identity(&changed[0]), identity(&a_object));
    // The open set c's list aside as `.unsynced.settling` too, for a sync that may still run.
    engine.settle_layout().await.unwrap();
    assert!(!dir.path().join("objects/.unsynced.settling").exists());
    drop(engine);

    // A line damaged before others: which objects were listed is unknown, so all are
    // written again.
    std::fs::write(
        unsynced(dir.path()),
        format!(
            "boot {}\nnot a manifest\n{}\n",
            this_boot(),
            c.manifest.to_hex()
        ),
    )
    .unwrap();
    let before = objects(dir.path());
    let engine = open(dir.path()).await;
    let after = objects(dir.path());
    assert_eq!(after.len(), 3);
    assert!(
        after
            .iter()
            .all(|(path, inode)| before.get(path) != Some(inode))
    );
    for (record, seed) in [(&a, 1), (&b, 2), (&c, 3)] {
        let shown = engine.layout_path(record).unwrap();
        assert_eq!(std::fs::read(shown).unwrap(), bytes(seed, 200_000));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_listed_under_another_boot() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    // A list an open could not deal with (from another boot): uploads sync their objects
    // instead of adding to it, and it stays for the next open.
    // (A boot id of the same length as this boot's.)
    let foreign = "boot 00000000-0000-0000-0000-000000000000\n";
    std::fs::create_dir_all(dir.path().join("objects")).unwrap();
    std::fs::write(unsynced(dir.path()), foreign).unwrap();
    let a = upload(&engine, "a.bin", &bytes(1, 200_000)).await;
    assert_eq!(
        std::fs::read_to_string(unsynced(dir.path())).unwrap(),
        foreign
    );
    engine.settle_layout().await.unwrap();
    assert_eq!(
        std::fs::read_to_string(unsynced(dir.path())).unwrap(),
        foreign
    );
    drop(engine);
    let engine = open(dir.path()).await;
    assert!(!unsynced(dir.path()).exists());
    let shown = engine.layout_path(&a).unwrap();
    assert_eq!(std::fs::read(shown).unwrap(), bytes(1, 200_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_left_behind_stays_marked_behind_until_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    upload(&engine, "a.bin", &bytes(1, 10_000)).await;
    assert!(ProjectedCatalog::open(dir.path(), true).is_some());
    // A file where the layout needs a directory: the next update of the layout fails.
    let key = ArtifactKey::new("b.bin", Some("blocked"), Some("build")).unwrap();
    std::fs::write(dir.path().join("artifacts/blocked"), b"in the way").unwrap();
    let b = engine
        .upload(&key, std::io::Cursor::new(bytes(2, 10_000)), "alice")
        .await
        .expect("the version commits although its projection failed");
    assert!(engine.layout_path(&b).is_some_and(|p| !p.exists()));
    // Later changes that succeed do not mark the layout current again.
    let c = upload(&engine, "c.bin", &bytes(3, 10_000)).await;
    engine.count_download(&c, "alice").await.unwrap();
    assert!(
        ProjectedCatalog::open(dir.path(), true).is_none(),
        "metadata.db answered with a layout that is behind"
    );
    drop(engine);
    let engine = open(dir.path()).await;
    let shown = engine.layout_path(&b).unwrap();
    assert_eq!(std::fs::read(shown).unwrap(), bytes(2, 10_000));
    assert!(ProjectedCatalog::open(dir.path(), true).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_leaves_out_only_what_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let lost = upload(&engine, "a.bin", &bytes(1, 50_000)).await;
    let mut records = Vec::new();
    for (name, seed) in [("b.bin", 2), ("c.bin", 3), ("d.bin", 4)] {
        records.push((upload(&engine, name, &bytes(seed, 50_000)).await, seed));
    }
    // A chunk of a.bin lost before any verify marked it, then the layout lost whole.
    let manifest = engine.cas().manifest(lost.manifest).await.unwrap();
    engine
        .cas()
        .chunk_store()
        .delete_many(vec![manifest.chunks()[0].id])
        .await
        .unwrap();
    engine.settle_layout().await.unwrap();
    drop(engine);
    std::fs::remove_dir_all(dir.path().join("objects")).unwrap();

    let engine = open(dir.path()).await;
    for (record, seed) in &records {
        let shown = engine.layout_path(record).unwrap();
        assert_eq!(std::fs::read(shown).unwrap(), bytes(*seed, 50_000));
    }
    assert!(!engine.layout_path(&lost).unwrap().exists());
    assert!(
        ProjectedCatalog::open(dir.path(), true).is_none(),
        "a layout missing a version is not current"
    );
}
