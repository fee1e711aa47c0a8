//! The definitions a script makes: `task(name)` builders and `workflow.define(name)`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mlua::{AnyUserData, Function, Lua, Table, UserData, UserDataMethods, Value};

use crate::error::raise;
use crate::runner::{RunEvent, Sink};

/// State shared by the DSL, the modules and the runner.
pub(crate) struct Shared {
    pub(crate) base_dir: PathBuf,
    pub(crate) sink: Sink,
    workflows: Mutex<Vec<WorkflowDef>>,
    /// The task each running Lua thread belongs to, by thread pointer: how `exec.run` and
    /// `fs.*` know which work directory they run in.
    scopes: Mutex<HashMap<usize, Arc<TaskScope>>>,
}

/// What a task's code runs in.
#[derive(Debug)]
pub(crate) struct TaskScope {
    pub(crate) task: String,
    pub(crate) workdir: PathBuf,
    /// `SLOTH_*` variables for its commands.
    pub(crate) env: Vec<(String, String)>,
}

impl Shared {
    pub(crate) fn new(base_dir: PathBuf, sink: Sink) -> Self {
        Self {
            base_dir,
            sink,
            workflows: Mutex::default(),
            scopes: Mutex::default(),
        }
    }

    pub(crate) fn emit(&self, event: RunEvent) {
        (self.sink)(event);
    }

    fn workflows(&self) -> MutexGuard<'_, Vec<WorkflowDef>> {
        self.workflows.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn workflow(&self, name: &str) -> Option<WorkflowDef> {
        self.workflows().iter().find(|w| w.name == name).cloned()
    }

    pub(crate) fn workflow_infos(&self) -> Vec<WorkflowInfo> {
        self.workflows()
            .iter()
            .map(|w| WorkflowInfo {
                name: w.name.clone(),
                description: w.description.clone(),
                version: w.version.clone(),
                tasks: w.tasks.iter().map(|t| t.name.clone()).collect(),
            })
            .collect()
    }

    /// The task the calling Lua code belongs to, if any.
    pub(crate) fn scope(&self, lua: &Lua) -> Option<Arc<TaskScope>> {
        let key = lua.current_thread().to_pointer() as usize;
        self.scopes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
    }

    pub(crate) fn enter(&self, thread: &mlua::Thread, scope: Arc<TaskScope>) {
        self.scopes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(thread.to_pointer() as usize, scope);
    }

    pub(crate) fn leave(&self, thread: &mlua::Thread) {
        self.scopes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(thread.to_pointer() as usize));
    }
}

/// A workflow as `sloth-runner run` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowInfo {
    /// Its name.
    pub name: String,
    /// `:description(...)`.
    pub description: Option<String>,
    /// `:version(...)`.
    pub version: Option<String>,
    /// Its tasks, in the order given.
    pub tasks: Vec<String>,
}

/// What a task runs: a Lua function, or a shell command line.
#[derive(Clone)]
pub(crate) enum Command {
    Lua(Function),
    Shell(String),
}

/// A task as its builder left it.
#[derive(Clone)]
pub(crate) struct TaskDef {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) command: Option<Command>,
    pub(crate) depends_on: Vec<String>,
    pub(crate) artifacts: Vec<String>,
    pub(crate) consumes: Vec<String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) retries: u32,
    pub(crate) workdir: Option<String>,
    /// `file:line` of the `task(...)` call.
    pub(crate) defined_at: String,
}

/// A workflow's `:config{...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowConfig {
    /// `timeout`: the whole run's deadline.
    pub timeout: Option<Duration>,
    /// `create_workdir_before_run` (default true): each task gets a fresh directory of its own.
    pub create_workdir_before_run: bool,
    /// `artifact_retention` (e.g. `"30d"`): a retention rule for the run's stack.
    pub artifact_retention: Option<String>,
    /// `artifact_compression` (default true): zstd for this workflow's artifacts.
    pub artifact_compression: bool,
    /// `verify_checksums` (default true): rehash each consumed copy against its checksum.
    pub verify_checksums: bool,
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        Self {
            timeout: None,
            create_workdir_before_run: true,
            artifact_retention: None,
            artifact_compression: true,
            verify_checksums: true,
        }
    }
}

#[derive(Clone)]
pub(crate) struct WorkflowDef {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) tasks: Vec<TaskDef>,
    pub(crate) config: WorkflowConfig,
}

/// `task(name)`: chainable setters, then `:build()`.
struct TaskBuilder(TaskDef);

/// What `:build()` returns: a finished task for `workflow:tasks{...}`.
struct BuiltTask(TaskDef);

impl UserData for BuiltTask {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("name", |_, this| Ok(this.0.name.clone()));
    }
}

/// Adds a chainable setter: `builder:NAME(value)` converts `value` with `set` and returns the
/// builder.
fn setter<M, F>(methods: &mut M, name: &'static str, set: F)
where
    M: UserDataMethods<TaskBuilder>,
    F: Fn(&Lua, &mut TaskDef, Value) -> mlua::Result<()> + mlua::MaybeSend + 'static,
{
    methods.add_function(name, move |lua, (ud, value): (AnyUserData, Value)| {
        {
            let mut builder = ud.borrow_mut::<TaskBuilder>()?;
            set(lua, &mut builder.0, value)?;
        }
        Ok(ud)
    });
}

impl UserData for TaskBuilder {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("name", |_, this| Ok(this.0.name.clone()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        setter(methods, "description", |lua, t, v| {
            t.description = Some(string(lua, v, "description")?);
            Ok(())
        });
        setter(methods, "command", |lua, t, v| {
            t.command = Some(match v {
                Value::Function(f) => Command::Lua(f),
                Value::String(s) => Command::Shell(s.to_str()?.to_owned()),
                other => {
                    return Err(raise(
                        lua,
                        format!(
                            "task '{}': command must be a function or a shell command string, got {}",
                            t.name,
                            other.type_name()
                        ),
                    ));
                }
            });
            Ok(())
        });
        setter(methods, "depends_on", |lua, t, v| {
            t.depends_on = string_list(lua, v, "depends_on")?;
            Ok(())
        });
        setter(methods, "artifacts", |lua, t, v| {
            t.artifacts = string_list(lua, v, "artifacts")?;
            Ok(())
        });
        setter(methods, "consumes", |lua, t, v| {
            let names = string_list(lua, v, "consumes")?;
            for name in &names {
                sloth_engine::Name::parse("artifact name", name)
                    .map_err(|e| raise(lua, format!("task '{}': consumes: {e}", t.name)))?;
            }
            t.consumes = names;
            Ok(())
        });
        setter(methods, "timeout", |lua, t, v| {
            t.timeout = Some(duration(lua, v, "timeout")?);
            Ok(())
        });
        setter(methods, "retries", |lua, t, v| {
            t.retries = match v {
                Value::Integer(n) if (0..=100).contains(&n) => n as u32,
                other => {
                    return Err(raise(
                        lua,
                        format!(
                            "retries must be a whole number from 0 to 100, got {}",
                            shown(&other)
                        ),
                    ));
                }
            };
            Ok(())
        });
        setter(methods, "workdir", |lua, t, v| {
            t.workdir = Some(string(lua, v, "workdir")?);
            Ok(())
        });
        methods.add_method("build", |_, this, ()| Ok(BuiltTask(this.0.clone())));
    }
}

/// `workflow.define(name)`'s handle: setters that change the registered workflow.
struct WorkflowBuilder {
    name: String,
    shared: Arc<Shared>,
}

impl WorkflowBuilder {
    fn update(&self, f: impl FnOnce(&mut WorkflowDef)) {
        let mut workflows = self.shared.workflows();
        if let Some(w) = workflows.iter_mut().find(|w| w.name == self.name) {
            f(w);
        }
    }
}

impl UserData for WorkflowBuilder {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_function("description", |lua, (ud, v): (AnyUserData, Value)| {
            let text = string(lua, v, "description")?;
            ud.borrow::<WorkflowBuilder>()?
                .update(|w| w.description = Some(text));
            Ok(ud)
        });
        methods.add_function("version", |lua, (ud, v): (AnyUserData, Value)| {
            let text = string(lua, v, "version")?;
            ud.borrow::<WorkflowBuilder>()?
                .update(|w| w.version = Some(text));
            Ok(ud)
        });
        methods.add_function("tasks", |lua, (ud, v): (AnyUserData, Value)| {
            let Value::Table(list) = v else {
                return Err(raise(
                    lua,
                    format!(
                        "tasks expects a list of tasks, got {}",
                        v.type_name()
                    ),
                ));
            };
            let mut tasks = Vec::new();
            for (i, item) in list.sequence_values::<Value>().enumerate() {
                let def = match item? {
                    Value::UserData(u) => {
                        if let Ok(t) = u.borrow::<BuiltTask>() {
                            t.0.clone()
                        } else if let Ok(t) = u.borrow::<TaskBuilder>() {
                            t.0.clone()
                        } else {
                            return Err(raise(lua, format!("tasks: item {} is not a task", i + 1)));
                        }
                    }
                    Value::Nil => {
                        return Err(raise(lua, format!("tasks: item {} is nil", i + 1)));
                    }
                    other => {
                        return Err(raise(
                            lua,
                            format!(
                                "tasks: item {} is a {}, not a task (made with task(NAME)...:build())",
                                i + 1,
                                other.type_name()
                            ),
                        ));
                    }
                };
                tasks.push(def);
            }
            ud.borrow::<WorkflowBuilder>()?.update(|w| w.tasks = tasks);
            Ok(ud)
        });
        methods.add_function("config", |lua, (ud, v): (AnyUserData, Value)| {
            let Value::Table(table) = v else {
                return Err(raise(
                    lua,
                    format!("config expects a table, got {}", v.type_name()),
                ));
            };
            let config = workflow_config(lua, &table)?;
            ud.borrow::<WorkflowBuilder>()?
                .update(|w| w.config = config);
            Ok(ud)
        });
    }
}

const CONFIG_KEYS: &str = "timeout, create_workdir_before_run, artifact_retention, artifact_compression, verify_checksums";

fn workflow_config(lua: &Lua, table: &Table) -> mlua::Result<WorkflowConfig> {
    let mut config = WorkflowConfig::default();
    for pair in table.pairs::<String, Value>() {
        let (key, value) = pair?;
        match key.as_str() {
            "timeout" => config.timeout = Some(duration(lua, value, "timeout")?),
            "create_workdir_before_run" => {
                config.create_workdir_before_run = boolean(lua, value, &key)?;
            }
            "artifact_retention" => {
                let text = string(lua, value, "artifact_retention")?;
                if sloth_policies::parse_duration(&text).is_none() {
                    return Err(raise(
                        lua,
                        format!(
                            "artifact_retention must be a duration like 7d, 30d, 6h or 45m, got '{text}'"
                        ),
                    ));
                }
                config.artifact_retention = Some(text);
            }
            "artifact_compression" => config.artifact_compression = boolean(lua, value, &key)?,
            "verify_checksums" => config.verify_checksums = boolean(lua, value, &key)?,
            other => {
                return Err(raise(
                    lua,
                    format!("unknown config key '{other}' (known: {CONFIG_KEYS})"),
                ));
            }
        }
    }
    Ok(config)
}

/// Installs `task` and `workflow`.
pub(crate) fn install(lua: &Lua, shared: &Arc<Shared>) -> mlua::Result<()> {
    let globals = lua.globals();
    globals.set(
        "task",
        lua.create_function(|lua, name: Value| {
            let name = string(lua, name, "task name")?;
            sloth_engine::Name::parse("task", &name).map_err(|e| raise(lua, e))?;
            let defined_at = lua
                .inspect_stack(1, |d| {
                    let file = d.source().short_src?.into_owned();
                    Some(format!("{file}:{}", d.current_line()?))
                })
                .flatten()
                .unwrap_or_default();
            Ok(TaskBuilder(TaskDef {
                name,
                description: None,
                command: None,
                depends_on: Vec::new(),
                artifacts: Vec::new(),
                consumes: Vec::new(),
                timeout: None,
                retries: 0,
                workdir: None,
                defined_at,
            }))
        })?,
    )?;
    let workflow = lua.create_table()?;
    let shared = Arc::clone(shared);
    workflow.set(
        "define",
        lua.create_function(move |lua, name: Value| {
            let name = string(lua, name, "workflow name")?;
            let mut workflows = shared.workflows();
            if workflows.iter().any(|w| w.name == name) {
                return Err(raise(lua, format!("workflow '{name}' is defined twice")));
            }
            workflows.push(WorkflowDef {
                name: name.clone(),
                description: None,
                version: None,
                tasks: Vec::new(),
                config: WorkflowConfig::default(),
            });
            Ok(WorkflowBuilder {
                name,
                shared: Arc::clone(&shared),
            })
        })?,
    )?;
    globals.set("workflow", workflow)?;
    Ok(())
}

fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => format!("'{}'", s.to_string_lossy()),
        Value::Integer(n) => n.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Boolean(b) => b.to_string(),
        other => other.type_name().to_owned(),
    }
}

fn string(lua: &Lua, value: Value, what: &str) -> mlua::Result<String> {
    match value {
        Value::String(s) => Ok(s.to_str()?.to_owned()),
        other => Err(raise(
            lua,
            format!("{what} must be a string, got {}", other.type_name()),
        )),
    }
}

fn boolean(lua: &Lua, value: Value, what: &str) -> mlua::Result<bool> {
    match value {
        Value::Boolean(b) => Ok(b),
        other => Err(raise(
            lua,
            format!("{what} must be true or false, got {}", shown(&other)),
        )),
    }
}

/// A string, or a list of strings.
fn string_list(lua: &Lua, value: Value, what: &str) -> mlua::Result<Vec<String>> {
    match value {
        Value::String(s) => Ok(vec![s.to_str()?.to_owned()]),
        Value::Table(t) => t
            .sequence_values::<Value>()
            .enumerate()
            .map(|(i, v)| match v? {
                Value::String(s) => Ok(s.to_str()?.to_owned()),
                other => Err(raise(
                    lua,
                    format!(
                        "{what}: item {} must be a string, got {}",
                        i + 1,
                        other.type_name()
                    ),
                )),
            })
            .collect(),
        other => Err(raise(
            lua,
            format!(
                "{what} expects a list of strings, got {}",
                other.type_name()
            ),
        )),
    }
}

/// `"30m"`, `"1h"`, `"45s"`, `"7d"`, or a number of seconds.
fn duration(lua: &Lua, value: Value, what: &str) -> mlua::Result<Duration> {
    let seconds = match &value {
        Value::Integer(n) if *n > 0 => Some(*n),
        Value::String(s) => s
            .to_str()
            .ok()
            .and_then(|s| sloth_policies::parse_duration(&s))
            .filter(|s| *s > 0),
        _ => None,
    };
    seconds
        .map(|s| Duration::from_secs(s as u64))
        .ok_or_else(|| {
            raise(
                lua,
                format!(
                    "{what} must be a duration like 90s, 30m, 1h or 2d (or seconds), got {}",
                    shown(&value)
                ),
            )
        })
}
