//! What `tunnel-agent status` shows: gateways and their connections, forward ports,
//! live streams and how recent ones ended. One typed view, [`AgentStatus`], is both the
//! JSON the agent answers and what the text is rendered from.

use std::fmt::Write;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tunnel_transport::streams::{Ended, LiveView};

use crate::Agent;
use crate::certificate::CertificateView;
use crate::fake_dns::FakeDnsView;
use crate::forward::ForwardView;
use crate::pool::SlotView;

/// The agent's status, as `status --json` prints it.
#[derive(Serialize, Deserialize)]
pub struct AgentStatus {
    pub local_protocol: u32,
    pub uptime_secs: f64,
    pub gateways: Vec<GatewayView>,
    pub forwards: Vec<ForwardView>,
    pub synthetic_names: FakeDnsView,
    pub registrations_pending: usize,
    pub loopback_listeners: Vec<String>,
    pub streams: Vec<LiveView>,
    pub recent: Vec<Ended>,
}

/// One gateway: where it is, this agent's certificate for it, its connections.
#[derive(Serialize, Deserialize)]
pub struct GatewayView {
    pub name: String,
    pub addresses: Vec<String>,
    pub connections: Vec<SlotView>,
    pub certificate: CertificateView,
}

pub fn view(agent: &Agent) -> AgentStatus {
    AgentStatus {
        local_protocol: tunnel_proto::local::VERSION,
        uptime_secs: agent.started.elapsed().as_secs_f64(),
        gateways: agent
            .pools
            .iter()
            .map(|pool| GatewayView {
                name: pool.peer.name.clone(),
                addresses: pool
                    .peer
                    .addresses
                    .iter()
                    .map(|a| a.address.clone())
                    .collect(),
                connections: pool.views(),
                certificate: pool.certificate.view(),
            })
            .collect(),
        forwards: agent.forwards.clone(),
        synthetic_names: agent.fake_dns.view(),
        registrations_pending: agent.registrations.len(),
        loopback_listeners: [Some(agent.listener_addresses.0), agent.listener_addresses.1]
            .into_iter()
            .flatten()
            .map(|a| a.to_string())
            .collect(),
        streams: agent.streams.live(),
        recent: agent.streams.recent(),
    }
}

pub fn json(agent: &Agent) -> String {
    serde_json::to_string(&view(agent)).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

pub fn render(reply: &str) -> Result<String> {
    let status: AgentStatus = serde_json::from_str(reply)
        .context("the agent's status answer is not what this version reads")?;
    let mut out = String::new();
    let _ = writeln!(out, "agent up {:.0}s", status.uptime_secs);
    for g in &status.gateways {
        let _ = writeln!(out, "\ngateway {} at {}", g.name, g.addresses.join(", "));
        let cert = &g.certificate;
        match &cert.problem {
            Some(problem) => {
                let _ = writeln!(out, "  certificate PROBLEM: {problem}");
            }
            None => {
                let _ = writeln!(
                    out,
                    "  certificate {} ({}) valid until {}",
                    cert.file,
                    cert.identity.as_deref().unwrap_or("?"),
                    cert.valid_until
                );
            }
        }
        for (i, c) in g.connections.iter().enumerate() {
            let state = serde_json::to_value(c.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  connection {i}: {:<22} {:<10} for {:.0}s  rtt {}  streams {}{}",
                c.address,
                state,
                c.state_secs,
                c.rtt_ms.map_or("-".into(), |ms| format!("{ms:.2}ms")),
                c.streams,
                match (&c.error, c.retry_in_secs) {
                    (Some(e), Some(retry)) => format!("  (retry in {retry:.0}s; {e})"),
                    (Some(e), None) => format!("  (after: {e})"),
                    (None, _) => String::new(),
                }
            );
        }
    }
    if let Some(problem) = &status.synthetic_names.problem {
        let _ = writeln!(
            out,
            "\nsynthetic names PROBLEM: {problem} ({} names refused)",
            status.synthetic_names.refused
        );
    }
    if !status.forwards.is_empty() {
        let _ = writeln!(out, "\nforward ports:");
        for f in &status.forwards {
            let _ = writeln!(out, "  {} -> {} via {}", f.listen, f.to, f.via);
        }
    }
    out.push_str(&tunnel_transport::streams::render(
        &status.streams,
        &status.recent,
    ));
    Ok(out)
}
