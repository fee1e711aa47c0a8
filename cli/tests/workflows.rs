//! `sloth-runner run`: the spec's examples through the binary on the embedded store, and the
//! errors a user meets, each with its message and exit code. (Runs on agents are tested with
//! real agent processes in `network.rs`.)

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;

mod common;

use common::{examples, sloth};

fn run(data: &Path, args: &[&str]) -> Output {
    sloth()
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .current_dir(examples())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn the_examples_run_on_the_embedded_store_and_list_their_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = run(
        &data,
        &["run", "ci_pipeline", "--file", "ci_pipeline.sloth"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for line in [
        "🚀 Running workflow ci_pipeline (stack ci_pipeline, run ",
        "   Tasks: build → test → deploy\n",
        "▶ build\n",
        "  build ℹ Build completed successfully\n",
        "  build 📦 Stored app.bin v1 (",
        "  test 📥 Copied app.bin v1 (",
        "  test │ 2 tests passed\n",
        "✓ deploy (",
        "✓ Workflow ci_pipeline succeeded in ",
        ": 3 tasks, 2 artifacts stored in stack ci_pipeline on local\n",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
    // A successful run leaves no work directories behind.
    assert_eq!(std::fs::read_dir(data.join("runs")).unwrap().count(), 0);

    let out = run(
        &data,
        &["run", "multi_stage", "--file", "multi_stage.sloth"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("🧹 artifact_retention = 30d on stack multi_stage: deleted 0 artifacts"),
        "{stdout}"
    );

    let listed = text(&run(&data, &["agent", "artifacts", "list", "local"]).stdout);
    for (name, stack, task) in [
        ("app.bin", "ci_pipeline", "build"),
        ("test-report.xml", "ci_pipeline", "test"),
        ("deps.tar.gz", "multi_stage", "build_deps"),
        ("app.bin", "multi_stage", "build_app"),
    ] {
        assert!(
            listed.lines().any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.first() == Some(&name)
                    && cols.get(1) == Some(&stack)
                    && cols.last() == Some(&task)
            }),
            "{name} {stack} {task} not in:\n{listed}"
        );
    }
    // What was stored is what the build made: the downloaded binary runs.
    let app = dir.path().join("app.bin");
    let out = run(
        &data,
        &[
            "agent",
            "artifacts",
            "download",
            "local",
            "app.bin",
            "--stack",
            "ci_pipeline",
            "-o",
        ],
    );
    assert!(!out.status.success(), "-o without a value");
    let out = sloth()
        .arg("--data-dir")
        .arg(&data)
        .args([
            "agent",
            "artifacts",
            "download",
            "local",
            "app.bin",
            "--stack",
            "ci_pipeline",
            "-o",
        ])
        .arg(&app)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ran = std::process::Command::new("sh")
        .arg(&app)
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(text(&ran.stdout), "app 1.2.3\n");
}

#[test]
fn values_files_reach_the_script() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, "version: \"2.0.0\"\ndeploy_dir: ~\n").unwrap();
    let out = run(
        &data,
        &[
            "run",
            "ci_pipeline",
            "--file",
            "ci_pipeline.sloth",
            "--stack",
            "production",
            "--values",
            values.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("✓ deploy (")
            && text(&out.stdout).contains("Deployed app 2.0.0 to production/opt/app"),
        "{}",
        text(&out.stdout)
    );
    std::fs::write(&values, "version: [unclosed\n").unwrap();
    let out = run(
        &data,
        &[
            "run",
            "ci_pipeline",
            "--file",
            "ci_pipeline.sloth",
            "--values",
            values.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with(&format!(
            "error: values file {} is not valid YAML",
            values.display()
        )),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn failures_exit_non_zero_with_a_message_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let script = |name: &str, source: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, source).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let bad_syntax = script(
        "syntax.sloth",
        "local build = task(\"build\")\n    :command(function()\n",
    );
    let returns_false = script(
        "false.sloth",
        "local t = task(\"t\"):command(function()\n  return false, \"no compiler\"\nend):build()\nworkflow.define(\"w\"):tasks({t})\n",
    );
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["run".into(), "w".into(), "--file".into(), bad_syntax.clone()],
            format!("error: {bad_syntax}:3: 'end' expected (to close 'function' at line 2) near <eof>\n"),
        ),
        (
            vec!["run".into(), "w".into(), "--file".into(), returns_false.clone()],
            format!("error: workflow 'w' failed: task 't': {returns_false}:1: no compiler\n"),
        ),
        (
            vec!["run".into(), "w".into(), "--file".into(), "missing.sloth".into()],
            "error: cannot read workflow file missing.sloth: No such file or directory (os error 2)\n".into(),
        ),
        (
            vec!["run".into(), "w".into(), "--file".into(), returns_false.clone(), "--stack".into(), "a/b".into()],
            "error: invalid stack \"a/b\": must not contain '/' or '\\'\n".into(),
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&data, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(text(&out.stderr), expected, "{args:?}");
    }
    // An agent that is not there: nothing runs, and the error says where it looked.
    let out = run(
        &data,
        &[
            "run",
            "ci_pipeline",
            "--file",
            "ci_pipeline.sloth",
            "--agent",
            "127.0.0.1:1",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: agent at 127.0.0.1:1 is not reachable: "),
        "{stderr}"
    );
    assert!(text(&out.stdout).is_empty());
}

#[test]
fn artifact_retention_applies_to_the_runs_stack_and_is_registered() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let old = dir.path().join("old.txt");
    std::fs::write(&old, "from last month").unwrap();
    let elsewhere = run(
        &data,
        &[
            "agent",
            "artifacts",
            "upload",
            "local",
            old.to_str().unwrap(),
            "--stack",
            "other",
        ],
    );
    assert!(elsewhere.status.success());
    let up = run(
        &data,
        &[
            "agent",
            "artifacts",
            "upload",
            "local",
            old.to_str().unwrap(),
            "--stack",
            "s",
        ],
    );
    assert!(up.status.success(), "{}", text(&up.stderr));
    // Old by 3 s; the run's own artifact is at most 2 s old when the rule runs (ages are whole
    // seconds), so "2s" deletes exactly the old one unless the run itself takes over 2 s.
    std::thread::sleep(std::time::Duration::from_millis(3100));
    let script = dir.path().join("keep.sloth");
    std::fs::write(
        &script,
        "local t = task(\"t\"):artifacts({\"new.txt\"}):command(function()\n\
           fs.write(\"new.txt\", \"fresh\")\n  return true\nend):build()\n\
         workflow.define(\"w\"):tasks({t}):config({ artifact_retention = \"2s\" })\n",
    )
    .unwrap();
    let out = run(
        &data,
        &[
            "run",
            "w",
            "--file",
            script.to_str().unwrap(),
            "--stack",
            "s",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("🧹 artifact_retention = 2s on stack s: deleted 1 artifact, "),
        "{stdout}"
    );
    let listed = text(&run(&data, &["agent", "artifacts", "list", "local"]).stdout);
    assert!(
        !listed
            .lines()
            .any(|l| l.starts_with("old.txt") && l.contains(" s ")),
        "{listed}"
    );
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("old.txt") && l.contains(" other ")),
        "{listed}"
    );
    let events = text(&run(&data, &["events", "list", "--type", "artifact.cleanup"]).stdout);
    assert!(
        events.contains("retention older-than(older_than=2s) on stack s"),
        "{events}"
    );
}
