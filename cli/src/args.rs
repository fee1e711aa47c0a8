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
    #[arg(
        long,
        global = true,
        env = "SLOTH_RUNNER_DATA_DIR",
        value_name = "DIR",
        help_heading = GLOBAL
    )]
    pub(crate) data_dir: Option<PathBuf>,

    #[command(flatten)]
    pub(crate) net: NetArgs,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Heading of the options every command takes, listed apart from the command's own.
const GLOBAL: &str = "Global options";

/// How to reach agents and the master.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = GLOBAL)]
pub(crate) struct NetArgs {
    /// The master that knows agents by name (host:port).
    #[arg(
        long,
        global = true,
        env = "SLOTH_RUNNER_MASTER_ADDR",
        value_name = "ADDR",
        value_parser = host_port
    )]
    pub(crate) master: Option<String>,
    /// Bearer token for agents and the master that require one.
    #[arg(
        long,
        global = true,
        env = "SLOTH_RUNNER_TOKEN",
        hide_env_values = true
    )]
    pub(crate) token: Option<String>,
    /// CA certificate (PEM) of agents that serve TLS; turns TLS on.
    #[arg(long, global = true, env = "SLOTH_RUNNER_CA", value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// Client certificate (PEM), for agents that require one.
    #[arg(long, global = true, value_name = "FILE", requires = "client_key")]
    pub(crate) client_cert: Option<PathBuf>,
    /// Client certificate's key (PEM).
    #[arg(long, global = true, value_name = "FILE", requires = "client_cert")]
    pub(crate) client_key: Option<PathBuf>,
}

/// TLS and token options of a server (agent or master).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Listening and security")]
pub(crate) struct ServeArgs {
    /// Address to listen on. Anything but loopback needs TLS or tokens, or --insecure.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub(crate) bind: std::net::IpAddr,
    /// Server certificate (PEM); with --tls-key, serve TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Server certificate's key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) client_ca: Option<PathBuf>,
    /// Token file: lines of `<sha256 of token> <scopes> <principal>` (see `token new`).
    #[arg(long, value_name = "FILE")]
    pub(crate) tokens: Option<PathBuf>,
    /// Listen beyond loopback without TLS or tokens.
    #[arg(long)]
    pub(crate) insecure: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Agent commands.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// The master: the registry agents report to.
    Master {
        #[command(subcommand)]
        command: MasterCommand,
    },
    /// Retention policies: look inside one, or try it on a fixture.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Tokens for agents and the master.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The audit trail of artifact operations.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Run a workflow from a .sloth file: locally on the embedded store, or on an agent.
    Run(RunArgs),
}

/// `run WORKFLOW --file F.sloth`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The workflow to run (the name given to workflow.define).
    pub(crate) workflow: String,
    /// The workflow file (Lua).
    #[arg(short, long, value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// Stack the artifacts go to (default: the workflow's name).
    #[arg(short, long)]
    pub(crate) stack: Option<String>,
    /// Run on this agent (name, host:port, or `local`); its store receives the artifacts.
    #[arg(short, long)]
    pub(crate) agent: Option<String>,
    /// YAML file whose contents the script sees as the global `values`.
    #[arg(long, value_name = "FILE")]
    pub(crate) values: Option<PathBuf>,
    /// Keep the tasks' work directories after a successful run (a failed run always keeps
    /// them).
    #[arg(long)]
    pub(crate) keep_workdirs: bool,
    /// Most tasks running at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub(crate) parallel: u16,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Manage the artifacts stored on an agent.
    Artifacts {
        #[command(subcommand)]
        command: ArtifactsCommand,
    },
    /// Run an agent: serve this data directory's store on the network.
    Start(AgentStartArgs),
    /// List the agents registered with the master.
    List,
    /// Show one agent registered with the master.
    Get {
        /// Agent name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct AgentStartArgs {
    /// The agent's name (registered with the master, recorded in events).
    #[arg(long)]
    pub(crate) name: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value = "50052")]
    pub(crate) port: u16,
    /// Address the master hands out for this agent (default: the bound address).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) advertise: Option<String>,
    /// Store settings file (default: config.toml in the data directory).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Serve Prometheus metrics on this port (same address as --bind), at /metrics.
    #[arg(long, value_name = "PORT")]
    pub(crate) metrics_port: Option<u16>,
    /// Seconds between heartbeats to the master.
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) heartbeat: u64,
    #[command(flatten)]
    pub(crate) serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum MasterCommand {
    /// Run the master.
    Start(MasterStartArgs),
}

#[derive(Debug, Args)]
pub(crate) struct MasterStartArgs {
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value = "50053")]
    pub(crate) port: u16,
    #[command(flatten)]
    pub(crate) serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Show a policy's metadata, imports and exports, without running it.
    Inspect {
        /// A policy module (FILE.wasm) or a built-in's name.
        policy: String,
    },
    /// Run a policy on artifacts from a JSON file and print its decisions; no store is touched.
    Test {
        /// A policy module (FILE.wasm) or a built-in's name.
        policy: String,
        /// JSON: an array of artifacts ({id, name, stack, task, size, created_at, ...}).
        #[arg(long, value_name = "FIXTURE.json")]
        artifacts: PathBuf,
        /// The time to judge by, Unix seconds (default: now).
        #[arg(long, value_name = "UNIX_SECONDS")]
        now: Option<i64>,
        /// A parameter for the policy (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
        params: Vec<(String, String)>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Make a random token and print it with the token-file line that grants it.
    New {
        /// Scopes, comma-separated: read, write, delete, run, admin.
        #[arg(long, default_value = "read")]
        scopes: String,
        /// Who the token stands for (recorded in events).
        #[arg(long)]
        principal: String,
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
    /// Copy an artifact from one agent to another; only chunks the target lacks travel.
    Copy(CopyArgs),
    /// Delete what a retention policy chooses: by default, versions older than --older-than.
    #[command(after_help = SIZES_AND_TIMES)]
    Cleanup(CleanupArgs),
    /// Rehash every chunk and check every manifest and projection; report each problem with
    /// the artifact versions it hurts. Exits 1 when anything is wrong.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// Agent name: `local`, a name the master knows, or host:port.
    pub(crate) agent: String,
    /// Report (and repair) only this stack's artifacts; the chunks are checked store-wide.
    #[arg(long, short = 's')]
    pub(crate) stack: Option<String>,
    /// Mark versions whose content is lost as damaged (still listed, never served) and rebuild
    /// metadata.db and the artifacts/ layout.
    #[arg(long)]
    pub(crate) repair: bool,
}

#[derive(Debug, Args)]
pub(crate) struct CleanupArgs {
    /// Agent name: `local`, a name the master knows, or host:port.
    pub(crate) agent: String,
    /// Remove artifact versions older than this: a number and d, h, m or s (7d, 30d, 6h, 1h,
    /// 45m, 0d). Default 30d; the parameter of the built-in `older-than` policy.
    #[arg(long, value_name = "DURATION", value_parser = duration, conflicts_with = "policy", allow_hyphen_values = true)]
    pub(crate) older_than: Option<String>,
    /// Limit cleanup to one stack.
    #[arg(long, short = 's')]
    pub(crate) stack: Option<String>,
    /// List what would be deleted, with the policy's reasons, and delete nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Another policy: a built-in (older-than, keep-last, max-total-size, unused-for) or a
    /// policy module (FILE.wasm).
    #[arg(long, value_name = "BUILTIN|FILE.wasm")]
    pub(crate) policy: Option<String>,
    /// A parameter for the policy (repeatable), e.g. --param count=5.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
    pub(crate) params: Vec<(String, String)>,
}

/// A duration as cleanup takes it, checked up front so a typo never reaches a policy.
fn duration(text: &str) -> Result<String, String> {
    match sloth_policies::parse_duration(text) {
        Some(_) => Ok(text.to_owned()),
        None => Err(format!(
            "'{text}' is not a duration: use a whole number and a unit, d (days), h (hours), \
             m (minutes) or s (seconds), as in 7d, 30d, 6h, 1h, 45m or 0d"
        )),
    }
}

/// `host:port` as the agents judge it ([`sloth_agent::client::host_of`]).
pub(crate) fn host_port(text: &str) -> Result<String, String> {
    sloth_agent::client::host_of(text).map(|_| text.to_owned())
}

fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

#[derive(Debug, Args)]
pub(crate) struct CopyArgs {
    /// Agent to copy from.
    pub(crate) source: String,
    /// Agent to copy to.
    pub(crate) target: String,
    /// Artifact name.
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) scope: Scope,
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
    /// Version of the artifact (default: the newest; `delete` without it deletes every
    /// version).
    #[arg(long, value_name = "N")]
    pub(crate) version: Option<u32>,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Agent name: `local`, a name the master knows, or host:port.
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
    /// Agent name: `local`, a name the master knows, or host:port.
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
    /// Agent name: `local`, a name the master knows, or host:port.
    pub(crate) agent: String,
    /// Artifact names (several download concurrently; then -o must be a directory).
    #[arg(required = true, num_args = 1..)]
    pub(crate) names: Vec<String>,
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
    /// Agent name: `local`, a name the master knows, or host:port.
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
    /// Agent name: `local`, a name the master knows, or host:port.
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
    /// Agent whose trail to read: `local`, a name the master knows, or host:port.
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
