//! Compiles the built-in policies (`builtins/`, Rust written with the SDK) to
//! `wasm32-unknown-unknown` and puts the modules in `OUT_DIR`, where `lib.rs` includes them.
//! No `.wasm` file is committed: the modules always match their source.

use std::path::PathBuf;
use std::process::Command;

const POLICIES: [&str; 4] = ["older_than", "keep_last", "max_total_size", "unused_for"];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    for watched in [
        "builtins/src",
        "builtins/examples",
        "builtins/Cargo.toml",
        "builtins/Cargo.lock",
        "sdk/src",
        "sdk/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={watched}");
    }
    let target_dir = out_dir.join("builtins-target");
    // Through rustup's `cargo` when there is one, so that `builtins/`'s toolchain file (the
    // pinned toolchain, which has the wasm32 target) applies even when the outer build runs on
    // another toolchain (`cargo +nightly fuzz`); else the cargo running this build.
    let cargo = if Command::new("rustup").arg("--version").output().is_ok() {
        "cargo".into()
    } else {
        std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
    };
    let mut command = Command::new(cargo);
    command
        .current_dir(manifest_dir.join("builtins"))
        .args([
            "build",
            "--release",
            "--examples",
            "--locked",
            "--target",
            "wasm32-unknown-unknown",
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer build's settings are for the host (and maybe another toolchain), not wasm32.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .expect("running cargo to build the built-in policies");
    assert!(
        status.success(),
        "building the built-in policies for wasm32-unknown-unknown failed (is the target installed? \
         `rustup target add wasm32-unknown-unknown`)"
    );
    for policy in POLICIES {
        let built = target_dir
            .join("wasm32-unknown-unknown/release/examples")
            .join(format!("{policy}.wasm"));
        std::fs::copy(&built, out_dir.join(format!("{policy}.wasm")))
            .unwrap_or_else(|e| panic!("copying {}: {e}", built.display()));
    }
}
