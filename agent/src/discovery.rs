//! `SERVICES` and `EXPLAIN` from the local socket: the agent asks its gateways (see
//! `tunnel_proto::discovery`) and answers with their JSON.

use anyhow::{Result, bail};
use bytes::Bytes;
use serde::Serialize;
use tunnel_proto::Target;
use tunnel_proto::discovery::{Answer, EXPLAIN_PATH, Question, Reach, SERVICES_PATH};

use crate::Agent;
use crate::pool::Pool;

/// One gateway's answer about this agent's reach, or why there is none.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct GatewayReach {
    pub gateway: String,
    pub reach: Option<Reach>,
    pub error: Option<String>,
}

async fn ask<T: serde::de::DeserializeOwned>(pool: &Pool, path: &str, body: Bytes) -> Result<T> {
    let (status, answer) = pool.exchange(path, body).await?;
    if !status.is_success() {
        bail!(
            "the gateway answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    Ok(serde_json::from_slice(&answer)?)
}

/// Every gateway's list of the services and publications this agent may reach.
pub async fn services(agent: &Agent) -> String {
    let mut all = Vec::new();
    for pool in &agent.pools {
        let answer = ask::<Reach>(pool, SERVICES_PATH, Bytes::from_static(b"{}")).await;
        all.push(match answer {
            Ok(reach) => GatewayReach {
                gateway: pool.peer.name.clone(),
                reach: Some(reach),
                error: None,
            },
            Err(e) => GatewayReach {
                gateway: pool.peer.name.clone(),
                reach: None,
                error: Some(format!("{e:#}")),
            },
        });
    }
    serde_json::to_string(&all).unwrap_or_default()
}

/// The gateway `via`'s policy answer for `target` (a synthetic address is asked about
/// by the name behind it).
pub async fn explain(agent: &Agent, via: &str, target: Target) -> String {
    let target = match target {
        Target::Addr {
            host: tunnel_proto::Host::Ip(ip),
            port,
        } if agent.fake_dns.is_synthetic(ip) => match agent.fake_dns.name_of(ip) {
            Some(name) => Target::Addr {
                host: tunnel_proto::Host::Name(name),
                port,
            },
            None => Target::Addr {
                host: tunnel_proto::Host::Ip(ip),
                port,
            },
        },
        other => other,
    };
    let reply = match agent.pool(via) {
        None => Err(anyhow::anyhow!("no gateway `{via}` in agent.toml")),
        Some(pool) => {
            let question = Question {
                target: target.to_string(),
            };
            let body = Bytes::from(serde_json::to_vec(&question).unwrap_or_default());
            ask::<Answer>(pool, EXPLAIN_PATH, body).await
        }
    };
    match reply {
        Ok(answer) => serde_json::to_string(&answer).unwrap_or_default(),
        Err(e) => serde_json::json!({ "error": format!("{e:#}") }).to_string(),
    }
}
