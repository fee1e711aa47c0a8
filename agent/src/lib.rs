//! `sloth-agent`: sloth-runner's agents on the network.
//!
//! - [`server`]: an agent serving its [`Engine`](sloth_engine::Engine) over tonic (the
//!   `Artifacts` and `Agent` services of `sloth-proto`), with TLS, bearer tokens and limits on
//!   every call, heartbeating to a master when given one.
//! - [`master`]: the registry agents heartbeat to and the CLI finds them through.
//! - [`client`]: what the CLI uses to talk to both: dedup-aware upload (the client chunks, the
//!   agent asks only for what it lacks), verified download, copy between agents.
//! - [`auth`]: the token file and the one layer that checks every call's scope.
//!
//! Protocol types stop here: callers see engine records and this crate's [`Error`].

pub mod auth;
pub mod client;
mod convert;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod master;
pub mod metrics;
pub mod retention;
pub mod server;
pub mod tls;
mod wire;
pub mod workflows;

pub use error::{Error, Result};
