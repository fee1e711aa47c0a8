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
        record.status = if self.is_active(&record) {
            "active"
        } else {
            "inactive"
        }
        .into();
        record
    }

    /// Seconds without a heartbeat after which an agent counts as inactive: three of its
    /// intervals.
    fn window(&self, name: &str) -> i64 {
        let interval = self
            .intervals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
            .unwrap_or(5);
        3 * i64::from(interval)
    }

    fn is_active(&self, record: &reg::AgentRecord) -> bool {
        now() - record.last_heartbeat <= self.window(&record.name)
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
        if beat.address.len() > 300 {
            return Err(Status::invalid_argument("an agent address over 300 bytes"));
        }
        crate::client::host_of(&beat.address)
            .map_err(|why| Status::invalid_argument(format!("agent address {why}")))?;
        let now = now();
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        // A name is one agent: another live agent under it would make every command that
        // names it reach either store, depending on the last heartbeat. A name whose agent
        // stopped heartbeating passes to the newcomer (an agent restarted elsewhere).
        if let Some(holder) = agents.get(&beat.name)
            && holder.address != beat.address
            && self.is_active(holder)
        {
            return Err(Status::already_exists(format!(
                "agent name '{}' is taken by the agent at {} (last heartbeat {} s ago); \
                 choose another --name, or stop that agent (the name is free {} s after its \
                 last heartbeat)",
                beat.name,
                holder.address,
                now - holder.last_heartbeat,
                self.window(&beat.name)
            )));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use registry_server::Registry as _;

    fn beat(name: &str, address: &str) -> Request<reg::HeartbeatRequest> {
        Request::new(reg::HeartbeatRequest {
            name: name.into(),
            address: address.into(),
            interval_secs: 1,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_live_agents_name_is_refused_to_another_address() {
        let registry = Registry::default();
        registry.heartbeat(beat("a", "10.0.0.1:1")).await.unwrap();
        let refused = registry
            .heartbeat(beat("a", "10.0.0.2:1"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::AlreadyExists);
        assert!(refused.message().contains("10.0.0.1:1"), "{refused:?}");
        // The holder keeps beating; the registry still points at it.
        registry.heartbeat(beat("a", "10.0.0.1:1")).await.unwrap();
        let record = registry
            .get_agent(Request::new(reg::GetAgentRequest { name: "a".into() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(record.address, "10.0.0.1:1");
        // A holder silent for longer than three intervals gives the name up.
        registry
            .agents
            .lock()
            .unwrap()
            .get_mut("a")
            .unwrap()
            .last_heartbeat -= 4;
        registry.heartbeat(beat("a", "10.0.0.2:1")).await.unwrap();
    }
}
