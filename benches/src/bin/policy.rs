//! Retention policy cost: compiling a policy (cache miss) against loading it again (hit), and
//! evaluating `keep-last` over 100,000 artifact versions — in memory, and end to end as a
//! dry-run cleanup of a real catalog when one is given (the `catalog` benchmark's).
//!
//! ```text
//! cargo run --release -p sloth-benches --bin policy -- [--versions N] [--catalog DIR] [--module FILE.wasm]
//! ```
//!
//! `--module` measures another build of a keep-last-compatible policy (parameter `count`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use sloth_engine::{CleanupRequest, Engine, EngineConfig};
use sloth_policies::{Action, Artifact, Limits, PolicyHost, builtin};

/// Retention policies over a large catalog.
#[derive(Debug, Parser)]
struct Args {
    /// Artifact versions in the catalog.
    #[arg(long, default_value_t = 100_000)]
    versions: usize,
    /// A catalog's data directory to use (made once when missing).
    #[arg(long, value_name = "DIR")]
    catalog: Option<std::path::PathBuf>,
    /// A policy module (.wasm) to run instead of the built-in keep-last.
    #[arg(long, value_name = "FILE")]
    module: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let Args {
        versions,
        catalog,
        module: module_file,
    } = Args::parse();
    let host = Arc::new(PolicyHost::new(Limits::default())?);
    let owned = module_file.map(std::fs::read).transpose()?;
    let module = match &owned {
        Some(bytes) => bytes.as_slice(),
        None => builtin("keep-last").context("built-in")?,
    };
    let start = Instant::now();
    let policy = host.load(module, "keep-last")?;
    let miss = start.elapsed();
    let start = Instant::now();
    host.load(module, "keep-last")?;
    let hit = start.elapsed();
    println!(
        "load keep-last: compile (cache miss) {:.1} ms, cache hit {:.3} ms",
        miss.as_secs_f64() * 1e3,
        hit.as_secs_f64() * 1e3
    );

    let params: BTreeMap<String, String> = [("count".to_string(), "5".to_string())].into();
    // The catalog first, in a process that has not yet evaluated anything: the figure a
    // one-shot `cleanup` sees, with its first-touch page faults.
    if let Some(dir) = catalog {
        let engine = Engine::open(
            &dir,
            EngineConfig {
                layout: false,
                ..EngineConfig::default()
            },
        )
        .await?;
        let start = Instant::now();
        let report = engine
            .cleanup(
                &host,
                CleanupRequest {
                    policy: policy.clone(),
                    params: params.clone(),
                    stack: None,
                    now: 1_800_000_000,
                    dry_run: true,
                    max_share: None,
                },
                "bench",
            )
            .await?;
        println!(
            "dry-run cleanup with keep-last count=5 on {} ({} versions): {:.0} ms end to end, {} to delete (target ≤ 1000 ms)",
            dir.display(),
            report.evaluated,
            start.elapsed().as_secs_f64() * 1e3,
            report.doomed.len()
        );
    }
    let batch: Vec<Artifact> = (0..versions)
        .map(|i| Artifact {
            id: format!("{i:032x}"),
            name: format!("artifact-{}.bin", i % 100),
            stack: format!("stack-{}", (i / 100) % 100),
            task: format!("task-{}", (i / 10_000) % 10),
            version: (i / 100_000) as u32 + 1,
            size: 4096 + i as u64,
            created_at: 1_700_000_000 + i as i64,
            modified_at: 1_700_000_000 + i as i64,
            download_count: (i % 7) as u64,
            last_download_at: None,
            checksum: format!("sha256:{i:064x}"),
        })
        .collect();
    let start = Instant::now();
    let decisions = host.evaluate(&policy, 1_800_000_000, &params, &batch)?;
    let took = start.elapsed();
    let deleted = decisions
        .iter()
        .filter(|d| d.action == Action::Delete)
        .count();
    println!(
        "keep-last count=5 over {versions} versions (in memory): {:.0} ms, {deleted} to delete",
        took.as_secs_f64() * 1e3
    );

    Ok(())
}
