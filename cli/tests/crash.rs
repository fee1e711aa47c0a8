//! The crash harness: an agent killed with SIGKILL at random moments while clients upload to
//! it, round after round. Afterwards every upload whose commit was acknowledged reads back
//! bit-exact, every visible version is complete, verify finds nothing, and GC reclaims every
//! chunk the cut-off uploads left behind.
//!
//! `SLOTH_CRASH_ROUNDS` (default 20) and `SLOTH_CRASH_SEED` (default: the time) tune it; the
//! seed is printed so that a failing run can be repeated.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use sloth_engine::{Engine, EngineConfig, ListQuery, ProjectedCatalog};

mod common;

use common::sloth;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// The child is handed to the caller, which kills and waits for it.
#[allow(clippy::zombie_processes)]
fn start_agent(data: &Path, log: &Path) -> (Child, String) {
    let mut child = sloth()
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["agent", "start", "--name", "crashy", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            let _ = child.wait();
            panic!("agent exited: {}", std::fs::read_to_string(log).unwrap());
        }
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr = rest.split([' ', '\n']).next().unwrap().to_owned();
            std::thread::spawn(move || {
                let _ = stdout.read_to_end(&mut Vec::new());
            });
            return (child, addr);
        }
    }
}

#[test]
fn killed_agents_lose_nothing_acknowledged_and_show_nothing_partial() {
    let rounds: u32 = std::env::var("SLOTH_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("SLOTH_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("crash harness: {rounds} rounds, seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agent-data");
    let log = dir.path().join("agent.log");
    // Sources: each upload is a distinct file; some share a prefix, so rounds dedup.
    let shared: Vec<u8> = (0..600_000).map(|_| rng.next() as u8).collect();
    let mut sources: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    let mut attempted = 0;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let all = ListQuery {
        all_versions: true,
        ..ListQuery::default()
    };
    // Rounds after which metadata.db answered for the catalog, and refused to.
    let (mut answered, mut refused) = (0, 0);

    for round in 0..rounds {
        let (mut agent, addr) = start_agent(&data, &log);
        let mut clients = Vec::new();
        for k in 0..4 {
            let name = format!("r{round:02}-{k}.bin");
            let path = dir.path().join(&name);
            let len = 200_000 + rng.below(16_000_000) as usize;
            let mut content = if k % 2 == 0 {
                shared.clone()
            } else {
                Vec::new()
            };
            content.extend((0..len).map(|_| rng.next() as u8));
            std::fs::write(&path, &content).unwrap();
            sources.insert(name.clone(), path.clone());
            attempted += 1;
            let addr = addr.clone();
            clients.push(std::thread::spawn(move || {
                let out = sloth()
                    .args(["agent", "artifacts", "upload", &addr])
                    .arg(&path)
                    .args(["--stack", "crash"])
                    .output()
                    .unwrap();
                (name, out.status.success())
            }));
        }
        // Clients need ~50 ms to start and a few hundred to upload: kills land before, during
        // and after commits.
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        agent.kill().unwrap();
        agent.wait().unwrap();
        for client in clients {
            let (name, ok) = client.join().unwrap();
            if ok {
                acknowledged.insert(name);
            }
        }
        // metadata.db answers `list` and `show` only when it provably holds the whole
        // catalog: whatever the kill interrupted, an answer it gives is the recovered one's.
        let projected = ProjectedCatalog::open(&data, true).map(|p| p.list(&all).unwrap());
        let recovered = runtime.block_on(async {
            let engine = Engine::open(&data, EngineConfig::default()).await.unwrap();
            engine.settle_layout().await.unwrap();
            engine.list(&all).unwrap()
        });
        // The layout objects the killed agent had left unsynced are synced and unlisted.
        for list in [".unsynced", ".unsynced.settling"] {
            assert!(!data.join("objects").join(list).exists(), "round {round}");
        }
        match projected {
            Some(projected) => {
                answered += 1;
                assert_eq!(projected, recovered, "round {round} (seed {seed})");
            }
            None => refused += 1,
        }
    }

    // Every acknowledged upload, and every version visible at all, reads back exactly.
    let (mut agent, addr) = start_agent(&data, &log);
    let listed = sloth()
        .args([
            "agent",
            "artifacts",
            "list",
            &addr,
            "--stack",
            "crash",
            "--limit",
            "100000",
        ])
        .args(["--output", "json"])
        .output()
        .unwrap();
    assert!(listed.status.success());
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    // `local` on the same data directory lists the same, from metadata.db, while the agent
    // holds the store (opening the store would wait for the agent's lock).
    let local = sloth()
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["agent", "artifacts", "list", "local", "--stack", "crash"])
        .args(["--limit", "100000", "--output", "json"])
        .output()
        .unwrap();
    assert!(
        local.status.success(),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    let mut local: Vec<serde_json::Value> = serde_json::from_slice(&local.stdout).unwrap();
    for artifact in &mut local {
        artifact["agent"] = addr.clone().into();
    }
    let differs = local.iter().zip(&listed).find(|(l, r)| l != r);
    assert!(
        local.len() == listed.len() && differs.is_none(),
        "local lists {} versions, the agent {}; first difference: {differs:?}",
        local.len(),
        listed.len()
    );
    let visible: BTreeSet<String> = listed
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect();
    let lost: Vec<&String> = acknowledged.difference(&visible).collect();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut wrong = Vec::new();
    for name in &visible {
        let target = out.join(name);
        let got = sloth()
            .args([
                "agent",
                "artifacts",
                "download",
                &addr,
                name,
                "--stack",
                "crash",
                "-o",
            ])
            .arg(&target)
            .output()
            .unwrap();
        if !got.status.success()
            || std::fs::read(&target).unwrap() != std::fs::read(&sources[name]).unwrap()
        {
            wrong.push(name.clone());
        }
    }
    let verify = sloth()
        .args(["agent", "artifacts", "verify", &addr])
        .output()
        .unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    agent.wait().unwrap();
    println!(
        "crash harness: {rounds} rounds, {attempted} uploads, {} acknowledged, {} visible, {} lost, {} wrong; \
         metadata.db answered after {answered} kills and refused after {refused}",
        acknowledged.len(),
        visible.len(),
        lost.len(),
        wrong.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged but lost: {lost:?} (seed {seed})"
    );
    assert!(
        wrong.is_empty(),
        "visible but not intact: {wrong:?} (seed {seed})"
    );
    assert!(
        verify.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        !acknowledged.is_empty(),
        "no upload ever finished: the harness tested nothing"
    );

    // GC reclaims every chunk no version uses.
    runtime.block_on(async {
        let engine = Engine::open(&data, EngineConfig::default()).await.unwrap();
        let before = engine.cas().stats().await.unwrap();
        let gc = engine.cas().gc().await.unwrap();
        let after = engine.cas().stats().await.unwrap();
        let mut used = BTreeSet::new();
        for record in engine
            .list(&ListQuery {
                all_versions: true,
                ..ListQuery::default()
            })
            .unwrap()
        {
            let manifest = engine.cas().manifest(record.manifest).await.unwrap();
            used.extend(manifest.chunks().iter().map(|c| c.id));
        }
        println!(
            "crash harness: GC removed {} orphan chunks ({} bytes); {} chunks before, {} after, {} used",
            gc.chunks_deleted, gc.bytes_freed, before.chunks, after.chunks, used.len()
        );
        let pack_bytes: u64 = std::fs::read_dir(data.join("store/packs"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        println!(
            "crash harness: after GC, pack files hold {pack_bytes} bytes for {} bytes of live frames",
            after.stored_bytes
        );
        assert_eq!(after.chunks, used.len() as u64, "orphans left after GC");
    });
}
