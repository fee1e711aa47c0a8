//! Faults from outside: a full disk. (Corruption is `engine/tests/corruption.rs`; crashes are
//! `cli/tests/crash.rs`.)
//!
//! The store lives on a tmpfs of a few MiB, mounted in a private mount namespace
//! (`unshare --mount --map-root-user`), so the test needs neither root nor a loop device. A
//! machine that forbids user namespaces fails the test with the reason; set
//! `SLOTH_SKIP_NAMESPACE_TESTS=1` there to skip it knowingly.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

mod common;

use common::BIN;

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut state = 0x2545_F491_4F6C_DD1D_u64 ^ seed;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data).unwrap();
}

/// Runs `script` (sh) in a private mount namespace where `$MNT` is a fresh tmpfs of `size`.
fn in_small_filesystem(dir: &Path, size: &str, script: &str) -> Option<String> {
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--map-root-user", "sh", "-c"])
        .arg(format!(
            "set -u\nmount -t tmpfs -o size={size} tmpfs \"$MNT\" || exit 97\n{script}"
        ))
        .env("MNT", &mnt)
        .env("BIN", BIN)
        .env("DIR", dir)
        .env("USER", "tester")
        .env_remove("SLOTH_RUNNER_DATA_DIR")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(97) || text.contains("unshare failed") {
        if std::env::var_os("SLOTH_SKIP_NAMESPACE_TESTS").is_some() {
            eprintln!("skipped: cannot mount a tmpfs in a user namespace here: {text}");
            return None;
        }
        panic!(
            "cannot mount a tmpfs in a user namespace: {text}\n(set SLOTH_SKIP_NAMESPACE_TESTS=1 to skip)"
        );
    }
    Some(text)
}

#[test]
fn a_full_disk_fails_uploads_cleanly_and_the_store_recovers() {
    for layout in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        random_file(&dir.path().join("small.bin"), 1_000_000, 1);
        random_file(&dir.path().join("big.bin"), 12_000_000, 2);
        let config = format!("layout = {layout}\n");
        let script = format!(
            r#"
mkdir "$MNT/data" && printf '{config}' > "$MNT/data/config.toml"
s() {{ "$BIN" --data-dir "$MNT/data" "$@"; }}
s agent artifacts upload local "$DIR/small.bin" >/dev/null || exit 1
if s agent artifacts upload local "$DIR/big.bin" 2>"$DIR/err"; then echo "UPLOAD-SUCCEEDED"; fi
echo "ERR: $(cat "$DIR/err")"
# Whatever room the failed upload left, none is left now: reading must need no free byte.
cat /dev/zero > "$MNT/filler" 2>/dev/null
s agent artifacts list local --output json > "$DIR/listed.json" || echo "LIST-FAILED"
s agent artifacts show local small.bin > "$DIR/shown" || echo "SHOW-FAILED"
s agent artifacts verify local > "$DIR/verify1" 2>&1 && echo "VERIFY1-PASSED"
rm "$MNT/filler"
mount -o remount,size=64m "$MNT" || exit 98
s agent artifacts upload local "$DIR/big.bin" >/dev/null 2>&1 || echo "RETRY-FAILED"
s agent artifacts verify local > "$DIR/verify2" 2>&1 || echo "VERIFY2-FAILED"
s agent artifacts download local big.bin -o "$DIR/big.out" >/dev/null 2>&1 || echo "DOWNLOAD-FAILED"
s agent artifacts download local small.bin -o "$DIR/small.out" >/dev/null 2>&1 || echo "DOWNLOAD-FAILED"
"#
        );
        let Some(out) = in_small_filesystem(dir.path(), "8m", &script) else {
            return;
        };
        let context = format!("layout = {layout}:\n{out}");
        assert!(!out.contains("UPLOAD-SUCCEEDED"), "{context}");
        assert!(out.contains("No space left on device"), "{context}");
        for failure in [
            "LIST-FAILED",
            "SHOW-FAILED",
            "RETRY-FAILED",
            "VERIFY2-FAILED",
            "DOWNLOAD-FAILED",
        ] {
            assert!(!out.contains(failure), "{failure}: {context}");
        }
        // With no room for SQLite's shared-memory index, verify cannot read metadata.db: it
        // says so, and finds the content whole.
        let verify1 = std::fs::read_to_string(dir.path().join("verify1")).unwrap();
        assert!(!out.contains("VERIFY1-PASSED"), "{context}");
        assert!(
            verify1.contains("⚠ Projection: metadata.db: disk I/O error")
                && verify1.contains("0 bad chunks, 0 damaged versions, 1 projection problem"),
            "{verify1}"
        );
        // No partial version: only small.bin was listed while the disk was full.
        let listed = std::fs::read_to_string(dir.path().join("listed.json")).unwrap();
        assert!(
            listed.contains("small.bin") && !listed.contains("big.bin"),
            "{listed}"
        );
        for name in ["big", "small"] {
            assert!(
                std::fs::read(dir.path().join(format!("{name}.bin"))).unwrap()
                    == std::fs::read(dir.path().join(format!("{name}.out"))).unwrap(),
                "{name} read back"
            );
        }
    }
}
