//! Storage efficiency on a version series: stores `v1.tar`, `v2.tar`, `v3.tar` (see
//! `benches/scripts/make-version-series.sh`) one after another into a fresh store per average
//! chunk size and prints the store's bytes on disk (`du -sb`, store closed) after each version.
//!
//! ```text
//! cargo run --release -p sloth-benches --bin efficiency -- SERIES_DIR [--avg 65536,131072,...]
//!     [--level 3] [--recompress LEVEL] [--work DIR]
//! ```
//! `--recompress LEVEL` adds a column: the store after a `Cas::recompress(LEVEL)` pass over all
//! three versions (cold data recompressed at a higher level).
//! ```text
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use sloth_benches::{du_sb, mb_per_s};
use sloth_cas::{Cas, CasConfig, ChunkerParams};

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut series: Option<PathBuf> = None;
    let mut avgs = vec![64 << 10, 128 << 10, 256 << 10, 512 << 10];
    let mut level = 3;
    let mut recompress: Option<i32> = None;
    let mut work = std::env::temp_dir().join("sloth-efficiency");
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--avg" => {
                avgs = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--level" => level = value()?.parse()?,
            "--recompress" => recompress = Some(value()?.parse()?),
            "--work" => work = value()?.into(),
            "--bench" => {}
            other if series.is_none() && !other.starts_with('-') => series = Some(other.into()),
            other => bail!("unknown argument {other}"),
        }
    }
    let series =
        series.context("usage: efficiency SERIES_DIR [--avg N,N] [--level L] [--work DIR]")?;
    let versions: Vec<PathBuf> = ["v1.tar", "v2.tar", "v3.tar"]
        .iter()
        .map(|v| series.join(v))
        .collect();
    for v in &versions {
        if !v.exists() {
            bail!(
                "{} is missing; run benches/scripts/make-version-series.sh {}",
                v.display(),
                series.display()
            );
        }
    }
    let input: u64 = versions
        .iter()
        .map(|v| std::fs::metadata(v).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    println!(
        "version series in {}: {} bytes in 3 versions, zstd level {level}",
        series.display(),
        input
    );
    println!(
        "{:>8} {:>14} {:>14} {:>14} {:>9} {:>10}",
        "avg", "after v1", "after v2", "after v3", "ratio", "MB/s"
    );
    std::fs::create_dir_all(&work)?;
    for avg in avgs {
        let store = work.join(format!("store-{avg}"));
        let _ = std::fs::remove_dir_all(&store);
        let config = CasConfig {
            chunker: Some(ChunkerParams::new(avg)?),
            zstd_level: level,
            ..CasConfig::default()
        };
        let mut sizes = Vec::new();
        let start = Instant::now();
        for v in &versions {
            let cas = Cas::open(&store, config.clone())?;
            let staged = cas.ingest_reader(std::fs::File::open(v)?).await?;
            cas.commit(staged).await?;
            drop(cas);
            sizes.push(du_sb(&store)?);
        }
        let took = start.elapsed();
        if let Some(level) = recompress {
            let cas = Cas::open(&store, config.clone())?;
            let t = Instant::now();
            let report = cas.recompress(level).await?;
            drop(cas);
            let size = du_sb(&store)?;
            println!(
                "         recompress at {level}: {} of {} chunks, {:.1} s -> store {size} B ({:.4} of input)",
                report.chunks_recompressed,
                report.chunks_examined,
                t.elapsed().as_secs_f64(),
                size as f64 / input as f64
            );
        }
        println!(
            "{:>7}K {:>14} {:>14} {:>14} {:>9.4} {:>10.1}",
            avg / 1024,
            sizes[0],
            sizes[1],
            sizes[2],
            sizes[2] as f64 / input as f64,
            mb_per_s(input, took)
        );
        std::fs::remove_dir_all(&store)?;
    }
    Ok(())
}
