//! Which store an agent name means, where the data directory is, and who is asking.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sloth_engine::{Engine, EngineConfig, StoreConfigFile};

/// How long a command waits for another `sloth-runner` process to release the store.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The one agent that exists today: the embedded store in the data directory.
pub(crate) const LOCAL: &str = "local";

/// Opens the store of `agent`. Only `local` exists until network agents are implemented; any
/// other name fails here, before anything is read or written.
pub(crate) async fn open(agent: &str, data_dir: &Path) -> anyhow::Result<Engine> {
    check(agent, data_dir)?;
    if data_dir.exists() && !data_dir.is_dir() {
        bail!(
            "data directory '{}' is not usable: it is not a directory",
            data_dir.display()
        );
    }
    let mut config = StoreConfigFile::load(data_dir)?.apply(EngineConfig {
        agent: LOCAL.into(),
        ..EngineConfig::default()
    })?;
    // The embedded store serves one process at a time (sled's lock): commands started
    // together on `local` take turns instead of failing, up to this long.
    config.cas.lock_wait = LOCK_WAIT;
    Ok(Engine::open(data_dir, config).await?)
}

/// Fails unless `agent` names a store this build can reach.
pub(crate) fn check(agent: &str, data_dir: &Path) -> anyhow::Result<()> {
    if agent != LOCAL {
        bail!(
            "agent '{agent}' is not reachable: only '{LOCAL}' (the embedded store in {}) is available; \
             network agents are not implemented yet",
            data_dir.display()
        );
    }
    Ok(())
}

/// The data directory: `--data-dir` / `SLOTH_RUNNER_DATA_DIR` when given, else
/// `/var/lib/sloth-runner` for root, else `$XDG_DATA_HOME/sloth-runner`, else
/// `~/.local/share/sloth-runner`.
pub(crate) fn data_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = given {
        if dir.as_os_str().is_empty() {
            bail!("--data-dir must not be empty");
        }
        return Ok(dir);
    }
    if effective_uid() == Some(0) {
        return Ok(PathBuf::from("/var/lib/sloth-runner"));
    }
    // The XDG spec says a relative $XDG_DATA_HOME is invalid and must be ignored.
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").map(PathBuf::from)
        && xdg.is_absolute()
    {
        return Ok(xdg.join("sloth-runner"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("cannot choose a data directory: HOME is not set; pass --data-dir or set SLOTH_RUNNER_DATA_DIR")?;
    Ok(PathBuf::from(home).join(".local/share/sloth-runner"))
}

/// Who is recorded in events: `$USER`, else `$LOGNAME`, else `uid <n>`.
pub(crate) fn principal() -> String {
    ["USER", "LOGNAME"]
        .into_iter()
        .filter_map(|var| std::env::var(var).ok())
        .find(|name| !name.is_empty())
        .or_else(|| effective_uid().map(|uid| format!("uid {uid}")))
        .unwrap_or_else(|| "unknown".into())
}

/// The effective uid, read from the owner of `/proc/self` (Linux) to stay free of `unsafe`
/// and of libc bindings.
fn effective_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}
