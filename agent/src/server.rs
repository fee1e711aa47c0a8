//! An agent: its engine served over tonic, with TLS, tokens, limits and heartbeats.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures::{Stream, StreamExt};
use sloth_cas::ChunkStore;
use sloth_engine::{ArtifactKey, ArtifactRecord, Engine, ListQuery, Name, SETTLE_EVERY, Selector};
use sloth_proto::artifacts::{self as pb, agent_server, artifacts_server};
use sloth_proto::registry as reg;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthLayer, Tokens, principal};
use crate::client::{Connection, Link};
use crate::error::{cas_status, chain, status};
use crate::limits::*;
use crate::metrics::{CountingIo, Metrics};
use crate::tls::ServerTls;
use crate::{Error, Result, convert};

/// How an agent serves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The agent's name, recorded in events and registered with the master.
    pub name: String,
    /// Address to listen on (port 0: any free port).
    pub bind: SocketAddr,
    /// Address clients should dial, sent to the master (default: the bound address, with the
    /// host name when bound to every interface).
    pub advertise: Option<String>,
    /// The master to heartbeat to.
    pub master: Option<Link>,
    /// Seconds between heartbeats.
    pub heartbeat: Duration,
    /// TLS, when given.
    pub tls: Option<ServerTls>,
    /// Bearer tokens, when given.
    pub tokens: Option<Tokens>,
    /// Listen beyond loopback without TLS or tokens.
    pub insecure: bool,
    /// How long a shutdown waits for calls in flight before cutting them off.
    pub grace: Duration,
    /// Retention rules to run on schedule.
    pub retention: Vec<sloth_engine::RetentionRule>,
    /// Verify the whole store this often, repairing too when the flag is set.
    pub verify: Option<(Duration, bool)>,
    /// Where relative policy module paths of the rules are found (the config file's folder).
    pub policy_dir: std::path::PathBuf,
}

impl AgentConfig {
    /// Defaults for an agent called `name` on `bind`.
    pub fn new(name: impl Into<String>, bind: SocketAddr) -> Self {
        Self {
            name: name.into(),
            bind,
            advertise: None,
            master: None,
            heartbeat: Duration::from_secs(5),
            tls: None,
            tokens: None,
            insecure: false,
            grace: Duration::from_secs(30),
            retention: Vec::new(),
            verify: None,
            policy_dir: std::path::PathBuf::from("."),
        }
    }
}

/// Refuses to expose an unprotected server beyond loopback unless told `--insecure`.
pub fn check_exposure(bind: SocketAddr, tls: bool, tokens: bool, insecure: bool) -> Result<()> {
    if !bind.ip().is_loopback() && !tls && !tokens && !insecure {
        return Err(Error::Config(format!(
            "refusing to listen on {bind} with neither TLS (--tls-cert/--tls-key) nor tokens \
             (--tokens): anyone on the network could read and delete artifacts. Bind to \
             127.0.0.1, add TLS or tokens, or pass --insecure"
        )));
    }
    Ok(())
}

/// A listening socket, bound before serving so the caller knows the port.
#[derive(Debug)]
pub struct Bound {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl Bound {
    /// Binds `addr`.
    pub async fn bind(addr: SocketAddr) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn into_listener(self) -> tokio::net::TcpListener {
        self.listener
    }
}

/// A tonic server builder with the limits every sloth server runs with.
pub(crate) fn builder(tls: Option<&ServerTls>) -> Result<Server<tower::layer::util::Identity>> {
    let mut server = Server::builder()
        .concurrency_limit_per_connection(MAX_CONCURRENT_CALLS)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW * 2)
        .max_frame_size(FRAME_SIZE)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Bounds unary calls (and a stream's start); streams bound themselves (IDLE_TIMEOUT,
        // CALL_TIMEOUT).
        .timeout(UNARY_TIMEOUT);
    if let Some(tls) = tls {
        server = server
            .tls_config(tls.config()?)
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    }
    Ok(server)
}

/// Turns Nagle's algorithm off on an accepted connection. tonic does it only for listeners it
/// binds itself, not for `serve_with_incoming`: without it, a response written in two pieces
/// waited for the client's delayed ACK, and a `show` took 48 ms instead of 6.
pub(crate) fn no_delay(tcp: tokio::net::TcpStream) -> std::io::Result<tokio::net::TcpStream> {
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// HTTP/2 flow-control window: the 64 KiB default caps a stream far below disk speed.
pub(crate) const WINDOW: u32 = 8 << 20;

/// Largest HTTP/2 frame either side accepts: 16 KiB (the default) splits each 4 MiB message
/// into 256 frames.
pub(crate) const FRAME_SIZE: u32 = 1 << 20;

/// Serves `engine` on `bound` (and Prometheus metrics on `metrics`, when given) until
/// `shutdown` completes; then stops accepting calls, lets those in flight finish for up to
/// `config.grace`, and returns.
pub async fn serve(
    engine: Engine,
    config: AgentConfig,
    bound: Bound,
    metrics_bound: Option<Bound>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    check_exposure(
        bound.addr,
        config.tls.is_some(),
        config.tokens.is_some(),
        config.insecure,
    )?;
    let engine = Arc::new(engine);
    let metrics = Arc::new(Metrics::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let metrics_server = match metrics_bound {
        Some(bound) => {
            check_exposure(
                bound.addr,
                config.tls.is_some(),
                config.tokens.is_some(),
                config.insecure,
            )?;
            Some(tokio::spawn(crate::metrics::serve(
                bound.listener,
                Arc::clone(&metrics),
                Arc::clone(&engine),
                stopped(stop_rx.clone()),
            )))
        }
        None => None,
    };
    let policies = Arc::new(
        sloth_policies::PolicyHost::new(sloth_policies::Limits::default())
            .map_err(|e| Error::Config(e.to_string()))?,
    );
    let retention = crate::retention::spawn(
        Arc::clone(&engine),
        Arc::clone(&policies),
        config.retention.clone(),
        config.policy_dir.clone(),
    );
    let settler = tokio::spawn(settle_on_schedule(Arc::clone(&engine)));
    let verifier = config.verify.map(|(every, repair)| {
        tokio::spawn(crate::retention::verify_on_schedule(
            Arc::clone(&engine),
            every,
            repair,
        ))
    });
    let workflow_rules = crate::retention::WorkflowRules::start(
        Arc::clone(&engine),
        Arc::clone(&policies),
        config.policy_dir.clone(),
    )?;
    let workflows = sloth_proto::workflows::workflows_server::WorkflowsServer::new(
        crate::workflows::WorkflowsService::new(Arc::clone(&engine), Arc::clone(&workflow_rules)),
    );
    let artifacts = artifacts_server::ArtifactsServer::new(ArtifactsService {
        engine: Arc::clone(&engine),
        metrics: Arc::clone(&metrics),
        policies,
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    // Upload requests come in, and Download and GetChunks answers go out, without tonic's
    // copies (`wire.rs`).
    let artifacts = crate::wire::SendUnencoded::new(artifacts, MAX_MESSAGE);
    let info = agent_server::AgentServer::new(InfoService {
        engine: Arc::clone(&engine),
        name: config.name.clone(),
    });
    let heartbeat = match config.master.clone() {
        Some(master) => {
            let beat = Heartbeat {
                engine: Arc::clone(&engine),
                master,
                name: config.name.clone(),
                address: advertised(&config, bound.addr),
                tls: config.tls.is_some(),
                interval: config.heartbeat,
            };
            // The first one before serving: a name another live agent holds ends the start. A
            // master that does not answer soon delays nothing: the agent serves and retries.
            let first = tokio::time::timeout(FIRST_BEAT_WAIT, beat.send())
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Remote(format!(
                        "no answer within {FIRST_BEAT_WAIT:?}"
                    )))
                });
            if let Err(e @ Error::NameTaken(_)) = first {
                return Err(e);
            }
            Some(tokio::spawn(beat.repeat(first)))
        }
        None => None,
    };
    let counted = Arc::clone(&metrics);
    let incoming = TcpListenerStream::new(bound.listener).map(move |conn| {
        conn.and_then(no_delay)
            .map(|tcp| CountingIo::new(tcp, Arc::clone(&counted)))
    });
    let server = builder(config.tls.as_ref())?
        .layer(AuthLayer::new(config.tokens.clone()))
        .add_service(artifacts)
        .add_service(info)
        .add_service(workflows)
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx));
    let mut server = std::pin::pin!(server);
    let result = tokio::select! {
        result = &mut server => result,
        () = shutdown => {
            tracing::info!("shutting down: finishing calls in flight (up to {:?})", config.grace);
            let _ = stop_tx.send(true);
            match tokio::time::timeout(config.grace, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!("calls still running after {:?}: cut off; uncommitted uploads leave nothing visible", config.grace);
                    Ok(())
                }
            }
        }
    };
    if let Some(task) = heartbeat {
        task.abort();
    }
    for task in retention {
        task.abort();
    }
    workflow_rules.stop();
    if let Some(task) = verifier {
        task.abort();
    }
    settler.abort();
    let _ = stop_tx.send(true);
    if let Some(task) = metrics_server {
        let _ = task.await;
    }
    result.map_err(|e| Error::Remote(format!("server failed: {}", chain(&e))))?;
    // The engine's last clones are dropped with the server: flush what it holds.
    engine.cas().flush().await?;
    if let Err(e) = engine.settle_layout().await {
        tracing::warn!("syncing the layout's new objects failed (the next start retries): {e}");
    }
    Ok(())
}

/// Makes the layout objects uploads named unsynced durable every [`SETTLE_EVERY`], so that a
/// machine crash leaves at most that much of the layout to write again.
async fn settle_on_schedule(engine: Arc<Engine>) {
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + SETTLE_EVERY, SETTLE_EVERY);
    loop {
        ticker.tick().await;
        if let Err(e) = engine.settle_layout().await {
            tracing::warn!("syncing the layout's new objects failed (retried later): {e}");
        }
    }
}

/// The address sent to the master.
pub fn advertised(config: &AgentConfig, bound: SocketAddr) -> String {
    if let Some(addr) = &config.advertise {
        return addr.clone();
    }
    if bound.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        return format!("{host}:{}", bound.port());
    }
    bound.to_string()
}

/// Fails when the master knows another live agent (another address) by `config.name`, so that
/// `agent start` can say so before it reports listening. The master refuses such an agent's
/// heartbeats in any case ([`serve`] then fails); an unreachable master is not an error here
/// (the agent starts and keeps trying).
pub async fn check_name_free(config: &AgentConfig, bound: SocketAddr) -> Result<()> {
    let Some(link) = &config.master else {
        return Ok(());
    };
    let holder = tokio::time::timeout(FIRST_BEAT_WAIT, async {
        crate::client::Master::connect(link)
            .await?
            .get(&config.name)
            .await
    })
    .await;
    match holder {
        Ok(Ok(holder))
            if holder.status == "active" && holder.address != advertised(config, bound) =>
        {
            Err(Error::NameTaken(format!(
                "agent name '{}' is taken by the agent at {} (registered with the master at {}); \
                 choose another --name, or stop that agent",
                config.name, holder.address, link.addr
            )))
        }
        _ => Ok(()),
    }
}

/// How long an agent's start waits for the master (the name check, the first heartbeat)
/// before it serves anyway and keeps trying in the background.
const FIRST_BEAT_WAIT: Duration = Duration::from_secs(3);

/// What an agent sends the master, every `interval`.
struct Heartbeat {
    engine: Arc<Engine>,
    master: Link,
    name: String,
    address: String,
    tls: bool,
    interval: Duration,
}

impl Heartbeat {
    async fn send(&self) -> Result<()> {
        let figures = figures(&self.engine)
            .await
            .map_err(|e| Error::Remote(chain(&e)))?;
        let conn = Connection::open("master", &self.master).await?;
        conn.registry()
            .heartbeat(reg::HeartbeatRequest {
                name: self.name.clone(),
                address: self.address.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                tls: self.tls,
                figures: Some(figures),
                interval_secs: self.interval.as_secs().max(1) as u32,
            })
            .await?;
        Ok(())
    }

    /// Heartbeats from one interval after the `first`, logging when they start failing and
    /// when they work again.
    async fn repeat(self, first: Result<()>) {
        let interval = self.interval;
        let mut failing = false;
        let mut outcome = first;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            match outcome {
                Ok(()) if failing => {
                    tracing::info!("registered with the master at {} again", self.master.addr);
                    failing = false;
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    tracing::warn!(
                        "heartbeat to the master at {} failed (retrying every {interval:?}): {}",
                        self.master.addr,
                        chain(&e)
                    );
                    failing = true;
                }
                Err(_) => {}
            }
            ticker.tick().await;
            outcome = self.send().await;
        }
    }
}

async fn figures(engine: &Engine) -> Result<pb::StoreFigures> {
    let usage = engine.stack_usage()?;
    let stored = engine.cas().stats().await?.stored_bytes;
    Ok(pb::StoreFigures {
        artifacts: usage.iter().map(|u| u.artifacts).sum(),
        versions: usage.iter().map(|u| u.versions).sum(),
        logical_bytes: usage.iter().map(|u| u.logical_bytes).sum(),
        stored_bytes: stored,
    })
}

struct InfoService {
    engine: Arc<Engine>,
    name: String,
}

#[tonic::async_trait]
impl agent_server::Agent for InfoService {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::AgentInfo>, Status> {
        let figures = figures(&self.engine)
            .await
            .map_err(|e| Status::internal(chain(&e)))?;
        Ok(Response::new(pb::AgentInfo {
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            figures: Some(figures),
        }))
    }
}

struct ArtifactsService {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    policies: Arc<sloth_policies::PolicyHost>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// An upload's requests: decoded by `wire.rs`, or by tonic where the service runs unwrapped.
type Inbound = ResponseStream<pb::UploadRequest>;

fn name_arg(what: &'static str, value: &str) -> Result<String, Status> {
    Name::parse(what, value)
        .map(|n| n.to_string())
        .map_err(|e| status(&e))
}

pub(crate) fn optional_name(
    what: &'static str,
    value: Option<String>,
) -> Result<Option<String>, Status> {
    value.map(|v| name_arg(what, &v)).transpose()
}

pub(crate) fn selector_arg(s: pb::Selector) -> Result<Selector, Status> {
    let s = convert::selector_from(s);
    name_arg("artifact name", &s.name)?;
    Ok(Selector {
        stack: optional_name("stack", s.stack)?,
        task: optional_name("task", s.task)?,
        ..s
    })
}

/// A List/Events `limit` as the engine takes it: 0 (none given) and anything larger become
/// [`MAX_LIST`].
pub(crate) fn list_limit(limit: u32) -> usize {
    (if limit == 0 {
        MAX_LIST
    } else {
        limit.min(MAX_LIST)
    }) as usize
}

fn protocol(message: impl Into<String>) -> Status {
    Status::invalid_argument(message.into())
}

impl ArtifactsService {
    fn resolve(&self, selector: pb::Selector) -> Result<ArtifactRecord, Status> {
        self.engine
            .resolve(&selector_arg(selector)?)
            .map_err(|e| status(&e))
    }

    /// The record on the wire, with its layout path when it is the newest version.
    fn artifact(&self, record: &ArtifactRecord, newest: bool) -> pb::Artifact {
        let path = self
            .engine
            .layout_path(record)
            .filter(|_| newest)
            .map(|p| p.display().to_string());
        convert::artifact(record, path)
    }

    fn newest_version(&self, record: &ArtifactRecord) -> Result<(u32, u32), Status> {
        let key = record.key().map_err(|e| status(&e))?;
        let versions = self.engine.versions(&key).map_err(|e| status(&e))?;
        let newest = versions.last().map_or(record.version, |r| r.version);
        Ok((newest, versions.len() as u32))
    }

    async fn header(&self, selector: pb::Selector) -> Result<pb::DownloadHeader, Status> {
        let record = self.resolve(selector)?;
        sloth_engine::refuse_damaged(&record).map_err(|e| status(&e))?;
        let manifest = self
            .engine
            .cas()
            .manifest(record.manifest)
            .await
            .map_err(|e| cas_status(&e, chain(&e)))?;
        let (newest, _) = self.newest_version(&record)?;
        Ok(pb::DownloadHeader {
            artifact: Some(self.artifact(&record, newest == record.version)),
            chunks: manifest.chunks().iter().map(convert::chunk_ref).collect(),
            length: manifest.len(),
            sha256: manifest.digests().sha256.to_vec().into(),
            blake3: manifest.digests().blake3.to_vec().into(),
        })
    }
}

#[tonic::async_trait]
impl artifacts_server::Artifacts for ArtifactsService {
    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let _timer = self.metrics.timer("list");
        let r = request.into_inner();
        let limit = list_limit(r.limit);
        let records = self
            .engine
            .list(&ListQuery {
                stack: optional_name("stack", r.stack)?,
                task: optional_name("task", r.task)?,
                all_versions: r.all_versions,
                limit: Some(limit),
            })
            .map_err(|e| status(&e))?;
        // Only the newest version of each artifact has a layout path; with every version
        // listed, a newer version of a listed record is more recent and so also listed.
        let mut newest = std::collections::HashMap::new();
        for r in &records {
            let v = newest
                .entry((r.stack.as_str(), r.task.as_str(), r.name.as_str()))
                .or_insert(0);
            *v = r.version.max(*v);
        }
        let artifacts = records
            .iter()
            .map(|r| {
                let is_newest = newest.get(&(r.stack.as_str(), r.task.as_str(), r.name.as_str()))
                    == Some(&r.version);
                self.artifact(r, is_newest)
            })
            .collect();
        Ok(Response::new(pb::ListResponse { artifacts }))
    }

    async fn show(
        &self,
        request: Request<pb::Selector>,
    ) -> Result<Response<pb::ShowResponse>, Status> {
        let _timer = self.metrics.timer("show");
        let record = self.resolve(request.into_inner())?;
        let (newest, count) = self.newest_version(&record)?;
        Ok(Response::new(pb::ShowResponse {
            artifact: Some(self.artifact(&record, newest == record.version)),
            newest_version: newest,
            version_count: count,
            layout_enabled: self.engine.layout_path(&record).is_some(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::Selector>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let _timer = self.metrics.timer("delete");
        let principal = principal(&request);
        let selector = selector_arg(request.into_inner())?;
        let deleted = self
            .engine
            .delete(&selector, &principal)
            .await
            .map_err(|e| status(&e))?;
        self.metrics.deletes.fetch_add(1, Relaxed);
        Ok(Response::new(pb::DeleteResponse {
            deleted: deleted.iter().map(|r| convert::artifact(r, None)).collect(),
        }))
    }

    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<pb::EventsResponse>, Status> {
        let _timer = self.metrics.timer("events");
        let r = request.into_inner();
        if r.kind.as_ref().is_some_and(|k| k.len() > 256) {
            return Err(protocol("event kind pattern longer than 256 bytes"));
        }
        let limit = list_limit(r.limit);
        let events = self
            .engine
            .events(r.kind.as_deref(), Some(limit))
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::EventsResponse {
            events: events.iter().map(convert::event).collect(),
        }))
    }

    type UploadStream = ResponseStream<pb::UploadResponse>;

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadRequest>>,
    ) -> Result<Response<Self::UploadStream>, Status> {
        let principal = principal(&request);
        let mut request = request;
        let inbound: Inbound = match crate::wire::undecoded(&mut request) {
            Some(decoded) => Box::pin(decoded),
            None => Box::pin(request.into_inner()),
        };
        let (tx, rx) = mpsc::channel(OFFER_WINDOW + 1);
        let engine = Arc::clone(&self.engine);
        let metrics = Arc::clone(&self.metrics);
        tokio::spawn(async move {
            let _timer = metrics.timer("upload");
            let session = upload_session(&engine, &metrics, &principal, inbound, &tx);
            let result = match tokio::time::timeout(CALL_TIMEOUT, session).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "the upload took longer than {CALL_TIMEOUT:?}; nothing was stored"
                ))),
            };
            if let Err(status) = result {
                metrics.upload_failures.fetch_add(1, Relaxed);
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type DownloadStream = ResponseStream<pb::DownloadResponse>;

    async fn download(
        &self,
        request: Request<pb::Selector>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let header = self.header(request.into_inner()).await?;
        let ids = header
            .chunks
            .iter()
            .map(|c| convert::chunk_id(&c.id))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| Status::internal(e.to_string()))?;
        let name = header
            .artifact
            .as_ref()
            .map_or_else(String::new, |a| a.name.clone());
        let first = futures::stream::once(async move {
            Ok(pb::DownloadResponse {
                step: Some(pb::download_response::Step::Header(header)),
            })
        });
        let timer = self.metrics.timer("download");
        let frames = frame_stream(self.engine.cas().clone(), &self.metrics, ids, name, timer).map(
            |frames| {
                frames.map(|frames| pb::DownloadResponse {
                    step: Some(pb::download_response::Step::Frames(frames)),
                })
            },
        );
        Ok(crate::wire::unencoded(first.chain(frames)))
    }

    async fn confirm_download(
        &self,
        request: Request<pb::Selector>,
    ) -> Result<Response<pb::ConfirmDownloadResponse>, Status> {
        let principal = principal(&request);
        let selector = request.into_inner();
        if selector.stack.is_none() || selector.task.is_none() || selector.version.is_none() {
            return Err(protocol(
                "a download confirmation names stack, task and version",
            ));
        }
        let record = self.resolve(selector)?;
        self.engine
            .count_download(&record, &principal)
            .await
            .map_err(|e| status(&e))?;
        self.metrics.downloads.fetch_add(1, Relaxed);
        self.metrics
            .downloaded_bytes
            .fetch_add(record.size, Relaxed);
        Ok(Response::new(pb::ConfirmDownloadResponse {}))
    }

    async fn describe(
        &self,
        request: Request<pb::Selector>,
    ) -> Result<Response<pb::DownloadHeader>, Status> {
        Ok(Response::new(self.header(request.into_inner()).await?))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let principal = principal(&request);
        let r = request.into_inner();
        if let Some(stack) = &r.stack {
            sloth_engine::Name::parse("stack", stack).map_err(|e| status(&e))?;
        }
        let report = self
            .engine
            .verify(r.stack.as_deref(), r.repair, &principal)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(convert::verify_report(&report)))
    }

    async fn cleanup(
        &self,
        request: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupResponse>, Status> {
        let principal = principal(&request);
        let r = request.into_inner();
        let policy = match r.policy {
            Some(pb::cleanup_request::Policy::Builtin(name)) => {
                let bytes = sloth_policies::builtin(&name).ok_or_else(|| {
                    protocol(format!(
                        "no built-in policy '{name}' (built-ins: {})",
                        sloth_policies::builtin_names()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                self.policies.load(bytes, &name)
            }
            Some(pb::cleanup_request::Policy::Module(bytes)) => {
                if bytes.len() > 16 << 20 {
                    return Err(protocol("a policy module larger than 16 MiB"));
                }
                self.policies.load(&bytes, "uploaded module")
            }
            None => return Err(protocol("a cleanup names a policy")),
        }
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = policy.metadata.name.clone();
        let report = self
            .engine
            .cleanup(
                &self.policies,
                sloth_engine::CleanupRequest {
                    policy,
                    params: r.params.into_iter().collect(),
                    stack: optional_name("stack", r.stack)?,
                    now: now_secs(),
                    dry_run: r.dry_run,
                    max_share: None,
                },
                &principal,
            )
            .await
            .map_err(|e| match e {
                sloth_engine::Error::Policy(p) => Status::failed_precondition(p.to_string()),
                other => status(&other),
            })?;
        self.metrics
            .deletes
            .fetch_add(report.deleted as u64, Relaxed);
        Ok(Response::new(pb::CleanupResponse {
            policy: name,
            evaluated: report.evaluated as u64,
            doomed: report
                .doomed
                .iter()
                .map(|d| pb::Doomed {
                    artifact: Some(convert::artifact(&d.record, None)),
                    reason: d.reason.clone(),
                })
                .collect(),
            deleted: report.deleted as u64,
            logical_bytes: report.logical_bytes,
            freed_bytes: report.freed_bytes,
        }))
    }

    type GetChunksStream = ResponseStream<pb::Frames>;

    async fn get_chunks(
        &self,
        request: Request<pb::GetChunksRequest>,
    ) -> Result<Response<Self::GetChunksStream>, Status> {
        let ids = request.into_inner().ids;
        if ids.len() > MAX_BATCH {
            return Err(protocol(format!(
                "{} chunk ids asked for at once; at most {MAX_BATCH}",
                ids.len()
            )));
        }
        let ids = ids
            .iter()
            .map(|id| convert::chunk_id(id))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| protocol(e.to_string()))?;
        Ok(crate::wire::unencoded(frame_stream(
            self.engine.cas().clone(),
            &self.metrics,
            ids,
            String::new(),
            self.metrics.timer("get_chunks"),
        )))
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The stored frames of `ids`, in order, packed into messages of about [`FRAMES_BYTES`].
/// `timer` runs until the last message is handed over.
fn frame_stream(
    cas: sloth_cas::Cas,
    metrics: &Arc<Metrics>,
    ids: Vec<sloth_cas::ChunkId>,
    artifact: String,
    timer: crate::metrics::Timer,
) -> impl Stream<Item = Result<pb::Frames, Status>> + Send + 'static {
    let metrics = Arc::clone(metrics);
    let fetched = futures::stream::iter(ids).map(move |id| {
        let cas = cas.clone();
        let artifact = artifact.clone();
        async move {
            match cas.chunk_store().get(id).await {
                Ok(Some(data)) => Ok(pb::Frame {
                    id: id.as_bytes().to_vec().into(),
                    data,
                    header: bytes::Bytes::new(),
                }),
                Ok(None) if artifact.is_empty() => Err(Status::not_found(format!(
                    "chunk {id} is not stored on this agent"
                ))),
                Ok(None) => Err(Status::data_loss(format!(
                    "chunk {id} of artifact '{artifact}' is missing from the agent's store"
                ))),
                Err(e) => Err(cas_status(&e, chain(&e))),
            }
        }
    });
    let mut pending = pb::Frames::default();
    let mut pending_bytes = 0usize;
    let mut done = false;
    let mut fetched = Box::pin(fetched.buffered(16));
    async_stream(move |tx| async move {
        let _timer = timer;
        while !done {
            match fetched.next().await {
                Some(Ok(frame)) => {
                    pending_bytes += frame.data.len();
                    pending.frames.push(frame);
                    if pending_bytes < FRAMES_BYTES {
                        continue;
                    }
                }
                Some(Err(status)) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                None => done = true,
            }
            if !pending.frames.is_empty() {
                metrics
                    .frame_bytes_sent
                    .fetch_add(pending_bytes as u64, Relaxed);
                pending_bytes = 0;
                if tx.send(Ok(std::mem::take(&mut pending))).await.is_err() {
                    return; // the client went away
                }
            }
        }
    })
}

/// A stream fed by a task through a small channel, which gives backpressure and stops the
/// task when the receiver is dropped.
fn async_stream<T, F, Fut>(f: F) -> impl Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(f(tx));
    ReceiverStream::new(rx)
}

/// One upload conversation (see `UploadRequest` in `artifacts.proto`).
async fn upload_session(
    engine: &Engine,
    metrics: &Metrics,
    principal: &str,
    mut inbound: Inbound,
    tx: &mpsc::Sender<Result<pb::UploadResponse, Status>>,
) -> Result<(), Status> {
    use pb::upload_request::Step;
    let mut next = async || -> Result<Option<Step>, Status> {
        match tokio::time::timeout(IDLE_TIMEOUT, inbound.next()).await {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the upload sent nothing for {IDLE_TIMEOUT:?}; nothing was stored"
            ))),
            Ok(Some(Err(status))) => Err(status),
            Ok(None) => Ok(None),
            Ok(Some(Ok(message))) => message
                .step
                .map(Some)
                .ok_or_else(|| protocol("an upload message with no step")),
        }
    };
    let Some(Step::Begin(begin)) = next().await? else {
        return Err(protocol("an upload must start with Begin"));
    };
    let key = ArtifactKey::new(&begin.name, begin.stack.as_deref(), begin.task.as_deref())
        .map_err(|e| status(&e))?;
    let ready = pb::UploadResponse {
        step: Some(pb::upload_response::Step::Ready(pb::Ready {
            avg_chunk: engine.cas().params().avg(),
            zstd_level: engine.cas().zstd_level(),
            split_frames: true,
        })),
    };
    if tx.send(Ok(ready)).await.is_err() {
        return Ok(());
    }
    let mut receiving = engine.receive().map_err(|e| status(&e))?;
    loop {
        match next().await? {
            None => {
                return Err(Status::cancelled(
                    "the upload ended before its commit; nothing was stored",
                ));
            }
            Some(Step::Begin(_)) => return Err(protocol("Begin sent twice in one upload")),
            Some(Step::Offer(offer)) => {
                if offer.chunks.len() > MAX_BATCH {
                    return Err(protocol(format!(
                        "an offer of {} chunks; at most {MAX_BATCH}",
                        offer.chunks.len()
                    )));
                }
                let refs = offer
                    .chunks
                    .iter()
                    .map(convert::chunk_ref_from)
                    .collect::<Result<Vec<_>>>()
                    .map_err(|e| protocol(e.to_string()))?;
                let missing = receiving.offer(&refs).await.map_err(|e| status(&e))?;
                let answer = pb::UploadResponse {
                    step: Some(pb::upload_response::Step::Missing(pb::Missing {
                        indexes: missing,
                    })),
                };
                if tx.send(Ok(answer)).await.is_err() {
                    return Ok(()); // the client went away
                }
            }
            Some(Step::Frames(frames)) => {
                let frames = frames
                    .frames
                    .into_iter()
                    .map(convert::frame)
                    .collect::<Result<Vec<_>>>()
                    .map_err(|e| protocol(e.to_string()))?;
                metrics
                    .chunks_received
                    .fetch_add(frames.len() as u64, Relaxed);
                metrics.frame_bytes_received.fetch_add(
                    frames.iter().map(|(_, f)| f.stored_len() as u64).sum(),
                    Relaxed,
                );
                receiving.put(frames).await.map_err(|e| status(&e))?;
            }
            Some(Step::Commit(commit)) => {
                let claim = convert::claim(&commit.sha256, &commit.blake3)
                    .map_err(|e| protocol(e.to_string()))?;
                let record = engine
                    .commit_received(&key, receiving, commit.length, claim, principal)
                    .await
                    .map_err(|e| status(&e))?;
                metrics.uploads.fetch_add(1, Relaxed);
                metrics.uploaded_bytes.fetch_add(record.size, Relaxed);
                let path = engine.layout_path(&record).map(|p| p.display().to_string());
                let answer = pb::UploadResponse {
                    step: Some(pb::upload_response::Step::Committed(pb::Committed {
                        artifact: Some(convert::artifact(&record, path)),
                    })),
                };
                let _ = tx.send(Ok(answer)).await;
                return Ok(());
            }
        }
    }
}
