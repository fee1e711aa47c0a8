//! Planning and running a workflow's tasks.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use mlua::{HookTriggers, Lua, LuaSerdeExt, MultiValue, Value, VmState};
use sloth_engine::{ArtifactKey, ArtifactRecord, Name};

use crate::dsl::{Command, Shared, TaskDef, TaskScope, WorkflowConfig, WorkflowDef};
use crate::error::describe;
use crate::{ArtifactStore, Error, Result};

/// Receives everything a run reports, as it happens. Called from the thread driving the run:
/// it should return quickly (print, or queue for a network stream).
pub type Sink = Arc<dyn Fn(RunEvent) + Send + Sync>;

/// A `log.*` level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// `log.debug`.
    Debug,
    /// `log.info`.
    Info,
    /// `log.warn`, and a failed `exec.run`.
    Warn,
    /// `log.error`.
    Error,
}

/// Which output of a command a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its command succeeded and its artifacts were stored.
    Succeeded,
    /// It failed (the message says why).
    Failed,
    /// It never started: a dependency failed, or the run stopped after another task failed.
    Skipped,
}

/// An artifact a task stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArtifact {
    /// Artifact name (the file's name).
    pub name: String,
    /// Stack.
    pub stack: String,
    /// Task.
    pub task: String,
    /// The version this run made.
    pub version: u32,
    /// Bytes.
    pub size: u64,
    /// `sha256:<hex>`.
    pub checksum: String,
}

/// What a run reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// The run begins.
    RunStarted {
        /// Workflow name.
        workflow: String,
        /// The stack its artifacts go to.
        stack: String,
        /// This run's id.
        run_id: String,
        /// Its tasks in a valid order.
        tasks: Vec<String>,
    },
    /// A task (or a retry of it) starts.
    TaskStarted {
        /// Task.
        task: String,
        /// 1 for the first try.
        attempt: u32,
        /// Tries allowed (`retries` + 1).
        attempts: u32,
    },
    /// `log.*` from the script, or a note from the runner.
    Log {
        /// The task, or `None` at the script's top level.
        task: Option<String>,
        /// Level.
        level: Level,
        /// Text.
        message: String,
    },
    /// One line a command printed.
    Output {
        /// The task, or `None` at the script's top level.
        task: Option<String>,
        /// stdout or stderr.
        stream: Stream,
        /// The line, without its newline.
        line: String,
    },
    /// An artifact was copied into a task's work directory.
    ArtifactConsumed {
        /// The consuming task.
        task: String,
        /// Artifact name.
        name: String,
        /// Version copied.
        version: u32,
        /// Bytes.
        size: u64,
        /// The task that produced it.
        from_task: String,
    },
    /// A task's artifact was stored.
    ArtifactStored(StoredArtifact),
    /// A task ended.
    TaskFinished {
        /// Task.
        task: String,
        /// How.
        outcome: Outcome,
        /// The command's message, or why it failed or was skipped.
        message: String,
        /// Time from its first start (zero when skipped).
        elapsed: Duration,
    },
}

/// One task's part of a [`RunReport`].
#[derive(Debug, Clone, PartialEq)]
pub struct TaskReport {
    /// Task.
    pub name: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Its message, or why it failed or was skipped.
    pub message: String,
    /// Time taken.
    pub elapsed: Duration,
    /// Artifacts it stored.
    pub artifacts: Vec<StoredArtifact>,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// Workflow name.
    pub workflow: String,
    /// Stack the artifacts went to.
    pub stack: String,
    /// Run id.
    pub run_id: String,
    /// Every task, in the order they finished (skipped ones last).
    pub tasks: Vec<TaskReport>,
    /// Wall time.
    pub elapsed: Duration,
    /// The run's work directories, when kept (after a failure, or when asked to keep them).
    pub kept_workdirs: Option<PathBuf>,
}

impl RunReport {
    /// Whether every task succeeded.
    pub fn succeeded(&self) -> bool {
        self.tasks.iter().all(|t| t.outcome == Outcome::Succeeded)
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stack for the artifacts (default: the workflow's name).
    pub stack: Option<String>,
    /// Where run directories (one per run, one work directory per task) are made.
    pub work_root: PathBuf,
    /// Who the store's events name.
    pub principal: String,
    /// Keep the work directories after a successful run too.
    pub keep_workdirs: bool,
    /// Most tasks running at once.
    pub max_parallel: usize,
}

/// A workflow whose task graph was checked: every dependency exists, there is no cycle, every
/// task has a command.
#[derive(Clone)]
pub struct Plan {
    workflow: WorkflowDef,
    /// Per task, the indexes of its dependencies.
    deps: Vec<Vec<usize>>,
    /// A valid execution order.
    order: Vec<usize>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("workflow", &self.workflow.name)
            .field("order", &self.task_order())
            .finish()
    }
}

impl Plan {
    pub(crate) fn new(workflow: WorkflowDef) -> Result<Self> {
        let fail = |reason: String| Error::Plan {
            workflow: workflow.name.clone(),
            reason,
        };
        if workflow.tasks.is_empty() {
            return Err(fail(
                "has no tasks: give them with :tasks({...})".to_owned(),
            ));
        }
        let mut index = HashMap::new();
        for (i, task) in workflow.tasks.iter().enumerate() {
            if index.insert(task.name.as_str(), i).is_some() {
                return Err(fail(format!("task '{}' appears twice", task.name)));
            }
            if task.command.is_none() {
                return Err(fail(format!(
                    "task '{}' ({}) has no command: give it one with :command(...)",
                    task.name, task.defined_at
                )));
            }
        }
        let names: Vec<&str> = workflow.tasks.iter().map(|t| t.name.as_str()).collect();
        let mut deps = Vec::with_capacity(workflow.tasks.len());
        for task in &workflow.tasks {
            let mut mine = Vec::new();
            for dep in &task.depends_on {
                match index.get(dep.as_str()) {
                    Some(&d) => mine.push(d),
                    None => {
                        return Err(fail(format!(
                            "task '{}' depends on '{dep}', which is not one of its tasks ({})",
                            task.name,
                            names.join(", ")
                        )));
                    }
                }
            }
            deps.push(mine);
        }
        let order = topological(&deps).map_err(|cycle| {
            let path: Vec<&str> = cycle.iter().map(|&i| names[i]).collect();
            fail(format!(
                "tasks depend on each other in a cycle: {}",
                path.join(" → ")
            ))
        })?;
        Ok(Self {
            workflow,
            deps,
            order,
        })
    }

    /// The workflow's name.
    pub fn workflow(&self) -> &str {
        &self.workflow.name
    }

    /// The workflow's `config`.
    pub fn config(&self) -> &WorkflowConfig {
        &self.workflow.config
    }

    /// Task names in a valid execution order.
    pub fn task_order(&self) -> Vec<&str> {
        self.order
            .iter()
            .map(|&i| self.workflow.tasks[i].name.as_str())
            .collect()
    }
}

/// Orders tasks so each comes after its dependencies, or returns a cycle (first node
/// repeated at the end).
fn topological(deps: &[Vec<usize>]) -> std::result::Result<Vec<usize>, Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        node: usize,
        deps: &[Vec<usize>],
        marks: &mut [Mark],
        stack: &mut Vec<usize>,
        order: &mut Vec<usize>,
    ) -> std::result::Result<(), Vec<usize>> {
        match marks[node] {
            Mark::Done => return Ok(()),
            Mark::Active => {
                let from = stack.iter().position(|&n| n == node).unwrap_or(0);
                let mut cycle = stack[from..].to_vec();
                cycle.push(node);
                return Err(cycle);
            }
            Mark::New => {}
        }
        marks[node] = Mark::Active;
        stack.push(node);
        for &dep in &deps[node] {
            visit(dep, deps, marks, stack, order)?;
        }
        stack.pop();
        marks[node] = Mark::Done;
        order.push(node);
        Ok(())
    }
    let mut marks = vec![Mark::New; deps.len()];
    let mut order = Vec::with_capacity(deps.len());
    for node in 0..deps.len() {
        visit(node, deps, &mut marks, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

/// Marks the error the timeout hook raises inside Lua code.
const TIMEOUT_MARK: &str = "sloth-runner: deadline reached";

/// A deadline and how to name it when it passes.
#[derive(Clone)]
struct Limit {
    at: Instant,
    what: String,
}

/// Why an attempt failed, and whether trying again could help.
struct Failure {
    message: String,
    retry: bool,
}

impl Failure {
    fn final_(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: false,
        }
    }

    fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: true,
        }
    }
}

/// Everything one run's tasks share.
struct RunCtx<'a, S> {
    lua: &'a Lua,
    shared: &'a Shared,
    store: &'a S,
    options: &'a RunOptions,
    workflow: &'a WorkflowDef,
    stack: String,
    run_id: String,
    run_dir: PathBuf,
    deadline: Option<Limit>,
    /// Artifacts stored by this run so far, by name: what `:consumes` prefers.
    produced: Mutex<HashMap<String, ArtifactRecord>>,
    /// Each finished task's outputs (the third value its command returned).
    outputs: Mutex<HashMap<String, serde_json::Value>>,
}

pub(crate) async fn run<S: ArtifactStore>(
    lua: &Lua,
    shared: &Shared,
    plan: &Plan,
    store: &S,
    options: &RunOptions,
) -> Result<RunReport> {
    let workflow = &plan.workflow;
    let stack = options
        .stack
        .clone()
        .unwrap_or_else(|| workflow.name.clone());
    Name::parse("stack", &stack).map_err(|e| Error::Plan {
        workflow: workflow.name.clone(),
        reason: format!("{e} (the stack defaults to the workflow's name; give one with --stack)"),
    })?;
    let run_id = new_run_id();
    let run_dir = options.work_root.join(&run_id);
    std::fs::create_dir_all(&run_dir).map_err(|source| Error::Io {
        path: run_dir.clone(),
        source,
    })?;
    let started = Instant::now();
    let ctx = RunCtx {
        lua,
        shared,
        store,
        options,
        workflow,
        stack,
        run_id,
        run_dir,
        deadline: workflow.config.timeout.map(|t| Limit {
            at: started + t,
            what: format!("the workflow's timeout of {}", human_duration(t)),
        }),
        produced: Mutex::default(),
        outputs: Mutex::default(),
    };
    shared.emit(RunEvent::RunStarted {
        workflow: workflow.name.clone(),
        stack: ctx.stack.clone(),
        run_id: ctx.run_id.clone(),
        tasks: plan.task_order().into_iter().map(str::to_owned).collect(),
    });

    let tasks = &workflow.tasks;
    let mut outcome: Vec<Option<Outcome>> = vec![None; tasks.len()];
    let mut started_tasks = vec![false; tasks.len()];
    let mut reports = Vec::with_capacity(tasks.len());
    let mut running = FuturesUnordered::new();
    let mut stopped_by: Option<String> = None;
    loop {
        if stopped_by.is_none() {
            for &i in &plan.order {
                if running.len() >= options.max_parallel.max(1) {
                    break;
                }
                let ready = !started_tasks[i]
                    && plan.deps[i]
                        .iter()
                        .all(|&d| outcome[d] == Some(Outcome::Succeeded));
                if ready {
                    started_tasks[i] = true;
                    let ctx = &ctx;
                    running.push(async move { (i, ctx.run_task(&tasks[i], &plan.deps[i]).await) });
                }
            }
        }
        let Some((i, report)) = running.next().await else {
            break;
        };
        outcome[i] = Some(report.outcome);
        if report.outcome != Outcome::Succeeded && stopped_by.is_none() {
            stopped_by = Some(tasks[i].name.clone());
        }
        reports.push(report);
    }
    for &i in &plan.order {
        if outcome[i].is_some() {
            continue;
        }
        let failed_dep = plan.deps[i]
            .iter()
            .find(|&&d| outcome[d] != Some(Outcome::Succeeded))
            .map(|&d| tasks[d].name.clone());
        let message = match (failed_dep, &stopped_by) {
            (Some(dep), _) => format!("'{dep}' did not succeed"),
            (None, Some(by)) => format!("the run stopped after '{by}' failed"),
            (None, None) => "not started".to_owned(),
        };
        outcome[i] = Some(Outcome::Skipped);
        shared.emit(RunEvent::TaskFinished {
            task: tasks[i].name.clone(),
            outcome: Outcome::Skipped,
            message: message.clone(),
            elapsed: Duration::ZERO,
        });
        reports.push(TaskReport {
            name: tasks[i].name.clone(),
            outcome: Outcome::Skipped,
            message,
            elapsed: Duration::ZERO,
            artifacts: Vec::new(),
        });
    }
    let mut report = RunReport {
        workflow: workflow.name.clone(),
        stack: ctx.stack.clone(),
        run_id: ctx.run_id.clone(),
        tasks: reports,
        elapsed: started.elapsed(),
        kept_workdirs: None,
    };
    if report.succeeded() && !options.keep_workdirs {
        let _ = std::fs::remove_dir_all(&ctx.run_dir);
    } else {
        report.kept_workdirs = Some(ctx.run_dir.clone());
    }
    Ok(report)
}

impl<S: ArtifactStore> RunCtx<'_, S> {
    async fn run_task(&self, def: &TaskDef, deps: &[usize]) -> TaskReport {
        let started = Instant::now();
        let attempts = def.retries + 1;
        let mut failure = String::new();
        for attempt in 1..=attempts {
            self.shared.emit(RunEvent::TaskStarted {
                task: def.name.clone(),
                attempt,
                attempts,
            });
            match self.attempt(def, deps).await {
                Ok((message, artifacts)) => {
                    self.shared.emit(RunEvent::TaskFinished {
                        task: def.name.clone(),
                        outcome: Outcome::Succeeded,
                        message: message.clone(),
                        elapsed: started.elapsed(),
                    });
                    return TaskReport {
                        name: def.name.clone(),
                        outcome: Outcome::Succeeded,
                        message,
                        elapsed: started.elapsed(),
                        artifacts,
                    };
                }
                Err(f) => {
                    failure = f.message;
                    if !f.retry || attempt == attempts {
                        break;
                    }
                    self.shared.emit(RunEvent::Log {
                        task: Some(def.name.clone()),
                        level: Level::Warn,
                        message: format!(
                            "attempt {attempt} of {attempts} failed: {failure}; trying again"
                        ),
                    });
                }
            }
        }
        self.shared.emit(RunEvent::TaskFinished {
            task: def.name.clone(),
            outcome: Outcome::Failed,
            message: failure.clone(),
            elapsed: started.elapsed(),
        });
        TaskReport {
            name: def.name.clone(),
            outcome: Outcome::Failed,
            message: failure,
            elapsed: started.elapsed(),
            artifacts: Vec::new(),
        }
    }

    /// One try: work directory, consumed artifacts, the command, the declared artifacts.
    async fn attempt(
        &self,
        def: &TaskDef,
        deps: &[usize],
    ) -> std::result::Result<(String, Vec<StoredArtifact>), Failure> {
        let workdir = self.workdir(def).map_err(Failure::final_)?;
        for name in &def.consumes {
            self.consume(def, name, &workdir).await?;
        }
        let limit = [
            def.timeout.map(|t| Limit {
                at: Instant::now() + t,
                what: format!("its timeout of {}", human_duration(t)),
            }),
            self.deadline.clone(),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|l| l.at);
        let scope = Arc::new(TaskScope {
            task: def.name.clone(),
            workdir: workdir.clone(),
            env: vec![
                ("SLOTH_WORKFLOW".into(), self.workflow.name.clone()),
                ("SLOTH_STACK".into(), self.stack.clone()),
                ("SLOTH_TASK".into(), def.name.clone()),
                ("SLOTH_RUN_ID".into(), self.run_id.clone()),
                ("SLOTH_WORKDIR".into(), workdir.display().to_string()),
            ],
        });
        let (message, outputs) = self.execute(def, deps, scope, limit).await?;
        let artifacts = self.store_artifacts(def, &workdir).await?;
        self.outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(def.name.clone(), outputs);
        Ok((message, artifacts))
    }

    /// The task's work directory: its `:workdir`, else (with `create_workdir_before_run`) a
    /// fresh directory of its own in the run directory, else the script's directory.
    fn workdir(&self, def: &TaskDef) -> std::result::Result<PathBuf, String> {
        let create = self.workflow.config.create_workdir_before_run;
        let dir = match &def.workdir {
            Some(dir) => self.shared.base_dir.join(dir),
            None if create => {
                let dir = self.run_dir.join(&def.name);
                // A retry starts from a clean directory, like the first try.
                match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(format!(
                            "cannot clear work directory {}: {e}",
                            dir.display()
                        ));
                    }
                    _ => {}
                }
                dir
            }
            None => return Ok(self.shared.base_dir.clone()),
        };
        if create {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create work directory {}: {e}", dir.display()))?;
        } else if !dir.is_dir() {
            return Err(format!(
                "work directory {} does not exist (create_workdir_before_run is off)",
                dir.display()
            ));
        }
        Ok(dir)
    }

    async fn consume(
        &self,
        def: &TaskDef,
        name: &str,
        workdir: &Path,
    ) -> std::result::Result<(), Failure> {
        let fail = |reason: String| Failure::final_(format!("consumes '{name}': {reason}"));
        let from_run = self
            .produced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let record = match from_run {
            Some(record) => record,
            None => self
                .store
                .newest_in_stack(&self.stack, name)
                .map_err(|e| fail(sloth_engine::error_chain(&e)))?
                .ok_or_else(|| {
                    fail(format!(
                        "no task of this run produced it and stack '{}' holds no artifact of that name",
                        self.stack
                    ))
                })?,
        };
        let target = workdir.join(name);
        self.store
            .fetch(&record, &target, &self.options.principal)
            .await
            .map_err(|e| fail(sloth_engine::error_chain(&e)))?;
        if self.workflow.config.verify_checksums {
            let copy = target.clone();
            let digest = tokio::task::spawn_blocking(move || sloth_engine::sha256_file(&copy))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|e| fail(format!("cannot read the copy back: {e}")))?;
            if digest != record.checksum {
                return Err(fail(format!(
                    "the copy in {} has checksum {digest}, the store says {}",
                    target.display(),
                    record.checksum
                )));
            }
        }
        self.shared.emit(RunEvent::ArtifactConsumed {
            task: def.name.clone(),
            name: name.to_owned(),
            version: record.version,
            size: record.size,
            from_task: record.task.clone(),
        });
        Ok(())
    }

    /// Runs the task's command under its time limit. Returns its message and outputs.
    async fn execute(
        &self,
        def: &TaskDef,
        deps: &[usize],
        scope: Arc<TaskScope>,
        limit: Option<Limit>,
    ) -> std::result::Result<(String, serde_json::Value), Failure> {
        let timed_out =
            |limit: &Limit| Failure::retry(format!("timed out: reached {}", limit.what));
        let command = def
            .command
            .as_ref()
            .expect("plans check every task has a command");
        let function = match command {
            Command::Shell(line) => {
                let run = crate::modules::shell(line, &scope, &self.shared.sink);
                let finished = match &limit {
                    Some(l) => tokio::time::timeout_at(l.at.into(), run)
                        .await
                        .map_err(|_| timed_out(l))?,
                    None => run.await,
                }
                .map_err(|e| Failure::final_(format!("cannot run '{line}': {e}")))?;
                return if finished.success {
                    Ok((String::new(), serde_json::Value::Null))
                } else {
                    Err(Failure::retry(format!(
                        "{}: command failed ({}): {line}",
                        def.defined_at,
                        finished.status_text()
                    )))
                };
            }
            Command::Lua(function) => function,
        };
        let lua_failure = |e: mlua::Error| Failure::retry(describe(&e));
        let thread = self
            .lua
            .create_thread(function.clone())
            .map_err(lua_failure)?;
        if let Some(l) = &limit {
            let at = l.at;
            thread
                .set_hook(
                    HookTriggers::new().every_nth_instruction(10_000),
                    move |_, _| {
                        if Instant::now() >= at {
                            Err(mlua::Error::RuntimeError(TIMEOUT_MARK.to_owned()))
                        } else {
                            Ok(VmState::Continue)
                        }
                    },
                )
                .map_err(lua_failure)?;
        }
        let argument = self.context_table(def, deps, &scope).map_err(lua_failure)?;
        self.shared.enter(&thread, scope);
        let result = async {
            let call = thread.clone().into_async::<MultiValue>(argument)?;
            match &limit {
                Some(l) => match tokio::time::timeout_at(l.at.into(), call).await {
                    Ok(result) => result.map(Some),
                    Err(_) => Ok(None),
                },
                None => call.await.map(Some),
            }
        }
        .await;
        self.shared.leave(&thread);
        let values = match result {
            Ok(Some(values)) => values,
            Ok(None) => return Err(timed_out(limit.as_ref().expect("only with a limit"))),
            Err(e) => {
                let message = describe(&e);
                return Err(match &limit {
                    Some(l) if message.contains(TIMEOUT_MARK) => timed_out(l),
                    _ => Failure::retry(message),
                });
            }
        };
        self.interpret(def, function, values)
    }

    /// `true|false, message[, outputs]`; returning nothing counts as success.
    fn interpret(
        &self,
        def: &TaskDef,
        function: &mlua::Function,
        values: MultiValue,
    ) -> std::result::Result<(String, serde_json::Value), Failure> {
        let info = function.info();
        let at = format!(
            "{}:{}",
            info.short_src.as_deref().unwrap_or("?"),
            info.line_defined.unwrap_or(0)
        );
        let mut values = values.into_iter();
        let first = values.next().unwrap_or(Value::Nil);
        let message = match values.next() {
            None | Some(Value::Nil) => String::new(),
            Some(Value::String(s)) => s.to_string_lossy(),
            Some(other) => self
                .lua
                .coerce_string(other)
                .ok()
                .flatten()
                .map(|s| s.to_string_lossy())
                .unwrap_or_default(),
        };
        match first {
            Value::Nil | Value::Boolean(true) => {
                let outputs = match values.next() {
                    None | Some(Value::Nil) => serde_json::Value::Null,
                    Some(v) => self.lua.from_value(v).map_err(|e| {
                        Failure::final_(format!(
                            "{at}: task '{}' returned outputs that are not plain data: {}",
                            def.name,
                            describe(&e)
                        ))
                    })?,
                };
                Ok((message, outputs))
            }
            Value::Boolean(false) => Err(Failure::retry(if message.is_empty() {
                format!("{at}: task '{}' returned false", def.name)
            } else {
                format!("{at}: {message}")
            })),
            other => Err(Failure::final_(format!(
                "{at}: task '{}' returned {}, expected true or false",
                def.name,
                other.type_name()
            ))),
        }
    }

    /// The argument a command function gets: `{task, workflow, stack, run_id, workdir,
    /// inputs}`, `inputs` holding each dependency's outputs by task name.
    fn context_table(
        &self,
        def: &TaskDef,
        deps: &[usize],
        scope: &TaskScope,
    ) -> mlua::Result<mlua::Table> {
        let table = self.lua.create_table()?;
        table.set("task", def.name.as_str())?;
        table.set("workflow", self.workflow.name.as_str())?;
        table.set("stack", self.stack.as_str())?;
        table.set("run_id", self.run_id.as_str())?;
        table.set("workdir", scope.workdir.display().to_string())?;
        let inputs = self.lua.create_table()?;
        let outputs = self.outputs.lock().unwrap_or_else(|e| e.into_inner());
        for &d in deps {
            let name = &self.workflow.tasks[d].name;
            if let Some(value) = outputs.get(name) {
                inputs.set(name.as_str(), self.lua.to_value(value)?)?;
            }
        }
        table.set("inputs", inputs)?;
        Ok(table)
    }

    /// Stores the files `:artifacts{...}` names. A name or pattern that matches nothing fails
    /// the task.
    async fn store_artifacts(
        &self,
        def: &TaskDef,
        workdir: &Path,
    ) -> std::result::Result<Vec<StoredArtifact>, Failure> {
        let files = declared_files(&def.artifacts, workdir).map_err(Failure::retry)?;
        let mut stored = Vec::with_capacity(files.len());
        for (name, path) in files {
            let fail = |e: sloth_engine::Error| {
                Failure::final_(format!(
                    "cannot store artifact '{name}': {}",
                    sloth_engine::error_chain(&e)
                ))
            };
            let key = ArtifactKey::new(&name, Some(&self.stack), Some(&def.name)).map_err(fail)?;
            let record = self
                .store
                .store(
                    &key,
                    &path,
                    self.workflow.config.artifact_compression,
                    &self.options.principal,
                )
                .await
                .map_err(fail)?;
            let artifact = StoredArtifact {
                name: record.name.clone(),
                stack: record.stack.clone(),
                task: record.task.clone(),
                version: record.version,
                size: record.size,
                checksum: record.checksum.clone(),
            };
            self.shared.emit(RunEvent::ArtifactStored(artifact.clone()));
            self.produced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name, record);
            stored.push(artifact);
        }
        Ok(stored)
    }
}

/// The files `patterns` name in `workdir`, as (artifact name, path): plain names must exist,
/// patterns (`*`, `?`, `[`) must match at least one file. The artifact name is the file's
/// name; two different files with the same name are an error.
fn declared_files(
    patterns: &[String],
    workdir: &Path,
) -> std::result::Result<Vec<(String, PathBuf)>, String> {
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for pattern in patterns {
        let matches: Vec<PathBuf> = if pattern.contains(['*', '?', '[']) {
            let full = format!(
                "{}/{pattern}",
                glob::Pattern::escape(&workdir.display().to_string())
            );
            let found: Vec<PathBuf> = glob::glob(&full)
                .map_err(|e| format!("artifact pattern '{pattern}' is not a valid glob: {e}"))?
                .filter_map(|entry| entry.ok())
                .filter(|path| path.is_file())
                .collect();
            if found.is_empty() {
                return Err(format!(
                    "declared artifact pattern '{pattern}' matched no file in {}",
                    workdir.display()
                ));
            }
            found
        } else {
            let path = workdir.join(pattern);
            if path.is_dir() {
                return Err(format!(
                    "declared artifact '{pattern}' is a directory; artifacts are files (archive it first, e.g. tar -czf)"
                ));
            }
            if !path.is_file() {
                return Err(format!(
                    "declared artifact '{pattern}' was not produced: no such file in {}",
                    workdir.display()
                ));
            }
            vec![path]
        };
        for path in matches {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match files.iter().find(|(n, _)| *n == name) {
                Some((_, other)) if *other != path => {
                    return Err(format!(
                        "two declared artifacts have the name '{name}': {} and {}",
                        other.display(),
                        path.display()
                    ));
                }
                Some(_) => {}
                None => files.push((name, path)),
            }
        }
    }
    Ok(files)
}

/// `<unix seconds>-<6 random hex digits>`: sorts by time, unique enough for a directory name.
fn new_run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{secs}-{:06x}", hasher.finish() & 0xff_ffff)
}

/// `90s`, `30m`, `1h`, `1h30m`.
pub(crate) fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topological_orders_and_finds_cycles() {
        assert_eq!(topological(&[vec![], vec![0], vec![1]]), Ok(vec![0, 1, 2]));
        assert_eq!(
            topological(&[vec![2], vec![0], vec![1]]),
            Err(vec![0, 2, 1, 0])
        );
        assert_eq!(topological(&[vec![0]]), Err(vec![0, 0]));
    }

    #[test]
    fn declared_files_need_every_name_and_pattern_to_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.xml"), "a").expect("write");
        std::fs::create_dir(dir.path().join("out")).expect("mkdir");
        std::fs::write(dir.path().join("out/a.xml"), "b").expect("write");
        std::fs::write(dir.path().join("out/b.xml"), "c").expect("write");
        let files = declared_files(&["out/*.xml".into()], dir.path()).expect("match");
        assert_eq!(
            files.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a.xml", "b.xml"]
        );
        let clash = declared_files(&["a.xml".into(), "out/*.xml".into()], dir.path());
        assert!(clash.expect_err("clash").contains("two declared artifacts"));
        let missing = declared_files(&["app.bin".into()], dir.path());
        assert!(missing.expect_err("missing").contains("was not produced"));
        let none = declared_files(&["*.bin".into()], dir.path());
        assert!(none.expect_err("none").contains("matched no file"));
        let directory = declared_files(&["out".into()], dir.path());
        assert!(directory.expect_err("dir").contains("is a directory"));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(human_duration(Duration::from_secs(1800)), "30m");
        assert_eq!(human_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(human_duration(Duration::from_secs(5)), "5s");
    }
}
