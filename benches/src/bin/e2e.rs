//! End-to-end ingest/read benchmark of the chunk store, with `zstd -3 -T1` as the same run's
//! baseline. Prints MB/s and stored bytes; see docs/benchmarks.md.
//!
//! ```text
//! cargo run --release -p sloth-benches --bin e2e -- [--quick] [--rounds N] [--random-mib N]
//!     [--text FILE] [--avg BYTES] [--work DIR] [--only-file FILE]
//! ```
//! The compressible file goes through `--rounds` rounds (default 5). Each round times zstd
//! just before and just after the store's runs and measures them against the mean of the
//! two, so every ratio compares the same minute of this shared machine, where the same zstd
//! run takes anywhere from 0.8 to 2 s. The summary gives the median of each round's ratios,
//! and also the ratios against the fastest zstd run of all (the most conservative reading).
//! Each round also times the work a first ingest cannot skip ([`Required`]), alone and two
//! copies at once, so the summary can say how far that work lets a first ingest go.
//!
//! `--only-file FILE` ingests and reads back just that file (for `time -v` peak-RSS runs).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use sloth_benches::{cpu_times, du_sb, ensure_text_tar, mb_per_s, median, warm, write_random_file};
use sloth_cas::{Cas, CasConfig, ChunkId, ChunkerParams, ContentHasher, frame};

/// End-to-end ingest/read benchmark of the chunk store against `zstd -3 -T1`.
#[derive(Debug, Parser)]
struct Args {
    /// A short run: at most 64 MiB of random data and a cut of the tar.
    #[arg(long)]
    quick: bool,
    /// Rounds of zstd, the store's three ingests, zstd.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// MiB of random data for the incompressible case.
    #[arg(long, default_value_t = 1024)]
    random_mib: u64,
    /// The compressible file (default: a tar of the system's docs and Python library, made
    /// once in --work).
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// Average chunk size in bytes (default: the store's).
    #[arg(long, value_name = "BYTES")]
    avg: Option<u32>,
    /// Where inputs and stores go.
    #[arg(long, value_name = "DIR", default_value_os_t = std::env::temp_dir().join("sloth-e2e"))]
    work: PathBuf,
    /// Ingest and read back just this file (for `time -v` peak-RSS runs).
    #[arg(long, value_name = "FILE")]
    only_file: Option<PathBuf>,
}

struct Run {
    ingest: Duration,
    /// CPU time the process spent during the ingest, on all its threads.
    ingest_cpu: Duration,
    read: Duration,
    bytes: u64,
    stored_growth: u64,
    new_chunks: u64,
    chunks: u64,
}

fn config(avg: Option<u32>) -> Result<CasConfig> {
    Ok(CasConfig {
        chunker: avg.map(ChunkerParams::new).transpose()?,
        ..CasConfig::default()
    })
}

/// Ingests `file` into `cas`, then reads it back with full verification. `store` is the
/// store's directory: its growth is measured after a flush, with the store still open, as a
/// running agent keeps it.
async fn ingest_and_read(cas: &Cas, store: &Path, file: &Path) -> Result<Run> {
    cas.flush().await?;
    let before = du_sb(store)?;
    let bytes = std::fs::metadata(file)?.len();
    let (start, cpu) = (Instant::now(), cpu_times().0);
    let staged = cas.ingest_reader(std::fs::File::open(file)?).await?;
    let stats = staged.stats();
    let id = cas.commit(staged).await?;
    let ingest = start.elapsed();
    let ingest_cpu = cpu_times().0.saturating_sub(cpu);

    let start = Instant::now();
    let read_bytes = cas.read_to(id, &mut tokio::io::sink()).await?;
    let read = start.elapsed();
    if read_bytes != bytes {
        bail!("read back {read_bytes} bytes of {bytes}");
    }
    cas.flush().await?;
    Ok(Run {
        ingest,
        ingest_cpu,
        read,
        bytes,
        stored_growth: du_sb(store)?.saturating_sub(before),
        new_chunks: stats.new_chunks,
        chunks: stats.chunks,
    })
}

/// The three ingests of one file: into a fresh store, again with the store open, and again
/// after closing and reopening it.
struct Ingests {
    first: Run,
    again: Run,
    cold: Run,
    /// `du -sb` of the closed store.
    stored: u64,
}

impl Ingests {
    /// How much a re-ingest grew the store, as a fraction of what the first ingest stored.
    fn growth(&self, run: &Run) -> f64 {
        run.stored_growth as f64 / self.first.stored_growth.max(1) as f64
    }
}

/// First ingest and re-ingest of `file` into a fresh store, then a re-ingest after closing and
/// reopening it (what a one-shot CLI command on the embedded store does).
async fn first_and_again(
    label: &str,
    work: &Path,
    file: &Path,
    cfg: &CasConfig,
) -> Result<Ingests> {
    let store = work.join(format!("store-{label}"));
    let _ = std::fs::remove_dir_all(&store);
    let cas = Cas::open(&store, cfg.clone())?;
    let first = ingest_and_read(&cas, &store, file).await?;
    let again = ingest_and_read(&cas, &store, file).await?;
    drop(cas);
    let cas = Cas::open(&store, cfg.clone())?;
    let cold = ingest_and_read(&cas, &store, file).await?;
    drop(cas);
    let stored = du_sb(&store)?;
    std::fs::remove_dir_all(&store)?;
    Ok(Ingests {
        first,
        again,
        cold,
        stored,
    })
}

/// Prints the three ingests of `label`, against a zstd figure when there is one.
fn lines(label: &str, runs: &Ingests, zstd_mbs: Option<f64>) {
    line(&format!("{label}, first ingest"), &runs.first, zstd_mbs);
    line(&format!("{label}, re-ingest"), &runs.again, zstd_mbs);
    line(
        &format!("{label}, reopen + re-ingest"),
        &runs.cold,
        zstd_mbs,
    );
    println!(
        "{:<32} store {} B on disk, closed ({:.3} of input); re-ingest grew it {:.4}%, reopen + re-ingest {:.4}%",
        "",
        runs.stored,
        runs.stored as f64 / runs.first.bytes as f64,
        100.0 * runs.growth(&runs.again),
        100.0 * runs.growth(&runs.cold),
    );
}

/// One run of `zstd -3 -T1 FILE -c > /dev/null`, the baseline every target is a ratio of.
struct Zstd {
    took: Duration,
    cpu: Duration,
    compressed: u64,
}

fn zstd_once(file: &Path) -> Result<Zstd> {
    let (start, cpu) = (Instant::now(), cpu_times().1);
    let mut child = Command::new("zstd")
        .args(["-3", "-T1", "-q", "-c"])
        .arg(file)
        .stdout(Stdio::piped())
        .spawn()
        .context("running zstd (apt-get install zstd)")?;
    let mut stdout = child.stdout.take().context("zstd stdout")?;
    let compressed = std::io::copy(&mut stdout, &mut std::io::sink())?;
    let status = child.wait()?;
    let took = start.elapsed();
    let cpu = cpu_times().1.saturating_sub(cpu);
    if !status.success() {
        bail!("zstd failed on {}: {status}", file.display());
    }
    Ok(Zstd {
        took,
        cpu,
        compressed,
    })
}

/// The work a first ingest cannot skip, timed step by step on one thread over the file in
/// memory, with the store's own functions: cut points, each chunk's id (BLAKE3), the
/// whole-content BLAKE3 and SHA-256, each chunk's frame (zstd). Half its total is the fastest
/// an ingest could be on two cores, were both always busy and each as fast as one alone.
struct Required {
    cut: Duration,
    ids: Duration,
    whole: Duration,
    frames: Duration,
}

impl Required {
    fn measure(data: &Bytes, params: ChunkerParams, level: i32) -> Self {
        let start = Instant::now();
        let lengths = params.chunk_lengths(data);
        let cut = start.elapsed();
        let mut chunks = Vec::with_capacity(lengths.len());
        let mut at = 0;
        for len in lengths {
            chunks.push(data.slice(at..at + len));
            at += len;
        }
        let start = Instant::now();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::digest(c)).collect();
        let ids_took = start.elapsed();
        let start = Instant::now();
        let mut whole = ContentHasher::default();
        whole.update(data);
        std::hint::black_box(whole.finish());
        let whole = start.elapsed();
        let start = Instant::now();
        let mut seen = HashSet::new();
        for (chunk, id) in chunks.iter().zip(&ids) {
            // As the ingest does: a chunk repeated in the content is compressed once.
            if seen.insert(*id) {
                std::hint::black_box(frame::encode(chunk, level));
            }
        }
        let frames = start.elapsed();
        Self {
            cut,
            ids: ids_took,
            whole,
            frames,
        }
    }

    fn total(&self) -> Duration {
        self.cut + self.ids + self.whole + self.frames
    }

    /// The same work on two threads at once, each over the whole file: whether a core slows
    /// down while the other is busy too (on the first machine of this project two vCPUs did
    /// the work of one and a half). Returns the mean of the two threads' totals.
    fn measure_pair(data: &Bytes, params: ChunkerParams, level: i32) -> Duration {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| Self::measure(data, params, level).total());
            let b = Self::measure(data, params, level).total();
            (a.join().expect("no panic"), b)
        });
        (a + b) / 2
    }
}

/// One round on the compressible file: zstd, the store's three ingests, zstd again.
struct Round {
    /// zstd's throughput over the two runs around the store's (their mean time).
    zstd_mbs: f64,
    /// The faster of the two zstd runs.
    fastest: Zstd,
    required: Required,
    /// [`Required::measure_pair`] in this round.
    required_pair: Duration,
    ingests: Ingests,
}

impl Round {
    /// (first ingest, re-ingest, reopen + re-ingest, verified read after the first ingest)
    /// in MB/s.
    fn figures(&self) -> [f64; 4] {
        let i = &self.ingests;
        let mbs = |r: &Run, took| mb_per_s(r.bytes, took);
        [
            mbs(&i.first, i.first.ingest),
            mbs(&i.again, i.again.ingest),
            mbs(&i.cold, i.cold.ingest),
            mbs(&i.first, i.first.read),
        ]
    }
}

fn line(label: &str, run: &Run, zstd_mbs: Option<f64>) {
    let ingest = mb_per_s(run.bytes, run.ingest);
    let read = mb_per_s(run.bytes, run.read);
    let ratio = |v: f64| zstd_mbs.map_or(String::new(), |z| format!(" ({:.2}x zstd)", v / z));
    let cpu = run.ingest_cpu.as_secs_f64();
    println!(
        "{label:<32} {:>8.1} MiB  ingest {ingest:>7.1} MB/s{} {cpu:.2} CPU-s ({:.2} cores)  read+verify {read:>7.1} MB/s{}  stored +{} B  chunks {}/{} new",
        run.bytes as f64 / (1u64 << 20) as f64,
        ratio(ingest),
        cpu / run.ingest.as_secs_f64(),
        ratio(read),
        run.stored_growth,
        run.new_chunks,
        run.chunks,
    );
}

/// The targets against the rounds: the median of each round's ratio, then the ratios against
/// the fastest zstd run of all. A `quick` run's figures are not judged against the targets:
/// on 64 MiB the fixed costs of opening and syncing weigh too much.
fn summary(rounds: &[Round], len: u64, quick: bool) {
    let ratios = |k: usize| median(rounds.iter().map(|r| r.figures()[k] / r.zstd_mbs).collect());
    let growth = median(
        rounds
            .iter()
            .map(|r| r.ingests.growth(&r.ingests.again))
            .collect(),
    );
    let check = |ok: bool| match (quick, ok) {
        (true, _) => "",
        (false, true) => "✔",
        (false, false) => "✘",
    };
    println!(
        "compressible, median of {} rounds, each against its own zstd runs{}:",
        rounds.len(),
        if quick {
            " (--quick: too little input to judge the targets by)"
        } else {
            ""
        }
    );
    let (first, again, cold, read) = (ratios(0), ratios(1), ratios(2), ratios(3));
    println!(
        "  first ingest          {first:.2}x zstd  (target ≥ 1.3)  {}",
        check(first >= 1.3)
    );
    println!(
        "  re-ingest             {again:.2}x zstd  (target ≥ 3)    {}",
        check(again >= 3.0)
    );
    println!("  reopen + re-ingest    {cold:.2}x zstd");
    println!(
        "  read + verify         {read:.2}x zstd  (target ≥ 2)    {}",
        check(read >= 2.0)
    );
    println!(
        "  re-ingest growth      {:.4}%       (target < 0.1%) {}",
        100.0 * growth,
        check(growth < 0.001)
    );
    let Some(fastest) = rounds.iter().map(|r| &r.fastest).min_by_key(|z| z.took) else {
        return;
    };
    let best = mb_per_s(len, fastest.took);
    let ours = |k: usize| median(rounds.iter().map(|r| r.figures()[k]).collect());
    println!(
        "  against the fastest zstd run of all ({best:.1} MB/s), the median figures: first ingest {:.2}x, re-ingest {:.2}x, read + verify {:.2}x",
        ours(0) / best,
        ours(1) / best,
        ours(3) / best,
    );
    // What `work` seconds of CPU per round allow: with both cores busy all the time, the
    // ingest would take half of them, against zstd's wall time in the same round.
    let bound_by = |work: &dyn Fn(&Round) -> Duration| {
        median(
            rounds
                .iter()
                .map(|r| {
                    let zstd_took = len as f64 / 1e6 / r.zstd_mbs;
                    2.0 * zstd_took / work(r).as_secs_f64()
                })
                .collect(),
        )
    };
    let bound = bound_by(&|r| r.ingests.first.ingest_cpu);
    let cpu = median(
        rounds
            .iter()
            .map(|r| r.ingests.first.ingest_cpu.as_secs_f64())
            .collect(),
    );
    println!(
        "  first ingest: median {cpu:.2} CPU-s; with both cores always busy, at most {bound:.2}x zstd (median of the rounds)"
    );
    let required = median(
        rounds
            .iter()
            .map(|r| r.required.total().as_secs_f64())
            .collect(),
    );
    let required_bound = bound_by(&|r| r.required.total());
    let slowdown = median(
        rounds
            .iter()
            .map(|r| r.required_pair.as_secs_f64() / r.required.total().as_secs_f64())
            .collect(),
    );
    println!(
        "  the required work alone: median {required:.2} s on one thread; on two cores always busy and each as fast as alone, at most {required_bound:.2}x zstd"
    );
    println!(
        "  two copies of it at once take {slowdown:.2}x as long each: on two cores as fast as they are together, at most {:.2}x zstd",
        required_bound / slowdown
    );
    println!(
        "  stored {:.3} of the input; zstd -3 of the whole file: {:.3}",
        rounds[0].ingests.stored as f64 / len as f64,
        fastest.compressed as f64 / len as f64,
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.random_mib = args.random_mib.min(64);
    }
    std::fs::create_dir_all(&args.work)?;
    let cfg = config(args.avg)?;
    let avg = cfg.chunker.unwrap_or_default().avg();

    if let Some(file) = &args.only_file {
        let store = args.work.join("store-only");
        let _ = std::fs::remove_dir_all(&store);
        let cas = Cas::open(&store, cfg.clone())?;
        let run = ingest_and_read(&cas, &store, file).await?;
        line("file", &run, None);
        drop(cas);
        std::fs::remove_dir_all(&store)?;
        return Ok(());
    }

    println!(
        "sloth-cas end-to-end benchmark: avg chunk {avg} B, zstd level {}, {} cores",
        cfg.zstd_level,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("{}", sloth_benches::memory_condition());

    // (b) compressible input and the zstd baseline on the same file, in this run.
    let text = match &args.text {
        Some(p) => p.clone(),
        None => {
            let p = args.work.join("text-input.tar");
            ensure_text_tar(&p)?;
            p
        }
    };
    let text = if args.quick {
        let cut = args.work.join("text-input-quick.tar");
        let data = std::fs::read(&text)?;
        std::fs::write(&cut, &data[..data.len().min(64 << 20)])?;
        cut
    } else {
        text
    };
    warm(&text)?;
    let text_len = std::fs::metadata(&text)?.len();
    let mut rounds = Vec::new();
    let text_bytes = Bytes::from(std::fs::read(&text)?);
    let params = cfg.chunker.unwrap_or_default();
    for round in 1..=args.rounds {
        let before = zstd_once(&text)?;
        let required = Required::measure(&text_bytes, params, cfg.zstd_level);
        let required_pair = Required::measure_pair(&text_bytes, params, cfg.zstd_level);
        let ingests = first_and_again("compressible", &args.work, &text, &cfg).await?;
        let after = zstd_once(&text)?;
        let zstd_mbs = mb_per_s(2 * text_len, before.took + after.took);
        println!(
            "round {round}: zstd -3 -T1 {zstd_mbs:.1} MB/s ({:.2} s, {:.2} CPU-s before; {:.2} s, {:.2} CPU-s after), {:.1} MiB",
            before.took.as_secs_f64(),
            before.cpu.as_secs_f64(),
            after.took.as_secs_f64(),
            after.cpu.as_secs_f64(),
            text_len as f64 / (1u64 << 20) as f64,
        );
        println!(
            "round {round}: the required work on one thread {:.3} s (two copies at once: {:.3} s each): cut {:.3}, chunk ids {:.3}, whole-content BLAKE3 + SHA-256 {:.3}, frames {:.3}",
            required.total().as_secs_f64(),
            required_pair.as_secs_f64(),
            required.cut.as_secs_f64(),
            required.ids.as_secs_f64(),
            required.whole.as_secs_f64(),
            required.frames.as_secs_f64(),
        );
        lines("compressible", &ingests, Some(zstd_mbs));
        let fastest = if before.took <= after.took {
            before
        } else {
            after
        };
        rounds.push(Round {
            zstd_mbs,
            fastest,
            required,
            required_pair,
            ingests,
        });
    }
    summary(&rounds, text_len, args.quick);

    // (a) incompressible input, once, against the median zstd figure.
    let zstd_mbs = median(rounds.iter().map(|r| r.zstd_mbs).collect());
    let random = args.work.join(format!("random-{}m.bin", args.random_mib));
    if !random.exists() {
        write_random_file(&random, args.random_mib << 20, 1)?;
    }
    warm(&random)?;
    let runs = first_and_again("random", &args.work, &random, &cfg).await?;
    lines("random", &runs, Some(zstd_mbs));
    Ok(())
}
