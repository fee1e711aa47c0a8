//! What the CLI test files share.

// Each test file uses part of it.
#![allow(dead_code)]

use std::process::Command;

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_sloth-runner");

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
