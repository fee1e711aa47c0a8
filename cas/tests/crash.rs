//! A process killed in the middle of an ingest loses nothing committed, exposes nothing
//! partial, and leaves only garbage that GC reclaims.
//!
//! The test re-runs its own binary as the child that gets killed (SIGKILL, no clean-up at all).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use common::{random_bytes, read_all, small_chunks};
use sloth_cas::{Cas, ManifestId};

const CHILD_ENV: &str = "SLOTH_CAS_CRASH_CHILD";

/// A stream of fresh random bytes that never ends by itself: after 64 MiB it stalls (so a
/// child whose parent died cannot fill the disk) and gives up with an error after a minute.
struct Endless(u64);
impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0 >= 1000 + 1024 {
            std::thread::sleep(std::time::Duration::from_secs(60));
            return Err(std::io::Error::other("the parent never killed this child"));
        }
        let n = buf.len().min(64 * 1024);
        buf[..n].copy_from_slice(&random_bytes(self.0, n));
        self.0 += 1;
        Ok(n)
    }
}

/// The child: commits one small artifact, says so, then ingests forever until killed.
#[allow(clippy::unwrap_used)] // part of the test: any failure fails it
fn child(dir: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cas = Cas::open(dir, small_chunks()).unwrap();
        let id = cas
            .commit(cas.ingest_bytes(random_bytes(1, 100_000)).await.unwrap())
            .await
            .unwrap();
        println!("committed {id}");
        let result = cas.ingest_reader(Endless(1000)).await;
        panic!("the endless ingest only ends by SIGKILL, got {result:?}");
    });
}

/// Kills the child however the test ends.
struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn killed_mid_ingest_leaves_only_garbage() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        return child(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut proc = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "killed_mid_ingest_leaves_only_garbage",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(proc.0.stdout.take().unwrap()).lines();
    let id: ManifestId = loop {
        let line = lines.next().expect("child ended early").unwrap();
        // libtest prints its "test ... " prefix on the same line.
        if let Some((_, id)) = line.split_once("committed ") {
            break id.trim().parse().unwrap();
        }
    };
    // Let the endless ingest write several MiB of chunks, then kill it without warning.
    let packs = dir.path().join("packs");
    let pack_bytes = || -> u64 {
        std::fs::read_dir(&packs)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pack_bytes() < 8 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "child wrote too little"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    proc.0.kill().unwrap();
    proc.0.wait().unwrap();
    let garbage = pack_bytes();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cas = Cas::open(dir.path(), small_chunks()).unwrap();
        // The committed artifact survives bit-exact; the interrupted one never became visible.
        assert_eq!(read_all(&cas, id).await.unwrap(), random_bytes(1, 100_000));
        assert_eq!(cas.stats().await.unwrap().manifests, 1);
        assert!(cas.scrub().await.unwrap().is_clean());
        // GC gives the interrupted ingest's space back.
        let report = cas.gc().await.unwrap();
        let after = pack_bytes();
        eprintln!("packs {garbage} B after the kill, {after} B after GC ({report:?})");
        assert!(after < 200_000, "packs still hold {after} bytes");
        assert_eq!(read_all(&cas, id).await.unwrap(), random_bytes(1, 100_000));
        assert!(cas.scrub().await.unwrap().is_clean());
    });
}
