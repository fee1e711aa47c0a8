//! What the CLI test files share.

// Each test file uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_sloth-runner");

/// The repository's `examples/` folder. Found through the `CARGO_MANIFEST_DIR` cargo and nextest
/// set when they run a test, not the one baked in at build time: two checkouts sharing a target
/// directory can reuse each other's test binaries, and the baked path is then the other's.
pub(crate) fn examples() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.join("../examples")
}

/// `sloth-runner` run as the user `tester`, with none of the settings a developer's
/// environment might carry (data directory, master, token, CA).
pub(crate) fn sloth() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("SLOTH_RUNNER_DATA_DIR")
        .env_remove("SLOTH_RUNNER_MASTER_ADDR")
        .env_remove("SLOTH_RUNNER_TOKEN")
        .env_remove("SLOTH_RUNNER_CA")
        .env("USER", "tester");
    cmd
}
