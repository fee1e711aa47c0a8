//! Shared helpers for sloth-runner's benchmarks: input generation and measurement.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Bytes on disk of a directory, as `du -sb` reports them (apparent sizes, every file).
pub fn du_sb(dir: &Path) -> Result<u64> {
    let out = Command::new("du")
        .arg("-sb")
        .arg(dir)
        .output()
        .context("running du -sb")?;
    if !out.status.success() {
        bail!(
            "du -sb {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected du output {text:?}"))
}

/// CPU time (user + system) of this process and, separately, of its children that have been
/// waited for, from `/proc/self/stat` (in 10 ms ticks).
pub fn cpu_times() -> (Duration, Duration) {
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
    // utime, stime, cutime, cstime are fields 14-17 of the file, 11-14 after the ')'; 100 Hz.
    (
        Duration::from_millis((ticks(11) + ticks(12)) * 10),
        Duration::from_millis((ticks(13) + ticks(14)) * 10),
    )
}

/// The machine's memory at this moment, from `/proc/meminfo`: free, held by the page cache,
/// and total. On this VM a write into the page cache costs about twice the CPU (and a copy
/// into it up to five times) when the cache has filled memory and each new page must first be
/// reclaimed, so a figure means little without this beside it (see `docs/benchmarks.md`).
pub fn memory_condition() -> String {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let gib = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(f64::NAN, |kib| kib as f64 / (1u64 << 20) as f64)
    };
    format!(
        "memory: {:.1} GiB free, {:.1} GiB page cache, of {:.1} GiB",
        gib("MemFree"),
        gib("Cached"),
        gib("MemTotal")
    )
}

/// The median of `values` (the mean of the middle two for an even count; NaN for none).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Megabytes (10^6 bytes) per second.
pub fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9)
}

/// Writes `len` bytes of deterministic pseudo-random data to `path`, streaming.
pub fn write_random_file(path: &Path, len: u64, seed: u64) -> Result<()> {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use std::io::Write;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        rng.fill(&mut block[..n]);
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(())
}

/// Builds the compressible benchmark input: an uncompressed tar of the system's documentation
/// and Python library folders (those that exist), written to `path` if it is not there yet.
pub fn ensure_text_tar(path: &Path) -> Result<u64> {
    if !path.exists() {
        let candidates = ["/usr/share/doc", "/usr/lib/python3", "/usr/lib/python3.11"];
        let dirs: Vec<&str> = candidates
            .into_iter()
            .filter(|d| Path::new(d).is_dir())
            .collect();
        if dirs.is_empty() {
            bail!("none of {candidates:?} exist; pass --text FILE");
        }
        let status = Command::new("tar")
            .args([
                "--sort=name",
                "--mtime=@0",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
            ])
            .arg("-cf")
            .arg(path)
            .args(&dirs)
            .stderr(std::process::Stdio::null())
            .status()
            .context("running tar")?;
        // tar exits 1 when files changed while reading; the archive is still usable.
        if !matches!(status.code(), Some(0 | 1)) {
            bail!("tar of {dirs:?} failed: {status}");
        }
    }
    Ok(std::fs::metadata(path)?.len())
}

/// Reads a file once so that later timed reads come from the page cache, as they do for the
/// baseline.
pub fn warm(path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// An agent on `127.0.0.1:0` serving a store in a directory, run inside the benchmark's own
/// process (as `sloth-runner agent start` would run it), for the benchmarks that measure the
/// network path.
#[derive(Debug)]
pub struct InProcessAgent {
    /// How a client reaches it.
    pub link: sloth_agent::client::Link,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<sloth_agent::Result<()>>,
}

impl InProcessAgent {
    /// Opens (or creates) the store in `dir` and starts serving it as agent `name`.
    pub async fn start(dir: &Path, name: &str) -> Result<Self> {
        use sloth_agent::server::{AgentConfig, Bound};
        let engine = sloth_engine::Engine::open(
            dir,
            sloth_engine::EngineConfig {
                agent: name.into(),
                ..sloth_engine::EngineConfig::default()
            },
        )
        .await?;
        let bound = Bound::bind("127.0.0.1:0".parse()?).await?;
        let config = AgentConfig::new(name, bound.local_addr());
        let link = sloth_agent::client::Link {
            addr: bound.local_addr().to_string(),
            ..sloth_agent::client::Link::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(sloth_agent::server::serve(
            engine,
            config,
            bound,
            None,
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Self { link, stop, server })
    }

    /// A new client connection to it.
    pub async fn connect(&self) -> Result<sloth_agent::client::Remote> {
        Ok(sloth_agent::client::Remote::connect(&self.link.addr, &self.link).await?)
    }

    /// Shuts it down and waits until it has stopped.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.server.await??;
        Ok(())
    }
}
