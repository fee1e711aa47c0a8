//! Catalog latency with many artifact versions: fills a data directory with N versions
//! (default 100,000; kept between runs) and times `list --limit 50`, `show` and an engine open,
//! in-process and, when `sloth-runner` is built beside this binary, as one-shot
//! `sloth-runner` processes on `local`: answered from `metadata.db` (what the CLI does when it
//! is current), alternating with the same commands made to open the store (the pending mark
//! set before each), the same run's baseline.
//!
//! ```text
//! cargo run --release -p sloth-benches --bin catalog -- [--versions N] [--work DIR]
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use sloth_engine::{ArtifactKey, Engine, EngineConfig, ListQuery, Selector};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Catalog latency with many artifact versions.
#[derive(Debug, Parser)]
struct Args {
    /// Artifact versions in the catalog (made once, kept in --work).
    #[arg(long, default_value_t = 100_000)]
    versions: u64,
    /// Where the data directories go.
    #[arg(long, value_name = "DIR", default_value_os_t = std::env::temp_dir().join("sloth-catalog"))]
    work: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let Args { versions, work } = Args::parse();
    let data: PathBuf = work.join(format!("data-{versions}"));
    let config = EngineConfig {
        layout: false,
        ..EngineConfig::default()
    };
    let engine = Engine::open(&data, config.clone()).await?;
    let have = engine
        .list(&ListQuery {
            all_versions: true,
            ..ListQuery::default()
        })?
        .len() as u64;
    if have < versions {
        let start = Instant::now();
        for i in have..versions {
            // 100 stacks × 10 tasks × 100 names, 1–N versions each; small distinct contents.
            let key = ArtifactKey::new(
                &format!("artifact-{}.bin", i % 100),
                Some(&format!("stack-{}", (i / 100) % 100)),
                Some(&format!("task-{}", (i / 10_000) % 10)),
            )?;
            engine
                .upload(
                    &key,
                    std::io::Cursor::new(i.to_le_bytes().repeat(64)),
                    "bench",
                )
                .await?;
            if i % 10_000 == 9_999 {
                eprintln!(
                    "{} versions, {:.0}/s",
                    i + 1,
                    (i + 1 - have) as f64 / start.elapsed().as_secs_f64()
                );
            }
        }
    }
    drop(engine);

    let mut opens = Vec::new();
    let mut lists = Vec::new();
    let mut shows = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let engine = Engine::open(&data, config.clone()).await?;
        opens.push(t.elapsed());
        let t = Instant::now();
        let listed = engine.list(&ListQuery {
            limit: Some(50),
            ..ListQuery::default()
        })?;
        lists.push(t.elapsed());
        assert_eq!(listed.len(), 50);
        let t = Instant::now();
        engine.resolve(&Selector {
            name: "artifact-7.bin".into(),
            stack: Some("stack-3".into()),
            task: Some("task-0".into()),
            version: None,
        })?;
        shows.push(t.elapsed());
    }
    println!(
        "{versions} versions: open {:?}, list --limit 50 {:?}, show {:?} (medians of 7, in-process)",
        median(opens),
        median(lists),
        median(shows)
    );
    let cli = std::env::current_exe()?.with_file_name("sloth-runner");
    if cli.is_file() {
        one_shot(&cli, &data)?;
    } else {
        println!("(build `sloth-cli` in the same profile to time `sloth-runner` processes too)");
    }
    Ok(())
}

/// Times `list` and `show` as `sloth-runner` processes on `local`, each answered from
/// `metadata.db` and, alternately, from the store.
fn one_shot(cli: &std::path::Path, data: &std::path::Path) -> Result<()> {
    // The layout stays off, as above: the CLI reads the store's settings from config.toml.
    let config = data.join(sloth_engine::CONFIG_FILE);
    if !config.exists() {
        std::fs::write(&config, "layout = false\n")?;
    }
    let data_dir = data.to_str().context("a UTF-8 data directory")?;
    let commands: [(&str, Vec<&str>); 2] = [
        ("list --limit 50", vec!["list", "local", "--limit", "50"]),
        (
            "show",
            vec![
                "show",
                "local",
                "artifact-7.bin",
                "--stack",
                "stack-3",
                "--task",
                "task-0",
            ],
        ),
    ];
    let run = |args: &[&str]| -> Result<Duration> {
        let t = Instant::now();
        let out = std::process::Command::new(cli)
            .args(["--data-dir", data_dir, "agent", "artifacts"])
            .args(args)
            .output()?;
        let elapsed = t.elapsed();
        if !out.status.success() {
            bail!(
                "sloth-runner {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(elapsed)
    };
    // Makes the next command open the store: an engine open clears a mark whose change the
    // catalog never committed, so it is set again before each.
    let mark_pending = || -> Result<()> {
        rusqlite::Connection::open(data.join("metadata.db"))?.execute(
            "INSERT OR REPLACE INTO projection_meta (key, value) VALUES ('pending', 1)",
            [],
        )?;
        Ok(())
    };
    // Untimed: brings metadata.db up to date (a rebuild when it is from another setting).
    run(&commands[0].1)?;
    for (what, args) in &commands {
        let (mut projected, mut store) = (Vec::new(), Vec::new());
        for _ in 0..11 {
            projected.push(run(args)?);
            mark_pending()?;
            store.push(run(args)?);
        }
        let range = |v: &[Duration]| {
            let (lo, hi) = (v.iter().min().expect("runs"), v.iter().max().expect("runs"));
            format!(
                "{:.1}–{:.1} ms",
                lo.as_secs_f64() * 1e3,
                hi.as_secs_f64() * 1e3
            )
        };
        println!(
            "sloth-runner {what} on local: {:.1} ms ({}) from metadata.db, {:.1} ms ({}) opening the store (medians of 11)",
            median(projected.clone()).as_secs_f64() * 1e3,
            range(&projected),
            median(store.clone()).as_secs_f64() * 1e3,
            range(&store),
        );
    }
    Ok(())
}
