#!/usr/bin/env bash
# Build a "version series" dataset: three uncompressed tars (v1.tar, v2.tar,
# v3.tar) of a dependency cache made of Rust crate sources, where crates are
# added, dropped and version-bumped between versions.
#
# Usage: make-version-series.sh OUT_DIR
#
# Where the crates come from (SERIES_SOURCE):
#   lock  (default) Self-contained: writes two throwaway cargo projects into a
#         temp dir (an "old" one pinned to mid-2024 releases, resolved
#         MSRV-aware against rust-version 1.75, and a "new" one), runs
#         `cargo generate-lockfile` + `cargo fetch` for each (this downloads
#         the .crate files into $CARGO_HOME/registry/cache), and takes the
#         union of the registry packages in both Cargo.lock files.
#   cache Every $CARGO_HOME/registry/cache/*/*.crate already present
#         (no network; the set depends on what this machine has fetched).
# Either way the .crate files (gzipped tars of `name-version/...`) are unpacked
# into a temp dir and the tars are built from there, so nothing depends on
# which crates happen to be unpacked in registry/src.
#
# Reproducibility: top-level dependencies are pinned with `=`, but transitive
# ones resolve against the crates.io index of the day. The resolved lockfiles
# are written to OUT_DIR/{old,new}.Cargo.lock; to rebuild the very same
# dataset later, pass SERIES_LOCK_DIR=DIR holding old.Cargo.lock and
# new.Cargo.lock (e.g. a previous OUT_DIR): they are then used as is
# (`cargo fetch --locked`). OUT_DIR also gets v{1,2,3}.list (crate dirs per
# tar) and SHA256SUMS.
#
# Selection (deterministic): crate dirs are grouped by crate name; groups are
# sorted by name and numbered g = 0, 1, 2, ...
#   g % 10 == 9   held out of v1; alternately (1st, 3rd, ... held-out group)
#                 added in v2, or (2nd, 4th, ...) added in v3   (~10%)
#   g % 20 == 4   in v1 only (dropped in v2)                     (~5%)
#   g % 20 == 14  in v1 and v2 (dropped in v3)                   (~5%)
#   otherwise     in all three
# A group with several versions (e.g. hyper 0.14 and 1.x) is a version bump:
# v1 gets the oldest version, v3 the newest, v2 the middle one (3+ versions)
# or, with exactly 2 versions, alternately the newer (bump at v2) or the older
# (bump at v3) one.
#
# Tars: `tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner
# --format=gnu`, normalised modes, uncompressed; each top-level entry is one
# `name-version/` dir, as in registry/src.
#
# Env: CARGO_HOME (default ~/.cargo), TMPDIR (temp space, ~1.5 GB for lock),
# SERIES_SOURCE (lock|cache), SERIES_LOCK_DIR, SERIES_DRY_RUN=1 (select and
# print estimated sizes from the .crate headers, build no tar).
set -euo pipefail
export LC_ALL=C
umask 022

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
OUT_DIR=$1
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
SOURCE=${SERIES_SOURCE:-lock}
LOCK_DIR=${SERIES_LOCK_DIR:-}
DRY_RUN=${SERIES_DRY_RUN:-0}
REGISTRY_CACHE=$CARGO_HOME/registry/cache

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sloth-series.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

log() { echo "[make-version-series] $*" >&2; }

# ---------------------------------------------------------------- manifests
write_project() { # DIR KIND
    local dir=$1 kind=$2
    mkdir -p "$dir/src"
    echo 'fn main() {}' >"$dir/src/main.rs"
    if [ "$kind" = old ]; then
        # Roughly what the dependency tree looked like in mid-2024. The
        # MSRV-aware resolver (resolver 3, cargo >= 1.84) also pulls older
        # transitive versions, compatible with rust-version 1.75.
        cat >"$dir/Cargo.toml" <<'EOF'
[package]
name = "series-old"
version = "0.0.0"
edition = "2021"
rust-version = "1.75"
resolver = "3"
publish = false

[dependencies]
tokio = { version = "=1.38.0", features = ["full"] }
tonic = "=0.11.0"
prost = "=0.12.6"
wasmtime = "=22.0.0"
mlua = { version = "=0.9.8", features = ["lua54", "vendored"] }
clap = { version = "=4.5.4", features = ["derive"] }
serde = { version = "=1.0.203", features = ["derive"] }
serde_json = "=1.0.117"
rusqlite = { version = "=0.31.0", features = ["bundled"] }
rustls = "=0.23.10"
reqwest = { version = "=0.12.4", features = ["json"] }
hyper = { version = "=1.3.1", features = ["full"] }
axum = "=0.7.5"
regex = "=1.10.4"
syn = { version = "=2.0.66", features = ["full"] }
image = "=0.25.1"
polars = { version = "=0.40.0", features = ["lazy"] }
datafusion = "=39.0.0"
aws-sdk-s3 = "=1.36.0"
gix = "=0.63.0"
EOF
    else
        cat >"$dir/Cargo.toml" <<'EOF'
[package]
name = "series-new"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
tokio = { version = "=1.54.1", features = ["full"] }
tonic = "=0.14.9"
prost = "=0.14.6"
wasmtime = "=48.0.8"
mlua = { version = "=0.12.2", features = ["lua54", "vendored"] }
clap = { version = "=4.6.9", features = ["derive"] }
serde = { version = "=1.0.229", features = ["derive"] }
serde_json = "=1.0.154"
rusqlite = { version = "=0.43.0", features = ["bundled"] }
rustls = "=0.23.46"
reqwest = { version = "=0.13.5", features = ["json"] }
hyper = { version = "=1.12.0", features = ["full"] }
axum = "=0.8.9"
regex = "=1.13.2"
syn = { version = "=2.0.119", features = ["full"] }
image = "=0.25.10"
polars = { version = "=0.55.2", features = ["lazy"] }
datafusion = "=55.2.0"
aws-sdk-s3 = "=1.157.0"
gix = "=0.90.0"
EOF
    fi
}

# Registry packages of a Cargo.lock, as "name version" lines.
lock_packages() {
    awk '
        /^\[\[package\]\]/ { n = ""; v = ""; next }
        /^name = /         { n = $3; next }
        /^version = /      { v = $3; next }
        /^source = "registry\+/ { gsub(/"/, "", n); gsub(/"/, "", v); print n, v }
    ' "$1"
}

# "name version" lines, one per crate file to use -> $WORK/crates (sorted,
# unique), and $WORK/crate-files: "name-version path/to/.crate".
: >"$WORK/crates.raw"
case "$SOURCE" in
lock)
    command -v cargo >/dev/null || { echo "cargo not found" >&2; exit 1; }
    for kind in old new; do
        proj=$WORK/proj-$kind
        write_project "$proj" "$kind"
        if [ -n "$LOCK_DIR" ] && [ -f "$LOCK_DIR/$kind.Cargo.lock" ]; then
            log "$kind: using $LOCK_DIR/$kind.Cargo.lock"
            cp "$LOCK_DIR/$kind.Cargo.lock" "$proj/Cargo.lock"
        else
            log "$kind: resolving (cargo generate-lockfile)"
            (cd "$proj" && cargo generate-lockfile --quiet)
        fi
        log "$kind: cargo fetch --locked"
        (cd "$proj" && cargo fetch --locked --quiet)
        cp "$proj/Cargo.lock" "$OUT_DIR/$kind.Cargo.lock"
        lock_packages "$proj/Cargo.lock" >>"$WORK/crates.raw"
    done
    sort -u "$WORK/crates.raw" >"$WORK/crates.nv"
    while read -r n v; do
        f=
        for cand in "$REGISTRY_CACHE"/*/"$n-$v.crate"; do
            if [ -f "$cand" ]; then f=$cand; break; fi
        done
        if [ -z "$f" ]; then
            echo "missing $n-$v.crate under $REGISTRY_CACHE (cargo fetch failed?)" >&2
            exit 1
        fi
        echo "$n-$v $f"
    done <"$WORK/crates.nv" | sort -k1,1 >"$WORK/crate-files"
    ;;
cache)
    # Sorted paths; the first index dir wins for a crate cached twice.
    find "$REGISTRY_CACHE" -mindepth 2 -maxdepth 2 -name '*.crate' -type f | sort |
        awk '{ f = $0; sub(/.*\//, "", f); sub(/\.crate$/, "", f);
               if (!(f in seen)) { seen[f] = 1; print f, $0 } }' |
        sort -k1,1 >"$WORK/crate-files"
    # Split name-version at the last "-<digits>.<digits>.<digits>".
    sed -E 's/^(.*)-([0-9]+\.[0-9]+\.[0-9]+[^ ]*) .*$/\1 \2/' "$WORK/crate-files" |
        sort -u >"$WORK/crates.nv"
    ;;
*)
    echo "SERIES_SOURCE must be lock or cache, not '$SOURCE'" >&2
    exit 2
    ;;
esac

total=$(wc -l <"$WORK/crates.nv")
if [ "$total" -lt 20 ]; then
    echo "only $total crates found; need at least 20" >&2
    exit 1
fi

# ---------------------------------------------------------------- selection
# Input: "name version" sorted by name then version (version order).
sort -t' ' -k1,1 -k2,2V "$WORK/crates.nv" | awk -v dir="$WORK" '
    function flush(   k, g, in1, in2, in3, i2) {
        if (ng == 0) return
        k = nv; g = gi++
        in1 = in2 = in3 = 1
        if (g % 10 == 9) { in1 = 0; if (held++ % 2 == 0) in2 = 1; else in2 = 0 }
        else if (g % 20 == 4)  { in2 = 0; in3 = 0 }
        else if (g % 20 == 14) { in3 = 0 }
        if (k == 1) i2 = 1
        else if (k == 2) i2 = (multi % 2 == 0) ? 2 : 1
        else i2 = int((k + 1) / 2)
        if (k > 1) multi++
        if (in1) print name "-" ver[1] > (dir "/v1.sel")
        if (in2) print name "-" ver[i2] > (dir "/v2.sel")
        if (in3) print name "-" ver[k] > (dir "/v3.sel")
        ng = 0
    }
    BEGIN { gi = 0; held = 0; multi = 0; ng = 0 }
    {
        if (ng && $1 != name) flush()
        if (!ng) { name = $1; nv = 0; ng = 1 }
        ver[++nv] = $2
    }
    END {
        flush()
        printf "%d %d\n", gi, multi > (dir "/sel.stats")
    }
'
read -r n_names n_multi <"$WORK/sel.stats"
for v in 1 2 3; do
    sort -u "$WORK/v$v.sel" >"$OUT_DIR/v$v.list"
done
sort -u "$OUT_DIR/v1.list" "$OUT_DIR/v2.list" "$OUT_DIR/v3.list" >"$WORK/needed"
# every selected crate must map to exactly one .crate file
if [ "$(join "$WORK/needed" "$WORK/crate-files" | wc -l)" -ne "$(wc -l <"$WORK/needed")" ]; then
    echo "internal error: selected crates without a .crate file" >&2
    exit 1
fi

log "crate versions available: $total, crate names: $n_names, names with several versions: $n_multi"
echo "crate-list fingerprint: $(cut -d' ' -f1 "$WORK/crate-files" | sha256sum | cut -c1-16) (source=$SOURCE)"

# names of a list (strip the version)
names_of() { sed -E 's/^(.*)-([0-9]+\.[0-9]+\.[0-9]+.*)$/\1/' "$1" | sort -u; }
describe() { # V PREV
    local v=$1 prev=${2:-}
    local line
    line="v$v: crates=$(wc -l <"$OUT_DIR/v$v.list")"
    if [ -n "$prev" ]; then
        names_of "$OUT_DIR/v$prev.list" >"$WORK/pn"
        names_of "$OUT_DIR/v$v.list" >"$WORK/cn"
        local added removed bumped
        added=$(comm -13 "$WORK/pn" "$WORK/cn" | wc -l)
        removed=$(comm -23 "$WORK/pn" "$WORK/cn" | wc -l)
        # same name in both, different version
        bumped=$(comm -13 "$OUT_DIR/v$prev.list" "$OUT_DIR/v$v.list" |
            sed -E 's/^(.*)-([0-9]+\.[0-9]+\.[0-9]+.*)$/\1/' | sort -u |
            comm -12 - "$WORK/pn" | wc -l)
        line="$line (vs v$prev: +$added crates, -$removed crates, $bumped version bumps)"
    fi
    echo "$line"
}

if [ "$DRY_RUN" = 1 ]; then
    for v in 1 2 3; do
        est=$(join "$OUT_DIR/v$v.list" "$WORK/crate-files" | while read -r _ f; do
            gzip -l "$f" | awk 'NR == 2 { print $2 }'
        done | awk '{ s += $1 } END { printf "%d", s }')
        echo "$(describe $v $([ $v -gt 1 ] && echo $((v - 1)))) est_tar_bytes=$est"
    done
    exit 0
fi

# ---------------------------------------------------------------- extract
POOL=$WORK/pool
mkdir -p "$POOL"
log "unpacking $(wc -l <"$WORK/needed") .crate files into $POOL"
join "$WORK/needed" "$WORK/crate-files" | while read -r c f; do
    tar -xzf "$f" -C "$POOL" --no-same-owner --no-same-permissions
    if [ ! -d "$POOL/$c" ]; then
        echo "$f did not unpack to $c/" >&2
        exit 1
    fi
done
# .crate files are expected to hold exactly name-version/; anything else
# unpacked at the top level would be silently ignored, so check.
extra=$(ls -A "$POOL" | sort | comm -23 - "$WORK/needed" | head -5)
if [ -n "$extra" ]; then
    echo "unexpected top-level entries unpacked: $extra" >&2
    exit 1
fi

# ---------------------------------------------------------------- tars
rm -f "$OUT_DIR/SHA256SUMS"
for v in 1 2 3; do
    # Top-level order = the sorted list; --sort=name orders each dir below.
    tar -C "$POOL" -cf "$OUT_DIR/v$v.tar.tmp" \
        --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        --format=gnu --mode='u+rwX,go+rX,go-w' \
        --verbatim-files-from --files-from="$OUT_DIR/v$v.list"
    mv "$OUT_DIR/v$v.tar.tmp" "$OUT_DIR/v$v.tar"
    echo "$(describe $v $([ $v -gt 1 ] && echo $((v - 1)))) tar_bytes=$(stat -c %s "$OUT_DIR/v$v.tar")"
done
(cd "$OUT_DIR" && sha256sum v1.tar v2.tar v3.tar >SHA256SUMS)
sed 's/^/sha256 /' "$OUT_DIR/SHA256SUMS"
