#!/usr/bin/env bash
# The whole test suite: unit, integration and property tests (nextest), doctests, and a
# compile check of the fuzz targets (their own workspace).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo nextest run --workspace --no-fail-fast
cargo test --workspace --doc
(cd fuzz && cargo check --all-targets --quiet)
