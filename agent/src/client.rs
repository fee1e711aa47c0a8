//! The client side: what the CLI uses to reach agents and the master.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use sloth_cas::{
    ChunkId, ChunkRef, Chunker, ChunkerParams, Claim, ContentCheck, ContentSink, frame,
};
use sloth_engine::{ArtifactKey, ArtifactRecord, Event, ListQuery, Selector, SyncBehind};
use sloth_proto::artifacts::{
    self as pb, agent_client::AgentClient, artifacts_client::ArtifactsClient,
};
use sloth_proto::registry::{self as reg, registry_client::RegistryClient};
use sloth_proto::workflows::{self as wf, workflows_client::WorkflowsClient};
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::USER_HEADER;
use crate::limits::*;
use crate::tls::ClientTls;
use crate::wire::Decoded;
use crate::{Error, Result, convert};

/// A workflow to run on an agent ([`Remote::run_workflow`]).
#[derive(Debug, Clone)]
pub struct WorkflowRun {
    /// The `.sloth` file's Lua source.
    pub script: String,
    /// Its name, for messages (`file:line`).
    pub file_name: String,
    /// The workflow to run.
    pub workflow: String,
    /// Stack for its artifacts (default: the workflow's name).
    pub stack: Option<String>,
    /// The script's `values` global.
    pub values: serde_json::Value,
    /// Keep the work directories on the agent after success.
    pub keep_workdirs: bool,
    /// Most tasks at once.
    pub max_parallel: u32,
}

/// The host of a `host:port` address (`[v6]:port` gives the bare v6 address), or why the
/// address is not one: a host, then a port from 1 to 65535. Every address the CLI, the agents
/// and the master take is judged by this.
pub fn host_of(addr: &str) -> std::result::Result<&str, String> {
    addr.rsplit_once(':')
        .filter(|(_, port)| port.parse::<u16>().is_ok_and(|p| p != 0))
        .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
        .filter(|host| !host.is_empty())
        .ok_or_else(|| format!("'{addr}' is not host:port (a host, then a port from 1 to 65535)"))
}

/// Where a server is and the credentials to use with it.
#[derive(Debug, Clone, Default)]
pub struct Link {
    /// `host:port`.
    pub addr: String,
    /// TLS settings; plain HTTP/2 when no CA is given.
    pub tls: ClientTls,
    /// Bearer token.
    pub token: Option<String>,
    /// Who the client says it is (recorded by agents without tokens, marked unverified).
    pub user: Option<String>,
}

/// Adds the credentials to every call.
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    user: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        if let Some(value) = &self.user {
            request.metadata_mut().insert(USER_HEADER, value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Credentials>;

/// A connection to an agent or the master.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    channel: Channel,
    credentials: Credentials,
    what: String,
    addr: String,
    tls: bool,
    client_cert: bool,
}

/// Whether a TLS failure reads like rustls getting a plaintext answer where a TLS record
/// should be (a client with --ca against a server without TLS).
fn plaintext_peer(reason: &str) -> bool {
    reason.contains("InvalidContentType") || reason.contains("corrupt message")
}

const PLAINTEXT_HINT: &str =
    " (it does not seem to serve TLS: drop --ca, or start it with --tls-cert and --tls-key)";

impl Connection {
    /// Connects to `link`; `what` names the peer in errors (`agent 'x'`, `master`).
    pub(crate) async fn open(what: &str, link: &Link) -> Result<Self> {
        let unreachable = |reason: String| Error::Unreachable {
            what: what.to_owned(),
            addr: link.addr.clone(),
            reason,
        };
        let host = host_of(&link.addr).map_err(unreachable)?;
        let tls = link.tls.config(host)?;
        let tls_on = tls.is_some();
        let scheme = if tls_on { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", link.addr))
            .map_err(|e| unreachable(format!("invalid address: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .initial_stream_window_size(crate::server::WINDOW)
            .initial_connection_window_size(crate::server::WINDOW * 2)
            .max_frame_size(crate::server::FRAME_SIZE)
            .http2_keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            let reason = crate::error::chain(&e);
            let hint = if tls_on && plaintext_peer(&reason) {
                PLAINTEXT_HINT
            } else {
                ""
            };
            unreachable(format!("{reason}{hint}"))
        })?;
        let header = |value: String, what: &str| {
            value.parse().map_err(|_| {
                Error::Config(format!(
                    "the {what} contains characters not allowed in a header"
                ))
            })
        };
        Ok(Self {
            channel,
            what: what.to_owned(),
            addr: link.addr.clone(),
            tls: link.tls.enabled(),
            client_cert: link.tls.identity.is_some(),
            credentials: Credentials {
                authorization: link
                    .token
                    .as_ref()
                    .map(|t| header(format!("Bearer {t}"), "token"))
                    .transpose()?,
                user: link
                    .user
                    .clone()
                    .map(|u| header(u, "user name"))
                    .transpose()?,
            },
        })
    }

    /// The error a failed call becomes (see [`Connection::explain`]).
    pub(crate) fn fail(&self, status: tonic::Status) -> Error {
        self.explain(status.into())
    }

    /// Turns a connection failure into "not reachable", with a hint at the usual TLS causes.
    pub(crate) fn explain(&self, e: Error) -> Error {
        let Error::Transport(reason) = e else {
            return e;
        };
        let hint = if !self.tls {
            " (if it serves TLS, pass --ca with the CA of its certificate)"
        } else if plaintext_peer(&reason) {
            PLAINTEXT_HINT
        } else if !self.client_cert {
            " (if it requires client certificates, pass --client-cert and --client-key)"
        } else {
            ""
        };
        Error::Unreachable {
            what: self.what.clone(),
            addr: self.addr.clone(),
            reason: format!("{reason}{hint}"),
        }
    }

    pub(crate) fn artifacts(&self) -> ArtifactsClient<Authed> {
        ArtifactsClient::with_interceptor(self.channel.clone(), self.credentials.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// The credentials as the headers of a call made without tonic's client: what the same
    /// interceptor adds to every other call.
    fn call_headers(&self) -> Result<crate::wire::CallHeaders> {
        let mut credentials = self.credentials.clone();
        let request = tonic::service::Interceptor::call(&mut credentials, tonic::Request::new(()))
            .map_err(|s| self.fail(s))?;
        Ok(request.metadata().clone().into_headers())
    }

    /// Opens an `Upload` call sending what `requests` yields (see [`crate::wire`]).
    async fn upload_call(
        &self,
        requests: mpsc::Receiver<pb::UploadRequest>,
    ) -> Result<Decoded<pb::UploadResponse>> {
        let headers = self.call_headers()?;
        crate::wire::upload(&self.channel, headers, CALL_TIMEOUT, MAX_MESSAGE, requests)
            .await
            .map_err(|s| self.fail(s))
    }

    /// Calls a method whose answers carry chunk frames, decoding them without tonic's copy
    /// (see [`crate::wire`]).
    async fn frames_call<M: prost::Message + Default>(
        &self,
        method: &'static str,
        request: &impl prost::Message,
    ) -> Result<Decoded<M>> {
        let headers = self.call_headers()?;
        crate::wire::server_streaming(
            &self.channel,
            method,
            headers,
            CALL_TIMEOUT,
            MAX_MESSAGE,
            request,
        )
        .await
        .map_err(|s| self.fail(s))
    }

    pub(crate) fn agent(&self) -> AgentClient<Authed> {
        AgentClient::with_interceptor(self.channel.clone(), self.credentials.clone())
    }

    pub(crate) fn workflows(&self) -> WorkflowsClient<Authed> {
        WorkflowsClient::with_interceptor(self.channel.clone(), self.credentials.clone())
            .max_encoding_message_size(MAX_MESSAGE)
    }

    pub(crate) fn registry(&self) -> RegistryClient<Authed> {
        RegistryClient::with_interceptor(self.channel.clone(), self.credentials.clone())
    }
}

fn unary<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(UNARY_TIMEOUT);
    request
}

/// An artifact as an agent lists it: the record and the agent-side layout path.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The record.
    pub record: ArtifactRecord,
    /// Where the agent's layout shows it (unset when the layout is off or not newest).
    pub layout_path: Option<String>,
}

/// What `show` learns about an artifact.
#[derive(Debug, Clone)]
pub struct Shown {
    /// The version asked for, with its layout path.
    pub artifact: Listed,
    /// The newest version of the same artifact.
    pub newest_version: u32,
    /// How many versions exist.
    pub version_count: u32,
    /// Whether the agent keeps the layout projection.
    pub layout_enabled: bool,
}

/// An agent's store figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Distinct artifacts.
    pub artifacts: u64,
    /// Versions.
    pub versions: u64,
    /// Sum of the versions' sizes.
    pub logical_bytes: u64,
    /// Bytes the store's chunks take, after dedup and compression.
    pub stored_bytes: u64,
}

impl From<pb::StoreFigures> for Figures {
    fn from(f: pb::StoreFigures) -> Self {
        Self {
            artifacts: f.artifacts,
            versions: f.versions,
            logical_bytes: f.logical_bytes,
            stored_bytes: f.stored_bytes,
        }
    }
}

impl Figures {
    /// Logical bytes per stored byte (0 when nothing is stored; the CLI shows `-` then).
    pub fn dedup_ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            0.0
        } else {
            self.logical_bytes as f64 / self.stored_bytes as f64
        }
    }
}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct Uploaded {
    /// The new version.
    pub record: ArtifactRecord,
    /// Chunks in the content, and how many of them the agent asked for.
    pub chunks: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Frame bytes sent (chunk payloads on the wire, after compression).
    pub bytes_sent: u64,
}

/// What a download did.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// The version downloaded.
    pub record: ArtifactRecord,
    /// Where it was written.
    pub path: PathBuf,
    /// Frame bytes received.
    pub bytes_received: u64,
}

/// Which policy a remote cleanup runs.
#[derive(Debug, Clone)]
pub enum PolicySource {
    /// A built-in, by name.
    Builtin(String),
    /// A module's bytes.
    Module(Vec<u8>),
}

/// Counts bytes as they are read, for progress bars.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// A connection to one agent.
#[derive(Debug, Clone)]
pub struct Remote {
    name: String,
    conn: Connection,
}

impl Remote {
    /// Connects to the agent `name` at `link.addr`.
    pub async fn connect(name: &str, link: &Link) -> Result<Self> {
        Ok(Self {
            name: name.to_owned(),
            conn: Connection::open(
                &if name == link.addr {
                    "agent".to_owned()
                } else {
                    format!("agent '{name}'")
                },
                link,
            )
            .await?,
        })
    }

    /// Finds the agent `name` through the master at `master.addr` and connects to it with
    /// the same TLS settings and token.
    pub async fn find(name: &str, master: &Link) -> Result<Self> {
        let record = Master::connect(master).await?.get(name).await?;
        let link = Link {
            addr: record.address.clone(),
            ..master.clone()
        };
        if record.tls && !link.tls.enabled() {
            return Err(Error::Config(format!(
                "agent '{name}' at {} uses TLS: pass --ca with the CA of its certificate",
                record.address
            )));
        }
        Self::connect(name, &link).await
    }

    /// The agent's name as the caller knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Artifacts, as [`sloth_engine::Engine::list`] returns them.
    pub async fn list(&self, query: &ListQuery) -> Result<Vec<Listed>> {
        let limit = query.limit.map_or(0, |l| l.min(MAX_LIST as usize) as u32);
        let response = self
            .conn
            .artifacts()
            .list(unary(pb::ListRequest {
                stack: query.stack.clone(),
                task: query.task.clone(),
                all_versions: query.all_versions,
                limit,
            }))
            .await
            .map_err(|s| self.conn.fail(s))?
            .into_inner();
        response
            .artifacts
            .into_iter()
            .map(|a| {
                let (record, layout_path) = convert::record(a)?;
                Ok(Listed {
                    record,
                    layout_path,
                })
            })
            .collect()
    }

    /// One artifact version and what surrounds it.
    pub async fn show(&self, selector: &Selector) -> Result<Shown> {
        let response = self
            .conn
            .artifacts()
            .show(unary(convert::selector(selector)))
            .await
            .map_err(|s| self.conn.fail(s))?
            .into_inner();
        let artifact = response
            .artifact
            .ok_or_else(|| Error::Protocol("show answered without an artifact".into()))?;
        let (record, layout_path) = convert::record(artifact)?;
        Ok(Shown {
            artifact: Listed {
                record,
                layout_path,
            },
            newest_version: response.newest_version,
            version_count: response.version_count,
            layout_enabled: response.layout_enabled,
        })
    }

    /// Deletes what `selector` means (one version, or every version).
    pub async fn delete(&self, selector: &Selector) -> Result<Vec<ArtifactRecord>> {
        let response = self
            .conn
            .artifacts()
            .delete(unary(convert::selector(selector)))
            .await
            .map_err(|s| self.conn.fail(s))?
            .into_inner();
        response
            .deleted
            .into_iter()
            .map(|a| Ok(convert::record(a)?.0))
            .collect()
    }

    /// Events whose kind matches `kind`, the most recent `limit`, oldest first.
    pub async fn events(&self, kind: Option<&str>, limit: Option<usize>) -> Result<Vec<Event>> {
        let response = self
            .conn
            .artifacts()
            .events(unary(pb::EventsRequest {
                kind: kind.map(str::to_owned),
                limit: limit.map_or(0, |l| l.min(MAX_LIST as usize) as u32),
            }))
            .await
            .map_err(|s| self.conn.fail(s))?
            .into_inner();
        response
            .events
            .into_iter()
            .map(convert::event_from)
            .collect()
    }

    /// The agent's version and store figures.
    pub async fn info(&self) -> Result<(String, Figures)> {
        let info = self
            .conn
            .agent()
            .info(unary(pb::InfoRequest {}))
            .await
            .map_err(|s| self.conn.fail(s))?
            .into_inner();
        Ok((info.version, info.figures.unwrap_or_default().into()))
    }

    /// Runs a retention policy on the agent (see [`sloth_engine::Engine::cleanup`]): a
    /// built-in by name, or a module's bytes. Returns the policy's name and the report.
    pub async fn cleanup(
        &self,
        policy: PolicySource,
        params: std::collections::BTreeMap<String, String>,
        stack: Option<String>,
        dry_run: bool,
    ) -> Result<(String, sloth_engine::CleanupReport)> {
        let policy = match policy {
            PolicySource::Builtin(name) => pb::cleanup_request::Policy::Builtin(name),
            PolicySource::Module(bytes) => pb::cleanup_request::Policy::Module(bytes.into()),
        };
        let r = self
            .conn
            .artifacts()
            .cleanup(unary(pb::CleanupRequest {
                policy: Some(policy),
                params: params.into_iter().collect(),
                stack,
                dry_run,
            }))
            .await
            .map_err(|s| self.conn.fail(s))?
            .into_inner();
        let doomed = r
            .doomed
            .into_iter()
            .map(|d| {
                let artifact = d
                    .artifact
                    .ok_or_else(|| Error::Protocol("a cleanup entry without an artifact".into()))?;
                Ok(sloth_engine::Doomed {
                    record: convert::record(artifact)?.0,
                    reason: d.reason,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((
            r.policy,
            sloth_engine::CleanupReport {
                evaluated: r.evaluated as usize,
                doomed,
                deleted: r.deleted as usize,
                logical_bytes: r.logical_bytes,
                freed_bytes: r.freed_bytes,
            },
        ))
    }

    /// Verifies the agent's store (see `Engine::verify`). No deadline: it rehashes the whole
    /// store.
    pub async fn verify(
        &self,
        stack: Option<String>,
        repair: bool,
    ) -> Result<sloth_engine::VerifyReport> {
        let response = self
            .conn
            .artifacts()
            .verify(tonic::Request::new(pb::VerifyRequest { stack, repair }))
            .await
            .map_err(|s| self.conn.fail(s))?
            .into_inner();
        convert::verify_report_from(response)
    }

    /// Runs a workflow on the agent, handing each event to `on_event` as it arrives. Returns
    /// the run's report (task failures are in it, not errors). A script the agent cannot load,
    /// or a workflow it cannot plan, is refused before anything runs.
    pub async fn run_workflow(
        &self,
        run: WorkflowRun,
        mut on_event: impl FnMut(sloth_lua::RunEvent),
    ) -> Result<sloth_lua::RunReport> {
        let request = wf::RunRequest {
            script: run.script,
            file_name: run.file_name,
            workflow: run.workflow,
            stack: run.stack,
            values_json: if run.values.is_null() {
                String::new()
            } else {
                run.values.to_string()
            },
            keep_workdirs: run.keep_workdirs,
            max_parallel: run.max_parallel,
        };
        // No deadline: a run takes as long as its tasks (which have their own timeouts).
        let mut stream = self
            .conn
            .workflows()
            .run(tonic::Request::new(request))
            .await
            .map_err(|s| self.conn.fail(s))?
            .into_inner();
        while let Some(message) = stream.message().await.map_err(|s| self.conn.fail(s))? {
            match crate::workflows::event_from_wire(message) {
                Some(crate::workflows::Received::Event(event)) => on_event(event),
                Some(crate::workflows::Received::Finished(report)) => return Ok(report),
                None => {}
            }
        }
        Err(Error::Protocol(
            "the agent ended the workflow's stream without its result".into(),
        ))
    }

    /// Uploads what `reader` yields as a new version of `key`. The content is cut into chunks
    /// here; only the chunks the agent lacks are compressed and sent.
    pub async fn upload<R: Read + Send + 'static>(
        &self,
        key: &ArtifactKey,
        reader: R,
        progress: Option<Progress>,
    ) -> Result<Uploaded> {
        self.upload_rereadable(key, reader, None, progress).await
    }

    /// [`Remote::upload`] of a file's content, `file` being another handle to the file
    /// `reader` reads. The whole-content claim (its SHA-256) is then computed only once the
    /// agent asks for a chunk: when the agent holds every chunk it needs no claim (see
    /// `Commit` in `artifacts.proto`), and a re-upload costs only cutting and chunk ids. Until
    /// then the first chunks cut are held (up to 32 MiB) to be hashed without reading
    /// them again; past that the file is read again from its start if a chunk is asked for.
    /// The file's size and times are compared before and after, as GNU tar does: a file
    /// changed during the upload fails it, and nothing becomes visible. A change of its
    /// status alone (a chmod, a rename, a build replacing it) counts too; a write that leaves
    /// both times as they were (within the file system's timestamp resolution) does not.
    pub async fn upload_rereadable<R: Read + Send + 'static>(
        &self,
        key: &ArtifactKey,
        reader: R,
        file: Option<std::fs::File>,
        progress: Option<Progress>,
    ) -> Result<Uploaded> {
        let mut session = UploadSession::begin(&self.conn, key).await?;
        let params = ChunkerParams::new(session.avg_chunk)
            .map_err(|e| Error::Protocol(format!("the agent's chunk size: {e}")))?;
        let (level, split) = (session.zstd_level, session.split_frames);
        let before = file.as_ref().map(FileState::of).transpose()?;
        let again = file.as_ref().map(std::fs::File::try_clone).transpose()?;
        let rehash = std::sync::Mutex::new(Rehash::Idle(again));
        let gate = Arc::new(ClaimGate::new(file.is_none()));
        let (batches_tx, batches_rx) = mpsc::channel(2);
        let cutter = {
            let gate = Arc::clone(&gate);
            tokio::task::spawn_blocking(move || cut(reader, params, batches_tx, progress, &gate))
        };
        // An upload that fails stops its re-hash (when it returns early, through this drop).
        let stop_on_drop = StopOnDrop::default();
        let stop = Arc::clone(&stop_on_drop.0);
        let sent = session
            .offer_all(batches_rx, |batch, missing| {
                if gate.need() == ClaimFrom::File {
                    rehash
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .start(&stop);
                }
                compress(batch, missing, level, split)
            })
            .await;
        // The cutter's own error (the file could not be read) explains a failed upload best.
        let (length, digest) = cutter
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        let (chunks, chunks_sent, bytes_sent) = sent?;
        let rehash = rehash.into_inner().unwrap_or_else(|e| e.into_inner());
        let digests = match digest {
            Digest::Claimed(claim) => Some(claim),
            Digest::Held(held) if gate.needed() => Some(
                tokio::task::spawn_blocking(move || hash_chunks(&held))
                    .await
                    .map_err(|e| Error::Io(std::io::Error::other(e)))?,
            ),
            Digest::Held(_) => None,
            Digest::GaveUp => match rehash.finish()? {
                Some((reread, _)) if reread != length => {
                    return Err(changed(format!("{length} bytes read, then {reread}")));
                }
                rehashed => rehashed.map(|(_, claim)| claim),
            },
        };
        if let (Some(before), Some(file)) = (before, &file)
            && FileState::of(file)? != before
        {
            return Err(changed("its size or times differ".into()));
        }
        let record = session.commit(length, digests).await?;
        Ok(Uploaded {
            record,
            chunks,
            chunks_sent,
            bytes_sent,
        })
    }

    /// Copies the artifact `selector` means from this agent to `dst`, under the same stack,
    /// task and name (as a new version there). Only the chunks `dst` lacks are fetched from
    /// here and sent on.
    pub async fn copy_to(&self, dst: &Remote, selector: &Selector) -> Result<Uploaded> {
        let header = self
            .conn
            .artifacts()
            .describe(unary(convert::selector(selector)))
            .await
            .map_err(|s| self.conn.fail(s))?
            .into_inner();
        let length = header.length;
        let (record, refs, digests) = convert::header(header)?;
        let mut session = UploadSession::begin(&dst.conn, &record.key()?).await?;
        let (batches_tx, batches_rx) = mpsc::channel(2);
        let feeder = tokio::spawn(async move {
            for chunk_refs in refs.chunks(MAX_BATCH) {
                let batch = Batch {
                    refs: chunk_refs.to_vec(),
                    data: Vec::new(),
                };
                if batches_tx.send(Ok(batch)).await.is_err() {
                    break;
                }
            }
        });
        let source = self.conn.clone();
        let sent = session
            .offer_all(batches_rx, move |batch, missing| {
                let source = source.clone();
                async move { fetch(&source, &batch, &missing).await }
            })
            .await;
        feeder.abort();
        let (chunks, chunks_sent, bytes_sent) = sent?;
        let copied = session.commit(length, Some(digests.into())).await?;
        // The source counts (and logs) the copy as a download, as it would a CLI's. The copy
        // stands either way: a source artifact deleted meanwhile only loses the count.
        if let Err(e) = self.confirm_download(&record).await {
            tracing::warn!(
                "copied, but the source did not count the download: {}",
                crate::error::chain(&e)
            );
        }
        Ok(Uploaded {
            record: copied,
            chunks,
            chunks_sent,
            bytes_sent,
        })
    }

    /// Tells the agent a download of `record` completed, for its count and its event log.
    async fn confirm_download(&self, record: &ArtifactRecord) -> Result<()> {
        self.conn
            .artifacts()
            .confirm_download(unary(pb::Selector {
                name: record.name.clone(),
                stack: Some(record.stack.clone()),
                task: Some(record.task.clone()),
                version: Some(record.version),
            }))
            .await
            .map_err(|s| self.conn.fail(s))?;
        Ok(())
    }

    /// Downloads the artifact `selector` means to `target` (a file, or an existing directory
    /// to put it in under its name): each chunk and the whole content are verified, the bytes
    /// go to a temporary file renamed into place only when every check passed, and then the
    /// agent counts the download.
    pub async fn download(
        &self,
        selector: &Selector,
        target: &Path,
        progress: Option<Progress>,
    ) -> Result<Downloaded> {
        let mut stream = self
            .conn
            .frames_call::<pb::DownloadResponse>(
                crate::wire::DOWNLOAD_PATH,
                &convert::selector(selector),
            )
            .await?;
        let header = match next_message(&mut stream)
            .await
            .map_err(|e| self.conn.explain(e))?
        {
            Some(pb::DownloadResponse {
                step: Some(pb::download_response::Step::Header(header)),
            }) => header,
            _ => {
                return Err(Error::Protocol(
                    "a download must start with its header".into(),
                ));
            }
        };
        let length = header.length;
        let (record, refs, digests) = convert::header(header)?;
        let path = if target.is_dir() {
            target.join(&record.name)
        } else {
            target.to_path_buf()
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let output = |e: std::io::Error| {
            Error::Engine(sloth_engine::Error::Output {
                path: path.clone(),
                source: e,
            })
        };
        let tmp = tokio::task::block_in_place(|| {
            tempfile::Builder::new()
                .prefix(".sloth-download-")
                .tempfile_in(&dir)
        })
        .map_err(output)?;
        let file = tmp.as_file().try_clone().map_err(output)?;

        // Frames are checked against the expected chunk, decoded and verified on the blocking
        // pool (several at once, results in order), then written (syncing behind) and hashed
        // side by side.
        let sink = ContentSink::spawn(SyncBehind::new(file), 32);
        let received = std::sync::atomic::AtomicU64::new(0);
        let expected = std::sync::Mutex::new(refs.into_iter());
        let frames = futures::stream::unfold(stream, |mut stream| async move {
            match next_message(&mut stream).await {
                Ok(Some(pb::DownloadResponse {
                    step: Some(pb::download_response::Step::Frames(frames)),
                })) => Some((Ok(frames.frames), stream)),
                Ok(None) => None,
                Ok(Some(_)) => Some((
                    Err(Error::Protocol("unexpected message in a download".into())),
                    stream,
                )),
                Err(e) => Some((Err(e), stream)),
            }
        })
        .map_ok(|frames| futures::stream::iter(frames.into_iter().map(Ok)))
        .try_flatten()
        .map(|frame: Result<pb::Frame>| {
            let frame = frame?;
            let Some(expected) = expected.lock().unwrap_or_else(|e| e.into_inner()).next() else {
                return Err(Error::Protocol(
                    "the agent sent more chunks than the header lists".into(),
                ));
            };
            if frame.id.as_ref() != expected.id.as_bytes() {
                return Err(Error::Protocol(format!(
                    "the agent sent chunk {} where {} was expected",
                    hex::encode(&frame.id),
                    expected.id
                )));
            }
            received.fetch_add(frame.data.len() as u64, Ordering::Relaxed);
            Ok((expected, frame.data))
        })
        .map(|item| async move {
            let (expected, data) = item?;
            tokio::task::spawn_blocking(move || decode_checked(expected, &data))
                .await
                .map_err(|e| Error::Io(std::io::Error::other(e)))?
        })
        .buffered(2 * cores());
        // Boxed so that it can be dropped (ending the call) before waiting for the writer.
        let mut frames = Box::pin(frames);
        let mut failed = None;
        while let Some(chunk) = frames.next().await {
            match chunk {
                Ok(chunk) => {
                    let len = chunk.len() as u64;
                    if !sink.send(chunk).await {
                        break; // the writer failed and says why
                    }
                    if let Some(progress) = &progress {
                        progress(len);
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(frames);
        let written = sink.finish().await;
        if let Some(e) = failed {
            return Err(e);
        }
        // Every chunk matched its id; the whole content is checked by length and SHA-256.
        let (file, check) = written.map_err(output)?;
        let len = check.len();
        if len != length {
            return Err(Error::Protocol(format!(
                "the download ended after {len} of {} bytes",
                length
            )));
        }
        if check.sha256() != digests.sha256 {
            return Err(Error::Cas(sloth_cas::Error::DigestMismatch {
                manifest: record.manifest,
                algorithm: "sha256",
            }));
        }
        tokio::task::spawn_blocking(move || file.finish())
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?
            .map_err(output)?;
        std::fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .map_err(output)?;
        tmp.persist(&path).map_err(|e| output(e.error))?;
        self.confirm_download(&record).await?;
        Ok(Downloaded {
            record,
            path,
            bytes_received: received.load(Ordering::Relaxed),
        })
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

async fn next_message<T>(
    stream: &mut (impl Stream<Item = Result<T, tonic::Status>> + Unpin),
) -> Result<Option<T>> {
    match tokio::time::timeout(IDLE_TIMEOUT, stream.next()).await {
        Err(_) => Err(Error::Remote(format!(
            "the agent sent nothing for {IDLE_TIMEOUT:?}"
        ))),
        Ok(result) => Ok(result.transpose()?),
    }
}

fn decode_checked(expected: ChunkRef, data: &Bytes) -> Result<Bytes> {
    let chunk = frame::decode_shared(&expected.id, data)?;
    if chunk.len() != expected.len as usize {
        return Err(Error::Cas(sloth_cas::Error::CorruptChunk {
            id: expected.id,
            reason: format!("{} bytes, the header says {}", chunk.len(), expected.len),
        }));
    }
    Ok(chunk)
}

/// Chunks offered together, with their bytes when they are at hand (a local file).
struct Batch {
    refs: Vec<ChunkRef>,
    data: Vec<Bytes>,
}

/// Raw bytes per batch: bounds what waits for the agent's answer.
const BATCH_BYTES: usize = 8 << 20;

/// Cuts `reader` into chunks and sends them in batches with their ids; returns the content's
/// length and what [`digest`] made of it. Four threads share the work: the chunker's own reads
/// ahead, this one cuts, one computes chunk ids and fills batches, one hashes the whole content
/// when `gate` says the claim is needed.
fn cut<R: Read + Send + 'static>(
    reader: R,
    params: ChunkerParams,
    batches: mpsc::Sender<Result<Batch>>,
    progress: Option<Progress>,
    gate: &Arc<ClaimGate>,
) -> Result<(u64, Digest)> {
    let (digest_tx, digest_rx) = std::sync::mpsc::sync_channel::<Bytes>(64);
    let digester = {
        let gate = Arc::clone(gate);
        std::thread::spawn(move || digest(digest_rx, &gate))
    };
    let (id_tx, id_rx) = std::sync::mpsc::sync_channel::<Bytes>(64);
    let failed = Arc::new(AtomicBool::new(false));
    let batcher = {
        let failed = Arc::clone(&failed);
        std::thread::spawn(move || batch_with_ids(id_rx, &batches, &failed))
    };
    let mut length = 0u64;
    let mut result = Ok(());
    for chunk in Chunker::reading_ahead(reader, params) {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                failed.store(true, Ordering::Release);
                result = Err(Error::Cas(sloth_cas::Error::Input(e)));
                break;
            }
        };
        if let Some(progress) = &progress {
            progress(chunk.len() as u64);
        }
        length += chunk.len() as u64;
        if digest_tx.send(chunk.clone()).is_err() || id_tx.send(chunk).is_err() {
            break; // the upload failed; it says why
        }
    }
    drop((digest_tx, id_tx));
    let panicked = |_| Error::Io(std::io::Error::other("a thread of the upload panicked"));
    let digest = digester.join().map_err(panicked)?;
    batcher.join().map_err(panicked)?;
    result?;
    Ok((length, digest))
}

/// Content held for the claim until the agent asks for a chunk. On a fast link the first
/// answer comes back before this much is cut, and a first upload reads its file once; on a
/// slow one the pipeline may run further ahead (up to ~9 batches of 8 MiB), and the upload
/// reads the file again as it did before holding. A re-upload holds this much at most.
const HOLD_BYTES: usize = 32 << 20;

/// Whether an upload needs its claim: undecided until the agent first asks for a chunk (then
/// needed), unless the digester gave up holding content first. Shared by the digester and
/// the upload's answers; whichever moves first decides.
struct ClaimGate(AtomicU8);

const UNDECIDED: u8 = 0;
const NEEDED: u8 = 1;
const GAVE_UP: u8 = 2;

/// Where a needed claim comes from.
#[derive(Debug, PartialEq, Eq)]
enum ClaimFrom {
    /// The digester: it holds or hashed every chunk cut so far.
    Digester,
    /// The file, read again: the digester had given up holding its first chunks.
    File,
}

impl ClaimGate {
    /// A gate already open when `eager` (there is no file to read again).
    fn new(eager: bool) -> Self {
        Self(AtomicU8::new(if eager { NEEDED } else { UNDECIDED }))
    }

    /// The agent asked for a chunk: the claim is needed.
    fn need(&self) -> ClaimFrom {
        match self
            .0
            .compare_exchange(UNDECIDED, NEEDED, Ordering::AcqRel, Ordering::Acquire)
        {
            Err(GAVE_UP) => ClaimFrom::File,
            _ => ClaimFrom::Digester,
        }
    }

    /// Whether the claim was found needed.
    fn needed(&self) -> bool {
        self.0.load(Ordering::Acquire) == NEEDED
    }

    /// The digester stops holding content unless it is needed already; returns whether it
    /// gave up.
    fn give_up(&self) -> bool {
        self.0
            .compare_exchange(UNDECIDED, GAVE_UP, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// What the digester made of the content.
enum Digest {
    /// The claim, hashed from the chunks as they were cut.
    Claimed(Claim),
    /// Every chunk, in order: the content was cut before the claim was found needed.
    Held(Vec<Bytes>),
    /// More than [`HOLD_BYTES`] was cut before the claim was found needed.
    GaveUp,
}

/// Hashes the chunks `chunks` yields once `gate` says so, holding them until then.
fn digest(chunks: std::sync::mpsc::Receiver<Bytes>, gate: &ClaimGate) -> Digest {
    let mut check = ContentCheck::default();
    let (mut held, mut held_bytes) = (Vec::new(), 0);
    let (mut hashing, mut gave_up) = (false, false);
    for chunk in chunks {
        if !hashing && gate.needed() {
            hashing = true;
            held.drain(..).for_each(|c: Bytes| check.update(&c));
        }
        if hashing {
            check.update(&chunk);
        } else if !gave_up {
            held_bytes += chunk.len();
            held.push(chunk);
            // Fails when the claim was found needed meanwhile: the next chunk, or the end,
            // hashes what is held.
            if held_bytes > HOLD_BYTES && gate.give_up() {
                (held, gave_up) = (Vec::new(), true);
            }
        }
    }
    if gate.needed() {
        held.drain(..).for_each(|c: Bytes| check.update(&c));
        Digest::Claimed(sha256_claim(check))
    } else if gave_up {
        Digest::GaveUp
    } else {
        Digest::Held(held)
    }
}

/// The claim of content held as chunks.
fn hash_chunks(chunks: &[Bytes]) -> Claim {
    let mut check = ContentCheck::default();
    chunks.iter().for_each(|c| check.update(c));
    sha256_claim(check)
}

/// A file's size and times: a file changed during an upload shows other ones after it.
#[derive(Debug, PartialEq, Eq)]
struct FileState {
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl FileState {
    fn of(file: &std::fs::File) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Self {
            len: m.len(),
            modified: (m.mtime(), m.mtime_nsec()),
            changed: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The error of an upload whose file changed while it was read.
fn changed(how: String) -> Error {
    Error::Io(std::io::Error::other(format!(
        "the file changed while it was uploaded ({how}); nothing was committed"
    )))
}

/// Computes the id of each chunk `chunks` yields and sends them in batches; the last, partial
/// batch is not sent when the cutting `failed` (the upload fails without it).
fn batch_with_ids(
    chunks: std::sync::mpsc::Receiver<Bytes>,
    batches: &mpsc::Sender<Result<Batch>>,
    failed: &AtomicBool,
) {
    let empty = || Batch {
        refs: Vec::new(),
        data: Vec::new(),
    };
    let (mut batch, mut batch_bytes) = (empty(), 0);
    for chunk in chunks {
        batch.refs.push(ChunkRef {
            id: ChunkId::digest(&chunk),
            len: chunk.len() as u32,
        });
        batch_bytes += chunk.len();
        batch.data.push(chunk);
        if batch.refs.len() == MAX_BATCH || batch_bytes >= BATCH_BYTES {
            batch_bytes = 0;
            if batches
                .blocking_send(Ok(std::mem::replace(&mut batch, empty())))
                .is_err()
            {
                return; // the upload failed; it says why
            }
        }
    }
    if !batch.refs.is_empty() && !failed.load(Ordering::Acquire) {
        let _ = batches.blocking_send(Ok(batch));
    }
}

/// The claim of an upload from a file (its SHA-256) when the digester gave up holding its
/// first chunks: computed once the agent asks for a chunk, by reading the file again from its
/// start on a thread of its own.
enum Rehash {
    /// Not started; the file, when there is one to read again.
    Idle(Option<std::fs::File>),
    Running(std::thread::JoinHandle<std::io::Result<(u64, Claim)>>),
}

impl Rehash {
    /// Starts hashing, once, until done or `stop`ped.
    fn start(&mut self, stop: &Arc<AtomicBool>) {
        if let Rehash::Idle(file) = self
            && let Some(file) = file.take()
        {
            let stop = Arc::clone(stop);
            *self = Rehash::Running(std::thread::spawn(move || hash_file(&file, &stop)));
        }
    }

    /// The length read and the digests, if hashing was started.
    fn finish(self) -> Result<Option<(u64, Claim)>> {
        match self {
            Rehash::Idle(_) => Ok(None),
            Rehash::Running(thread) => Ok(Some(
                thread
                    .join()
                    .map_err(|_| Error::Io(std::io::Error::other("the digest thread panicked")))?
                    .map_err(Error::Io)?,
            )),
        }
    }
}

/// Sets its flag when dropped.
#[derive(Default)]
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// What an upload claims: the SHA-256 of the content `check` saw.
fn sha256_claim(check: ContentCheck) -> Claim {
    Claim {
        sha256: check.sha256(),
        blake3: None,
    }
}

/// Hashes `file` from its start to its end, with positioned reads (another handle reading
/// the same file at the same time is not disturbed), unless `stop` is set first.
fn hash_file(file: &std::fs::File, stop: &AtomicBool) -> std::io::Result<(u64, Claim)> {
    use std::os::unix::fs::FileExt;
    let mut check = ContentCheck::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        if stop.load(Ordering::Acquire) {
            return Err(std::io::Error::other("the upload stopped"));
        }
        let n = match file.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        check.update(&buf[..n]);
        at += n as u64;
    }
    Ok((check.len(), sha256_claim(check)))
}

/// The frames of a local batch's missing chunks, compressed on the blocking pool; `split`
/// when the agent takes them as header and payload.
async fn compress(
    batch: Arc<Batch>,
    missing: Vec<u32>,
    level: i32,
    split: bool,
) -> Result<Vec<pb::Frame>> {
    futures::stream::iter(missing)
        .map(|i| {
            let batch = Arc::clone(&batch);
            async move {
                let i = i as usize;
                let id = batch.refs[i].id;
                let frame =
                    tokio::task::spawn_blocking(move || frame::encode(&batch.data[i], level))
                        .await
                        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
                Ok(convert::wire_frame(&id, &frame, split))
            }
        })
        .buffered(2 * cores())
        .try_collect()
        .await
}

/// The stored frames of a batch's missing chunks, fetched from another agent.
async fn fetch(source: &Connection, batch: &Batch, missing: &[u32]) -> Result<Vec<pb::Frame>> {
    let ids: Vec<Bytes> = missing
        .iter()
        .map(|&i| Bytes::copy_from_slice(batch.refs[i as usize].id.as_bytes()))
        .collect();
    let mut stream = source
        .frames_call::<pb::Frames>(
            crate::wire::GET_CHUNKS_PATH,
            &pb::GetChunksRequest { ids: ids.clone() },
        )
        .await?;
    let mut frames = Vec::with_capacity(ids.len());
    while let Some(message) = next_message(&mut stream).await? {
        frames.extend(message.frames);
    }
    if frames.len() != ids.len() || frames.iter().zip(&ids).any(|(f, id)| f.id != *id) {
        return Err(Error::Protocol(
            "the source agent sent other chunks than asked for".into(),
        ));
    }
    Ok(frames)
}

/// The client's half of one upload conversation (see `UploadRequest` in `artifacts.proto`).
struct UploadSession {
    requests: mpsc::Sender<pb::UploadRequest>,
    responses: Decoded<pb::UploadResponse>,
    avg_chunk: u32,
    zstd_level: i32,
    split_frames: bool,
}

fn step(step: pb::upload_request::Step) -> pb::UploadRequest {
    pb::UploadRequest { step: Some(step) }
}

impl UploadSession {
    async fn begin(conn: &Connection, key: &ArtifactKey) -> Result<Self> {
        let (requests, rx) = mpsc::channel(OFFER_WINDOW * 2);
        requests
            .send(step(pb::upload_request::Step::Begin(pb::Begin {
                name: key.name.to_string(),
                stack: Some(key.stack.to_string()),
                task: Some(key.task.to_string()),
            })))
            .await
            .map_err(|_| Error::Protocol("upload stream closed".into()))?;
        let mut responses = conn.upload_call(rx).await?;
        let ready = match next_message(&mut responses)
            .await
            .map_err(|e| conn.explain(e))?
        {
            Some(pb::UploadResponse {
                step: Some(pb::upload_response::Step::Ready(ready)),
            }) => ready,
            _ => {
                return Err(Error::Protocol(
                    "the agent did not answer Begin with Ready".into(),
                ));
            }
        };
        Ok(Self {
            requests,
            responses,
            avg_chunk: ready.avg_chunk,
            zstd_level: ready.zstd_level,
            split_frames: ready.split_frames,
        })
    }

    async fn send(&self, request: pb::UploadRequest) -> Result<()> {
        // A closed stream means the agent ended the call; its status comes with the next read.
        self.requests
            .send(request)
            .await
            .map_err(|_| Error::Protocol("the agent closed the upload".into()))
    }

    /// Offers every batch, keeping up to [`OFFER_WINDOW`] unanswered, and sends the frames
    /// `frames_for` makes for each batch's missing chunks. Returns (chunks, chunks sent,
    /// frame bytes sent).
    async fn offer_all<F, Fut>(
        &mut self,
        mut batches: mpsc::Receiver<Result<Batch>>,
        frames_for: F,
    ) -> Result<(u64, u64, u64)>
    where
        F: Fn(Arc<Batch>, Vec<u32>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<pb::Frame>>>,
    {
        let (pending_tx, mut pending_rx) = mpsc::channel::<Arc<Batch>>(OFFER_WINDOW);
        let requests = self.requests.clone();
        let offerer = async move {
            while let Some(batch) = batches.recv().await {
                let batch = Arc::new(batch?);
                let offer = pb::Offer {
                    chunks: batch.refs.iter().map(convert::chunk_ref).collect(),
                };
                if requests
                    .send(step(pb::upload_request::Step::Offer(offer)))
                    .await
                    .is_err()
                    || pending_tx.send(batch).await.is_err()
                {
                    break; // the other half failed and says why
                }
            }
            Ok::<_, Error>(())
        };
        let answerer = async {
            let (mut chunks, mut sent, mut bytes) = (0u64, 0u64, 0u64);
            while let Some(batch) = pending_rx.recv().await {
                let missing = match next_message(&mut self.responses).await? {
                    Some(pb::UploadResponse {
                        step: Some(pb::upload_response::Step::Missing(m)),
                    }) => m.indexes,
                    None => return Err(Error::Protocol("the agent ended the upload early".into())),
                    Some(_) => {
                        return Err(Error::Protocol(
                            "expected the agent's Missing answer".into(),
                        ));
                    }
                };
                if missing.windows(2).any(|w| w[0] >= w[1])
                    || missing
                        .last()
                        .is_some_and(|&i| i as usize >= batch.refs.len())
                {
                    return Err(Error::Protocol(
                        "the agent asked for chunks it was not offered".into(),
                    ));
                }
                chunks += batch.refs.len() as u64;
                sent += missing.len() as u64;
                if missing.is_empty() {
                    continue;
                }
                let frames = frames_for(Arc::clone(&batch), missing).await?;
                let mut message = pb::Frames::default();
                let mut message_bytes = 0;
                for frame in frames {
                    bytes += frame.data.len() as u64;
                    message_bytes += frame.data.len();
                    message.frames.push(frame);
                    if message_bytes >= FRAMES_BYTES {
                        message_bytes = 0;
                        self.send(step(pb::upload_request::Step::Frames(std::mem::take(
                            &mut message,
                        ))))
                        .await?;
                    }
                }
                if !message.frames.is_empty() {
                    self.send(step(pb::upload_request::Step::Frames(message)))
                        .await?;
                }
            }
            Ok((chunks, sent, bytes))
        };
        let (_, counts) = futures::try_join!(offerer, answerer)?;
        Ok(counts)
    }

    /// Commits the content with its `claim` (`None` when no chunk was sent).
    async fn commit(mut self, length: u64, claim: Option<Claim>) -> Result<ArtifactRecord> {
        let (sha256, blake3) = claim.map_or_else(Default::default, |c| {
            (
                Bytes::copy_from_slice(&c.sha256),
                c.blake3
                    .map(|b| Bytes::copy_from_slice(&b))
                    .unwrap_or_default(),
            )
        });
        self.send(step(pb::upload_request::Step::Commit(pb::Commit {
            length,
            sha256,
            blake3,
        })))
        .await?;
        match next_message(&mut self.responses).await? {
            Some(pb::UploadResponse {
                step: Some(pb::upload_response::Step::Committed(c)),
            }) => {
                let artifact = c
                    .artifact
                    .ok_or_else(|| Error::Protocol("commit answered without an artifact".into()))?;
                Ok(convert::record(artifact)?.0)
            }
            _ => Err(Error::Protocol(
                "the agent did not confirm the commit".into(),
            )),
        }
    }
}

/// A connection to the master.
#[derive(Debug, Clone)]
pub struct Master {
    addr: String,
    conn: Connection,
}

/// An agent as the master knows it.
#[derive(Debug, Clone)]
pub struct AgentEntry {
    /// Its name.
    pub name: String,
    /// `host:port` to dial.
    pub address: String,
    /// Its sloth-runner version.
    pub version: String,
    /// Whether it serves TLS.
    pub tls: bool,
    /// Its store figures at the last heartbeat.
    pub figures: Figures,
    /// Unix seconds.
    pub registered_at: i64,
    /// Unix seconds.
    pub last_heartbeat: i64,
    /// `active` or `inactive`.
    pub status: String,
}

impl Master {
    /// Connects to the master at `link.addr`.
    pub async fn connect(link: &Link) -> Result<Self> {
        Ok(Self {
            addr: link.addr.clone(),
            conn: Connection::open("master", link).await?,
        })
    }

    /// Every registered agent, by name.
    pub async fn list(&self) -> Result<Vec<AgentEntry>> {
        let response = self
            .conn
            .registry()
            .list_agents(unary(reg::ListAgentsRequest {}))
            .await
            .map_err(|s| self.conn.fail(s))?
            .into_inner();
        Ok(response.agents.into_iter().map(entry).collect())
    }

    /// The agent called `name`.
    pub async fn get(&self, name: &str) -> Result<AgentEntry> {
        match self
            .conn
            .registry()
            .get_agent(unary(reg::GetAgentRequest { name: name.into() }))
            .await
        {
            Ok(response) => Ok(entry(response.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => Err(Error::UnknownAgent {
                name: name.into(),
                master: self.addr.clone(),
            }),
            Err(status) => Err(self.conn.fail(status)),
        }
    }
}

fn entry(r: reg::AgentRecord) -> AgentEntry {
    AgentEntry {
        name: r.name,
        address: r.address,
        version: r.version,
        tls: r.tls,
        figures: r.figures.unwrap_or_default().into(),
        registered_at: r.registered_at,
        last_heartbeat: r.last_heartbeat,
        status: r.status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` chunks of 1 MiB, each of one repeated byte (its index), and the claim of them all.
    fn chunks(n: usize) -> (Vec<Bytes>, Claim) {
        let chunks: Vec<Bytes> = (0..n)
            .map(|i| Bytes::from(vec![i as u8; 1 << 20]))
            .collect();
        let claim = hash_chunks(&chunks);
        (chunks, claim)
    }

    /// Runs the digester over `chunks`, calling `need` on the gate before chunk `need_at`
    /// (or, at `chunks.len()`, after the last chunk but before the stream ends). The channel
    /// holds nothing, so the digester has taken chunk k before chunk k + 1 is offered.
    fn run(
        chunks: &[Bytes],
        gate: &Arc<ClaimGate>,
        need_at: Option<usize>,
    ) -> (Digest, Option<ClaimFrom>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(0);
        let digester = {
            let gate = Arc::clone(gate);
            std::thread::spawn(move || digest(rx, &gate))
        };
        let mut from = None;
        for (i, chunk) in chunks.iter().enumerate() {
            if need_at == Some(i) {
                from = Some(gate.need());
            }
            tx.send(chunk.clone()).unwrap();
        }
        if need_at == Some(chunks.len()) {
            from = Some(gate.need());
        }
        drop(tx);
        (digester.join().unwrap(), from)
    }

    fn claimed(digest: Digest) -> [u8; 32] {
        match digest {
            Digest::Claimed(claim) => claim.sha256,
            _ => panic!("expected a claim"),
        }
    }

    #[test]
    fn an_eager_gate_hashes_everything() {
        let (chunks, claim) = chunks(40);
        let gate = Arc::new(ClaimGate::new(true));
        assert_eq!(claimed(run(&chunks, &gate, None).0), claim.sha256);
    }

    #[test]
    fn content_held_until_needed_is_hashed_in_order_with_the_rest() {
        let (chunks, claim) = chunks(40);
        let gate = Arc::new(ClaimGate::new(false));
        let (digest, from) = run(&chunks, &gate, Some(20));
        assert_eq!(from, Some(ClaimFrom::Digester));
        assert_eq!(claimed(digest), claim.sha256);
    }

    #[test]
    fn a_need_after_the_last_chunk_hashes_everything_held() {
        let (chunks, claim) = chunks(5);
        let gate = Arc::new(ClaimGate::new(false));
        let (digest, from) = run(&chunks, &gate, Some(5));
        assert_eq!(from, Some(ClaimFrom::Digester));
        // Whether the digester saw the need before its stream ended or not, the claim covers
        // every chunk, in order.
        let sha256 = match digest {
            Digest::Claimed(claim) => claim.sha256,
            Digest::Held(held) => hash_chunks(&held).sha256,
            Digest::GaveUp => panic!("5 MiB is under the hold limit"),
        };
        assert_eq!(sha256, claim.sha256);
    }

    #[test]
    fn the_first_to_decide_wins() {
        let gate = ClaimGate::new(false);
        assert_eq!(gate.need(), ClaimFrom::Digester);
        assert!(!gate.give_up(), "a needed claim cannot be given up");
        assert!(gate.needed());
        let gate = ClaimGate::new(false);
        assert!(gate.give_up());
        assert_eq!(gate.need(), ClaimFrom::File);
        assert!(!gate.needed());
    }

    #[test]
    fn small_content_is_held_whole_when_never_found_needed() {
        let (chunks, claim) = chunks(5);
        let gate = Arc::new(ClaimGate::new(false));
        let Digest::Held(held) = run(&chunks, &gate, None).0 else {
            panic!("expected the chunks held");
        };
        assert_eq!(hash_chunks(&held).sha256, claim.sha256);
        // Found needed after the cutting ended: hashed from what was held.
        assert_eq!(gate.need(), ClaimFrom::Digester);
        assert!(gate.needed());
    }

    #[test]
    fn past_the_hold_limit_the_digester_gives_up_and_a_late_need_reads_again() {
        let (chunks, _) = chunks(HOLD_BYTES / (1 << 20) + 8);
        let gate = Arc::new(ClaimGate::new(false));
        let (digest, from) = run(&chunks, &gate, Some(HOLD_BYTES / (1 << 20) + 4));
        assert!(matches!(digest, Digest::GaveUp));
        assert_eq!(
            from,
            Some(ClaimFrom::File),
            "the need came after it gave up"
        );
        assert!(!gate.needed());
    }
}
