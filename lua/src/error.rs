use std::path::PathBuf;

/// Why a workflow could not be loaded, planned or started. (A task that fails while the
/// workflow runs is not an error here: it is reported in the run's events and report.)
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A syntax error, or an error raised while the script's top level ran: `file:line: ...`.
    #[error("{0}")]
    Script(String),
    /// The script does not define the workflow asked for.
    #[error("workflow '{name}' is not defined in {file} ({})", defined_list(.defined))]
    UnknownWorkflow {
        /// The workflow asked for.
        name: String,
        /// The script.
        file: String,
        /// The workflows the script does define.
        defined: Vec<String>,
    },
    /// The workflow's task graph is unusable: unknown dependency, cycle, duplicate task, a
    /// task without a command, a bad stack name.
    #[error("workflow '{workflow}': {reason}")]
    Plan {
        /// The workflow.
        workflow: String,
        /// What is wrong.
        reason: String,
    },
    /// The run directory could not be prepared.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

fn defined_list(defined: &[String]) -> String {
    if defined.is_empty() {
        "it defines none: call workflow.define(NAME)".to_owned()
    } else {
        format!("defined: {}", defined.join(", "))
    }
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// A Lua error as one line for a person: the message with its `file:line:`, without Lua's
/// stack traceback. An error raised by a Rust callback without a position gets the position
/// of the script line that called it.
pub(crate) fn describe(e: &mlua::Error) -> String {
    match e {
        mlua::Error::SyntaxError { message, .. } => strip_traceback(message),
        mlua::Error::RuntimeError(message) => strip_traceback(message),
        mlua::Error::CallbackError { traceback, cause } => {
            let message = describe(cause);
            match script_position(traceback) {
                Some(at) if !message.starts_with(&at) && !has_position(&message) => {
                    format!("{at}: {message}")
                }
                _ => message,
            }
        }
        mlua::Error::WithContext { context, cause } => format!("{context}: {}", describe(cause)),
        other => strip_traceback(&other.to_string()),
    }
}

fn strip_traceback(message: &str) -> String {
    message
        .split("\nstack traceback:")
        .next()
        .unwrap_or(message)
        .trim_end()
        .to_owned()
}

/// The first script frame (`file:line`) of a Lua traceback, skipping Rust/C frames.
fn script_position(traceback: &str) -> Option<String> {
    traceback.lines().skip(1).find_map(|line| {
        let line = line.trim();
        if line.starts_with("[C]") || line.starts_with("[string") {
            return None;
        }
        let mut parts = line.splitn(3, ':');
        let (file, number) = (parts.next()?, parts.next()?);
        number
            .parse::<u32>()
            .ok()
            .map(|number| format!("{file}:{number}"))
    })
}

/// Whether a message already starts with `something:NUMBER:`.
fn has_position(message: &str) -> bool {
    let mut parts = message.splitn(3, ':');
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(file), Some(number), Some(_))
            if !file.is_empty() && !file.contains(' ') && number.parse::<u32>().is_ok()
    )
}

/// A Lua error raised from a Rust callback, positioned at the script line that called it.
pub(crate) fn raise(lua: &mlua::Lua, message: impl std::fmt::Display) -> mlua::Error {
    let at = lua.inspect_stack(1, |d| {
        let line = d.current_line()?;
        let file = d.source().short_src?.into_owned();
        Some(format!("{file}:{line}"))
    });
    match at.flatten() {
        Some(at) => mlua::Error::RuntimeError(format!("{at}: {message}")),
        None => mlua::Error::RuntimeError(message.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracebacks_are_cut_and_positions_found() {
        assert_eq!(
            strip_traceback("a.sloth:3: boom\nstack traceback:\n\t[C]: in ?"),
            "a.sloth:3: boom"
        );
        let traceback = "stack traceback:\n\t[C]: in method 'timeout'\n\tci.sloth:12: in main chunk\n\t[C]: in ?";
        assert_eq!(script_position(traceback).as_deref(), Some("ci.sloth:12"));
        assert!(has_position("ci.sloth:12: bad"));
        assert!(!has_position("bad argument #1: error converting"));
    }
}
