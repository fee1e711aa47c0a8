//! The layout's objects are named before their bytes are synced (the store holds the content
//! durably); `objects/.unsynced` lists them until they are, and an open after a restart writes
//! them again from the store (see `engine/src/layout.rs`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

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
    let inode = std::fs::metadata(engine.layout_path(&c).unwrap())
        .unwrap()
        .ino();
    drop(engine);
    let engine = open(dir.path()).await;
    assert!(!unsynced(dir.path()).exists());
    let shown = engine.layout_path(&c).unwrap();
    assert_eq!(std::fs::metadata(&shown).unwrap().ino(), inode);
    assert_eq!(std::fs::read(&shown).unwrap(), bytes(3, 300_000));
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
    let kept_inode = std::fs::metadata(&kept_path).unwrap().ino();
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
    // Objects synced before the restart are not written again.
    assert_eq!(std::fs::metadata(&kept_path).unwrap().ino(), kept_inode);
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
    let inode = std::fs::metadata(engine.layout_path(&a).unwrap())
        .unwrap()
        .ino();
    drop(engine);
    // A crash while the list's first append was being written: no object was named after it.
    std::fs::write(unsynced(dir.path()), "boo").unwrap();
    assert!(ProjectedCatalog::open(dir.path(), true).is_none());
    let engine = open(dir.path()).await;
    assert!(!unsynced(dir.path()).exists());
    let shown = engine.layout_path(&a).unwrap();
    assert_eq!(std::fs::metadata(&shown).unwrap().ino(), inode);
    assert_eq!(std::fs::read(&shown).unwrap(), bytes(1, 100_000));
}
