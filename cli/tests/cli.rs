//! Runs the built `sloth-runner` against a store in a temporary data directory and compares
//! what it prints with the spec's layout.

// The whole file is test code; clippy's test exemption only covers the `#[test]` functions.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use sha2::Digest;

mod common;

use common::{BIN, sloth};

/// The spec's list header and dash line (40/15/12/20/20 columns, one space apart).
const LIST_HEADER: &str = "Name                                     Stack           Size         Created              Task";
const LIST_DASHES: &str = "---------------------------------------- --------------- ------------ -------------------- --------------------";

/// A scratch directory holding the data directory and the files the commands read and write.
struct Sloth {
    dir: tempfile::TempDir,
}

impl Sloth {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn data_dir(&self) -> PathBuf {
        self.path("data")
    }

    /// A command with a clean environment: this store, this user, no terminal.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = sloth();
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .current_dir(self.dir.path());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with_input(args, "")
    }

    fn run_with_input(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with exit code 1 (2 for clap's usage errors); returns
    /// its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            !out.status.success(),
            "{args:?} should fail; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "{args:?}: exit {:?}, stderr {stderr}",
            out.status.code()
        );
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        stderr
    }

    fn write(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Everything a change would show: every version with its counters, as JSON.
    fn snapshot(&self) -> String {
        self.ok(&[
            "agent",
            "artifacts",
            "list",
            "local",
            "--all-versions",
            "--output",
            "json",
        ])
    }
}

/// Reproducible incompressible bytes (xorshift64*).
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 19
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b' ',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        })
}

/// Splits a list row at the spec's column positions and checks the padding between them.
fn columns(row: &str) -> Vec<String> {
    let chars: Vec<char> = row.chars().collect();
    let mut cells = Vec::new();
    let mut at = 0;
    for width in [40, 15, 12, 20] {
        let cell: String = chars[at..at + width].iter().collect();
        assert_eq!(
            chars[at + width],
            ' ',
            "no separator after column at {at} in {row:?}"
        );
        cells.push(cell.trim_end().to_owned());
        at += width + 1;
    }
    cells.push(chars[at..].iter().collect());
    cells
}

/// `date -u` as a cross-check of the UTC conversion, when the command exists.
fn date_utc(secs: i64) -> Option<String> {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%d %H:%M:%S"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn a_whole_session_prints_the_spec_layout() {
    let s = Sloth::new();
    let app = content(2_500_000, 1);
    let results = content(450_000, 2);
    let logs = content(5_300_000, 3);
    s.write("app.bin", &app);
    s.write("test-results.xml", &results);
    s.write("deployment-logs.tar.gz", &logs);

    // upload
    let out = s.ok(&[
        "agent",
        "artifacts",
        "upload",
        "local",
        "./app.bin",
        "--stack",
        "production",
        "--task",
        "build",
    ]);
    assert_eq!(
        lines(&out),
        [
            "ℹ Uploading './app.bin' to agent 'local' as 'app.bin'...",
            "✓ Uploaded app.bin (2.5 MB)"
        ]
    );
    let out = s.ok(&[
        "agent",
        "artifacts",
        "upload",
        "local",
        "test-results.xml",
        "-s",
        "production",
        "-t",
        "test",
    ]);
    assert_eq!(lines(&out)[1], "✓ Uploaded test-results.xml (450 KB)");
    let out = s.ok(&[
        "agent",
        "artifacts",
        "upload",
        "local",
        "deployment-logs.tar.gz",
        "-s",
        "production",
        "-t",
        "deploy",
    ]);
    assert_eq!(lines(&out)[1], "✓ Uploaded deployment-logs.tar.gz (5.3 MB)");

    // list, line by line
    let out = s.ok(&["agent", "artifacts", "list", "local"]);
    let l = lines(&out);
    assert_eq!(l.len(), 9, "{out}");
    assert_eq!(l[0], "📦 Artifacts on agent: local 📦");
    assert_eq!(l[1], "");
    assert_eq!(l[2], LIST_HEADER);
    assert_eq!(l[3], LIST_DASHES);
    // Oldest first, in upload order.
    let expected = [
        ("app.bin", "2.5 MB", "build"),
        ("test-results.xml", "450 KB", "test"),
        ("deployment-logs.tar.gz", "5.3 MB", "deploy"),
    ];
    for (row, (name, size, task)) in l[4..7].iter().zip(expected) {
        let cells = columns(row);
        assert_eq!(cells[0], name, "{row:?}");
        assert_eq!(cells[1], "production");
        assert_eq!(cells[2], size);
        assert!(is_timestamp(&cells[3]), "{row:?}");
        assert_eq!(cells[4], task);
    }
    for row in &l[4..7] {
        assert_eq!(*row, row.trim_end(), "no trailing spaces");
    }
    assert_eq!(l[7], "");
    assert_eq!(l[8], "ℹ Total: 3 artifacts");

    // the spec's filters and limit
    let out = s.ok(&["agent", "artifacts", "list", "local", "--task", "test"]);
    assert_eq!(lines(&out).len(), 7);
    assert_eq!(columns(lines(&out)[4])[0], "test-results.xml");
    let out = s.ok(&[
        "agent",
        "artifacts",
        "list",
        "local",
        "--stack",
        "production",
        "-l",
        "2",
    ]);
    let l = lines(&out);
    assert_eq!(l.len(), 8, "{out}");
    assert_eq!(columns(l[4])[0], "test-results.xml", "the most recent ones");
    assert_eq!(columns(l[5])[0], "deployment-logs.tar.gz");
    assert_eq!(
        l[7],
        "ℹ Total: 2 artifacts (the most recent; more exist, raise --limit to see them)"
    );
    let out = s.ok(&["agent", "artifacts", "list", "local", "-l", "3"]);
    assert_eq!(
        lines(&out).last().unwrap(),
        &"ℹ Total: 3 artifacts",
        "exactly all"
    );
    let out = s.ok(&["agent", "artifacts", "list", "local", "--stack", "staging"]);
    assert_eq!(lines(&out)[4..], ["", "ℹ Total: 0 artifacts"]);

    // show, field by field
    let out = s.ok(&["agent", "artifacts", "show", "local", "app.bin"]);
    let l = lines(&out);
    let layout = s.data_dir().join("artifacts/production/build/app.bin");
    assert_eq!(l[0], "📦 Artifact Details");
    assert_eq!(l[1], "");
    assert_eq!(l[2], "Name:       app.bin");
    assert_eq!(l[3], format!("Path:       {}", layout.display()));
    assert_eq!(l[4], "Size:       2.5 MB");
    assert_eq!(l[5], format!("Checksum:   {}", sha256(&app)));
    assert_eq!(l[6], "Stack:      production");
    assert_eq!(l[7], "Task:       build");
    assert_eq!(l[8], "Version:    1");
    assert!(
        l[9].starts_with("Created:    ") && is_timestamp(&l[9][12..]),
        "{}",
        l[9]
    );
    assert!(
        l[10].starts_with("Modified:   ") && is_timestamp(&l[10][12..]),
        "{}",
        l[10]
    );
    assert_eq!(l[11], "Downloads:  0");
    assert_eq!(l.len(), 12);
    assert_eq!(
        std::fs::read(&layout).unwrap(),
        app,
        "the layout path holds the content"
    );

    // the printed times are the records' times in UTC
    let json: serde_json::Value = serde_json::from_str(&s.ok(&[
        "agent",
        "artifacts",
        "show",
        "local",
        "app.bin",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(json["path"], layout.display().to_string());
    assert_eq!(json["size"], 2_500_000);
    assert_eq!(json["checksum"], sha256(&app));
    if let Some(date) = date_utc(json["created_at"].as_i64().unwrap()) {
        assert_eq!(l[9], format!("Created:    {date}"));
    }

    // download: default target, a directory, a new nested path
    std::fs::remove_file(s.path("app.bin")).unwrap();
    let out = s.ok(&["agent", "artifacts", "download", "local", "app.bin"]);
    assert_eq!(
        lines(&out),
        [
            "ℹ Downloading artifact 'app.bin' from agent 'local'...",
            "✓ Downloaded app.bin to 'app.bin' (2.5 MB)"
        ]
    );
    assert!(
        std::fs::read(s.path("app.bin")).unwrap() == app,
        "bit-exact"
    );
    let out = s.ok(&["agent", "artifacts", "show", "local", "app.bin"]);
    assert_eq!(lines(&out)[11], "Downloads:  1");
    std::fs::create_dir(s.path("dist")).unwrap();
    let out = s.ok(&[
        "agent",
        "artifacts",
        "download",
        "local",
        "app.bin",
        "-o",
        "dist",
    ]);
    assert_eq!(
        lines(&out)[1],
        "✓ Downloaded app.bin to 'dist/app.bin' (2.5 MB)"
    );
    assert!(std::fs::read(s.path("dist/app.bin")).unwrap() == app);
    let out = s.ok(&[
        "agent",
        "artifacts",
        "download",
        "local",
        "test-results.xml",
        "--output",
        "reports/latest.xml",
    ]);
    assert_eq!(
        lines(&out)[1],
        "✓ Downloaded test-results.xml to 'reports/latest.xml' (450 KB)"
    );
    assert!(std::fs::read(s.path("reports/latest.xml")).unwrap() == results);

    // a second upload makes version 2; list shows the newest, --all-versions both
    let app2 = content(2_500_000, 4);
    s.write("app.bin", &app2);
    let out = s.ok(&[
        "agent",
        "artifacts",
        "upload",
        "local",
        "./app.bin",
        "-s",
        "production",
        "-t",
        "build",
    ]);
    assert_eq!(lines(&out)[1], "✓ Uploaded app.bin (2.5 MB, version 2)");
    let out = s.ok(&["agent", "artifacts", "list", "local"]);
    assert_eq!(out.matches("app.bin ").count(), 1, "{out}");
    assert_eq!(lines(&out).last().unwrap(), &"ℹ Total: 3 artifacts");
    let out = s.ok(&["agent", "artifacts", "list", "local", "--all-versions"]);
    let l = lines(&out);
    assert_eq!(l[2], format!("{LIST_HEADER}{}Version", " ".repeat(17)));
    assert_eq!(l[3], format!("{LIST_DASHES} -------"));
    let app_rows: Vec<&&str> = l.iter().filter(|r| r.starts_with("app.bin ")).collect();
    assert_eq!(app_rows.len(), 2, "{out}");
    assert!(
        app_rows[0].ends_with(" build                1"),
        "{}",
        app_rows[0]
    );
    assert!(
        app_rows[1].ends_with(" build                2"),
        "{}",
        app_rows[1]
    );
    assert_eq!(l.last().unwrap(), &"ℹ Total: 4 artifact versions");
    let out = s.ok(&["agent", "artifacts", "show", "local", "app.bin"]);
    assert_eq!(lines(&out)[5], format!("Checksum:   {}", sha256(&app2)));
    assert_eq!(lines(&out)[8], "Version:    2");
    let out = s.ok(&[
        "agent",
        "artifacts",
        "show",
        "local",
        "app.bin",
        "--version",
        "1",
    ]);
    assert_eq!(
        lines(&out)[3],
        "Path:       (not in the layout, which shows only the newest version, 2)"
    );
    assert_eq!(lines(&out)[5], format!("Checksum:   {}", sha256(&app)));
    s.ok(&[
        "agent",
        "artifacts",
        "download",
        "local",
        "app.bin",
        "--version",
        "1",
        "-o",
        "old.bin",
    ]);
    assert!(std::fs::read(s.path("old.bin")).unwrap() == app);

    // delete: cancelled, confirmed through stdin, forced
    let out = s.run_with_input(
        &["agent", "artifacts", "delete", "local", "test-results.xml"],
        "n\n",
    );
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "Are you sure you want to delete artifact 'test-results.xml' from agent 'local'? (y/N): n\nCancelled\n"
    );
    let out = s.run_with_input(
        &[
            "agent",
            "artifacts",
            "delete",
            "local",
            "app.bin",
            "--version",
            "1",
        ],
        "y\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "Are you sure you want to delete artifact 'app.bin' version 1 from agent 'local'? (y/N): y\n\
         ✓ Deleted artifact 'app.bin' version 1 from agent 'local'\n"
    );
    let out = s.run_with_input(
        &["agent", "artifacts", "delete", "local", "test-results.xml"],
        "yes\n",
    );
    assert!(out.status.success());
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .ends_with("✓ Deleted artifact 'test-results.xml' from agent 'local'\n")
    );
    let out = s.ok(&[
        "agent",
        "artifacts",
        "delete",
        "local",
        "deployment-logs.tar.gz",
        "--force",
    ]);
    assert_eq!(
        out,
        "✓ Deleted artifact 'deployment-logs.tar.gz' from agent 'local'\n"
    );
    let out = s.ok(&["agent", "artifacts", "list", "local", "--all-versions"]);
    let l = lines(&out);
    assert_eq!(l.len(), 7, "{out}");
    assert!(l[4].starts_with("app.bin ") && l[4].ends_with(" 2"));
    assert!(
        !s.data_dir()
            .join("artifacts/production/test/test-results.xml")
            .exists()
    );

    // events: upload, download and delete, by this user
    let out = s.ok(&["events", "list", "--type", "artifact.*"]);
    let l = lines(&out);
    assert_eq!(l[0], "📜 Events on agent: local 📜");
    let kinds: Vec<&str> = l[4..l.len() - 2]
        .iter()
        .map(|r| r.split_whitespace().nth(2).unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "artifact.upload",
            "artifact.upload",
            "artifact.upload",
            "artifact.download",
            "artifact.download",
            "artifact.download",
            "artifact.upload",
            "artifact.download",
            "artifact.delete",
            "artifact.delete",
            "artifact.delete"
        ]
    );
    assert!(
        l[4..l.len() - 2]
            .iter()
            .all(|r| r.split_whitespace().nth(3) == Some("tester"))
    );
    assert_eq!(l.last().unwrap(), &"ℹ Total: 11 events");
    let out = s.ok(&[
        "events", "list", "--type", "*.delete", "--limit", "1", "--output", "json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let events = json.as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["kind"], "artifact.delete");
    assert_eq!(events[0]["name"], "deployment-logs.tar.gz");
    assert_eq!(events[0]["principal"], "tester");
    assert_eq!(events[0]["agent"], "local");

    // metadata.db, through rusqlite and the stock sqlite3
    let expected_rows = vec![(
        "app.bin".to_owned(),
        "production".to_owned(),
        "build".to_owned(),
        2_500_000_i64,
        0_i64,
    )];
    let db = rusqlite::Connection::open(s.data_dir().join("metadata.db")).unwrap();
    let rows: Vec<(String, String, String, i64, i64)> = db
        .prepare("SELECT name, stack, task, size, download_count FROM artifacts")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, expected_rows);
    let (stack, artifacts, versions, logical, stored): (String, i64, i64, i64, i64) = db
        .query_row("SELECT * FROM stack_usage", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap();
    assert_eq!(
        (stack.as_str(), artifacts, versions, logical),
        ("production", 1, 1, 2_500_000)
    );
    assert!(
        stored > 0 && stored <= 2_600_000,
        "random content does not compress: {stored}"
    );
    drop(db);
    if let Ok(out) = Command::new("sqlite3")
        .arg(s.data_dir().join("metadata.db"))
        .arg("SELECT name, stack, task, size, download_count FROM artifacts; SELECT stack, artifacts, versions, logical_bytes FROM stack_usage;")
        .output()
    {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "app.bin|production|build|2500000|0\nproduction|1|1|2500000\n");
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let s = Sloth::new();
    s.write("app.bin", &content(100_000, 5));
    s.ok(&[
        "agent",
        "artifacts",
        "upload",
        "local",
        "app.bin",
        "-s",
        "production",
        "-t",
        "build",
    ]);
    s.ok(&[
        "agent",
        "artifacts",
        "upload",
        "local",
        "app.bin",
        "-n",
        "other.bin",
    ]);
    std::fs::create_dir(s.path("a-directory")).unwrap();
    let before = s.snapshot();
    let table_before = s.ok(&["agent", "artifacts", "list", "local", "--all-versions"]);

    let long = "n".repeat(256);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "agent",
                "artifacts",
                "upload",
                "local",
                "app.bin",
                "-n",
                "a/b",
            ],
            "invalid artifact name \"a/b\"",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "upload",
                "local",
                "app.bin",
                "-n",
                "a\\b",
            ],
            "must not contain '/' or '\\'",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "upload",
                "local",
                "app.bin",
                "-n",
                "..",
            ],
            "must not contain '..'",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "upload",
                "local",
                "app.bin",
                "-n",
                "x..y",
            ],
            "must not contain '..'",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "upload",
                "local",
                "app.bin",
                "-n",
                "tab\there",
            ],
            "control characters",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "upload",
                "local",
                "app.bin",
                "-n",
                "new\nline",
            ],
            "control characters",
        ),
        (
            vec!["agent", "artifacts", "upload", "local", "app.bin", "-n", ""],
            "must not be empty",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "upload",
                "local",
                "app.bin",
                "-n",
                &long,
            ],
            "longer than 255 bytes",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "upload",
                "local",
                "app.bin",
                "-s",
                "../etc",
            ],
            "invalid stack",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "upload",
                "local",
                "app.bin",
                "-t",
                "a/b",
            ],
            "invalid task",
        ),
        (
            vec!["agent", "artifacts", "upload", "local", "missing.bin"],
            "cannot upload 'missing.bin': No such file",
        ),
        (
            vec!["agent", "artifacts", "upload", "local", "a-directory"],
            "cannot upload 'a-directory': it is a directory",
        ),
        (
            vec!["agent", "artifacts", "upload", "local", "."],
            "give one with --name",
        ),
        (
            vec!["agent", "artifacts", "show", "local", "nothing.bin"],
            "artifact 'nothing.bin' not found",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "show",
                "local",
                "app.bin",
                "--version",
                "9",
            ],
            "not found at version 9",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "show",
                "local",
                "app.bin",
                "--stack",
                "staging",
            ],
            "not found in stack 'staging'",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "show",
                "local",
                "app.bin",
                "--version",
                "0",
            ],
            "--version must be at least 1",
        ),
        (
            vec!["agent", "artifacts", "show", "local", "a/b"],
            "invalid artifact name",
        ),
        (
            vec!["agent", "artifacts", "download", "local", "nothing.bin"],
            "artifact 'nothing.bin' not found",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "download",
                "local",
                "app.bin",
                "--version",
                "9",
            ],
            "not found at version 9",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "download",
                "local",
                "app.bin",
                "-o",
                "app.bin/inside",
            ],
            "app.bin",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "delete",
                "local",
                "nothing.bin",
                "--force",
            ],
            "artifact 'nothing.bin' not found",
        ),
        (
            vec![
                "agent",
                "artifacts",
                "delete",
                "local",
                "app.bin",
                "--version",
                "9",
                "-f",
            ],
            "not found at version 9",
        ),
        (
            vec!["agent", "artifacts", "list", "local", "--limit", "0"],
            "must be at least 1, got 0",
        ),
        (
            vec!["agent", "artifacts", "list", "local", "--limit", "-1"],
            "must be at least 1, got -1",
        ),
        (
            vec!["agent", "artifacts", "list", "local", "-l", "many"],
            "'many' is not a whole number",
        ),
        (
            vec!["agent", "artifacts", "list", "local", "--stack", "a/b"],
            "invalid stack",
        ),
        (vec!["events", "list", "--limit", "0"], "must be at least 1"),
    ];
    for (args, needle) in &cases {
        let stderr = s.fails(args);
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
    }
    for args in [
        vec!["agent", "artifacts", "list", "build-agent"],
        vec!["agent", "artifacts", "upload", "build-agent", "app.bin"],
        vec!["agent", "artifacts", "download", "build-agent", "app.bin"],
        vec!["agent", "artifacts", "show", "build-agent", "app.bin"],
        vec![
            "agent",
            "artifacts",
            "delete",
            "build-agent",
            "app.bin",
            "--force",
        ],
        vec!["events", "list", "--agent", "build-agent"],
    ] {
        let stderr = s.fails(&args);
        assert_eq!(
            stderr,
            format!(
                "error: cannot find agent 'build-agent': no master given; pass --master HOST:PORT or set \
                 SLOTH_RUNNER_MASTER_ADDR (or name the agent by host:port, or use 'local' for the embedded \
                 store in {})\n",
                s.data_dir().display()
            ),
            "{args:?}"
        );
    }
    assert!(!s.path("app.bin/inside").exists());

    // Permission bits do not stop root, so unreadable files are only tried as another user.
    if !running_as_root() {
        use std::os::unix::fs::PermissionsExt;
        let secret = s.write("secret.bin", b"x");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
        let stderr = s.fails(&["agent", "artifacts", "upload", "local", "secret.bin"]);
        assert!(
            stderr.contains("cannot upload 'secret.bin': Permission denied"),
            "{stderr}"
        );
    }

    assert_eq!(s.snapshot(), before, "bad input changed the store");
    assert_eq!(
        s.ok(&["agent", "artifacts", "list", "local", "--all-versions"]),
        table_before
    );
    assert_eq!(
        s.ok(&["events", "list"]).matches("artifact.upload").count(),
        2,
        "no events either"
    );
}

#[test]
fn unusable_data_dirs_are_named() {
    let s = Sloth::new();
    let file = s.write("a-file", b"not a directory");
    let out = Command::new(BIN)
        .args(["--data-dir"])
        .arg(&file)
        .args(["agent", "artifacts", "list", "local"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr,
        format!(
            "error: data directory '{}' is not usable: it is not a directory\n",
            file.display()
        )
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");

    let below_file = file.join("data");
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(&below_file)
        .args(["agent", "artifacts", "list", "local"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().starts_with(&format!(
        "error: data directory '{}' is not usable",
        below_file.display()
    )));

    if !running_as_root() {
        use std::os::unix::fs::PermissionsExt;
        let locked = s.path("read-only");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(&locked)
            .args(["agent", "artifacts", "list", "local"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8(out.stderr)
                .unwrap()
                .contains("Permission denied")
        );
    }
}

#[test]
fn data_dir_comes_from_flag_env_or_the_defaults() {
    let s = Sloth::new();
    s.write("app.bin", b"x");
    let from_env = s.path("env-data");
    let out = Command::new(BIN)
        .args(["agent", "artifacts", "upload", "local"])
        .arg(s.path("app.bin"))
        .env("SLOTH_RUNNER_DATA_DIR", &from_env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(from_env.join("metadata.db").is_file());

    // A network agent with no master to find it fails before the store is opened and names
    // the data directory `local` would use: a safe way to see the defaults.
    let default_dir = |envs: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["agent", "artifacts", "list", "elsewhere"])
            .env_remove("SLOTH_RUNNER_DATA_DIR")
            .env_remove("SLOTH_RUNNER_MASTER_ADDR");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let stderr = String::from_utf8(cmd.output().unwrap().stderr).unwrap();
        let start = stderr.find("embedded store in ").unwrap() + "embedded store in ".len();
        stderr[start..stderr.rfind(")\n").unwrap()].to_owned()
    };
    if running_as_root() {
        assert_eq!(
            default_dir(&[("XDG_DATA_HOME", "/xdg"), ("HOME", "/home/x")]),
            "/var/lib/sloth-runner"
        );
    } else {
        assert_eq!(
            default_dir(&[("XDG_DATA_HOME", "/xdg"), ("HOME", "/home/x")]),
            "/xdg/sloth-runner"
        );
        assert_eq!(
            default_dir(&[("XDG_DATA_HOME", "relative"), ("HOME", "/home/x")]),
            "/home/x/.local/share/sloth-runner"
        );
    }
}

#[test]
fn an_ambiguous_name_lists_its_places() {
    let s = Sloth::new();
    s.write("app.bin", b"one");
    s.ok(&[
        "agent",
        "artifacts",
        "upload",
        "local",
        "app.bin",
        "--stack",
        "production",
    ]);
    s.write("app.bin", b"two");
    s.ok(&[
        "agent",
        "artifacts",
        "upload",
        "local",
        "app.bin",
        "--stack",
        "staging",
        "--task",
        "build",
    ]);
    let before = s.snapshot();
    for args in [
        vec!["agent", "artifacts", "show", "local", "app.bin"],
        vec!["agent", "artifacts", "download", "local", "app.bin"],
        vec![
            "agent",
            "artifacts",
            "delete",
            "local",
            "app.bin",
            "--force",
        ],
    ] {
        let stderr = s.fails(&args);
        assert_eq!(
            stderr,
            "error: artifact 'app.bin' exists in several places; choose one with --stack and --task:\n  \
             --stack production --task default\n  --stack staging --task build\n",
            "{args:?}"
        );
    }
    assert_eq!(s.snapshot(), before);
    let out = s.ok(&[
        "agent",
        "artifacts",
        "show",
        "local",
        "app.bin",
        "--stack",
        "staging",
    ]);
    assert!(out.contains("Task:       build\n"));
    s.ok(&[
        "agent",
        "artifacts",
        "download",
        "local",
        "app.bin",
        "-s",
        "production",
        "-o",
        "got",
    ]);
    assert_eq!(std::fs::read(s.path("got")).unwrap(), b"one");
}

#[test]
fn a_corrupt_chunk_fails_the_download_and_leaves_nothing() {
    let s = Sloth::new();
    s.write("app.bin", &content(1_000_000, 6));
    s.ok(&["agent", "artifacts", "upload", "local", "app.bin"]);
    // Random content is stored raw, so flipping bytes in the pack breaks a chunk's BLAKE3.
    let packs = s.data_dir().join("store/packs");
    for entry in std::fs::read_dir(&packs).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 64] {
            *b ^= 0xff;
        }
        std::fs::write(&path, bytes).unwrap();
    }
    std::fs::create_dir(s.path("out")).unwrap();
    // Directories the download would create are gone again after it fails.
    s.fails(&[
        "agent",
        "artifacts",
        "download",
        "local",
        "app.bin",
        "-o",
        "out/new/deeper/app.bin",
    ]);
    assert!(
        !s.path("out/new").exists(),
        "the directories it made are removed"
    );
    let stderr = s.fails(&[
        "agent",
        "artifacts",
        "download",
        "local",
        "app.bin",
        "-o",
        "out",
    ]);
    assert!(
        stderr.starts_with("error: artifact 'app.bin' (version 1) failed verification: chunk "),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("is corrupt").count(),
        1,
        "the cause is not repeated: {stderr}"
    );
    assert_eq!(
        std::fs::read_dir(s.path("out")).unwrap().count(),
        0,
        "no file, no temporary"
    );
    assert!(
        s.ok(&["agent", "artifacts", "show", "local", "app.bin"])
            .contains("Downloads:  0\n")
    );
}

#[test]
fn several_downloads_check_every_name_first() {
    let s = Sloth::new();
    s.write("a.txt", b"alpha");
    s.write("b.txt", b"beta");
    s.ok(&["agent", "artifacts", "upload", "local", "a.txt"]);
    s.ok(&["agent", "artifacts", "upload", "local", "b.txt"]);
    let before = s.snapshot();
    let stderr = s.fails(&[
        "agent",
        "artifacts",
        "download",
        "local",
        "nope1",
        "a.txt",
        "nope2",
        "-o",
        "out/deep/",
    ]);
    assert_eq!(
        stderr,
        "error: 2 of 3 artifacts cannot be downloaded, so none was: \
         artifact 'nope1' not found; artifact 'nope2' not found\n"
    );
    assert!(!s.path("out").exists(), "no directory is created");
    assert_eq!(s.snapshot(), before, "nothing counted");

    // A name given twice is fetched and counted once; `-o dir/` is not printed as `dir//`.
    let stdout = s.ok(&[
        "agent",
        "artifacts",
        "download",
        "local",
        "a.txt",
        "b.txt",
        "a.txt",
        "-o",
        "out/",
    ]);
    assert_eq!(
        stdout.matches("✓ Downloaded a.txt to 'out/a.txt'").count(),
        1,
        "{stdout}"
    );
    assert!(
        stdout.contains("✓ Downloaded b.txt to 'out/b.txt'"),
        "{stdout}"
    );
    assert_eq!(std::fs::read(s.path("out/a.txt")).unwrap(), b"alpha");
    assert!(
        s.ok(&["agent", "artifacts", "show", "local", "a.txt"])
            .contains("Downloads:  1\n")
    );
}

#[test]
fn addresses_must_be_host_and_port() {
    let s = Sloth::new();
    for bad in ["", "127.0.0.1:99999", "host:abc", ":50053", "127.0.0.1:0"] {
        let err = s.fails(&["--master", bad, "agent", "list"]);
        assert!(
            err.contains(&format!("'{bad}' is not host:port")),
            "{bad:?}: {err}"
        );
    }
    let err = s.fails(&["agent", "artifacts", "list", "host:abc"]);
    assert_eq!(
        err,
        "error: 'host:abc' is not host:port (a host, then a port from 1 to 65535)\n"
    );
}

#[test]
fn a_closed_stdout_is_not_an_error() {
    let s = Sloth::new();
    // Names near the 255-byte limit make the JSON list far larger than a pipe's buffer.
    for i in 0..40 {
        let name = format!("{i:03}{}", "x".repeat(240));
        s.write(&name, b"x");
        s.ok(&["agent", "artifacts", "upload", "local", &name]);
    }
    for args in [
        vec!["agent", "artifacts", "list", "local", "--output", "json"],
        vec!["agent", "artifacts", "list", "local"],
        vec!["events", "list"],
    ] {
        let mut child = s
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{args:?}");
    }
    // A JSON list is valid JSON and complete when read to the end.
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["agent", "artifacts", "list", "local", "--output", "json"]))
            .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 40);
}

#[test]
fn a_cancelled_or_unanswered_prompt_deletes_nothing() {
    let s = Sloth::new();
    s.write("old-app.bin", b"old");
    s.ok(&["agent", "artifacts", "upload", "local", "old-app.bin"]);
    let before = s.snapshot();
    for input in ["", "\n", "no\n", "N\n", "yy\n"] {
        let out = s.run_with_input(
            &["agent", "artifacts", "delete", "local", "old-app.bin"],
            input,
        );
        assert!(out.status.success(), "{input:?}");
        assert!(
            String::from_utf8(out.stdout)
                .unwrap()
                .ends_with("Cancelled\n"),
            "{input:?}"
        );
    }
    assert_eq!(s.snapshot(), before);
    let out = s.run_with_input(
        &["agent", "artifacts", "delete", "local", "old-app.bin"],
        "Y\n",
    );
    assert!(out.status.success());
    assert!(
        s.ok(&["agent", "artifacts", "list", "local"])
            .contains("ℹ Total: 0 artifacts")
    );
}

#[test]
fn help_states_units_and_time_zone() {
    let s = Sloth::new();
    for command in ["list", "show", "upload", "download"] {
        let out = s.ok(&["agent", "artifacts", command, "--help"]);
        assert!(out.contains("1 KB = 1000 bytes"), "{command}: {out}");
        assert!(out.contains("times are UTC"), "{command}: {out}");
    }
    let out = s.ok(&["agent", "artifacts", "list", "--help"]);
    for flag in [
        "--stack <STACK>",
        "-s",
        "--task <TASK>",
        "-t",
        "--limit <N>",
        "-l",
        "[default: 50]",
        "--all-versions",
    ] {
        assert!(out.contains(flag), "{flag}: {out}");
    }
}

#[test]
fn help_lists_a_commands_own_options_before_the_global_ones() {
    let s = Sloth::new();
    let out = s.ok(&["agent", "start", "--help"]);
    let at = |text: &str| {
        out.find(text)
            .unwrap_or_else(|| panic!("{text:?} missing: {out}"))
    };
    let (own, serving, global) = (
        at("--heartbeat <SECS>"),
        at("Listening and security:"),
        at("Global options:"),
    );
    assert!(own < serving && serving < global, "{out}");
    assert!(
        serving < at("--tls-cert <FILE>") && at("--tls-key <FILE>") < global,
        "{out}"
    );
    for flag in ["--data-dir <DIR>", "--master <ADDR>", "--client-key <FILE>"] {
        assert!(at(flag) > global, "{flag} under Global options: {out}");
    }
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[test]
fn a_metadata_db_that_cannot_answer_is_passed_over_for_the_store() {
    let s = Sloth::new();
    s.write("app.bin", b"content");
    s.ok(&["agent", "artifacts", "upload", "local", "app.bin"]);
    let commands: [&[&str]; 3] = [
        &["agent", "artifacts", "list", "local", "--output", "json"],
        &["agent", "artifacts", "show", "local", "app.bin"],
        &["events", "list", "--type", "artifact.*", "--output", "json"],
    ];
    let answers: Vec<String> = commands.iter().map(|args| s.ok(args)).collect();
    // A value the file's reader refuses; the mark and generation still say "current", so the
    // file is opened, and fails only when asked.
    let db = rusqlite::Connection::open(s.data_dir().join("metadata.db")).unwrap();
    db.execute_batch("UPDATE artifact_versions SET manifest = 'not-a-manifest-id';")
        .unwrap();
    db.execute_batch("UPDATE events SET artifact_id = 'not-an-id';")
        .unwrap();
    drop(db);
    for (args, answer) in commands.iter().zip(&answers) {
        assert_eq!(&s.ok(args), answer, "{args:?}");
    }
}
