use tonic::{Code, Status};

/// What went wrong talking to an agent or the master, in the user's terms.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The agent or master could not be reached.
    #[error("{what} at {addr} is not reachable: {reason}")]
    Unreachable {
        /// `agent 'NAME'` or `master`.
        what: String,
        /// The address dialed.
        addr: String,
        /// Why.
        reason: String,
    },

    /// The master does not know an agent of that name.
    #[error("agent '{name}' is not registered with the master at {master}")]
    UnknownAgent {
        /// The agent name.
        name: String,
        /// The master's address.
        master: String,
    },

    /// The agent's credentials check failed (`Unauthenticated`).
    #[error("not authenticated: {0}")]
    Unauthenticated(String),

    /// The credentials lack the scope the call needs (`PermissionDenied`).
    #[error("permission denied: {0}")]
    PermissionDenied(String),

    /// The connection failed underneath the call (reset, TLS handshake, protocol mismatch).
    #[error("connection failed: {0}")]
    Transport(String),

    /// The agent answered with an error.
    #[error("{0}")]
    Remote(String),

    /// The master refused a registration: another live agent holds the name.
    #[error("{0}")]
    NameTaken(String),

    /// The peer broke the protocol (a message out of place, a malformed field).
    #[error("protocol error: {0}")]
    Protocol(String),

    /// Local configuration (certificates, token files) is unusable.
    #[error("{0}")]
    Config(String),

    /// The local catalog failed (agent side, or a local file on the client).
    #[error(transparent)]
    Engine(#[from] sloth_engine::Error),

    /// The chunk store or a verification failed.
    #[error(transparent)]
    Cas(#[from] sloth_cas::Error),

    /// A local I/O error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        let message = status.message().to_owned();
        // Failures below gRPC (a TLS mismatch, a reset) arrive as statuses with a source.
        let source = std::error::Error::source(&status);
        if (matches!(
            status.code(),
            Code::Unknown | Code::Unavailable | Code::Cancelled
        ) && source.is_some())
            || message.starts_with("h2 protocol error")
        {
            let mut text = message;
            if let Some(source) = source {
                let causes = chain(source);
                if !text.contains(&causes) {
                    text = format!("{text}: {causes}");
                }
            }
            return Error::Transport(text);
        }
        match status.code() {
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::PermissionDenied => Error::PermissionDenied(message),
            Code::Unavailable => Error::Remote(format!("agent unavailable: {message}")),
            Code::DeadlineExceeded => Error::Remote(format!("deadline exceeded: {message}")),
            Code::AlreadyExists => Error::NameTaken(message),
            // tonic's answer for a service the server does not have: the address is a
            // master's where an agent's was expected, or the other way round.
            Code::Unimplemented if message.is_empty() => Error::Remote(
                "the server does not offer this service: is the address a master's where an \
                 agent's is expected, or the other way round?"
                    .into(),
            ),
            _ if message.is_empty() => Error::Remote(format!("{:?}", status.code())),
            _ => Error::Remote(message),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The gRPC status an engine error is answered with: the message is the engine's own, so the
/// remote CLI prints what the local one would.
pub(crate) fn status(e: &sloth_engine::Error) -> Status {
    use sloth_engine::Error as E;
    let message = chain(e);
    match e {
        E::InvalidName { .. } | E::BadInput { .. } => Status::invalid_argument(message),
        E::NotFound { .. } => Status::not_found(message),
        E::Ambiguous { .. } => Status::failed_precondition(message),
        E::Damaged { .. } | E::MarkedDamaged { .. } => Status::data_loss(message),
        E::Store(c) => cas_status(c, message),
        _ => Status::internal(message),
    }
}

pub(crate) fn cas_status(e: &sloth_cas::Error, message: String) -> Status {
    use sloth_cas::Error as C;
    match e {
        C::Rejected(_)
        | C::MalformedFrame(_)
        | C::CorruptChunk { .. }
        | C::DigestMismatch { .. } => Status::invalid_argument(message),
        C::MissingChunk { .. } => Status::data_loss(message),
        _ => Status::internal(message),
    }
}

pub(crate) use sloth_engine::error_chain as chain;
