//! `sloth-runner agent artifacts cleanup` and `sloth-runner policy inspect|test`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use sloth_agent::client::PolicySource;
use sloth_engine::{CleanupReport, CleanupRequest, Name};
use sloth_policies::{Action, Artifact, Limits, Policy, PolicyHost, builtin, builtin_names};

use crate::agent::{self, Context, Store};
use crate::args::CleanupArgs;
use crate::format::{Table, human_size};

/// The policy `--policy` names: a built-in, or a module file.
fn source(policy: Option<&str>) -> anyhow::Result<PolicySource> {
    match policy {
        None => Ok(PolicySource::Builtin("older-than".into())),
        Some(name) if builtin(name).is_some() => Ok(PolicySource::Builtin(name.into())),
        Some(file) if Path::new(file).is_file() => Ok(PolicySource::Module(
            std::fs::read(file).with_context(|| format!("cannot read the policy '{file}'"))?,
        )),
        Some(other) => bail!(
            "no policy '{other}': not a built-in ({}) and not a file",
            builtin_names().collect::<Vec<_>>().join(", ")
        ),
    }
}

fn load(host: &PolicyHost, source: &PolicySource, origin: &str) -> anyhow::Result<Policy> {
    let bytes = match source {
        PolicySource::Builtin(name) => builtin(name).context("a known built-in")?,
        PolicySource::Module(bytes) => bytes.as_slice(),
    };
    Ok(host.load(bytes, origin)?)
}

pub(crate) async fn cleanup(
    ctx: &Context,
    args: CleanupArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if let Some(stack) = &args.stack {
        Name::parse("stack", stack)?;
    }
    let source = source(args.policy.as_deref())?;
    let mut params: BTreeMap<String, String> = args.params.into_iter().collect();
    if args.policy.is_none() {
        params.insert(
            "older_than".into(),
            args.older_than.unwrap_or_else(|| "30d".into()),
        );
    }
    let origin = args.policy.clone().unwrap_or_else(|| "older-than".into());
    // A bad module is refused before the agent is even contacted.
    let host = Arc::new(PolicyHost::new(Limits::default())?);
    let policy = load(&host, &source, &origin)?;
    policy.check_params(&params)?;
    let store = agent::open(&args.agent, ctx).await?;
    let (name, report) = match &store {
        Store::Local(engine) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let name = policy.metadata.name.clone();
            let request = CleanupRequest {
                policy,
                params,
                stack: args.stack,
                now,
                dry_run: args.dry_run,
                max_share: None,
            };
            (
                name,
                engine.cleanup(&host, request, &agent::principal()).await?,
            )
        }
        Store::Remote(remote) => {
            remote
                .cleanup(source, params, args.stack, args.dry_run)
                .await?
        }
    };
    print_report(out, &name, &report, args.dry_run)
}

fn print_report(
    out: &mut dyn Write,
    policy: &str,
    report: &CleanupReport,
    dry_run: bool,
) -> anyhow::Result<()> {
    let noun = |n: usize| if n == 1 { "artifact" } else { "artifacts" };
    if dry_run {
        let n = report.doomed.len();
        writeln!(
            out,
            "ℹ Dry run: policy '{policy}' would delete {n} {} of {} ({} of content){}",
            noun(n),
            report.evaluated,
            human_size(report.logical_bytes),
            if n > 0 { ":" } else { "." }
        )?;
        if n > 0 {
            writeln!(out)?;
            let mut table = Table::new(&[
                ("Name", 40),
                ("Stack", 15),
                ("Task", 20),
                ("Version", 7),
                ("Size", 12),
                ("Reason", 6),
            ]);
            for d in &report.doomed {
                let r = &d.record;
                table.row(&[
                    r.name.clone(),
                    r.stack.clone(),
                    r.task.clone(),
                    r.version.to_string(),
                    human_size(r.size),
                    d.reason.clone(),
                ]);
            }
            for line in table.lines() {
                writeln!(out, "{line}")?;
            }
        }
        return Ok(());
    }
    writeln!(
        out,
        "✓ Deleted {} {}, freed {}",
        report.deleted,
        noun(report.deleted),
        human_size(report.freed_bytes)
    )?;
    writeln!(
        out,
        "ℹ Policy '{policy}' looked at {} {}; the deleted ones held {} of content. \
         Freed is the disk space the store gave back: chunks still used by other artifacts stay.",
        report.evaluated,
        noun(report.evaluated),
        human_size(report.logical_bytes)
    )?;
    Ok(())
}

/// Applies a workflow's `artifact_retention` to its stack after a local run, and registers
/// the rule so that an agent serving this store keeps applying it.
pub(crate) async fn workflow_retention(
    engine: &sloth_engine::Engine,
    stack: &str,
    older_than: &str,
) -> anyhow::Result<String> {
    let host = Arc::new(PolicyHost::new(Limits::default())?);
    let (_, _, line) =
        sloth_agent::retention::apply_workflow_rule(engine, &host, stack, older_than)
            .await
            .map_err(anyhow::Error::msg)?;
    Ok(line)
}

/// The policy a `policy inspect|test` argument names.
fn named(host: &PolicyHost, policy: &str) -> anyhow::Result<Policy> {
    load(host, &source(Some(policy))?, policy)
}

pub(crate) fn inspect(policy: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let host = PolicyHost::new(Limits::default())?;
    let p = named(&host, policy)?;
    let m = &p.metadata;
    writeln!(out, "📜 Policy {} {}", m.name, m.version)?;
    writeln!(out)?;
    writeln!(out, "{:<13}{}", "Description:", m.description)?;
    writeln!(
        out,
        "{:<13}{}",
        "Parameters:",
        serde_json::to_string(&m.params)?
    )?;
    let imports = if p.imports.is_empty() {
        "(none)".to_owned()
    } else {
        p.imports.join(", ")
    };
    writeln!(out, "{:<13}{imports}", "Imports:")?;
    writeln!(out, "{:<13}{}", "Exports:", p.exports.join(", "))?;
    writeln!(out, "{:<13}{}", "BLAKE3:", hex::encode(p.hash))?;
    Ok(())
}

pub(crate) fn test(
    policy: &str,
    fixture: &Path,
    now: Option<i64>,
    params: Vec<(String, String)>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let host = PolicyHost::new(Limits::default())?;
    let p = named(&host, policy)?;
    let text = std::fs::read_to_string(fixture)
        .with_context(|| format!("cannot read the fixture '{}'", fixture.display()))?;
    let artifacts: Vec<Artifact> = serde_json::from_str(&text).with_context(|| {
        format!(
            "the fixture '{}' is not a JSON array of artifacts",
            fixture.display()
        )
    })?;
    let now = now.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    });
    let decisions = host.evaluate(&p, now, &params.into_iter().collect(), &artifacts)?;
    let mut table = Table::new(&[("Id", 20), ("Name", 30), ("Action", 6), ("Reason", 6)]);
    for (a, d) in artifacts.iter().zip(&decisions) {
        let action = match d.action {
            Action::Keep => "keep",
            Action::Delete => "delete",
        };
        table.row(&[
            a.id.clone(),
            a.name.clone(),
            action.into(),
            d.reason.clone(),
        ]);
    }
    for line in table.lines() {
        writeln!(out, "{line}")?;
    }
    let deleted = decisions
        .iter()
        .filter(|d| d.action == Action::Delete)
        .count();
    writeln!(out)?;
    writeln!(
        out,
        "ℹ Policy '{}': delete {deleted} of {}",
        p.metadata.name,
        decisions.len()
    )?;
    Ok(())
}
