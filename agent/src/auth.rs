//! Bearer tokens with scopes, checked for every call in one tower layer.
//!
//! An agent (or master) started with `--tokens FILE` accepts only calls that carry
//! `authorization: Bearer <token>` for a token listed in the file with the scope the call
//! needs. The file lists the SHA-256 of each token, never the token itself:
//!
//! ```text
//! # sha256 of the token                                              scopes       principal
//! 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  read,write   ci-bot
//! ```
//!
//! Scopes: `read` (list, show, download, events, agent info), `write` (upload, heartbeats to a
//! master), `delete` (delete, cleanup), `run` (run workflows, which execute commands as the
//! agent's user), `admin` (everything). Without a token file every call is
//! allowed and the principal is the client's self-reported user name, marked unverified.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::Digest as _;
use tonic::Status;

use crate::{Error, Result};

/// Metadata key a client uses to say who it is when the agent has no tokens.
pub const USER_HEADER: &str = "x-sloth-user";

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// List, show, download, events, agent info.
    Read,
    /// Upload; register with a master.
    Write,
    /// Delete artifacts.
    Delete,
    /// Run workflows: commands on the agent's machine, as its user.
    Run,
    /// Everything.
    Admin,
}

impl Scope {
    /// Every scope's name, for messages.
    pub const NAMES: &str = "read, write, delete, run, admin";

    /// A scope by name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "delete" => Some(Scope::Delete),
            "run" => Some(Scope::Run),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Delete => "delete",
            Scope::Run => "run",
            Scope::Admin => "admin",
        }
    }

    /// The scope a gRPC method (`/package.Service/Method`) needs. Unknown methods need
    /// `admin`: a method added later is closed until someone decides otherwise.
    pub fn for_method(path: &str) -> Self {
        match path.rsplit_once('/') {
            Some(("/sloth.artifacts.v1.Artifacts", method)) => match method {
                "List" | "Show" | "Events" | "Download" | "ConfirmDownload" | "Describe"
                | "GetChunks" => Scope::Read,
                "Upload" => Scope::Write,
                "Delete" | "Cleanup" => Scope::Delete,
                // "Verify" (a whole-store rehash that may mark versions damaged) needs admin.
                _ => Scope::Admin,
            },
            Some(("/sloth.artifacts.v1.Agent", "Info")) => Scope::Read,
            Some(("/sloth.workflows.v1.Workflows", "Run")) => Scope::Run,
            Some(("/sloth.registry.v1.Registry", method)) => match method {
                "ListAgents" | "GetAgent" => Scope::Read,
                "Heartbeat" => Scope::Write,
                _ => Scope::Admin,
            },
            _ => Scope::Admin,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Who made a call: put into every request's extensions by the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub String);

#[derive(Debug, Clone)]
struct Grant {
    scopes: Vec<Scope>,
    principal: String,
}

/// The token file: token hashes with their scopes and principals.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], Grant>,
}

impl Tokens {
    /// Reads a token file (see the module docs).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the token file '{}': {e}",
                path.display()
            ))
        })?;
        Self::parse(&text)
            .map_err(|e| Error::Config(format!("token file '{}': {e}", path.display())))
    }

    /// Parses the token file's text.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut by_hash = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |what: String| format!("line {}: {what}", n + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [hash, scopes, principal] = fields[..] else {
                return Err(at(
                    "expected three fields: <sha256 hex of the token> <scopes> <principal>".into(),
                ));
            };
            let mut digest = [0u8; 32];
            hex::decode_to_slice(hash, &mut digest)
                .map_err(|_| at(format!("'{hash}' is not a SHA-256 in hex (64 digits)")))?;
            let scopes = scopes
                .split(',')
                .map(|s| {
                    Scope::parse(s).ok_or_else(|| {
                        at(format!("unknown scope '{s}' (scopes: {})", Scope::NAMES))
                    })
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let grant = Grant {
                scopes,
                principal: principal.to_owned(),
            };
            if by_hash.insert(digest, grant).is_some() {
                return Err(at("this token is listed twice".into()));
            }
        }
        if by_hash.is_empty() {
            return Err("lists no tokens; every call would be refused".into());
        }
        Ok(Self { by_hash })
    }

    /// The file line that grants `token` the `scopes` as `principal`.
    pub fn line_for(token: &str, scopes: &[Scope], principal: &str) -> String {
        let scopes: Vec<&str> = scopes.iter().map(|s| s.name()).collect();
        format!("{}  {}  {principal}", hash_hex(token), scopes.join(","))
    }

    /// Who `token` is, if it grants `needed`.
    fn check(&self, token: Option<&str>, needed: Scope) -> std::result::Result<Principal, Status> {
        let Some(token) = token else {
            return Err(Status::unauthenticated(
                "this agent requires a token: pass --token or set SLOTH_RUNNER_TOKEN",
            ));
        };
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let Some(grant) = self.by_hash.get(&digest) else {
            return Err(Status::unauthenticated(
                "the token is not valid for this agent",
            ));
        };
        if grant.scopes.contains(&needed) || grant.scopes.contains(&Scope::Admin) {
            Ok(Principal(grant.principal.clone()))
        } else {
            Err(Status::permission_denied(format!(
                "this call needs the '{needed}' scope; the token of '{}' has {}",
                grant.principal,
                grant
                    .scopes
                    .iter()
                    .map(|s| format!("'{s}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}

fn hash_hex(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// The tower layer that authenticates every call (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    tokens: Option<Arc<Tokens>>,
}

impl AuthLayer {
    /// Checks tokens when `tokens` is given; else lets every call through.
    pub fn new(tokens: Option<Tokens>) -> Self {
        Self {
            tokens: tokens.map(Arc::new),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// [`AuthLayer`]'s service.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<Tokens>>,
}

impl<S> Auth<S> {
    fn authenticate<B>(&self, req: &http::Request<B>) -> std::result::Result<Principal, Status> {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        match &self.tokens {
            Some(tokens) => {
                let token =
                    header("authorization").map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim());
                tokens.check(token, Scope::for_method(req.uri().path()))
            }
            None => {
                let user = header(USER_HEADER)
                    .filter(|u| !u.is_empty() && u.len() <= 64)
                    .unwrap_or("anonymous");
                Ok(Principal(format!("{user} (unverified)")))
            }
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<std::result::Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self.authenticate(&req) {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                Box::pin(self.inner.call(req))
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

/// The principal the layer put into a request.
pub(crate) fn principal<T>(request: &tonic::Request<T>) -> String {
    request
        .extensions()
        .get::<Principal>()
        .map_or_else(|| "anonymous (unverified)".into(), |p| p.0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_grants_scopes() {
        let file = format!(
            "# comment\n{}\n{}\n",
            Tokens::line_for("reader-secret", &[Scope::Read], "dashboard"),
            Tokens::line_for("admin-secret", &[Scope::Admin], "ops"),
        );
        let tokens = Tokens::parse(&file).unwrap();
        assert_eq!(
            tokens.check(Some("reader-secret"), Scope::Read).unwrap(),
            Principal("dashboard".into())
        );
        let denied = tokens
            .check(Some("reader-secret"), Scope::Delete)
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("'delete' scope"), "{denied:?}");
        assert!(tokens.check(Some("admin-secret"), Scope::Delete).is_ok());
        let wrong = tokens.check(Some("guess"), Scope::Read).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        let missing = tokens.check(None, Scope::Read).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn bad_token_files_say_what_is_wrong() {
        for (text, says) in [
            ("", "no tokens"),
            ("abc read me", "not a SHA-256"),
            (
                &format!("{} read,fly me", "0".repeat(64)),
                "unknown scope 'fly'",
            ),
            (&format!("{} read", "0".repeat(64)), "three fields"),
        ] {
            let err = Tokens::parse(text).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }

    #[test]
    fn methods_map_to_scopes() {
        assert_eq!(
            Scope::for_method("/sloth.artifacts.v1.Artifacts/List"),
            Scope::Read
        );
        assert_eq!(
            Scope::for_method("/sloth.artifacts.v1.Artifacts/Upload"),
            Scope::Write
        );
        assert_eq!(
            Scope::for_method("/sloth.artifacts.v1.Artifacts/Delete"),
            Scope::Delete
        );
        assert_eq!(
            Scope::for_method("/sloth.artifacts.v1.Artifacts/Nope"),
            Scope::Admin
        );
        assert_eq!(Scope::for_method("/other.Service/List"), Scope::Admin);
    }
}
