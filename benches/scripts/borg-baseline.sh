#!/usr/bin/env bash
# borg baseline for a version series (see make-version-series.sh).
#
# Usage: borg-baseline.sh SERIES_DIR
#
# For each run -- "default" (borg's default chunker, buzhash,19,23,21,4095,
# ~2 MiB average) and "512k" (buzhash,17,23,19,4095, ~512 KiB average, for
# reference) -- stores v1.tar, v2.tar, v3.tar, in that order, as archives v1,
# v2, v3 of ONE fresh repo (`borg init --encryption=none`, `borg create
# --compression zstd,3`), and prints after each version:
#
#   borg vN tar_bytes=... repo_du_sb=... secs=... dedup_bytes=... run=...
#
# repo_du_sb is `du -sb` of the whole repo dir (so borg's own overhead:
# index, hints, integrity files, segment headers, counts); dedup_bytes is
# borg's "Deduplicated size" of that archive (compressed bytes of the chunks
# it was first to store); secs is the wall time of `borg create`. Then
# totals per run.
#
# Needs borg (Debian: apt-get install borgbackup). Repos and borg's
# cache/config/keys (BORG_BASE_DIR) live in a temp dir that is removed at exit
# (BORG_BASELINE_KEEP=1 keeps it), under BORG_BASELINE_WORK (default
# ${TMPDIR:-/tmp}); nothing is left in $HOME. BORG_BASELINE_RUNS selects runs
# (default "default 512k").
set -euo pipefail
export LC_ALL=C

if [ $# -ne 1 ]; then
    echo "usage: $0 SERIES_DIR" >&2
    exit 2
fi
SERIES_DIR=$(cd "$1" && pwd)
for v in 1 2 3; do
    [ -f "$SERIES_DIR/v$v.tar" ] || { echo "missing $SERIES_DIR/v$v.tar" >&2; exit 1; }
done
command -v borg >/dev/null || { echo "borg not found (apt-get install borgbackup)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 1; }

WORK=$(mktemp -d "${BORG_BASELINE_WORK:-${TMPDIR:-/tmp}}/borg-baseline.XXXXXX")
if [ "${BORG_BASELINE_KEEP:-0}" = 1 ]; then
    trap 'echo "kept $WORK" >&2' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi
export BORG_BASE_DIR=$WORK/base
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
unset BORG_REPO BORG_PASSPHRASE BORG_PASSCOMMAND BORG_KEY_FILE || true
mkdir -p "$BORG_BASE_DIR"

now_ns() { date +%s%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 1e9 }'; }

# Pull the figures we need out of `borg create --json` output.
json_stats() {
    python3 -c '
import json, sys
d = json.load(sys.stdin)
a = d["archive"]["stats"]
c = d["cache"]["stats"]
print(a["original_size"], a["compressed_size"], a["deduplicated_size"],
      c["unique_csize"], c["total_unique_chunks"], c["total_chunks"],
      d["archive"]["duration"])
'
}

echo "$(borg --version), compression zstd,3, series $SERIES_DIR"
for run in ${BORG_BASELINE_RUNS:-default 512k}; do
    case "$run" in
    default) chunker=() ; chunker_desc="default (buzhash,19,23,21,4095)" ;;
    512k) chunker=(--chunker-params buzhash,17,23,19,4095) ; chunker_desc="buzhash,17,23,19,4095" ;;
    *) echo "unknown run '$run' (default|512k)" >&2; exit 2 ;;
    esac
    repo=$WORK/repo-$run
    borg init --encryption=none "$repo" >/dev/null
    echo "== run=$run chunker=$chunker_desc repo_du_sb_empty=$(du -sb "$repo" | cut -f1)"
    tar_total=0
    time_total=0
    for v in 1 2 3; do
        tar_bytes=$(stat -c %s "$SERIES_DIR/v$v.tar")
        t0=$(now_ns)
        # Relative path, so the archive holds "vN.tar", not the series dir.
        out=$(cd "$SERIES_DIR" && borg create --json --compression zstd,3 \
            ${chunker[@]+"${chunker[@]}"} "$repo::v$v" "v$v.tar")
        t1=$(now_ns)
        read -r orig csize dedup uniq_csize uniq_chunks total_chunks dur <<<"$(json_stats <<<"$out")"
        du_sb=$(du -sb "$repo" | cut -f1)
        s=$(secs "$t0" "$t1")
        tar_total=$((tar_total + tar_bytes))
        time_total=$(awk -v a="$time_total" -v b="$s" 'BEGIN { printf "%.2f", a + b }')
        echo "borg v$v tar_bytes=$tar_bytes repo_du_sb=$du_sb secs=$s dedup_bytes=$dedup run=$run"
        echo "    borg \"This archive\": original=$orig compressed=$csize deduplicated=$dedup;" \
            "\"All archives\" deduplicated (unique_csize)=$uniq_csize;" \
            "chunks unique/total=$uniq_chunks/$total_chunks; borg duration=${dur}s"
    done
    du_sb=$(du -sb "$repo" | cut -f1)
    echo "borg total run=$run tar_bytes=$tar_total repo_du_sb=$du_sb secs=$time_total" \
        "ratio_tar_over_repo=$(awk -v a="$tar_total" -v b="$du_sb" 'BEGIN { printf "%.3f", a / b }')" \
        "unique_csize=$uniq_csize"
done
