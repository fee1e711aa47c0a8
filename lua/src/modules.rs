//! The modules a script gets: `exec`, `log` and `fs`.
//!
//! Inside a task, relative paths and commands run in the task's work directory; outside one
//! (the script's top level) in the script's directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use mlua::{Lua, Table, Value, Variadic};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::dsl::{Shared, TaskScope};
use crate::error::raise;
use crate::runner::{Level, RunEvent, Stream};

/// How much of a command's stdout or stderr `exec.run` keeps for its result table. The rest
/// still reaches the log, line by line.
const KEEP_OUTPUT: usize = 16 << 20;

pub(crate) fn install(lua: &Lua, shared: &Arc<Shared>) -> mlua::Result<()> {
    let globals = lua.globals();
    globals.set("exec", exec_module(lua, shared)?)?;
    globals.set("log", log_module(lua, shared)?)?;
    globals.set("fs", fs_module(lua, shared)?)?;
    // `print` is `log.info`: on an agent, stdout is the agent's, not the user's.
    let log: Table = globals.get("log")?;
    globals.set("print", log.get::<mlua::Function>("info")?)?;
    // A script must not end the process it runs in (on an agent: the agent).
    let os: Table = globals.get("os")?;
    os.set(
        "exit",
        lua.create_function(|lua, _: mlua::MultiValue| -> mlua::Result<()> {
            Err(raise(
                lua,
                "os.exit is not available in workflows: return false, \"message\" to fail a task",
            ))
        })?,
    )?;
    Ok(())
}

/// Where relative paths of the calling code resolve, and which task it is.
fn place(lua: &Lua, shared: &Shared) -> (PathBuf, Option<String>) {
    match shared.scope(lua) {
        Some(scope) => (scope.workdir.clone(), Some(scope.task.clone())),
        None => (shared.base_dir.clone(), None),
    }
}

fn exec_module(lua: &Lua, shared: &Arc<Shared>) -> mlua::Result<Table> {
    let exec = lua.create_table()?;
    let shared = Arc::clone(shared);
    exec.set(
        "run",
        lua.create_async_function(move |lua, (command, options): (String, Option<Table>)| {
            let shared = Arc::clone(&shared);
            // Everything that needs the Lua state happens before the first await.
            let prepared = prepare(&lua, &shared, command, options);
            async move {
                let (spawn, task) = prepared?;
                let sink = Arc::clone(&shared.sink);
                let done = run_process(&spawn, task.as_deref(), &sink).await;
                let done = match done {
                    Ok(done) => done,
                    Err(e) => {
                        return Err(mlua::Error::RuntimeError(format!(
                            "exec.run: cannot start '{}' in {}: {e}",
                            spawn.command,
                            spawn.dir.display()
                        )));
                    }
                };
                if !done.success {
                    shared.emit(RunEvent::Log {
                        task: task.clone(),
                        level: Level::Warn,
                        message: format!(
                            "command failed ({}): {}",
                            done.status_text(),
                            spawn.command
                        ),
                    });
                }
                let result = lua.create_table()?;
                result.set("stdout", lua.create_string(&done.stdout)?)?;
                result.set("stderr", lua.create_string(&done.stderr)?)?;
                result.set("exit_code", done.exit_code)?;
                result.set("success", done.success)?;
                Ok(result)
            }
        })?,
    )?;
    Ok(exec)
}

/// A command ready to start.
struct Spawn {
    command: String,
    dir: PathBuf,
    env: Vec<(String, String)>,
}

fn prepare(
    lua: &Lua,
    shared: &Shared,
    command: String,
    options: Option<Table>,
) -> mlua::Result<(Spawn, Option<String>)> {
    let scope = shared.scope(lua);
    let (mut dir, task) = place(lua, shared);
    let mut env = scope.map(|s| s.env.clone()).unwrap_or_default();
    if let Some(options) = options {
        for pair in options.pairs::<String, Value>() {
            let (key, value) = pair?;
            match (key.as_str(), value) {
                ("workdir", Value::String(s)) => dir = dir.join(s.to_str()?.as_ref() as &str),
                ("env", Value::Table(vars)) => {
                    for var in vars.pairs::<String, Value>() {
                        let (name, value) = var?;
                        let value = match value {
                            Value::String(s) => s.to_str()?.to_owned(),
                            Value::Integer(n) => n.to_string(),
                            Value::Number(n) => n.to_string(),
                            Value::Boolean(b) => b.to_string(),
                            other => {
                                return Err(raise(
                                    lua,
                                    format!(
                                        "exec.run: env.{name} must be a string, got {}",
                                        other.type_name()
                                    ),
                                ));
                            }
                        };
                        env.push((name, value));
                    }
                }
                (key, value) => {
                    return Err(raise(
                        lua,
                        format!(
                            "exec.run: unknown option {key} = {} (options: workdir = STRING, env = TABLE)",
                            value.type_name()
                        ),
                    ));
                }
            }
        }
    }
    Ok((Spawn { command, dir, env }, task))
}

/// Runs a task's `:command("shell line")` in its work directory.
pub(crate) async fn shell(
    line: &str,
    scope: &TaskScope,
    sink: &crate::Sink,
) -> std::io::Result<Finished> {
    let spawn = Spawn {
        command: line.to_owned(),
        dir: scope.workdir.clone(),
        env: scope.env.clone(),
    };
    run_process(&spawn, Some(&scope.task), sink).await
}

/// How a command ended.
pub(crate) struct Finished {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit_code: i64,
    pub(crate) success: bool,
    signal: Option<i32>,
}

impl Finished {
    pub(crate) fn status_text(&self) -> String {
        match self.signal {
            Some(signal) => format!("killed by signal {signal}"),
            None => format!("exit code {}", self.exit_code),
        }
    }
}

/// Kills a command's whole process group when dropped: when it finished (stragglers it left
/// in the background), and when the task was cancelled or timed out mid-command.
struct GroupGuard(Option<rustix::process::Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Runs `sh -c COMMAND` in its own process group, streaming each output line to the sink
/// and keeping (up to [`KEEP_OUTPUT`] of) both streams for the result.
async fn run_process(
    spawn: &Spawn,
    task: Option<&str>,
    sink: &crate::Sink,
) -> std::io::Result<Finished> {
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&spawn.command)
        .current_dir(&spawn.dir)
        .envs(spawn.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let _group = GroupGuard(
        child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32)),
    );
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (stdout, stderr, status) = tokio::join!(
        collect(stdout, Stream::Stdout, task, sink),
        collect(stderr, Stream::Stderr, task, sink),
        child.wait()
    );
    let status = status?;
    use std::os::unix::process::ExitStatusExt;
    Ok(Finished {
        stdout: stdout?,
        stderr: stderr?,
        exit_code: status.code().map_or(-1, i64::from),
        success: status.success(),
        signal: status.signal(),
    })
}

async fn collect(
    pipe: impl AsyncRead + Unpin,
    stream: Stream,
    task: Option<&str>,
    sink: &crate::Sink,
) -> std::io::Result<Vec<u8>> {
    let mut reader = BufReader::new(pipe);
    let mut kept = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(kept);
        }
        if kept.len() < KEEP_OUTPUT {
            kept.extend_from_slice(&line[..line.len().min(KEEP_OUTPUT - kept.len())]);
        }
        let text = String::from_utf8_lossy(&line);
        sink(RunEvent::Output {
            task: task.map(str::to_owned),
            stream,
            line: text.trim_end_matches(['\n', '\r']).to_owned(),
        });
    }
}

fn log_module(lua: &Lua, shared: &Arc<Shared>) -> mlua::Result<Table> {
    let log = lua.create_table()?;
    for (name, level) in [
        ("debug", Level::Debug),
        ("info", Level::Info),
        ("warn", Level::Warn),
        ("error", Level::Error),
    ] {
        let shared = Arc::clone(shared);
        log.set(
            name,
            lua.create_function(move |lua, parts: Variadic<Value>| {
                let tostring: mlua::Function = lua.globals().get("tostring")?;
                let mut message = String::new();
                for (i, part) in parts.into_iter().enumerate() {
                    if i > 0 {
                        message.push(' ');
                    }
                    let text: mlua::LuaString = tostring.call(part)?;
                    message.push_str(&text.to_string_lossy());
                }
                let task = shared.scope(lua).map(|s| s.task.clone());
                shared.emit(RunEvent::Log {
                    task,
                    level,
                    message,
                });
                Ok(())
            })?,
        )?;
    }
    Ok(log)
}

fn fs_module(lua: &Lua, shared: &Arc<Shared>) -> mlua::Result<Table> {
    let fs = lua.create_table()?;
    let resolve = {
        let shared = Arc::clone(shared);
        move |lua: &Lua, path: &str| -> PathBuf { place(lua, &shared).0.join(path) }
    };
    let failed = |lua: &Lua, op: &str, path: &Path, e: std::io::Error| {
        raise(lua, format!("fs.{op}: {}: {e}", path.display()))
    };

    let r = resolve.clone();
    fs.set(
        "read",
        lua.create_function(move |lua, path: String| {
            let path = r(lua, &path);
            let bytes = std::fs::read(&path).map_err(|e| failed(lua, "read", &path, e))?;
            lua.create_string(bytes)
        })?,
    )?;
    let r = resolve.clone();
    fs.set(
        "write",
        lua.create_function(move |lua, (path, content): (String, mlua::LuaString)| {
            let path = r(lua, &path);
            std::fs::write(&path, content.as_bytes()).map_err(|e| failed(lua, "write", &path, e))
        })?,
    )?;
    let r = resolve.clone();
    fs.set(
        "exists",
        lua.create_function(move |lua, path: String| Ok(r(lua, &path).exists()))?,
    )?;
    let r = resolve.clone();
    fs.set(
        "mkdir",
        lua.create_function(move |lua, path: String| {
            let path = r(lua, &path);
            std::fs::create_dir_all(&path).map_err(|e| failed(lua, "mkdir", &path, e))
        })?,
    )?;
    let r = resolve.clone();
    fs.set(
        "rm",
        lua.create_function(move |lua, path: String| {
            let path = r(lua, &path);
            let removed = match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
                Ok(_) => std::fs::remove_file(&path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            };
            removed.map_err(|e| failed(lua, "rm", &path, e))
        })?,
    )?;
    let r = resolve;
    fs.set(
        "ls",
        lua.create_function(move |lua, path: Option<String>| {
            let path = r(lua, path.as_deref().unwrap_or("."));
            let mut names = std::fs::read_dir(&path)
                .and_then(|dir| {
                    dir.map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
                        .collect::<std::io::Result<Vec<_>>>()
                })
                .map_err(|e| failed(lua, "ls", &path, e))?;
            names.sort();
            Ok(names)
        })?,
    )?;
    Ok(fs)
}
