use crate::{ChunkId, ManifestId};

/// Everything that can go wrong in the chunk store, in the terms a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The chunker parameters are outside what FastCDC supports.
    #[error("invalid chunker parameters: {0}")]
    InvalidParams(String),

    /// The store was created with other chunker parameters than the ones requested.
    #[error(
        "the store at {path} was created with an average chunk size of {stored} bytes, \
         but {requested} bytes were requested; chunks of both would never deduplicate"
    )]
    ParamsMismatch {
        /// The store's directory.
        path: String,
        /// Average chunk size recorded in the store.
        stored: u32,
        /// Average chunk size asked for.
        requested: u32,
    },

    /// The store was written by a newer (or unknown) format version.
    #[error("the store at {path} has format version {found}; this build reads version {supported}")]
    UnsupportedFormat {
        /// The store's directory.
        path: String,
        /// Version found on disk.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },

    /// A stored chunk frame could not be decoded or does not hash to its id.
    #[error("chunk {id} is corrupt: {reason}")]
    CorruptChunk {
        /// The chunk that failed.
        id: ChunkId,
        /// What was wrong with it.
        reason: String,
    },

    /// A chunk frame failed to decode before its id was known (wire or fuzz input).
    #[error("malformed chunk frame: {0}")]
    MalformedFrame(String),

    /// A manifest's bytes are not a valid manifest.
    #[error("malformed manifest: {0}")]
    MalformedManifest(String),

    /// A manifest references a chunk that the store does not hold.
    #[error("chunk {chunk} is missing from the store (referenced by manifest {manifest})")]
    MissingChunk {
        /// The manifest that needs it.
        manifest: ManifestId,
        /// The chunk that is gone.
        chunk: ChunkId,
    },

    /// No manifest with this id is stored.
    #[error("manifest {0} not found")]
    ManifestNotFound(ManifestId),

    /// The content read back does not match the manifest's whole-content digest.
    #[error("content of manifest {manifest} does not match its {algorithm} digest")]
    DigestMismatch {
        /// The manifest being read.
        manifest: ManifestId,
        /// Which digest failed (`sha256` or `blake3`).
        algorithm: &'static str,
    },

    /// Content sent from elsewhere broke the receiving protocol (a chunk not asked for, a
    /// length out of range, a chunk that never arrived).
    #[error("rejected upload: {0}")]
    Rejected(String),

    /// The input stream failed.
    #[error("reading the input failed: {0}")]
    Input(#[source] std::io::Error),

    /// Writing the output failed.
    #[error("writing the output failed: {0}")]
    Output(#[source] std::io::Error),

    /// Another open store (in this process or another) holds the store's lock.
    #[error("the store at {path} is in use by another process (waited {waited:?} for it to close)")]
    Locked {
        /// The locked directory.
        path: String,
        /// How long the open waited.
        waited: std::time::Duration,
    },

    /// The sled database failed.
    #[error("store database error: {0}")]
    Database(#[from] sled::Error),

    /// Another I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// A background worker died (a bug, or the runtime is shutting down).
    #[error("background task failed: {0}")]
    Task(String),
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Task(e.to_string())
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
