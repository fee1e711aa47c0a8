//! Upload and download over loopback against the same operations on the embedded store, in one
//! run: an agent served in this process on 127.0.0.1:0, a client talking gRPC to it.
//!
//! ```text
//! cargo run --release -p sloth-benches --bin network -- [--size-mib N] [--file PATH] [--work DIR] [--remote-upload-only]
//! ```
//!
//! `--remote-upload-only` runs just the first remote upload (for profiling it with `perf`).
//!
//! Prints MB/s for: local upload (ingest with the layout copy), local download (verified, to a
//! file, fsynced); remote first upload, remote re-upload of identical content, remote download;
//! and the ratios the agent issue sets targets for (remote ≥ 70% of local; re-upload ≥ 3× the
//! first upload). Each store is fresh, so every first upload stores everything.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sloth_benches::InProcessAgent;
use sloth_engine::{ArtifactKey, Engine, EngineConfig, Selector};

/// CPU time this process has used (user + system), from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the file, 12 and 13 after the ')'; 100 Hz.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Times `f`, printing its wall-clock and CPU time.
struct Phase {
    wall: Instant,
    cpu: Duration,
}

impl Phase {
    /// Starts timing after writing back what earlier phases left dirty in the page cache, so
    /// that no phase pays for another's disk writes.
    fn start() -> Self {
        let _ = std::process::Command::new("sync").status();
        std::thread::sleep(Duration::from_millis(500));
        Self {
            wall: Instant::now(),
            cpu: cpu_time(),
        }
    }

    /// (wall, cores busy on average)
    fn end(self) -> (Duration, f64) {
        let wall = self.wall.elapsed();
        let cpu = cpu_time().saturating_sub(self.cpu);
        (wall, cpu.as_secs_f64() / wall.as_secs_f64())
    }
}

fn mbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// Deterministic incompressible bytes (the shape of a release binary that is already packed).
fn write_random(path: &Path, len: u64) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut left = len;
    while left > 0 {
        buf.clear();
        while buf.len() < (1 << 20) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            buf.extend_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut size_mib = 1024u64;
    let mut file: Option<PathBuf> = None;
    let mut work = std::env::temp_dir().join("sloth-network");
    let mut remote_upload_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--size-mib" => size_mib = value()?.parse()?,
            "--file" => file = Some(value()?.into()),
            "--work" => work = value()?.into(),
            "--remote-upload-only" => remote_upload_only = true,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    std::fs::create_dir_all(&work)?;
    let input = match file {
        Some(path) => path,
        None => {
            let path = work.join(format!("random-{size_mib}m.bin"));
            if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(size_mib << 20) {
                write_random(&path, size_mib << 20)?;
            }
            path
        }
    };
    let len = std::fs::metadata(&input)?.len();
    println!("input: {} ({len} bytes)", input.display());
    let key = ArtifactKey::new("bench.bin", Some("bench"), Some("network"))?;
    let out_dir = tempfile::tempdir_in(&work)?;

    if remote_upload_only {
        return remote_upload(&input, &work, &key).await;
    }
    // Local: the embedded store, as `sloth-runner agent artifacts upload local` uses it.
    let local_dir = tempfile::tempdir_in(&work)?;
    let local = Engine::open(local_dir.path(), EngineConfig::default()).await?;
    let phase = Phase::start();
    let record = local.upload_path(&key, &input, "bench").await?;
    let (local_up, local_up_cores) = phase.end();
    let phase = Phase::start();
    local
        .download_to(&record, &out_dir.path().join("local.bin"), "bench")
        .await?;
    let (local_down, local_down_cores) = phase.end();
    drop(local);

    // Remote: an agent on loopback with its own fresh store.
    let agent_dir = tempfile::tempdir_in(&work)?;
    let agent = InProcessAgent::start(agent_dir.path(), "bench-agent").await?;
    let remote = agent.connect().await?;
    let phase = Phase::start();
    let first = remote
        .upload(&key, std::fs::File::open(&input)?, None)
        .await?;
    let (remote_up, remote_up_cores) = phase.end();
    let phase = Phase::start();
    let again = remote
        .upload(&key, std::fs::File::open(&input)?, None)
        .await?;
    let (remote_reup, remote_reup_cores) = phase.end();
    let phase = Phase::start();
    let down = remote
        .download(
            &Selector {
                name: key.name.to_string(),
                stack: Some(key.stack.to_string()),
                task: Some(key.task.to_string()),
                version: None,
            },
            &out_dir.path().join("remote.bin"),
            None,
        )
        .await?;
    let (remote_down, remote_down_cores) = phase.end();
    agent.stop().await?;

    println!(
        "local  upload      {:8.1} MB/s  ({:.2} s, {:.2} cores)",
        mbps(len, local_up),
        local_up.as_secs_f64(),
        local_up_cores
    );
    println!(
        "local  download    {:8.1} MB/s  ({:.2} s, {:.2} cores)",
        mbps(len, local_down),
        local_down.as_secs_f64(),
        local_down_cores
    );
    println!(
        "remote upload      {:8.1} MB/s  ({:.2} s, {:.2} cores, {} of {} chunks sent, {} frame bytes)",
        mbps(len, remote_up),
        remote_up.as_secs_f64(),
        remote_up_cores,
        first.chunks_sent,
        first.chunks,
        first.bytes_sent
    );
    println!(
        "remote re-upload   {:8.1} MB/s  ({:.2} s, {:.2} cores, {} of {} chunks sent, {} frame bytes)",
        mbps(len, remote_reup),
        remote_reup.as_secs_f64(),
        remote_reup_cores,
        again.chunks_sent,
        again.chunks,
        again.bytes_sent
    );
    println!(
        "remote download    {:8.1} MB/s  ({:.2} s, {:.2} cores, {} frame bytes)",
        mbps(len, remote_down),
        remote_down.as_secs_f64(),
        remote_down_cores,
        down.bytes_received
    );
    let up_ratio = local_up.as_secs_f64() / remote_up.as_secs_f64();
    let down_ratio = local_down.as_secs_f64() / remote_down.as_secs_f64();
    let reup_ratio = remote_up.as_secs_f64() / remote_reup.as_secs_f64();
    let mark = |ok: bool| if ok { "✔" } else { "✘" };
    println!(
        "remote upload / local upload        {:5.2}  (target ≥ 0.70) {}",
        up_ratio,
        mark(up_ratio >= 0.7)
    );
    println!(
        "remote download / local download    {:5.2}  (target ≥ 0.70) {}",
        down_ratio,
        mark(down_ratio >= 0.7)
    );
    println!(
        "re-upload / first upload            {:5.2}× (target ≥ 3)    {}",
        reup_ratio,
        mark(reup_ratio >= 3.0)
    );
    Ok(())
}

async fn remote_upload(input: &Path, work: &Path, key: &ArtifactKey) -> Result<()> {
    let agent_dir = tempfile::tempdir_in(work)?;
    let agent = InProcessAgent::start(agent_dir.path(), "bench-agent").await?;
    let remote = agent.connect().await?;
    let phase = Phase::start();
    remote
        .upload(key, std::fs::File::open(input)?, None)
        .await?;
    let (took, cores) = phase.end();
    println!(
        "remote upload {:.2} s, {cores:.2} cores",
        took.as_secs_f64()
    );
    agent.stop().await?;
    Ok(())
}
