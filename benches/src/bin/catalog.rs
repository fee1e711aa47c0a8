//! Catalog latency with many artifact versions: fills a data directory with N versions
//! (default 100,000; kept between runs) and times `list --limit 50`, `show` and an engine open,
//! in-process and through the `sloth-runner` binary when it is built.
//!
//! ```text
//! cargo run --release -p sloth-benches --bin catalog -- [--versions N] [--work DIR]
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sloth_engine::{ArtifactKey, Engine, EngineConfig, ListQuery, Selector};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut versions = 100_000u64;
    let mut work = std::env::temp_dir().join("sloth-catalog");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--versions" => versions = value()?.parse()?,
            "--work" => work = value()?.into(),
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
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
    Ok(())
}
