#!/usr/bin/env bash
# Compare two builds of the `e2e` benchmark on one file: alternating `--only-file` ingests
# (A, B, A, B, ...), then the medians of each and of the per-pair ratios B/A. Alternating
# pairs cancel most of the machine's drift; run it a second time with A and B swapped before
# believing a difference of a few percent (the order alone has shown 2%).
#
# Usage: ab-ingest.sh E2E_A E2E_B [PAIRS] [FILE]
#   E2E_A, E2E_B  two copies of target/release/e2e (copy each build aside first)
#   PAIRS         default 10
#   FILE          default /var/tmp/sloth-e2e/text-input.tar (made by a first `e2e` run)
set -euo pipefail
a=$1 b=$2 pairs=${3:-10} file=${4:-/var/tmp/sloth-e2e/text-input.tar}
work=$(mktemp -d /var/tmp/ab-ingest.XXXXXX)
trap 'rm -rf "$work"' EXIT
export RUST_BACKTRACE=0
cat "$file" >/dev/null # cached, as for every run after it
for _ in $(seq "$pairs"); do
  for x in A B; do
    bin=$a
    [ "$x" = B ] && bin=$b
    "$bin" --work "$work/$x" --only-file "$file" 2>&1 |
      awk -v x="$x" '/ ingest / { for (i = 1; i <= NF; i++) {
          if ($i == "ingest") mbs = $(i + 1); if ($i == "CPU-s") cpu = $(i - 1) }
        print x, mbs, cpu }'
  done
done | python3 -c '
import statistics as st, sys
runs = {}
for line in sys.stdin:
    x, mbs, cpu = line.split()
    runs.setdefault(x, []).append((float(mbs), float(cpu)))
for x in sorted(runs):
    mbs = [m for m, _ in runs[x]]
    cpu = [c for _, c in runs[x]]
    print(f"{x}: ingest median {st.median(mbs):.1f} MB/s (min {min(mbs):.1f}, max {max(mbs):.1f}), "
          f"median {st.median(cpu):.3f} CPU-s, {len(mbs)} runs")
ratios = [b[0] / a[0] for a, b in zip(runs["A"], runs["B"])]
each = " ".join(f"{r:.3f}" for r in ratios)
print(f"B/A per pair: median {st.median(ratios):.3f} ({each})")
'
