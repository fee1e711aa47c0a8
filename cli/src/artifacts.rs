//! `sloth-runner agent artifacts list|upload|download|show|delete`.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;
use sloth_engine::{ArtifactKey, ArtifactRecord, Engine, ListQuery, Name, Selector};

use crate::args::{DeleteArgs, DownloadArgs, ListArgs, Output, Scope, ShowArgs, UploadArgs};
use crate::format::{Table, human_size, utc_time};
use crate::{agent, progress};

/// A record as `--output json` prints it: the engine's fields plus where the layout shows it.
#[derive(Debug, Serialize)]
struct RecordJson<'a> {
    agent: &'a str,
    #[serde(flatten)]
    record: &'a ArtifactRecord,
    /// The layout path, or `null` when the layout is off or this is not the newest version.
    path: Option<PathBuf>,
}

/// The spec's list columns (header, width).
const LIST_COLUMNS: [(&str, usize); 5] = [
    ("Name", 40),
    ("Stack", 15),
    ("Size", 12),
    ("Created", 20),
    ("Task", 20),
];

pub(crate) async fn list(
    data_dir: &Path,
    args: ListArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    agent::check(&args.agent, data_dir)?;
    let stack = args
        .stack
        .as_deref()
        .map(|s| Name::parse("stack", s))
        .transpose()?;
    let task = args
        .task
        .as_deref()
        .map(|t| Name::parse("task", t))
        .transpose()?;
    let engine = agent::open(&args.agent, data_dir).await?;
    // One more than asked for tells whether more exist without reading the whole catalog
    // (the engine walks a time index from the newest end; a full count would not be cheap).
    let mut records = engine.list(&ListQuery {
        stack: stack.map(|s| s.to_string()),
        task: task.map(|t| t.to_string()),
        all_versions: args.all_versions,
        limit: Some(args.limit.saturating_add(1)),
    })?;
    // With every version listed, only the newest of each artifact has a layout path. Any
    // newer version of a listed record is more recent, so it is in the list too.
    let mut newest: HashMap<(String, String, String), u32> = HashMap::new();
    for r in &records {
        let v = newest
            .entry((r.stack.clone(), r.task.clone(), r.name.clone()))
            .or_default();
        *v = (*v).max(r.version);
    }
    let more = records.len() > args.limit;
    if more {
        records.remove(0);
    }

    if args.output == Output::Json {
        let json: Vec<RecordJson<'_>> = records
            .iter()
            .map(|r| {
                let n = newest
                    .get(&(r.stack.clone(), r.task.clone(), r.name.clone()))
                    .copied();
                record_json(&engine, &args.agent, r, n)
            })
            .collect();
        return print_json(out, &json);
    }

    writeln!(out, "📦 Artifacts on agent: {} 📦", args.agent)?;
    writeln!(out)?;
    let mut columns = LIST_COLUMNS.to_vec();
    if args.all_versions {
        columns.push(("Version", 7));
    }
    let mut table = Table::new(&columns);
    for r in &records {
        let mut row = vec![
            r.name.clone(),
            r.stack.clone(),
            human_size(r.size),
            utc_time(r.created_at),
            r.task.clone(),
        ];
        if args.all_versions {
            row.push(r.version.to_string());
        }
        table.row(&row);
    }
    for line in table.lines() {
        writeln!(out, "{line}")?;
    }
    writeln!(out)?;
    let noun = match (args.all_versions, records.len()) {
        (false, 1) => "artifact",
        (false, _) => "artifacts",
        (true, 1) => "artifact version",
        (true, _) => "artifact versions",
    };
    if more {
        writeln!(
            out,
            "ℹ Total: {} {noun} (the most recent; more exist, raise --limit to see them)",
            records.len()
        )?;
    } else {
        writeln!(out, "ℹ Total: {} {noun}", records.len())?;
    }
    Ok(())
}

pub(crate) async fn upload(
    data_dir: &Path,
    args: UploadArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    agent::check(&args.agent, data_dir)?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => default_name(&args.file)?,
    };
    let key = ArtifactKey::new(&name, args.stack.as_deref(), args.task.as_deref())?;
    // Opened here rather than through `Engine::upload_path`: the file is read through a
    // counting adapter for the progress bar.
    let file = sloth_engine::open_upload(&args.file)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let shown = args.file.display();
    let engine = agent::open(&args.agent, data_dir).await?;

    writeln!(
        out,
        "ℹ Uploading '{shown}' to agent '{}' as '{name}'...",
        args.agent
    )?;
    out.flush()?;
    let bar = progress::bar(len, &format!("Uploading {name}"));
    let reader = progress::Counting::new(file, bar.clone());
    let uploaded = engine.upload(&key, reader, &agent::principal()).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let record = uploaded?;
    let size = human_size(record.size);
    if record.version > 1 {
        writeln!(
            out,
            "✓ Uploaded {name} ({size}, version {})",
            record.version
        )?;
    } else {
        writeln!(out, "✓ Uploaded {name} ({size})")?;
    }
    Ok(())
}

/// The artifact name a file gets when `--name` is not given: its file name.
fn default_name(file: &Path) -> anyhow::Result<String> {
    let Some(base) = file.file_name() else {
        bail!(
            "cannot tell an artifact name from '{}'; give one with --name",
            file.display()
        );
    };
    match base.to_str() {
        Some(name) => Ok(name.to_owned()),
        None => bail!(
            "the file name of '{}' is not valid UTF-8; give the artifact a name with --name",
            file.display()
        ),
    }
}

pub(crate) async fn download(
    data_dir: &Path,
    args: DownloadArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (engine, _, record) =
        open_and_resolve(data_dir, &args.agent, &args.name, &args.scope).await?;
    let target = match args.output {
        None => PathBuf::from(&record.name),
        Some(path) => prepare_target(path)?,
    };

    writeln!(
        out,
        "ℹ Downloading artifact '{}' from agent '{}'...",
        record.name, args.agent
    )?;
    out.flush()?;
    // The engine reports no progress while it writes, so large downloads get a spinner.
    let spinner = progress::spinner(
        record.size,
        &format!("Downloading {} ({})", record.name, human_size(record.size)),
    );
    let written = engine
        .download_to(&record, &target, &agent::principal())
        .await;
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    let written = written?;
    writeln!(
        out,
        "✓ Downloaded {} to '{}' ({})",
        record.name,
        written.display(),
        human_size(record.size)
    )?;
    Ok(())
}

/// Makes `-o PATH` writable: a path ending in `/` is a directory to create, and a file's
/// missing parent directories are created.
fn prepare_target(path: PathBuf) -> anyhow::Result<PathBuf> {
    let wants_dir = path.as_os_str().as_encoded_bytes().ends_with(b"/");
    let dir = if wants_dir {
        Some(path.as_path())
    } else {
        path.parent()
    };
    if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory '{}'", dir.display()))?;
    }
    Ok(path)
}

pub(crate) async fn show(
    data_dir: &Path,
    args: ShowArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (engine, selector, record) =
        open_and_resolve(data_dir, &args.agent, &args.name, &args.scope).await?;
    // The layout holds only the newest version of each artifact.
    let newest = match selector.version {
        None => record.version,
        Some(_) => {
            engine
                .resolve(&Selector {
                    version: None,
                    ..place_of(&record)
                })?
                .version
        }
    };

    if args.output == Output::Json {
        return print_json(
            out,
            &record_json(&engine, &args.agent, &record, Some(newest)),
        );
    }

    let path = match engine.layout_path(&record) {
        None => "(layout projection disabled)".to_owned(),
        Some(_) if record.version != newest => {
            format!("(not in the layout, which shows only the newest version, {newest})")
        }
        Some(path) => path.display().to_string(),
    };
    writeln!(out, "📦 Artifact Details")?;
    writeln!(out)?;
    let fields = [
        ("Name:", record.name.clone()),
        ("Path:", path),
        ("Size:", human_size(record.size)),
        ("Checksum:", record.checksum.clone()),
        ("Stack:", record.stack.clone()),
        ("Task:", record.task.clone()),
        ("Version:", record.version.to_string()),
        ("Created:", utc_time(record.created_at)),
        ("Modified:", utc_time(record.modified_at)),
        ("Downloads:", record.download_count.to_string()),
    ];
    for (label, value) in fields {
        writeln!(out, "{label:<12}{value}")?;
    }
    Ok(())
}

pub(crate) async fn delete(
    data_dir: &Path,
    args: DeleteArgs,
    out: &mut dyn Write,
    input: &mut dyn BufRead,
) -> anyhow::Result<()> {
    let (engine, selector, record) =
        open_and_resolve(data_dir, &args.agent, &args.name, &args.scope).await?;
    let what = match selector.version {
        Some(v) => format!("artifact '{}' version {v}", record.name),
        None => {
            let versions = engine.versions(&record.key()?)?.len();
            if versions > 1 {
                format!("artifact '{}' (all {versions} versions)", record.name)
            } else {
                format!("artifact '{}'", record.name)
            }
        }
    };

    if !args.force {
        write!(
            out,
            "Are you sure you want to delete {what} from agent '{}'? (y/N): ",
            args.agent
        )?;
        out.flush()?;
        let mut answer = String::new();
        input
            .read_line(&mut answer)
            .context("reading the answer from standard input")?;
        if !std::io::stdin().is_terminal() {
            // Piped answers are not echoed by a terminal; show them so the transcript reads
            // like the interactive one.
            writeln!(out, "{}", answer.trim_end())?;
        }
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            writeln!(out, "Cancelled")?;
            return Ok(());
        }
    }

    // Narrowed to the place just resolved, so the confirmed artifact is the one deleted.
    let exact = Selector {
        version: selector.version,
        ..place_of(&record)
    };
    engine.delete(&exact, &agent::principal()).await?;
    writeln!(out, "✓ Deleted {what} from agent '{}'", args.agent)?;
    Ok(())
}

/// Validates a name and its scope up front, so bad input gets the naming rule's message.
/// What download, show and delete start with, in this order: the agent must exist, the name
/// and scope must be valid, then the store is opened and the artifact resolved. An unknown
/// agent, a bad name or an unknown or ambiguous artifact fails before anything else happens
/// (delete asks its question only after this).
async fn open_and_resolve(
    data_dir: &Path,
    agent_name: &str,
    name: &str,
    scope: &Scope,
) -> anyhow::Result<(Engine, Selector, ArtifactRecord)> {
    agent::check(agent_name, data_dir)?;
    let selector = selector(name, scope)?;
    let engine = agent::open(agent_name, data_dir).await?;
    let record = engine.resolve(&selector)?;
    Ok((engine, selector, record))
}

fn selector(name: &str, scope: &Scope) -> anyhow::Result<Selector> {
    Name::parse("artifact name", name)?;
    if let Some(stack) = &scope.stack {
        Name::parse("stack", stack)?;
    }
    if let Some(task) = &scope.task {
        Name::parse("task", task)?;
    }
    if scope.version == Some(0) {
        bail!("--version must be at least 1 (versions count from 1)");
    }
    Ok(Selector {
        name: name.to_owned(),
        stack: scope.stack.clone(),
        task: scope.task.clone(),
        version: scope.version,
    })
}

/// A selector for exactly the stack/task/name of `record`.
fn place_of(record: &ArtifactRecord) -> Selector {
    Selector {
        name: record.name.clone(),
        stack: Some(record.stack.clone()),
        task: Some(record.task.clone()),
        version: None,
    }
}

/// `newest`: the newest version's number when known; `None` means `record` is the newest.
fn record_json<'a>(
    engine: &Engine,
    agent: &'a str,
    record: &'a ArtifactRecord,
    newest: Option<u32>,
) -> RecordJson<'a> {
    let is_newest = newest.is_none_or(|n| n == record.version);
    RecordJson {
        agent,
        record,
        path: engine.layout_path(record).filter(|_| is_newest),
    }
}

pub(crate) fn print_json<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    value: &T,
) -> anyhow::Result<()> {
    // Rendered first so that a closed pipe surfaces as the plain I/O error main() looks for.
    let text = serde_json::to_string_pretty(value)?;
    writeln!(out, "{text}")?;
    Ok(())
}
