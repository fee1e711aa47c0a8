//! The load harness: N clients uploading, downloading, listing and deleting against one agent
//! on loopback for a fixed time, while a retention cleanup (with its GC) runs every second on
//! a stack of its own. Reports operations per second, p50/p99 latency per operation and every
//! error (there must be none), then checks that every surviving artifact reads back exactly.
//!
//! ```text
//! cargo run --release -p sloth-benches --bin load -- [--clients 32] [--seconds 20] [--work DIR]
//! ```
//!
//! Contents are generated from a seed (so they need not be kept in memory) and half of each
//! is drawn from a few shared blocks, so uploads deduplicate against each other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use sloth_agent::client::{Link, PolicySource, Remote};
use sloth_benches::InProcessAgent;
use sloth_engine::{ArtifactKey, ListQuery, Selector};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The content of artifact `seed`: a shared block (one of 8) followed by bytes of its own.
fn content(seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let own = 16_384 + (rng.next() % 500_000) as usize;
    let mut shared = Rng((seed % 8 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
    let mut data = Vec::with_capacity(own + 262_144 + 8);
    while data.len() < 262_144 {
        data.extend_from_slice(&shared.next().to_le_bytes());
    }
    while data.len() < 262_144 + own {
        data.extend_from_slice(&rng.next().to_le_bytes());
    }
    data
}

#[derive(Default)]
struct Stats {
    latencies: BTreeMap<&'static str, Vec<Duration>>,
    errors: Vec<String>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn client(
    id: usize,
    link: Link,
    work: PathBuf,
    until: Instant,
    stats: Arc<Mutex<Stats>>,
) -> Result<BTreeMap<String, u64>> {
    let remote = Remote::connect(&link.addr, &link).await?;
    let mut rng = Rng((id as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    // name -> seed of its newest version
    let mut mine: BTreeMap<String, u64> = BTreeMap::new();
    let mut counter = 0u64;
    let stack = format!("client-{id}");
    while Instant::now() < until {
        let roll = rng.next() % 100;
        let started = Instant::now();
        let (op, result): (&'static str, Result<()>) = if roll < 35 || mine.is_empty() {
            counter += 1;
            let name = format!("a{}.bin", counter % 12);
            let seed = (id as u64) << 32 | counter;
            let key = ArtifactKey::new(&name, Some(&stack), Some("load"))?;
            let r = remote
                .upload(&key, std::io::Cursor::new(content(seed)), None)
                .await
                .map(|_| {
                    mine.insert(name, seed);
                });
            ("upload", r.map_err(Into::into))
        } else if roll < 70 {
            let (name, seed) = pick(&mine, &mut rng);
            let target = work.join(format!("c{id}-{name}"));
            let r = async {
                remote
                    .download(&selector(&name, &stack), &target, None)
                    .await?;
                if std::fs::read(&target)? != content(seed) {
                    bail!("{stack}/{name}: downloaded bytes differ");
                }
                Ok(())
            }
            .await;
            ("download", r)
        } else if roll < 90 {
            let query = ListQuery {
                stack: Some(stack.clone()),
                limit: Some(50),
                ..ListQuery::default()
            };
            (
                "list",
                remote.list(&query).await.map(|_| ()).map_err(Into::into),
            )
        } else {
            let (name, _) = pick(&mine, &mut rng);
            let r = remote.delete(&selector(&name, &stack)).await.map(|_| {
                mine.remove(&name);
            });
            ("delete", r.map_err(Into::into))
        };
        let took = started.elapsed();
        let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.latencies.entry(op).or_default().push(took);
        if let Err(e) = result {
            stats.errors.push(format!("client {id} {op}: {e:#}"));
        }
    }
    Ok(mine)
}

fn pick(mine: &BTreeMap<String, u64>, rng: &mut Rng) -> (String, u64) {
    let i = (rng.next() % mine.len() as u64) as usize;
    let (name, seed) = mine.iter().nth(i).expect("not empty");
    (name.clone(), *seed)
}

fn selector(name: &str, stack: &str) -> Selector {
    Selector {
        name: name.to_owned(),
        stack: Some(stack.to_owned()),
        task: Some("load".to_owned()),
        version: None,
    }
}

/// Uploads to a stack of its own and runs the built-in keep-last policy on it every second:
/// cleanup deletes versions and collects their chunks while the clients work.
async fn janitor(link: Link, until: Instant, stats: Arc<Mutex<Stats>>) -> Result<u64> {
    let remote = Remote::connect(&link.addr, &link).await?;
    let mut runs = 0;
    let mut seed = 1u64 << 60;
    while Instant::now() < until {
        for _ in 0..3 {
            seed += 1;
            let key = ArtifactKey::new("scratch.bin", Some("janitor"), Some("gc"))?;
            if let Err(e) = remote
                .upload(&key, std::io::Cursor::new(content(seed)), None)
                .await
            {
                stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .errors
                    .push(format!("janitor upload: {e:#}"));
            }
        }
        let started = Instant::now();
        let result = remote
            .cleanup(
                PolicySource::Builtin("keep-last".into()),
                [("count".to_owned(), "1".to_owned())].into(),
                Some("janitor".into()),
                false,
            )
            .await;
        {
            let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
            stats
                .latencies
                .entry("cleanup")
                .or_default()
                .push(started.elapsed());
            match result {
                Ok(_) => runs += 1,
                Err(e) => stats.errors.push(format!("cleanup: {e:#}")),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(runs)
}

/// Many clients against one agent with cleanup running.
#[derive(Debug, Parser)]
struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    clients: u64,
    /// How long the clients run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Where the agent's data and the downloads go (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (clients, seconds) = (args.clients as usize, args.seconds);
    let scratch = tempfile::tempdir()?;
    let work = args.work.unwrap_or_else(|| scratch.path().to_path_buf());
    std::fs::create_dir_all(work.join("downloads"))?;

    let agent = InProcessAgent::start(&work.join("agent"), "load-agent").await?;
    let link = agent.link.clone();
    let addr = link.addr.clone();
    println!("load: {clients} clients for {seconds} s against an agent on {addr}");
    let stats = Arc::new(Mutex::new(Stats::default()));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let downloads = work.join("downloads");
    let tasks: Vec<_> = (0..clients)
        .map(|id| {
            tokio::spawn(client(
                id,
                link.clone(),
                downloads.clone(),
                until,
                Arc::clone(&stats),
            ))
        })
        .collect();
    let janitor = tokio::spawn(janitor(link.clone(), until, Arc::clone(&stats)));
    let mut survivors = Vec::new();
    for (id, task) in tasks.into_iter().enumerate() {
        survivors.push((id, task.await??));
    }
    let cleanups = janitor.await??;
    let elapsed = started.elapsed();

    // Every surviving artifact reads back exactly.
    let checker = agent.connect().await?;
    let mut checked = 0;
    let mut bad = Vec::new();
    for (id, mine) in &survivors {
        for (name, seed) in mine {
            let target = downloads.join(format!("final-{id}-{name}"));
            let stack = format!("client-{id}");
            let ok = match checker
                .download(&selector(name, &stack), &target, None)
                .await
            {
                Ok(_) => std::fs::read(&target).context("read back")? == content(*seed),
                Err(_) => false,
            };
            checked += 1;
            if !ok {
                bad.push(format!("{stack}/{name}"));
            }
            let _ = std::fs::remove_file(&target);
        }
    }
    agent.stop().await?;

    let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
    let total: usize = stats.latencies.values().map(Vec::len).sum();
    println!(
        "load: {total} operations in {:.1} s = {:.0} ops/s; {cleanups} cleanup runs",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "{:<10} {:>8} {:>9} {:>10} {:>10}",
        "operation", "count", "ops/s", "p50 ms", "p99 ms"
    );
    for (op, latencies) in &stats.latencies {
        let mut sorted = latencies.clone();
        sorted.sort();
        println!(
            "{op:<10} {:>8} {:>9.1} {:>10.1} {:>10.1}",
            sorted.len(),
            sorted.len() as f64 / elapsed.as_secs_f64(),
            percentile(&sorted, 0.5).as_secs_f64() * 1000.0,
            percentile(&sorted, 0.99).as_secs_f64() * 1000.0
        );
    }
    println!(
        "load: {} errors; final check: {checked} surviving artifacts, {} wrong or missing",
        stats.errors.len(),
        bad.len()
    );
    for e in stats.errors.iter().take(10) {
        println!("  error: {e}");
    }
    if !stats.errors.is_empty() || !bad.is_empty() {
        bail!(
            "the load run had {} errors and {} bad survivors ({bad:?})",
            stats.errors.len(),
            bad.len()
        );
    }
    Ok(())
}
