//! Several `sloth-runner` processes uploading, downloading and deleting overlapping
//! artifacts on the same `local` store at once. They take turns on the store's lock; afterwards
//! every live version reads back with its checksum and `stack_usage` matches the catalog.

use std::process::Command;

use sha2::Digest;

fn runner(data: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sloth-runner"));
    c.arg("--data-dir").arg(data);
    c
}

#[test]
fn processes_share_the_local_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let data = data.clone();
            let work = dir.path().join(format!("w{w}"));
            std::thread::spawn(move || {
                std::fs::create_dir_all(&work).unwrap();
                for round in 0..4u64 {
                    let name = format!("shared-{}.bin", (w + round) % 3);
                    let file = work.join(&name);
                    let mut bytes = vec![(w * 16 + round) as u8; 200_000];
                    bytes.extend_from_slice(&(w * 100 + round).to_le_bytes());
                    std::fs::write(&file, &bytes).unwrap();
                    let up = runner(&data)
                        .args(["agent", "artifacts", "upload", "local"])
                        .arg(&file)
                        .args(["--stack", "ci", "--task", "build"])
                        .output()
                        .unwrap();
                    assert!(
                        up.status.success(),
                        "{}",
                        String::from_utf8_lossy(&up.stderr)
                    );
                    // Someone else may have deleted it meanwhile: a clean "not found" is fine.
                    let down = runner(&data)
                        .args([
                            "agent",
                            "artifacts",
                            "download",
                            "local",
                            &name,
                            "--stack",
                            "ci",
                            "--task",
                            "build",
                            "-o",
                        ])
                        .arg(work.join("down.bin"))
                        .output()
                        .unwrap();
                    if !down.status.success() {
                        let err = String::from_utf8_lossy(&down.stderr);
                        assert!(err.contains("not found"), "{err}");
                    }
                    if round == 2 {
                        let del = runner(&data)
                            .args([
                                "agent",
                                "artifacts",
                                "delete",
                                "local",
                                &name,
                                "--stack",
                                "ci",
                                "--task",
                                "build",
                                "--force",
                            ])
                            .output()
                            .unwrap();
                        if !del.status.success() {
                            assert!(String::from_utf8_lossy(&del.stderr).contains("not found"));
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }

    let listed = runner(&data)
        .args([
            "agent",
            "artifacts",
            "list",
            "local",
            "--all-versions",
            "--output",
            "json",
            "--limit",
            "1000",
        ])
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let records: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let records = records.as_array().expect("a JSON array");
    assert!(!records.is_empty());
    for r in records {
        let name = r["name"].as_str().unwrap();
        let version = r["version"].as_u64().unwrap().to_string();
        let out = dir.path().join("verify.bin");
        let down = runner(&data)
            .args([
                "agent",
                "artifacts",
                "download",
                "local",
                name,
                "--stack",
                "ci",
                "--task",
                "build",
                "--version",
                &version,
                "-o",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            down.status.success(),
            "{}",
            String::from_utf8_lossy(&down.stderr)
        );
        let got = format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(std::fs::read(&out).unwrap()))
        );
        assert_eq!(got, r["checksum"].as_str().unwrap(), "{name} v{version}");
    }
    let conn = rusqlite::Connection::open(data.join("metadata.db")).unwrap();
    let (versions, logical): (i64, i64) = conn
        .query_row(
            "SELECT SUM(versions), SUM(logical_bytes) FROM stack_usage",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(versions as usize, records.len());
    assert_eq!(
        logical as u64,
        records
            .iter()
            .map(|r| r["size"].as_u64().unwrap())
            .sum::<u64>()
    );
}

/// Ctrl-C in the middle of a download leaves no file (not even a temporary one), does not
/// count a download, and exits 130.
#[test]
fn an_interrupted_download_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let big = dir.path().join("big.bin");
    // 256 MiB of incompressible bytes: long enough to interrupt mid-way.
    let mut bytes = vec![0u8; 256 << 20];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for b in bytes.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *b = state as u8;
    }
    std::fs::write(&big, &bytes).unwrap();
    drop(bytes);
    let up = runner(&data)
        .args(["agent", "artifacts", "upload", "local"])
        .arg(&big)
        .output()
        .unwrap();
    assert!(up.status.success());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut child = runner(&data)
        .args(["agent", "artifacts", "download", "local", "big.bin", "-o"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    if status.success() {
        // The machine was fast enough to finish first: nothing to check about interruption.
        return;
    }
    assert_eq!(status.code(), Some(130));
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "no file, not even a temporary one"
    );
    let show = runner(&data)
        .args(["agent", "artifacts", "show", "local", "big.bin"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&show.stdout).contains("Downloads:  0"));
}
