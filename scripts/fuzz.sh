#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 30 s each) and fails on the first
# crash. Needs a nightly toolchain and cargo-fuzz (.ci/run installs both). Crashing inputs are
# left in fuzz/artifacts/<target>/; replay with `cargo +nightly fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-30}"
# No sanitizer: the crates forbid unsafe code, and an uninstrumented build takes half the time.
# Fuzz builds get a target directory of their own: their flags differ from the main build's.
export CARGO_TARGET_DIR="${SLOTH_FUZZ_TARGET_DIR:-/var/tmp/sloth-fuzz-target}"
cargo +nightly fuzz build --sanitizer none
for target in $(cargo +nightly fuzz list); do
    extra=()
    # Each store_model input opens a store: keep sequences long enough to mean something.
    if [ "$target" = store_model ]; then extra=(-len_control=0 -max_len=1024); fi
    mkdir -p "corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    # (pipefail: a crash fails the pipeline, and set -e the script.)
    cargo +nightly fuzz run --sanitizer none "$target" -- \
        -max_total_time="$seconds" "${extra[@]}" 2>&1 | tail -n 3
done
