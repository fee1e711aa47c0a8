//! `agent artifacts cleanup` and `policy inspect|test` through the built binary, on `local`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;

mod common;

use common::sloth;

fn run(dir: &Path, args: &[&str]) -> Output {
    sloth()
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn versions(dir: &Path) -> usize {
    ok(
        dir,
        &[
            "agent",
            "artifacts",
            "list",
            "local",
            "--all-versions",
            "--output",
            "json",
        ],
    )
    .matches("\"checksum\"")
    .count()
}

#[test]
fn cleanup_deletes_what_the_policy_decides_and_prints_the_spec_line() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for (i, content) in [
        b"one".repeat(50_000),
        b"two".repeat(50_000),
        b"three".repeat(50_000),
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(d.join("app.bin"), content).unwrap();
        ok(
            d,
            &[
                "agent",
                "artifacts",
                "upload",
                "local",
                "app.bin",
                "-s",
                "prod",
                "-t",
                "build",
            ],
        );
        assert_eq!(versions(d), i + 1);
    }
    std::fs::write(d.join("keep.txt"), b"elsewhere").unwrap();
    ok(
        d,
        &[
            "agent",
            "artifacts",
            "upload",
            "local",
            "keep.txt",
            "-s",
            "other",
        ],
    );

    // Nothing is 30 days old yet.
    let default = ok(d, &["agent", "artifacts", "cleanup", "local"]);
    assert!(
        default.starts_with("✓ Deleted 0 artifacts, freed 0 B\n"),
        "{default}"
    );

    // A dry run lists, with reasons, and deletes nothing.
    let dry = ok(
        d,
        &[
            "agent",
            "artifacts",
            "cleanup",
            "local",
            "--policy",
            "keep-last",
            "--param",
            "count=1",
            "--dry-run",
        ],
    );
    assert!(
        dry.starts_with("ℹ Dry run: policy 'keep-last' would delete 2 artifacts of 4"),
        "{dry}"
    );
    assert!(dry.contains("#3 newest per artifact, keeping 1"), "{dry}");
    assert_eq!(versions(d), 4);

    let done = ok(
        d,
        &[
            "agent",
            "artifacts",
            "cleanup",
            "local",
            "--policy",
            "keep-last",
            "--param",
            "count=1",
        ],
    );
    assert!(done.starts_with("✓ Deleted 2 artifacts, freed "), "{done}");
    assert!(
        !done.contains("freed 0 B"),
        "their chunks were not shared: {done}"
    );
    assert_eq!(versions(d), 2);
    let shown = ok(d, &["agent", "artifacts", "show", "local", "app.bin"]);
    assert!(
        shown.contains("Version:    3\n"),
        "the newest stays: {shown}"
    );
    let events = ok(
        d,
        &[
            "events",
            "list",
            "--agent",
            "local",
            "--type",
            "artifact.delete",
        ],
    );
    assert!(events.contains("tester via policy keep-last"), "{events}");

    // --older-than 0d within one stack.
    let stack = ok(
        d,
        &[
            "agent",
            "artifacts",
            "cleanup",
            "local",
            "--older-than",
            "0d",
            "-s",
            "other",
        ],
    );
    assert!(stack.starts_with("✓ Deleted 1 artifact, freed "), "{stack}");
    assert_eq!(versions(d), 1);
}

#[test]
fn bad_durations_policies_and_modules_change_nothing() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    std::fs::write(d.join("app.bin"), b"content").unwrap();
    ok(d, &["agent", "artifacts", "upload", "local", "app.bin"]);

    for bad in ["30", "30 days", "-1d", "1w", "d", ""] {
        let err = fails(
            d,
            &[
                "agent",
                "artifacts",
                "cleanup",
                "local",
                "--older-than",
                bad,
            ],
        );
        assert!(err.contains("7d, 30d, 6h, 1h, 45m or 0d"), "{bad}: {err}");
    }
    let typo = fails(
        d,
        &[
            "agent",
            "artifacts",
            "cleanup",
            "local",
            "--policy",
            "keep-last",
            "--param",
            "cout=5",
        ],
    );
    assert_eq!(
        typo,
        "error: policy 'keep-last' failed: unknown parameter 'cout' (it takes: count, per)\n"
    );
    let extra = fails(
        d,
        &[
            "agent",
            "artifacts",
            "cleanup",
            "local",
            "--older-than",
            "7d",
            "--param",
            "foo=1",
        ],
    );
    assert!(
        extra.contains("unknown parameter 'foo' (it takes: older_than)"),
        "{extra}"
    );
    let unknown = fails(
        d,
        &["agent", "artifacts", "cleanup", "local", "--policy", "nope"],
    );
    assert!(
        unknown.contains("not a built-in (older-than, keep-last"),
        "{unknown}"
    );
    let missing = fails(
        d,
        &[
            "agent",
            "artifacts",
            "cleanup",
            "local",
            "--policy",
            "keep-last",
        ],
    );
    assert!(
        missing.contains(
            "policy 'keep-last' failed: it returned no answer: missing parameter 'count'"
        ),
        "{missing}"
    );
    std::fs::write(d.join("junk.wasm"), b"\0asm\x01\0\0\0garbage").unwrap();
    let junk = fails(
        d,
        &[
            "agent",
            "artifacts",
            "cleanup",
            "local",
            "--policy",
            "junk.wasm",
        ],
    );
    assert!(
        junk.contains("policy 'junk.wasm' failed: not a policy module"),
        "{junk}"
    );
    assert_eq!(versions(d), 1, "nothing was deleted");
}

#[test]
fn policies_can_be_inspected_and_tried_on_fixtures() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let inspect = ok(d, &["policy", "inspect", "older-than"]);
    assert!(
        inspect.starts_with("📜 Policy older-than 1.0.0\n"),
        "{inspect}"
    );
    assert!(inspect.contains("Imports:     sloth.log\n"), "{inspect}");
    assert!(inspect.contains("policy_evaluate"), "{inspect}");
    std::fs::write(
        d.join("fixture.json"),
        r#"[{"id":"a1","name":"app.bin","stack":"prod","task":"build","version":1,"size":5,
            "created_at":0,"modified_at":0,"download_count":0,"checksum":"sha256:00"},
           {"id":"a2","name":"app.bin","stack":"prod","task":"build","version":2,"size":5,
            "created_at":999000,"modified_at":999000,"download_count":0,"checksum":"sha256:00"}]"#,
    )
    .unwrap();
    let tested = ok(
        d,
        &[
            "policy",
            "test",
            "older-than",
            "--artifacts",
            "fixture.json",
            "--now",
            "1000000",
            "--param",
            "older_than=1d",
        ],
    );
    assert!(
        tested.contains("a1 ") && tested.contains("delete"),
        "{tested}"
    );
    assert!(
        tested.ends_with("ℹ Policy 'older-than': delete 1 of 2\n"),
        "{tested}"
    );
    assert!(!d.join("data").exists(), "no store was touched");
}

#[test]
fn a_duration_ending_in_a_multibyte_character_is_an_error_not_a_crash() {
    // Found by fuzzing `parse_duration`: `7д` split inside the `д` and panicked.
    let dir = tempfile::tempdir().unwrap();
    let err = fails(
        dir.path(),
        &[
            "agent",
            "artifacts",
            "cleanup",
            "local",
            "--older-than",
            "7д",
        ],
    );
    assert!(err.contains("'7д' is not a duration"), "{err}");
}
