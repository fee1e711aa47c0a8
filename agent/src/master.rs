//! The master: a registry of agents, kept in memory, filled by their heartbeats.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use sloth_proto::registry::{self as reg, registry_server};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::auth::{AuthLayer, Tokens};
use crate::error::chain;
use crate::server::{Bound, builder, check_exposure};
use crate::tls::ServerTls;
use crate::{Error, Result};

/// How a master serves.
#[derive(Debug, Clone, Default)]
pub struct MasterConfig {
    /// TLS, when given.
    pub tls: Option<ServerTls>,
    /// Bearer tokens, when given (agents need `write` to register, the CLI `read`).
    pub tokens: Option<Tokens>,
    /// Listen beyond loopback without TLS or tokens.
    pub insecure: bool,
}

/// Serves the registry on `bound` until `shutdown` completes.
pub async fn serve(
    config: MasterConfig,
    bound: Bound,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let addr = bound.local_addr();
    check_exposure(
        addr,
        config.tls.is_some(),
        config.tokens.is_some(),
        config.insecure,
    )?;
    let registry = registry_server::RegistryServer::new(Registry::default());
    builder(config.tls.as_ref())?
        .layer(AuthLayer::new(config.tokens))
        .add_service(registry)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(bound.into_listener())
                .map(|conn| conn.and_then(crate::server::no_delay)),
            shutdown,
        )
        .await
        .map_err(|e| Error::Remote(format!("master failed: {}", chain(&e))))
}

#[derive(Debug, Default)]
struct Registry {
    agents: Arc<Mutex<BTreeMap<String, reg::AgentRecord>>>,
    intervals: Arc<Mutex<BTreeMap<String, u32>>>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Registry {
    fn with_status(&self, mut record: reg::AgentRecord) -> reg::AgentRecord {
        let interval = self
            .intervals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&record.name)
            .copied()
            .unwrap_or(5);
        let missed = now() - record.last_heartbeat > 3 * i64::from(interval);
        record.status = if missed { "inactive" } else { "active" }.into();
        record
    }
}

#[tonic::async_trait]
impl registry_server::Registry for Registry {
    async fn heartbeat(
        &self,
        request: Request<reg::HeartbeatRequest>,
    ) -> Result<Response<reg::HeartbeatResponse>, Status> {
        let beat = request.into_inner();
        sloth_engine::Name::parse("agent name", &beat.name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if beat.address.rsplit_once(':').is_none() || beat.address.len() > 300 {
            return Err(Status::invalid_argument(format!(
                "agent address '{}' is not host:port",
                beat.address
            )));
        }
        let now = now();
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        let registered_at = agents
            .get(&beat.name)
            .map_or(now, |existing| existing.registered_at);
        if !agents.contains_key(&beat.name) {
            tracing::info!("agent '{}' registered at {}", beat.name, beat.address);
        }
        self.intervals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(beat.name.clone(), beat.interval_secs.clamp(1, 3600));
        agents.insert(
            beat.name.clone(),
            reg::AgentRecord {
                name: beat.name,
                address: beat.address,
                version: beat.version,
                tls: beat.tls,
                figures: beat.figures,
                registered_at,
                last_heartbeat: now,
                status: String::new(),
            },
        );
        Ok(Response::new(reg::HeartbeatResponse {}))
    }

    async fn list_agents(
        &self,
        _: Request<reg::ListAgentsRequest>,
    ) -> Result<Response<reg::ListAgentsResponse>, Status> {
        let agents: Vec<_> = self
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        Ok(Response::new(reg::ListAgentsResponse {
            agents: agents.into_iter().map(|a| self.with_status(a)).collect(),
        }))
    }

    async fn get_agent(
        &self,
        request: Request<reg::GetAgentRequest>,
    ) -> Result<Response<reg::AgentRecord>, Status> {
        let name = request.into_inner().name;
        let found = self
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .cloned();
        match found {
            Some(record) => Ok(Response::new(self.with_status(record))),
            None => Err(Status::not_found(format!(
                "agent '{name}' is not registered"
            ))),
        }
    }
}
