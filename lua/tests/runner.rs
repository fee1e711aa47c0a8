//! Workflows run against a real embedded store: the spec's examples end to end, and every
//! failure a script author can meet, each with its message.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sloth_engine::{ArtifactKey, Engine, EngineConfig, ListQuery};
use sloth_lua::{Error, Outcome, RunEvent, RunOptions, RunReport, Script, ScriptEnv};

struct Harness {
    dir: tempfile::TempDir,
    engine: Engine,
    events: Arc<Mutex<Vec<RunEvent>>>,
}

impl Harness {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path().join("data"), EngineConfig::default())
            .await
            .unwrap();
        std::fs::create_dir(dir.path().join("scripts")).unwrap();
        Self {
            dir,
            engine,
            events: Arc::default(),
        }
    }

    fn base(&self) -> PathBuf {
        self.dir.path().join("scripts")
    }

    fn load(&self, source: &str) -> sloth_lua::Result<Script> {
        let events = Arc::clone(&self.events);
        Script::load(
            source,
            "flow.sloth",
            ScriptEnv {
                base_dir: self.base(),
                values: serde_json::json!({ "base": self.base() }),
                sink: Arc::new(move |e| events.lock().unwrap().push(e)),
            },
        )
    }

    fn options(&self) -> RunOptions {
        RunOptions {
            stack: None,
            work_root: self.dir.path().join("runs"),
            principal: "tester".into(),
            keep_workdirs: true,
            max_parallel: 4,
        }
    }

    async fn run_with(&self, source: &str, workflow: &str, options: RunOptions) -> RunReport {
        let script = self.load(source).unwrap();
        let plan = script.plan(workflow).unwrap();
        script.run(&plan, &self.engine, &options).await.unwrap()
    }

    async fn run(&self, source: &str, workflow: &str) -> RunReport {
        self.run_with(source, workflow, self.options()).await
    }

    fn events(&self) -> Vec<RunEvent> {
        self.events.lock().unwrap().clone()
    }

    async fn read_back(&self, stack: &str, task: &str, name: &str) -> Vec<u8> {
        let key = ArtifactKey::new(name, Some(stack), Some(task)).unwrap();
        let record = self.engine.versions(&key).unwrap().pop().unwrap();
        let target = self.dir.path().join(format!("read-{stack}-{task}-{name}"));
        self.engine
            .download_to(&record, &target, "tester")
            .await
            .unwrap();
        std::fs::read(target).unwrap()
    }
}

fn task<'a>(report: &'a RunReport, name: &str) -> &'a sloth_lua::TaskReport {
    report.tasks.iter().find(|t| t.name == name).unwrap()
}

fn example(name: &str) -> String {
    // The `CARGO_MANIFEST_DIR` of the run, not of the build: two checkouts sharing a target
    // directory can reuse each other's test binaries, and the baked path is then the other's.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let path = dir.join("../examples").join(name);
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ci_pipeline_example_stores_its_artifacts_bit_exact() {
    let h = Harness::new().await;
    let report = h.run(&example("ci_pipeline.sloth"), "ci_pipeline").await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(report.stack, "ci_pipeline");
    let listed: Vec<(String, String, String)> = h
        .engine
        .list(&ListQuery {
            stack: Some("ci_pipeline".into()),
            ..ListQuery::default()
        })
        .unwrap()
        .into_iter()
        .map(|r| (r.name, r.stack, r.task))
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (name, task) in [("app.bin", "build"), ("test-report.xml", "test")] {
        assert!(
            listed.contains(&(name.into(), "ci_pipeline".into(), task.into())),
            "{name} in {listed:?}"
        );
        let produced =
            std::fs::read(report.kept_workdirs.as_ref().unwrap().join(task).join(name)).unwrap();
        assert_eq!(h.read_back("ci_pipeline", task, name).await, produced);
    }
    let deployed = task(&report, "deploy");
    assert_eq!(deployed.message, "Deployed app 1.2.3 to production/opt/app");
    // test and deploy each got their own copy of build's app.bin.
    let consumed = h
        .events()
        .into_iter()
        .filter(|e| matches!(e, RunEvent::ArtifactConsumed { name, .. } if name == "app.bin"))
        .count();
    assert_eq!(consumed, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_multi_stage_example_hands_dependencies_and_outputs_downstream() {
    let h = Harness::new().await;
    let mut options = h.options();
    options.stack = Some("builds".into());
    let report = h
        .run_with(&example("multi_stage.sloth"), "multi_stage", options)
        .await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(
        task(&report, "build_app").message,
        "Built app.bin: Hello, SLOTH!"
    );
    let app = h.read_back("builds", "build_app", "app.bin").await;
    let produced = std::fs::read(report.kept_workdirs.unwrap().join("build_app/app.bin")).unwrap();
    assert_eq!(app, produced);
    assert!(h.events().contains(&RunEvent::Log {
        task: Some("build_app".into()),
        level: sloth_lua::Level::Info,
        message: "using 2 cached modules".into(),
    }));
}

#[tokio::test(flavor = "multi_thread")]
async fn scripts_that_cannot_be_run_are_refused_with_file_and_line() {
    let h = Harness::new().await;
    let cases = [
        (
            "local t = task(\"a\")\n  :command(function()\n",
            "flow.sloth:3:",
        ),
        (
            "error(\"top-level trouble\")",
            "flow.sloth:1: top-level trouble",
        ),
        (
            "task(\"a\"):timeout(\"soon\")",
            "flow.sloth:1: timeout must be a duration like 90s, 30m, 1h or 2d (or seconds), got 'soon'",
        ),
        (
            "workflow.define(\"w\"):config({ timout = \"1m\" })",
            "flow.sloth:1: unknown config key 'timout'",
        ),
        (
            "task(\"a/b\")",
            "flow.sloth:1: invalid task \"a/b\": must not contain",
        ),
        (
            "task(\"a\"):consumes({\"../x\"})",
            "flow.sloth:1: task 'a': consumes:",
        ),
    ];
    for (source, expected) in cases {
        let Err(Error::Script(message)) = h.load(source) else {
            panic!("{source:?} loaded");
        };
        assert!(
            message.starts_with(expected) || message.contains(expected),
            "{source:?}: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn task_graphs_are_checked_before_anything_runs() {
    let h = Harness::new().await;
    let plan_error = |source: &str, workflow: &str| {
        let script = h.load(source).unwrap();
        script.plan(workflow).unwrap_err().to_string()
    };
    let unknown = plan_error(
        r#"local a = task("a"):command("true"):depends_on({"biuld"}):build()
           workflow.define("w"):tasks({a})"#,
        "w",
    );
    assert_eq!(
        unknown,
        "workflow 'w': task 'a' depends on 'biuld', which is not one of its tasks (a)"
    );
    let cycle = plan_error(
        r#"local a = task("a"):command("true"):depends_on({"c"}):build()
           local b = task("b"):command("true"):depends_on({"a"}):build()
           local c = task("c"):command("true"):depends_on({"b"}):build()
           workflow.define("w"):tasks({a, b, c})"#,
        "w",
    );
    assert_eq!(
        cycle,
        "workflow 'w': tasks depend on each other in a cycle: a → c → b → a"
    );
    let no_command = plan_error(
        "local a = task(\"a\"):build()\nworkflow.define(\"w\"):tasks({a})",
        "w",
    );
    assert!(
        no_command.contains("task 'a' (flow.sloth:1) has no command"),
        "{no_command}"
    );
    let missing = plan_error("workflow.define(\"w\")", "deploy");
    assert_eq!(
        missing,
        "workflow 'deploy' is not defined in flow.sloth (defined: w)"
    );
    assert!(!h.dir.path().join("runs").exists(), "nothing ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_commands_fail_their_task_and_skip_its_dependents() {
    let h = Harness::new().await;
    let source = r#"
local a = task("a")
    :command(function()
        return false, "the linker is sad"
    end)
    :build()
local b = task("b"):depends_on({"a"}):command("true"):build()
local c = task("c")
    :command(function()
        local n = nil
        return n.field
    end)
    :build()
local d = task("d"):command("echo oops >&2; exit 3"):build()
workflow.define("w"):tasks({a, b, c, d})
"#;
    let report = h.run(source, "w").await;
    assert!(!report.succeeded());
    assert_eq!(task(&report, "a").outcome, Outcome::Failed);
    assert_eq!(
        task(&report, "a").message,
        "flow.sloth:3: the linker is sad"
    );
    assert_eq!(task(&report, "b").outcome, Outcome::Skipped);
    assert_eq!(task(&report, "b").message, "'a' did not succeed");
    // The run stops at the first failure; whatever had already started finishes.
    for t in ["c", "d"] {
        let t = task(&report, t);
        match t.outcome {
            Outcome::Failed => {}
            Outcome::Skipped => assert!(t.message.contains("the run stopped after")),
            Outcome::Succeeded => panic!("{t:?}"),
        }
    }
    let c = task(&report, "c");
    if c.outcome == Outcome::Failed {
        assert!(
            c.message
                .starts_with("flow.sloth:11: attempt to index a nil value"),
            "{}",
            c.message
        );
    }
    let d = task(&report, "d");
    if d.outcome == Outcome::Failed {
        assert_eq!(
            d.message,
            "flow.sloth:14: command failed (exit code 3): echo oops >&2; exit 3"
        );
    }
    // A failed run keeps its work directories for inspection.
    assert!(report.kept_workdirs.unwrap().is_dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_stop_lua_loops_and_kill_whole_commands() {
    let h = Harness::new().await;
    let marker = h.base().join("survived");
    let source = r#"
local spin = task("spin"):timeout("1s"):command(function()
    while true do end
end):build()
local wait = task("wait"):timeout("1s"):command(function()
    exec.run("(sleep 2; touch '" .. values.base .. "/survived') & sleep 30")
    return true
end):build()
workflow.define("w"):tasks({spin, wait}):config({ timeout = "1h" })
"#;
    let started = Instant::now();
    let report = h.run(source, "w").await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    for name in ["spin", "wait"] {
        let t = task(&report, name);
        assert_eq!(t.outcome, Outcome::Failed, "{t:?}");
        assert_eq!(t.message, "timed out: reached its timeout of 1s");
    }
    // The command's background child was in its process group: killed with it.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!marker.exists(), "a killed command's child kept running");

    let workflow_limit = r#"
local slow = task("slow"):command("sleep 5"):build()
workflow.define("w"):tasks({slow}):config({ timeout = "1s" })
"#;
    let report = h.run(workflow_limit, "w").await;
    assert_eq!(
        task(&report, "slow").message,
        "timed out: reached the workflow's timeout of 1s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn consumed_and_declared_artifacts_must_exist() {
    let h = Harness::new().await;
    let source = r#"
local use = task("use"):consumes({"missing.bin"}):command(function()
    fs.write(values.base .. "/ran", "yes")
    return true
end):build()
local make = task("make"):artifacts({"app.bin"}):command(function()
    exec.run("echo not the binary > other.txt")
    return true
end):build()
workflow.define("consume"):tasks({use})
workflow.define("produce"):tasks({make})
"#;
    let report = h.run(source, "consume").await;
    assert_eq!(
        task(&report, "use").message,
        "consumes 'missing.bin': no task of this run produced it and stack 'consume' holds no artifact of that name"
    );
    assert!(!h.base().join("ran").exists(), "the command ran");
    let report = h.run(source, "produce").await;
    let make = task(&report, "make");
    assert_eq!(make.outcome, Outcome::Failed);
    assert!(
        make.message
            .starts_with("declared artifact 'app.bin' was not produced: no such file in "),
        "{}",
        make.message
    );
    assert!(h.engine.list(&ListQuery::default()).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn consumes_prefers_this_runs_version_then_the_newest_in_the_stack() {
    let h = Harness::new().await;
    let old = h.base().join("old.bin");
    std::fs::write(&old, b"from an earlier pipeline").unwrap();
    let key = ArtifactKey::new("app.bin", Some("s"), Some("release")).unwrap();
    h.engine.upload_path(&key, &old, "tester").await.unwrap();
    let source = r#"
local build = task("build"):artifacts({"app.bin"}):command(function()
    fs.write("app.bin", "built in this run")
    return true
end):build()
local check = task("check"):depends_on({"build"}):consumes({"app.bin"}):command(function()
    return true, fs.read("app.bin")
end):build()
local alone = task("alone"):consumes({"app.bin"}):command(function()
    return true, fs.read("app.bin")
end):build()
workflow.define("both"):tasks({build, check})
workflow.define("alone"):tasks({alone})
"#;
    let mut options = h.options();
    options.stack = Some("s".into());
    let report = h.run_with(source, "both", options.clone()).await;
    assert_eq!(task(&report, "check").message, "built in this run");
    // Without a producer in the run: the newest app.bin in the stack, now build's.
    let report = h.run_with(source, "alone", options).await;
    assert_eq!(task(&report, "alone").message, "built in this run");
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_run_a_failed_command_again_from_a_clean_workdir() {
    let h = Harness::new().await;
    let source = r#"
local flaky = task("flaky"):retries(2):command(function()
    local counter = values.base .. "/count"
    local n = tonumber(fs.exists(counter) and fs.read(counter) or "0") + 1
    fs.write(counter, tostring(n))
    if fs.exists("leftover") then return false, "the workdir was not cleaned" end
    fs.write("leftover", "x")
    return n >= 2, "try " .. n
end):build()
workflow.define("w"):tasks({flaky})
"#;
    let report = h.run(source, "w").await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(task(&report, "flaky").message, "try 2");
    let attempts: Vec<u32> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            RunEvent::TaskStarted { attempt, .. } => Some(attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [1, 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn independent_tasks_run_at_the_same_time() {
    let h = Harness::new().await;
    let source = r#"
local a = task("a"):command("sleep 0.5"):build()
local b = task("b"):command(function() exec.run("sleep 0.5"); return true end):build()
local c = task("c"):depends_on({"a", "b"}):command("true"):build()
workflow.define("w"):tasks({a, b, c})
"#;
    let report = h.run(source, "w").await;
    assert!(report.succeeded());
    let order: Vec<String> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            RunEvent::TaskStarted { task, .. } => Some(format!("start {task}")),
            RunEvent::TaskFinished { task, .. } => Some(format!("end {task}")),
            _ => None,
        })
        .collect();
    assert_eq!(&order[..2], ["start a", "start b"], "{order:?}");
    assert_eq!(&order[4..], ["start c", "end c"], "{order:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_fs_and_log_behave_as_documented() {
    let h = Harness::new().await;
    let source = r#"
local t = task("t"):command(function(ctx)
    fs.mkdir("sub")
    local r = exec.run("echo out; echo err >&2; pwd; echo $GREETING $SLOTH_TASK; exit 4",
        { workdir = "sub", env = { GREETING = "hi" } })
    assert(r.exit_code == 4 and r.success == false, "exit")
    assert(r.stderr == "err\n", "stderr: " .. r.stderr)
    local lines = {}
    for line in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert(lines[1] == "out", "stdout")
    assert(lines[2] == ctx.workdir .. "/sub", "pwd " .. lines[2])
    assert(lines[3] == "hi t", "env " .. lines[3])
    fs.write("sub/f.txt", "content")
    assert(fs.read("sub/f.txt") == "content")
    local names = fs.ls("sub")
    assert(#names == 1 and names[1] == "f.txt", "ls")
    fs.rm("sub")
    assert(not fs.exists("sub"), "rm")
    log.warn("done with", 3, "checks")
    return true, "ok", { checked = 3 }
end):build()
workflow.define("w"):tasks({t})
"#;
    let report = h.run(source, "w").await;
    assert!(report.succeeded(), "{report:#?}");
    let events = h.events();
    assert!(events.contains(&RunEvent::Log {
        task: Some("t".into()),
        level: sloth_lua::Level::Warn,
        message: "done with 3 checks".into(),
    }));
    assert!(events.contains(&RunEvent::Log {
        task: Some("t".into()),
        level: sloth_lua::Level::Warn,
        message: "command failed (exit code 4): echo out; echo err >&2; pwd; echo $GREETING $SLOTH_TASK; exit 4".into(),
    }));
}

#[tokio::test(flavor = "multi_thread")]
async fn artifact_compression_off_stores_chunks_raw() {
    let h = Harness::new().await;
    let script = |compress: bool, name: &str| {
        format!(
            r#"local t = task("t"):artifacts({{"data.txt"}}):command(function()
                   fs.write("data.txt", string.rep("{name}: all work and no play ", 20000))
                   return true
               end):build()
               workflow.define("{name}"):tasks({{t}}):config({{ artifact_compression = {compress} }})"#
        )
    };
    h.run(&script(false, "raw"), "raw").await;
    h.run(&script(true, "packed"), "packed").await;
    let stored = |stack: &str| {
        h.engine
            .list(&ListQuery {
                stack: Some(stack.into()),
                ..ListQuery::default()
            })
            .unwrap()[0]
            .stored_bytes
    };
    assert!(stored("raw") >= 420_000, "raw: {}", stored("raw"));
    assert!(stored("packed") < 42_000, "packed: {}", stored("packed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn print_is_logged_and_os_exit_cannot_end_the_process() {
    let h = Harness::new().await;
    let source = r#"
print("top", "level")
local t = task("t"):command(function()
    os.exit(1)
end):build()
workflow.define("w"):tasks({t})
"#;
    let report = h.run(source, "w").await;
    assert!(h.events().contains(&RunEvent::Log {
        task: None,
        level: sloth_lua::Level::Info,
        message: "top level".into(),
    }));
    assert_eq!(
        task(&report, "t").message,
        "flow.sloth:4: os.exit is not available in workflows: return false, \"message\" to fail a task"
    );
}
