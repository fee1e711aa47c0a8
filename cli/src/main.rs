//! `sloth-runner`: the command line of sloth-runner's artifact system.
//!
//! Each command lives in its own module and writes to the `Write` it is handed; errors come
//! back here, where they are printed as `error: ` and their chain, with exit code 1.

mod agent;
mod args;
mod artifacts;
mod cleanup;
mod events;
mod format;
mod progress;
mod run;
mod serve;
mod verify;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::args::{
    AgentCommand, ArtifactsCommand, Cli, Command, EventsCommand, MasterCommand, PolicyCommand,
    TokenCommand,
};

#[tokio::main]
async fn main() -> ExitCode {
    // Warnings from the libraries (a projection left stale after a committed change, a GC to
    // retry) go to stderr as `WARN ...`; the commands' own output stays on stdout.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(if serving_command() {
            tracing::Level::INFO
        } else {
            tracing::Level::WARN
        })
        .without_time()
        .with_target(false)
        .init();
    let cli = Cli::parse();
    // Servers handle SIGINT/SIGTERM themselves: they stop accepting and finish what is in
    // flight. INFO from them (registrations, shutdown) goes to stderr too.
    let serving = matches!(
        cli.command,
        Command::Agent {
            command: AgentCommand::Start(_)
        } | Command::Master { .. }
    );
    let result = if serving {
        run(cli).await
    } else {
        interruptible(cli).await
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `sloth-runner ... | head` closing the pipe early is not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Interrupted>().is_some() => ExitCode::from(130),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Whether the command line starts a server (read before clap, for the log level).
fn serving_command() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .any(|w| (w[0] == "agent" || w[0] == "master") && w[1] == "start")
}

/// Ctrl-C during a client command.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

async fn interruptible(cli: Cli) -> anyhow::Result<()> {
    // Ctrl-C drops the command's future, so what it holds is cleaned up on the way out (a
    // download's temporary file is deleted; an upload's uncommitted chunks are left for GC and
    // its staging copy for the next open to sweep) instead of the process dying mid-write.
    tokio::select! {
        result = run(cli) => result,
        _ = tokio::signal::ctrl_c() => {
            let _ = writeln!(std::io::stderr(), "error: interrupted");
            Err(Interrupted.into())
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let ctx = agent::Context {
        data_dir: agent::data_dir(cli.data_dir)?,
        net: cli.net,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Agent { command } => match command {
            AgentCommand::Artifacts { command } => match command {
                ArtifactsCommand::List(args) => artifacts::list(&ctx, args, &mut out).await?,
                ArtifactsCommand::Upload(args) => artifacts::upload(&ctx, args, &mut out).await?,
                ArtifactsCommand::Download(args) => {
                    artifacts::download(&ctx, args, &mut out).await?
                }
                ArtifactsCommand::Show(args) => artifacts::show(&ctx, args, &mut out).await?,
                ArtifactsCommand::Delete(args) => {
                    artifacts::delete(&ctx, args, &mut out, &mut std::io::stdin().lock()).await?
                }
                ArtifactsCommand::Copy(args) => artifacts::copy(&ctx, args, &mut out).await?,
                ArtifactsCommand::Cleanup(args) => cleanup::cleanup(&ctx, args, &mut out).await?,
                ArtifactsCommand::Verify(args) => verify::verify(&ctx, args, &mut out).await?,
            },
            AgentCommand::Start(args) => {
                drop(out);
                serve::agent_start(&ctx, args, &mut std::io::stdout()).await?;
                return Ok(());
            }
            AgentCommand::List => serve::agent_list(&ctx, &mut out).await?,
            AgentCommand::Get { name } => serve::agent_get(&ctx, &name, &mut out).await?,
        },
        Command::Master {
            command: MasterCommand::Start(args),
        } => {
            drop(out);
            serve::master_start(args, &mut std::io::stdout()).await?;
            return Ok(());
        }
        Command::Policy { command } => match command {
            PolicyCommand::Inspect { policy } => cleanup::inspect(&policy, &mut out)?,
            PolicyCommand::Test {
                policy,
                artifacts,
                now,
                params,
            } => cleanup::test(&policy, &artifacts, now, params, &mut out)?,
        },
        Command::Token {
            command: TokenCommand::New { scopes, principal },
        } => serve::token_new(&scopes, &principal, &mut out)?,
        Command::Events {
            command: EventsCommand::List(args),
        } => events::list(&ctx, args, &mut out).await?,
        Command::Run(args) => {
            // Task output is printed as it happens, from the run's event sink.
            drop(out);
            run::run(&ctx, args).await?;
            return Ok(());
        }
    }
    out.flush()?;
    Ok(())
}

/// Whether the error is stdout's write failing because the reader went away. Only a bare
/// I/O error counts: the commands' own writes propagate as such, while store errors that
/// happen to wrap an I/O error arrive as the engine's error type.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The error and its causes, joined by `: ` as anyhow's `{:#}` does, except that a cause whose
/// text the message already shows is not repeated (some library errors print their source in
/// their own message and also return it from `source()`).
fn chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_skips_causes_already_shown() {
        let inner = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(inner)
            .context("cannot write 'x': disk on fire")
            .context("downloading");
        assert_eq!(chain(&e), "downloading: cannot write 'x': disk on fire");
        let e = anyhow::anyhow!("root").context("outer");
        assert_eq!(chain(&e), "outer: root");
    }
}
