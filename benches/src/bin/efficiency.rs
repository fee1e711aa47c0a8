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

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Parser;
use sloth_benches::{du_sb, mb_per_s};
use sloth_cas::{Cas, CasConfig, ChunkerParams};

/// Storage efficiency on a version series.
#[derive(Debug, Parser)]
struct Args {
    /// The folder with v1.tar, v2.tar and v3.tar.
    series: PathBuf,
    /// Average chunk sizes to try, in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [64 << 10, 128 << 10, 256 << 10, 512 << 10])]
    avg: Vec<u32>,
    /// zstd level of the stores.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Also report each store after recompressing everything at this level.
    #[arg(long, value_name = "LEVEL")]
    recompress: Option<i32>,
    /// Where the stores go.
    #[arg(long, value_name = "DIR", default_value_os_t = std::env::temp_dir().join("sloth-efficiency"))]
    work: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let Args {
        series,
        avg: avgs,
        level,
        recompress,
        work,
    } = Args::parse();
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
