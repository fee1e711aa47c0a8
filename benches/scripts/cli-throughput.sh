#!/usr/bin/env bash
# CLI upload and download of FILE on the embedded store against the chunk store's own ingest
# and verified read of the same file (`e2e --only-file`), alternated in each round so that
# every ratio compares figures from the same minute of this noisy machine.
#
#   benches/scripts/cli-throughput.sh FILE [ROUNDS]      (release build; WORK= sets the scratch dir)
set -euo pipefail
file=${1:?usage: cli-throughput.sh FILE [ROUNDS]}
rounds=${2:-3}
work=${WORK:-/var/tmp/sloth-cli-throughput}
bin=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}/release
cargo build --release -q -p sloth-cli -p sloth-benches --bin sloth-runner --bin e2e
size=$(stat -c %s "$file")
seconds() { /usr/bin/time -f %e "$@" 2>&1 >/dev/null | tail -1; }
grep -E '^(MemTotal|MemFree|Cached):' /proc/meminfo | tr -s ' ' | paste -sd ' '
echo "round  store-ingest  cli-upload  ratio   store-read  cli-download  ratio   (MB/s)"
for round in $(seq "$rounds"); do
    rm -rf "$work" && mkdir -p "$work"
    line=$("$bin/e2e" --only-file "$file" --work "$work/e2e" | tail -1)
    ingest=$(sed -E 's/.*ingest +([0-9.]+) MB\/s.*/\1/' <<<"$line")
    read=$(sed -E 's/.*read\+verify +([0-9.]+) MB\/s.*/\1/' <<<"$line")
    rm -rf "$work/e2e"
    sync
    up=$(seconds "$bin/sloth-runner" --data-dir "$work/data" agent artifacts upload local "$file")
    sync
    down=$(seconds "$bin/sloth-runner" --data-dir "$work/data" agent artifacts download local \
        "$(basename "$file")" -o "$work/out")
    cmp -s "$file" "$work/out" || { echo "the download differs from $file" >&2; exit 1; }
    awk -v r="$round" -v s="$size" -v i="$ingest" -v u="$up" -v rd="$read" -v d="$down" 'BEGIN {
        up = s / 1e6 / u; down = s / 1e6 / d
        printf "%5d  %12.0f  %10.0f  %5.2f   %10.0f  %12.0f  %5.2f\n", r, i, up, up / i, rd, down, down / rd
    }'
done
rm -rf "$work"
