//! `sloth-runner run WORKFLOW --file F.sloth`: runs a workflow on the embedded store, or on
//! an agent that streams the run's events back, and prints them as they come.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sloth_engine::Name;
use sloth_lua::{Level, Outcome, RunEvent, RunOptions, RunReport, Script, ScriptEnv, Stream};

use crate::agent::{self, Context, LOCAL, Store};
use crate::args::RunArgs;
use crate::format::human_size;

pub(crate) async fn run(ctx: &Context, args: RunArgs) -> anyhow::Result<()> {
    if let Some(stack) = &args.stack {
        Name::parse("stack", stack)?;
    }
    let source = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read workflow file {}", args.file.display()))?;
    let values = load_values(args.values.as_deref())?;
    let file_name = args.file.display().to_string();
    let agent_name = args.agent.as_deref().unwrap_or(LOCAL);
    let sink: sloth_lua::Sink = Arc::new(|event| {
        let mut out = std::io::stdout().lock();
        for line in event_lines(&event) {
            let _ = writeln!(out, "{line}");
        }
    });
    let report = if agent_name == LOCAL {
        let base_dir = script_dir(&args.file)?;
        // Loading and planning first: a script error needs no store.
        let script = Script::load(
            &source,
            &file_name,
            ScriptEnv {
                base_dir,
                values,
                sink,
            },
        )?;
        let plan = script.plan(&args.workflow)?;
        let engine = agent::open_local(&ctx.data_dir, None, LOCAL).await?;
        let options = RunOptions {
            stack: args.stack.clone(),
            work_root: ctx.data_dir.join("runs"),
            principal: format!("{} via workflow {}", agent::principal(), plan.workflow()),
            keep_workdirs: args.keep_workdirs,
            max_parallel: usize::from(args.parallel),
        };
        let report = script.run(&plan, &engine, &options).await?;
        if report.succeeded()
            && let Some(older_than) = &plan.config().artifact_retention
        {
            // The workflow succeeded either way: a retention run that could not delete (the
            // share cap, a policy failure) is a warning, and the next run tries again.
            let line = match crate::cleanup::workflow_retention(&engine, &report.stack, older_than)
                .await
            {
                Ok(line) => line,
                Err(e) => format!("⚠ {e:#}"),
            };
            print_lines(&[line]);
        }
        report
    } else {
        let Store::Remote(remote) = agent::open(agent_name, ctx).await? else {
            unreachable!("only 'local' is the embedded store");
        };
        let request = sloth_agent::client::WorkflowRun {
            script: source,
            file_name,
            workflow: args.workflow.clone(),
            stack: args.stack.clone(),
            values,
            keep_workdirs: args.keep_workdirs,
            max_parallel: u32::from(args.parallel),
        };
        remote.run_workflow(request, |event| sink(event)).await?
    };
    print_lines(&summary(&report, agent_name));
    if !report.succeeded() {
        let failed = report
            .tasks
            .iter()
            .find(|t| t.outcome == Outcome::Failed)
            .map_or_else(String::new, |t| {
                format!(": task '{}': {}", t.name, t.message)
            });
        bail!("workflow '{}' failed{failed}", report.workflow);
    }
    Ok(())
}

fn print_lines(lines: &[String]) {
    let mut out = std::io::stdout().lock();
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
}

/// The script's directory, absolute: relative `:workdir`s and top-level `fs.*` resolve there.
fn script_dir(file: &Path) -> anyhow::Result<PathBuf> {
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent
        .canonicalize()
        .with_context(|| format!("cannot resolve the directory of {}", file.display()))
}

/// `--values F.yaml` as JSON-like data (`null` without one).
fn load_values(path: Option<&Path>) -> anyhow::Result<serde_json::Value> {
    let Some(path) = path else {
        return Ok(serde_json::Value::Null);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read values file {}", path.display()))?;
    serde_norway::from_str(&text)
        .with_context(|| format!("values file {} is not valid YAML", path.display()))
}

/// How each event is shown: one or more lines, task-prefixed so that parallel tasks stay
/// readable when interleaved.
pub(crate) fn event_lines(event: &RunEvent) -> Vec<String> {
    let prefix = |task: &Option<String>| match task {
        Some(task) => format!("  {task} "),
        None => "  ".to_owned(),
    };
    match event {
        RunEvent::RunStarted {
            workflow,
            stack,
            run_id,
            tasks,
        } => vec![
            format!("🚀 Running workflow {workflow} (stack {stack}, run {run_id})"),
            format!("   Tasks: {}", tasks.join(" → ")),
        ],
        RunEvent::TaskStarted {
            task,
            attempt,
            attempts,
        } => vec![if *attempt == 1 {
            format!("▶ {task}")
        } else {
            format!("▶ {task} (attempt {attempt} of {attempts})")
        }],
        RunEvent::Log {
            task,
            level,
            message,
        } => {
            let mark = match level {
                Level::Debug => "·",
                Level::Info => "ℹ",
                Level::Warn => "⚠",
                Level::Error => "✗",
            };
            vec![format!("{}{mark} {message}", prefix(task))]
        }
        RunEvent::Output { task, stream, line } => {
            let bar = match stream {
                Stream::Stdout => "│",
                Stream::Stderr => "┃",
            };
            vec![format!("{}{bar} {line}", prefix(task))]
        }
        RunEvent::ArtifactConsumed {
            task,
            name,
            version,
            size,
            from_task,
        } => vec![format!(
            "  {task} 📥 Copied {name} v{version} ({}) from task {from_task}",
            human_size(*size)
        )],
        RunEvent::ArtifactStored(a) => vec![format!(
            "  {} 📦 Stored {} v{} ({}, {})",
            a.task,
            a.name,
            a.version,
            human_size(a.size),
            short_checksum(&a.checksum)
        )],
        RunEvent::TaskFinished {
            task,
            outcome,
            message,
            elapsed,
        } => {
            let tail = if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            };
            vec![match outcome {
                Outcome::Succeeded => format!("✓ {task} ({}){tail}", seconds(*elapsed)),
                Outcome::Failed => format!("✗ {task} failed ({}){tail}", seconds(*elapsed)),
                Outcome::Skipped => format!("⊘ {task} skipped{tail}"),
            }]
        }
    }
}

fn short_checksum(checksum: &str) -> String {
    match checksum.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => format!("sha256:{}…", &hex[..12]),
        _ => checksum.to_owned(),
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn summary(report: &RunReport, agent: &str) -> Vec<String> {
    let count = |o: Outcome| report.tasks.iter().filter(|t| t.outcome == o).count();
    let stored: usize = report.tasks.iter().map(|t| t.artifacts.len()).sum();
    let mut lines = vec![String::new()];
    if report.succeeded() {
        lines.push(format!(
            "✓ Workflow {} succeeded in {}: {} {}, {stored} {} stored in stack {} on {agent}",
            report.workflow,
            seconds(report.elapsed),
            report.tasks.len(),
            if report.tasks.len() == 1 {
                "task"
            } else {
                "tasks"
            },
            if stored == 1 { "artifact" } else { "artifacts" },
            report.stack,
        ));
    } else {
        lines.push(format!(
            "✗ Workflow {} failed after {}: {} succeeded, {} failed, {} skipped",
            report.workflow,
            seconds(report.elapsed),
            count(Outcome::Succeeded),
            count(Outcome::Failed),
            count(Outcome::Skipped),
        ));
    }
    if let Some(dir) = &report.kept_workdirs {
        lines.push(format!("ℹ Work directories kept in {}", dir.display()));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_lines() {
        let line = |e: RunEvent| event_lines(&e).join("\n");
        assert_eq!(
            line(RunEvent::TaskStarted {
                task: "build".into(),
                attempt: 2,
                attempts: 3
            }),
            "▶ build (attempt 2 of 3)"
        );
        assert_eq!(
            line(RunEvent::TaskFinished {
                task: "test".into(),
                outcome: Outcome::Failed,
                message: "ci.sloth:12: boom".into(),
                elapsed: Duration::from_millis(1250),
            }),
            "✗ test failed (1.2s): ci.sloth:12: boom"
        );
        assert_eq!(
            line(RunEvent::Output {
                task: Some("build".into()),
                stream: Stream::Stdout,
                line: "ok".into()
            }),
            "  build │ ok"
        );
        assert_eq!(
            short_checksum("sha256:0123456789abcdef"),
            "sha256:0123456789ab…"
        );
    }
}
