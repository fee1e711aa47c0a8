//! sloth-runner's workflow DSL: Lua 5.4 scripts (`.sloth` files) that define tasks and
//! workflows, and the runner that executes them against an artifact store.
//!
//! ```lua
//! local build = task("build")
//!     :command(function()
//!         exec.run("cc -o app.bin main.c")
//!         return true, "built"
//!     end)
//!     :artifacts({"app.bin"})
//!     :build()
//!
//! workflow.define("ci"):tasks({build})
//! ```
//!
//! A run goes in three steps, each of which can fail with a clear error before the next:
//! [`Script::load`] executes the script's top level (which only defines things), producing the
//! workflows it declared; [`Script::plan`] checks one workflow's task graph (unknown
//! dependencies, cycles, tasks without a command); [`Script::run`] executes it.
//!
//! Execution: tasks start when their dependencies succeeded, several at once when independent.
//! All of them run on one Lua state, driven as coroutines by one future: a task's Lua code
//! runs until it awaits a command (`exec.run`), and meanwhile the others proceed. Each task
//! has its own work directory; `:consumes{...}` copies artifacts into it before the command,
//! `:artifacts{...}` stores files from it afterwards. Timeouts cover both Lua code (an
//! instruction-count hook checks the deadline) and commands (whose whole process group is
//! killed). What happens is reported as [`RunEvent`]s to the sink the caller provides.

mod dsl;
mod error;
mod modules;
mod runner;
mod store;

pub use dsl::{WorkflowConfig, WorkflowInfo};
pub use error::{Error, Result};
pub use runner::{
    Level, Outcome, Plan, RunEvent, RunOptions, RunReport, Sink, StoredArtifact, Stream, TaskReport,
};
pub use store::ArtifactStore;

use std::path::PathBuf;
use std::sync::Arc;

use mlua::{Lua, LuaSerdeExt, Value};

/// What a script sees of the world while it loads and runs.
#[derive(Clone)]
pub struct ScriptEnv {
    /// Relative paths in the script (`:workdir`, `fs.*` outside a task) resolve against this:
    /// the directory of the `.sloth` file.
    pub base_dir: PathBuf,
    /// The `values` global (from `--values F.yaml`); `null` for none (an empty table).
    pub values: serde_json::Value,
    /// Where log lines, command output and task progress go.
    pub sink: Sink,
}

impl std::fmt::Debug for ScriptEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptEnv")
            .field("base_dir", &self.base_dir)
            .field("values", &self.values)
            .finish_non_exhaustive()
    }
}

/// A loaded script: its Lua state and the workflows its top level defined.
pub struct Script {
    lua: Lua,
    shared: Arc<dsl::Shared>,
    file: String,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script")
            .field("file", &self.file)
            .field("workflows", &self.workflows())
            .finish_non_exhaustive()
    }
}

impl Script {
    /// Runs the top level of `source` (named `file` in messages), which defines tasks and
    /// workflows. A syntax error, or an error raised at the top level, is [`Error::Script`]
    /// with the file and line.
    pub fn load(source: &str, file: &str, env: ScriptEnv) -> Result<Self> {
        let lua = Lua::new();
        let shared = Arc::new(dsl::Shared::new(env.base_dir, env.sink));
        let setup = || -> mlua::Result<()> {
            dsl::install(&lua, &shared)?;
            modules::install(&lua, &shared)?;
            // Always a table (empty without a values file), so `values.x or default` works;
            // YAML nulls become nil.
            let values = match &env.values {
                serde_json::Value::Null => Value::Table(lua.create_table()?),
                other => lua.to_value_with(
                    other,
                    mlua::serde::SerializeOptions::new()
                        .serialize_none_to_null(false)
                        .serialize_unit_to_null(false),
                )?,
            };
            lua.globals().set("values", values)?;
            Ok(())
        };
        setup().map_err(|e| Error::Script(error::describe(&e)))?;
        lua.load(source)
            .set_name(format!("@{file}"))
            .exec()
            .map_err(|e| Error::Script(error::describe(&e)))?;
        Ok(Self {
            lua,
            shared,
            file: file.to_owned(),
        })
    }

    /// The workflows the script defined, in definition order.
    pub fn workflows(&self) -> Vec<WorkflowInfo> {
        self.shared.workflow_infos()
    }

    /// Checks workflow `name`'s task graph and orders it.
    pub fn plan(&self, name: &str) -> Result<Plan> {
        let workflow = self
            .shared
            .workflow(name)
            .ok_or_else(|| Error::UnknownWorkflow {
                name: name.to_owned(),
                file: self.file.clone(),
                defined: self.workflows().into_iter().map(|w| w.name).collect(),
            })?;
        Plan::new(workflow)
    }

    /// Runs a planned workflow against `store`. Task failures do not make this an error: they
    /// are in the report ([`RunReport::succeeded`]), as the events told them.
    pub async fn run<S: ArtifactStore>(
        &self,
        plan: &Plan,
        store: &S,
        options: &RunOptions,
    ) -> Result<RunReport> {
        runner::run(&self.lua, &self.shared, plan, store, options).await
    }
}
