use std::path::PathBuf;

/// What went wrong in the catalog, in the user's terms.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name, stack or task breaks the naming rules.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// `artifact name`, `stack` or `task`.
        what: &'static str,
        /// The rejected value (shortened when long).
        value: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// No artifact matches.
    #[error("artifact '{name}' not found{}", scope_suffix(.stack, .task, .version))]
    NotFound {
        /// Artifact name asked for.
        name: String,
        /// Stack filter, if any.
        stack: Option<String>,
        /// Task filter, if any.
        task: Option<String>,
        /// Version asked for, if any.
        version: Option<u32>,
    },

    /// A name matches artifacts under several stacks/tasks.
    #[error(
        "artifact '{name}' exists in several places; choose one with --stack and --task:\n{}",
        .candidates.iter().map(|c| format!("  --stack {} --task {}", c.0, c.1)).collect::<Vec<_>>().join("\n")
    )]
    Ambiguous {
        /// Artifact name asked for.
        name: String,
        /// (stack, task) pairs that have it.
        candidates: Vec<(String, String)>,
    },

    /// The file to upload cannot be used.
    #[error("cannot upload '{}': {reason}", .path.display())]
    BadInput {
        /// The path given.
        path: PathBuf,
        /// Why not.
        reason: String,
    },

    /// The data directory cannot be used.
    #[error("data directory '{}' is not usable: {reason}", .path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why not.
        reason: String,
    },

    /// A duration that is not one of the accepted forms.
    #[error("{what} must be a duration like 7d, 30d, 6h or 45m, got '{value}'")]
    InvalidDuration {
        /// What the duration is for.
        what: &'static str,
        /// What was given.
        value: String,
    },

    /// The store's config file is wrong.
    #[error("{}: {reason}", .path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The download target cannot be written.
    #[error("cannot write '{}'", .path.display())]
    Output {
        /// Where the artifact was to be written.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// Content failed verification while reading an artifact.
    #[error("artifact '{name}' (version {version}) failed verification")]
    Damaged {
        /// The artifact.
        name: String,
        /// Its version.
        version: u32,
        /// What the chunk store found.
        source: sloth_cas::Error,
    },

    /// `verify --repair` found this version's content lost and marked it.
    #[error(
        "artifact '{name}' (version {version}) is damaged and cannot be downloaded: {reason} (found by verify; delete it, or upload it again)"
    )]
    MarkedDamaged {
        /// The artifact.
        name: String,
        /// Its version.
        version: u32,
        /// What verify found.
        reason: String,
    },

    /// The metadata.db projection failed.
    #[error("metadata.db: {0}")]
    Sqlite(#[from] rusqlite::Error),

    /// A stored catalog record could not be decoded.
    #[error("corrupt catalog record: {0}")]
    CorruptRecord(String),

    /// The chunk store failed.
    #[error(transparent)]
    Store(#[from] sloth_cas::Error),

    /// The catalog database failed.
    #[error("catalog database error: {0}")]
    Database(#[from] sled::Error),

    /// A file operation on one of the store's own files failed.
    #[error("{}", .path.display())]
    File {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },

    /// A cleanup would delete more than its cap allows, so it deleted nothing.
    #[error(
        "policy '{policy}' would delete {would} of {of} versions, more than the {:.0}% cap; nothing was deleted",
        .cap * 100.0
    )]
    CleanupCapped {
        /// The policy.
        policy: String,
        /// Versions it chose.
        would: usize,
        /// Versions it looked at.
        of: usize,
        /// The cap, as a share.
        cap: f64,
    },

    /// A retention policy failed (and so deleted nothing).
    #[error(transparent)]
    Policy(#[from] sloth_policies::Error),

    /// Another I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

fn scope_suffix(stack: &Option<String>, task: &Option<String>, version: &Option<u32>) -> String {
    let mut out = String::new();
    if let Some(v) = version {
        out.push_str(&format!(" at version {v}"));
    }
    if let Some(s) = stack {
        out.push_str(&format!(" in stack '{s}'"));
    }
    if let Some(t) = task {
        out.push_str(&format!(" for task '{t}'"));
    }
    out
}

/// Names the file an I/O error happened on: `.map_err(at(&path))`.
pub(crate) fn at(path: impl AsRef<std::path::Path>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.as_ref().to_path_buf();
    move |source| Error::File { path, source }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
