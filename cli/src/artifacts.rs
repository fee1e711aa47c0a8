//! `sloth-runner agent artifacts list|upload|download|show|delete`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Serialize;
use sloth_agent::client::{Listed, Shown};
use sloth_engine::{ArtifactKey, ArtifactRecord, ListQuery, Name, Selector};

use crate::agent::{Context, Store};
use crate::args::{
    CopyArgs, DeleteArgs, DownloadArgs, ListArgs, Output, Scope, ShowArgs, UploadArgs,
};
use crate::format::{Table, human_size, utc_time};
use crate::{agent, progress};

/// A record as `--output json` prints it: the engine's fields plus where the layout shows it.
#[derive(Debug, Serialize)]
struct RecordJson<'a> {
    agent: &'a str,
    #[serde(flatten)]
    record: &'a ArtifactRecord,
    /// The layout path (on the agent's machine), or `null` when the layout is off or this is
    /// not the newest version.
    path: Option<&'a str>,
}

impl<'a> RecordJson<'a> {
    fn new(agent: &'a str, listed: &'a Listed) -> Self {
        Self {
            agent,
            record: &listed.record,
            path: listed.layout_path.as_deref(),
        }
    }
}

/// The spec's list columns (header, width).
const LIST_COLUMNS: [(&str, usize); 5] = [
    ("Name", 40),
    ("Stack", 15),
    ("Size", 12),
    ("Created", 20),
    ("Task", 20),
];

pub(crate) async fn list(ctx: &Context, args: ListArgs, out: &mut dyn Write) -> anyhow::Result<()> {
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
    let store = agent::open_catalog(&args.agent, ctx).await?;
    // One more than asked for tells whether more exist without reading the whole catalog
    // (the engine walks a time index from the newest end; a full count would not be cheap).
    let mut records = store
        .list(&ListQuery {
            stack: stack.map(|s| s.to_string()),
            task: task.map(|t| t.to_string()),
            all_versions: args.all_versions,
            limit: Some(args.limit.saturating_add(1)),
        })
        .await?;
    let more = records.len() > args.limit;
    if more {
        records.remove(0);
    }

    if args.output == Output::Json {
        let json: Vec<RecordJson<'_>> = records
            .iter()
            .map(|r| RecordJson::new(&args.agent, r))
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
    for Listed { record: r, .. } in &records {
        let mut row = vec![
            match r.damaged {
                Some(_) => format!("{} ⚠ damaged", r.name),
                None => r.name.clone(),
            },
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
    ctx: &Context,
    args: UploadArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let name = match &args.name {
        Some(name) => name.clone(),
        None => default_name(&args.file)?,
    };
    let key = ArtifactKey::new(&name, args.stack.as_deref(), args.task.as_deref())?;
    // Opened here rather than through `Engine::upload_path`: the progress bar follows the
    // file's read offset, and a remote upload checks the file did not change while it was
    // read (and may read it again for its claim).
    let file = sloth_engine::open_upload(&args.file)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let shown = args.file.display();
    let store = agent::open(&args.agent, ctx).await?;

    writeln!(
        out,
        "ℹ Uploading '{shown}' to agent '{}' as '{name}'...",
        args.agent
    )?;
    out.flush()?;
    let bar = progress::bar(len, &format!("Uploading {name}"));
    let again = file
        .try_clone()
        .with_context(|| format!("cannot read '{shown}' twice"))?;
    let following = bar
        .as_ref()
        .map(|bar| progress::follow_reads(bar, &file))
        .transpose()
        .with_context(|| format!("cannot follow the reads of '{shown}'"))?;
    let uploaded = store.upload(&key, file, again).await;
    drop(following);
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
    ctx: &Context,
    args: DownloadArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    // A name given twice is downloaded (and counted) once.
    let mut names: Vec<&String> = Vec::with_capacity(args.names.len());
    for name in &args.names {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let selectors = names
        .iter()
        .map(|name| selector(name, &args.scope))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if selectors.len() > 1 && args.scope.version.is_some() {
        bail!("--version applies to one artifact; download several without it");
    }
    let several = selectors.len() > 1;
    if let Some(path) = args
        .output
        .as_ref()
        .filter(|p| several && p.exists() && !p.is_dir())
    {
        bail!(
            "-o '{}' is a file; several artifacts need a directory",
            path.display()
        );
    }
    let store = agent::open(&args.agent, ctx).await?;
    // Resolved up front: an unknown or ambiguous name fails before anything is written, and
    // every such name is reported at once.
    let mut records = Vec::with_capacity(selectors.len());
    let mut unresolved = Vec::new();
    for selector in &selectors {
        match store.show(selector).await {
            Ok(shown) => records.push(shown.artifact.record),
            Err(e) => unresolved.push(e),
        }
    }
    match unresolved.len() {
        0 => {}
        1 if !several => return Err(unresolved.remove(0)),
        n => bail!(
            "{n} of {} artifacts cannot be downloaded, so none was: {}",
            selectors.len(),
            unresolved
                .iter()
                .map(crate::chain)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
    let (target, created) = match args.output {
        None if several => (PathBuf::from("."), Vec::new()),
        None => (PathBuf::new(), Vec::new()),
        Some(path) if several => {
            // Several files go into one directory.
            let mut dir = path.into_os_string();
            if !dir.as_encoded_bytes().ends_with(b"/") {
                dir.push("/");
            }
            prepare_target(PathBuf::from(dir))?
        }
        Some(path) => prepare_target(path)?,
    };
    let result = download_resolved(&store, &args.agent, &records, &target, out).await;
    if result.is_err() {
        remove_empty(&created);
    }
    result
}

/// Downloads artifacts already resolved to `records` into `target` (a directory ending in
/// `/`, a file, or empty for each one's name in the current directory).
async fn download_resolved(
    store: &Store,
    agent: &str,
    records: &[ArtifactRecord],
    target: &Path,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let several = records.len() > 1;
    for record in records {
        writeln!(
            out,
            "ℹ Downloading artifact '{}' from agent '{}'...",
            record.name, agent
        )?;
    }
    out.flush()?;
    let total: u64 = records.iter().map(|r| r.size).sum();
    let what = match records {
        [one] => format!("Downloading {} ({})", one.name, human_size(one.size)),
        many => format!(
            "Downloading {} artifacts ({})",
            many.len(),
            human_size(total)
        ),
    };
    let bar = match store {
        // The engine reports no progress while it writes: large local downloads get a spinner.
        Store::Local(_) => progress::spinner(total, &what),
        Store::Remote(_) => progress::bar(total, &what),
    };
    let counter: Option<sloth_agent::client::Progress> = bar.clone().map(|bar| {
        let counter: sloth_agent::client::Progress = std::sync::Arc::new(move |n| bar.inc(n));
        counter
    });
    let downloads = records.iter().map(|record| {
        let target = if target.as_os_str().is_empty() {
            PathBuf::from(&record.name)
        } else {
            target.to_path_buf()
        };
        let counter = counter.clone();
        async move { store.download(record, &target, counter).await }
    });
    // Remote downloads run concurrently; the embedded store's are bounded by one disk anyway.
    let results = futures::future::join_all(downloads).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let mut failed = None;
    for (record, result) in records.iter().zip(results) {
        match result {
            Ok(written) => writeln!(
                out,
                "✓ Downloaded {} to '{}' ({})",
                record.name,
                written.display(),
                human_size(record.size)
            )?,
            Err(e) if several => {
                writeln!(out, "✗ {}: {}", record.name, crate::chain(&e))?;
                failed.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    match failed {
        Some(e) => Err(e.context("some downloads failed")),
        None => Ok(()),
    }
}

/// Makes `-o PATH` writable: a path ending in `/` is a directory to create, and a file's
/// missing parent directories are created. Returns the path and the directories created,
/// deepest first, for [`remove_empty`] should the download fail.
fn prepare_target(path: PathBuf) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let wants_dir = path.as_os_str().as_encoded_bytes().ends_with(b"/");
    let dir = if wants_dir {
        Some(path.as_path())
    } else {
        path.parent()
    };
    let mut created = Vec::new();
    if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        created = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory '{}'", dir.display()))?;
    }
    Ok((path, created))
}

/// Removes the directories a failed download created, deepest first, as long as they are
/// empty (a download that failed leaves no file behind).
fn remove_empty(created: &[PathBuf]) {
    for dir in created {
        if std::fs::remove_dir(dir).is_err() {
            break;
        }
    }
}

pub(crate) async fn show(ctx: &Context, args: ShowArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let selector = selector(&args.name, &args.scope)?;
    let shown = agent::open_catalog(&args.agent, ctx)
        .await?
        .show(&selector)
        .await?;
    let Shown {
        artifact,
        newest_version: newest,
        layout_enabled,
        ..
    } = &shown;
    if args.output == Output::Json {
        return print_json(out, &RecordJson::new(&args.agent, artifact));
    }

    let record = &artifact.record;
    let path = match &artifact.layout_path {
        None if !layout_enabled => "(layout projection disabled)".to_owned(),
        _ if record.damaged.is_some() => "(not in the layout: damaged)".to_owned(),
        Some(path) if record.version == *newest => path.clone(),
        _ => format!("(not in the layout, which shows only the newest version, {newest})"),
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
    if let Some(reason) = &record.damaged {
        writeln!(out, "{:<12}{reason} (downloads are refused)", "Damaged:")?;
    }
    Ok(())
}

pub(crate) async fn delete(
    ctx: &Context,
    args: DeleteArgs,
    out: &mut dyn Write,
    input: &mut dyn BufRead,
) -> anyhow::Result<()> {
    let (store, selector, shown) =
        open_and_resolve(ctx, &args.agent, &args.name, &args.scope).await?;
    let record = &shown.artifact.record;
    let what = match selector.version {
        Some(v) => format!("artifact '{}' version {v}", record.name),
        None => {
            let versions = shown.version_count;
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
        ..place_of(record)
    };
    store.delete(&exact).await?;
    writeln!(out, "✓ Deleted {what} from agent '{}'", args.agent)?;
    Ok(())
}

/// Validates a name and its scope up front, so bad input gets the naming rule's message.
/// What download and delete start with (and show, which reads the catalog instead), in this
/// order: the agent must exist, the name and scope must be valid, then the store is opened and
/// the artifact resolved. An unknown
/// agent, a bad name or an unknown or ambiguous artifact fails before anything else happens
/// (delete asks its question only after this).
async fn open_and_resolve(
    ctx: &Context,
    agent_name: &str,
    name: &str,
    scope: &Scope,
) -> anyhow::Result<(Store, Selector, Shown)> {
    let selector = selector(name, scope)?;
    let store = agent::open(agent_name, ctx).await?;
    let shown = store.show(&selector).await?;
    Ok((store, selector, shown))
}

/// `copy SRC DST NAME`: the artifact goes to the same stack, task and name on DST as a new
/// version there. Only the chunks DST lacks are fetched from SRC and sent on.
pub(crate) async fn copy(ctx: &Context, args: CopyArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let selector = selector(&args.name, &args.scope)?;
    if args.source == args.target {
        bail!("source and target are both '{}'", args.source);
    }
    let (Store::Remote(source), Store::Remote(target)) = (
        agent::open(&args.source, ctx).await?,
        agent::open(&args.target, ctx).await?,
    ) else {
        bail!(
            "copy moves artifacts between network agents; for '{}' use upload or download",
            agent::LOCAL
        );
    };
    writeln!(
        out,
        "ℹ Copying artifact '{}' from agent '{}' to agent '{}'...",
        args.name, args.source, args.target
    )?;
    out.flush()?;
    let copied = source.copy_to(&target, &selector).await?;
    let record = &copied.record;
    writeln!(
        out,
        "✓ Copied {} ({}, version {} on '{}'): {} of {} chunks sent, {}",
        record.name,
        human_size(record.size),
        record.version,
        args.target,
        copied.chunks_sent,
        copied.chunks,
        human_size(copied.bytes_sent)
    )?;
    Ok(())
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

pub(crate) fn print_json<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    value: &T,
) -> anyhow::Result<()> {
    // Rendered first so that a closed pipe surfaces as the plain I/O error main() looks for.
    let text = serde_json::to_string_pretty(value)?;
    writeln!(out, "{text}")?;
    Ok(())
}
