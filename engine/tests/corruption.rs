//! The corruption harness: bytes flipped inside stored chunks, a pack file truncated, chunks
//! deleted, a layout file overwritten, `metadata.db` deleted. Every download of an affected
//! artifact fails with a checksum error, every other one still returns its exact bytes, and
//! verify lists exactly the damaged versions; `--repair` marks them and restores the
//! projections.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use sloth_cas::{ChunkId, ChunkStore as _};
use sloth_engine::{ArtifactKey, ArtifactRecord, Engine, EngineConfig, Error};

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(len);
    data
}

/// Where a frame sits: (pack file, offset, length).
fn locate(packs: &[PathBuf], frame: &[u8]) -> (PathBuf, usize, usize) {
    for pack in packs {
        let bytes = std::fs::read(pack).unwrap();
        if let Some(at) = bytes.windows(frame.len()).position(|w| w == frame) {
            return (pack.clone(), at, frame.len());
        }
    }
    panic!("frame not found in any pack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_is_found_never_served_and_reported_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let engine = Engine::open(&data_dir, EngineConfig::default())
        .await
        .unwrap();
    // Eight artifacts; the first four share a 1 MiB prefix, so one bad chunk there hurts four.
    let shared = random(99, 1 << 20);
    let mut originals = Vec::new();
    for i in 0..8u64 {
        let mut content = if i < 4 { shared.clone() } else { Vec::new() };
        content.extend(random(i, 700_000));
        let key = ArtifactKey::new(&format!("a{i}.bin"), Some("s"), Some("t")).unwrap();
        let record = engine
            .upload(&key, std::io::Cursor::new(content.clone()), "tester")
            .await
            .unwrap();
        originals.push((record, content));
    }
    // Which chunks each artifact uses, and where each chunk's frame is.
    let packs: Vec<PathBuf> = {
        let mut p: Vec<PathBuf> = std::fs::read_dir(data_dir.join("store/packs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        p.sort();
        p
    };
    let mut chunks_of: Vec<Vec<ChunkId>> = Vec::new();
    let mut location: HashMap<ChunkId, (PathBuf, usize, usize)> = HashMap::new();
    for (record, _) in &originals {
        let manifest = engine.cas().manifest(record.manifest).await.unwrap();
        let ids: Vec<ChunkId> = manifest.chunks().iter().map(|c| c.id).collect();
        for id in &ids {
            if !location.contains_key(id) {
                let frame = engine.cas().chunk_store().get(*id).await.unwrap().unwrap();
                location.insert(*id, locate(&packs, &frame));
            }
        }
        chunks_of.push(ids);
    }
    let users = |id: &ChunkId| -> BTreeSet<usize> {
        (0..chunks_of.len())
            .filter(|&i| chunks_of[i].contains(id))
            .collect()
    };
    let only_in =
        |i: usize| -> ChunkId { *chunks_of[i].iter().find(|id| users(id).len() == 1).unwrap() };
    let mut hit: BTreeSet<ChunkId> = BTreeSet::new();

    // 1. A byte flipped in the middle of a shared chunk.
    let shared_chunk = chunks_of[0][0];
    assert_eq!(users(&shared_chunk).len(), 4);
    // 2. A chunk of a5 deleted from the store.
    let deleted = only_in(5);
    engine
        .cas()
        .chunk_store()
        .delete_many(vec![deleted])
        .await
        .unwrap();
    hit.insert(deleted);
    // 3. The pack holding a6's own chunk cut in the middle of that chunk.
    let cut_chunk = only_in(6);
    let layout_paths: Vec<PathBuf> = originals
        .iter()
        .map(|(r, _)| engine.layout_path(r).unwrap())
        .collect();
    drop(engine);

    let (pack, at, len) = location[&shared_chunk].clone();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[at + len / 2] ^= 0x5a;
    std::fs::write(&pack, bytes).unwrap();
    hit.insert(shared_chunk);

    let (cut_pack, cut_at, cut_len) = location[&cut_chunk].clone();
    let cut = cut_at + cut_len / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut_pack)
        .unwrap()
        .set_len(cut as u64)
        .unwrap();
    for (id, (pack, at, len)) in &location {
        if *pack == cut_pack && at + len > cut {
            hit.insert(*id);
        }
    }
    let expected: BTreeSet<usize> = (0..originals.len())
        .filter(|&i| chunks_of[i].iter().any(|id| hit.contains(id)))
        .collect();
    assert!(expected.contains(&0) && expected.contains(&5) && expected.contains(&6));
    assert!(
        expected.len() < originals.len(),
        "something must stay whole"
    );

    // 4. The projections: an undamaged artifact's layout file overwritten, metadata.db deleted.
    let victim = (0..originals.len())
        .find(|i| !expected.contains(i))
        .unwrap();
    let victim_layout = &layout_paths[victim];
    let mut perms = std::fs::metadata(victim_layout).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(victim_layout, perms).unwrap();
    std::fs::write(victim_layout, vec![0u8; originals[victim].1.len()]).unwrap();
    std::fs::remove_file(data_dir.join("metadata.db")).unwrap();

    let engine = Engine::open(&data_dir, EngineConfig::default())
        .await
        .unwrap();
    assert!(data_dir.join("metadata.db").exists(), "rebuilt on open");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    for (i, (record, content)) in originals.iter().enumerate() {
        let target = out.join(&record.name);
        match engine.download_to(record, &target, "tester").await {
            Ok(_) => {
                assert!(!expected.contains(&i), "a{i} downloaded despite damage");
                assert!(
                    &std::fs::read(&target).unwrap() == content,
                    "a{i} wrong bytes"
                );
            }
            Err(e) => {
                assert!(expected.contains(&i), "a{i} failed: {e}");
                assert!(matches!(e, Error::Damaged { .. }), "a{i}: {e}");
                assert!(!target.exists(), "a failed download leaves no file");
            }
        }
    }

    let report = engine.verify(None, false, "tester").await.unwrap();
    let damaged: BTreeSet<usize> = report
        .damaged
        .iter()
        .map(|(r, _)| index_of(&originals, r))
        .collect();
    assert_eq!(damaged, expected);
    let bad: BTreeSet<String> = report.bad_chunks.iter().map(|b| b.chunk.clone()).collect();
    assert_eq!(bad, hit.iter().map(ChunkId::to_hex).collect());
    assert_eq!(
        report.projection_problems.len(),
        1,
        "{:?}",
        report.projection_problems
    );
    assert!(report.projection_problems[0].contains(&format!("a{victim}.bin")));

    let repaired = engine.verify(None, true, "tester").await.unwrap();
    assert_eq!(repaired.newly_marked, expected.len());
    assert!(repaired.projections_rebuilt);
    assert!(
        std::fs::read(victim_layout).unwrap() == originals[victim].1,
        "layout restored"
    );
    let after = engine.verify(None, false, "tester").await.unwrap();
    assert!(
        after.projection_problems.is_empty(),
        "{:?}",
        after.projection_problems
    );
    assert_eq!(after.damaged.len(), expected.len());
    for &i in &expected {
        let record = engine
            .versions(&originals[i].0.key().unwrap())
            .unwrap()
            .pop()
            .unwrap();
        assert!(record.damaged.is_some());
        assert!(engine.layout_path(&record).is_some_and(|p| !p.exists()));
        let err = engine
            .download_to(&record, &out.join("x"), "tester")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::MarkedDamaged { .. }), "{err}");
    }
    // Uploading a lost artifact again brings its old version back whole.
    let (record5, content5) = &originals[5];
    engine
        .upload(
            &record5.key().unwrap(),
            std::io::Cursor::new(content5.clone()),
            "tester",
        )
        .await
        .unwrap();
    let healed = engine.verify(Some("s"), true, "tester").await.unwrap();
    assert_eq!(healed.healed.len(), 1);
    let v1 = engine.versions(&record5.key().unwrap()).unwrap()[0].clone();
    assert!(v1.damaged.is_none());
    let target = out.join("a5-v1");
    engine.download_to(&v1, &target, "tester").await.unwrap();
    assert!(
        &std::fs::read(target).unwrap() == content5,
        "a5 v1 restored"
    );
}

fn index_of(originals: &[(ArtifactRecord, Vec<u8>)], r: &ArtifactRecord) -> usize {
    originals.iter().position(|(o, _)| o.id == r.id).unwrap()
}

/// A time-index entry whose record is gone (and stays gone) is damage, and `list` says so.
#[tokio::test]
async fn a_dangling_time_index_entry_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = || EngineConfig {
        layout: false,
        ..EngineConfig::default()
    };
    let key = ArtifactKey::new("app.bin", Some("prod"), Some("build")).unwrap();
    {
        let engine = Engine::open(dir.path(), config()).await.unwrap();
        engine
            .upload(&key, std::io::Cursor::new(random(1, 1000)), "t")
            .await
            .unwrap();
    }
    {
        let db = sled::open(dir.path().join("store/index")).unwrap();
        let records = db.open_tree("artifacts").unwrap();
        let (record_key, _) = records.first().unwrap().unwrap();
        records.remove(record_key).unwrap();
        db.flush().unwrap();
    }
    let engine = Engine::open(dir.path(), config()).await.unwrap();
    let err = engine
        .list(&sloth_engine::ListQuery::default())
        .unwrap_err();
    assert!(matches!(err, Error::CorruptRecord(_)), "{err}");
    assert!(err.to_string().contains("time index"), "{err}");
}
