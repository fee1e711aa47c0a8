//! The command line, as clap derive types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const SIZES_AND_TIMES: &str = "Sizes use decimal units (1 KB = 1000 bytes, 1 MB = 1000 KB); \
times are UTC, printed as YYYY-MM-DD HH:MM:SS.";

/// sloth-runner: artifacts on agents.
#[derive(Debug, Parser)]
#[command(name = "sloth-runner", version, about, after_help = SIZES_AND_TIMES)]
pub(crate) struct Cli {
    /// Data directory of the embedded store (agent `local`). Default: /var/lib/sloth-runner
    /// as root, else $XDG_DATA_HOME/sloth-runner or ~/.local/share/sloth-runner.
    #[arg(long, global = true, env = "SLOTH_RUNNER_DATA_DIR", value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Agent commands.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// The audit trail of artifact operations.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Manage the artifacts stored on an agent.
    Artifacts {
        #[command(subcommand)]
        command: ArtifactsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ArtifactsCommand {
    /// List the artifacts stored on an agent, oldest first.
    #[command(after_help = SIZES_AND_TIMES)]
    List(ListArgs),
    /// Upload a local file as an artifact.
    #[command(after_help = SIZES_AND_TIMES)]
    Upload(UploadArgs),
    /// Download an artifact to a local file, verified.
    #[command(after_help = SIZES_AND_TIMES)]
    Download(DownloadArgs),
    /// Show the details of one artifact.
    #[command(after_help = SIZES_AND_TIMES)]
    Show(ShowArgs),
    /// Delete an artifact (every version, or one with --version).
    Delete(DeleteArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum EventsCommand {
    /// List events, oldest first (the most recent --limit of them).
    #[command(after_help = SIZES_AND_TIMES)]
    List(EventsListArgs),
}

/// How `list`, `show` and `events list` print.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// The spec's human-readable layout.
    #[default]
    Table,
    /// JSON for scripts: the engine's records (sizes in bytes, times in Unix seconds).
    Json,
}

/// Narrows a name to one artifact when it exists under several stacks or tasks.
#[derive(Debug, Args)]
pub(crate) struct Scope {
    /// Stack of the artifact.
    #[arg(long, short = 's')]
    pub(crate) stack: Option<String>,
    /// Task of the artifact.
    #[arg(long, short = 't')]
    pub(crate) task: Option<String>,
    /// Version of the artifact (default: the newest).
    #[arg(long, value_name = "N")]
    pub(crate) version: Option<u32>,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Agent name (only `local`, the embedded store, for now).
    pub(crate) agent: String,
    /// Filter by stack name.
    #[arg(long, short = 's')]
    pub(crate) stack: Option<String>,
    /// Filter by task name.
    #[arg(long, short = 't')]
    pub(crate) task: Option<String>,
    /// Maximum artifacts to show: the most recent ones (at least 1).
    #[arg(long, short = 'l', default_value = "50", value_parser = positive, allow_negative_numbers = true, value_name = "N")]
    pub(crate) limit: usize,
    /// Show every version, with a Version column, instead of the newest of each artifact.
    #[arg(long)]
    pub(crate) all_versions: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub(crate) output: Output,
}

#[derive(Debug, Args)]
pub(crate) struct UploadArgs {
    /// Agent name (only `local`, the embedded store, for now).
    pub(crate) agent: String,
    /// The file to upload.
    pub(crate) file: PathBuf,
    /// Associate with stack (default: `default`).
    #[arg(long, short = 's')]
    pub(crate) stack: Option<String>,
    /// Associate with task (default: `default`).
    #[arg(long, short = 't')]
    pub(crate) task: Option<String>,
    /// Artifact name (default: the file's name).
    #[arg(long, short = 'n')]
    pub(crate) name: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct DownloadArgs {
    /// Agent name (only `local`, the embedded store, for now).
    pub(crate) agent: String,
    /// Artifact name.
    pub(crate) name: String,
    /// Local output path (default: the artifact's name in the current directory); an
    /// existing directory, or a path ending in `/`, receives the file under its name.
    /// Missing parent directories are created; an existing file is replaced.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub(crate) output: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) scope: Scope,
}

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// Agent name (only `local`, the embedded store, for now).
    pub(crate) agent: String,
    /// Artifact name.
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) scope: Scope,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub(crate) output: Output,
}

#[derive(Debug, Args)]
pub(crate) struct DeleteArgs {
    /// Agent name (only `local`, the embedded store, for now).
    pub(crate) agent: String,
    /// Artifact name.
    pub(crate) name: String,
    /// Skip the confirmation prompt.
    #[arg(long, short = 'f')]
    pub(crate) force: bool,
    #[command(flatten)]
    pub(crate) scope: Scope,
}

#[derive(Debug, Args)]
pub(crate) struct EventsListArgs {
    /// Only events whose kind matches this glob (`*` any run, `?` one character), e.g. `artifact.*`.
    #[arg(long = "type", value_name = "PATTERN")]
    pub(crate) kind: Option<String>,
    /// Maximum events to show: the most recent ones (at least 1).
    #[arg(long, short = 'l', default_value = "50", value_parser = positive, allow_negative_numbers = true, value_name = "N")]
    pub(crate) limit: usize,
    /// Agent whose trail to read (only `local`, the embedded store, for now).
    #[arg(long, default_value = "local")]
    pub(crate) agent: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub(crate) output: Output,
}

/// A count of at least 1: `--limit 0` would show nothing and is surely a mistake.
fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<i128>() {
        Ok(n) if n >= 1 => usize::try_from(n).map_err(|_| format!("{n} is too large")),
        Ok(n) => Err(format!("must be at least 1, got {n}")),
        Err(_) => Err(format!("'{text}' is not a whole number")),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn limits_must_be_positive() {
        assert_eq!(positive("50"), Ok(50));
        assert!(positive("0").is_err());
        assert!(positive("-3").is_err());
        assert!(positive("ten").is_err());
    }
}
