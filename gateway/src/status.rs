//! What `tunnel-gateway status` shows. One typed view, [`GatewayStatus`], is both the
//! JSON the gateway answers and what the text is rendered from.

use std::collections::BTreeMap;
use std::fmt::Write;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tunnel_transport::streams::{Ended, LiveView};

use crate::server::{ConnectionView, Gateway};

/// The gateway's status, as `status --json` prints it.
#[derive(Serialize, Deserialize)]
pub struct GatewayStatus {
    pub listen: String,
    pub uptime_secs: f64,
    pub connections: Vec<ConnectionView>,
    pub handshakes: Handshakes,
    pub limits: Limits,
    /// Refusals since start, by kind.
    pub refusals: BTreeMap<String, u64>,
    pub streams: Vec<LiveView>,
    pub recent: Vec<Ended>,
    /// Names agents publish here now, with their publishers.
    #[serde(default)]
    pub publications: Vec<crate::publications::PublicationView>,
    /// Callback listeners open here for agents' programs.
    #[serde(default)]
    pub callbacks: Vec<crate::callbacks::CallbackView>,
}

/// Connections waiting for their TLS handshake, and the caps.
#[derive(Serialize, Deserialize)]
pub struct Handshakes {
    pub waiting: usize,
    pub max: u32,
    pub max_per_source: u32,
}

/// What one identity may hold at once.
#[derive(Serialize, Deserialize)]
pub struct Limits {
    pub max_connections_per_identity: u32,
    pub max_streams_per_identity: u32,
}

pub fn view(gateway: &Gateway) -> GatewayStatus {
    let config = &gateway.config;
    GatewayStatus {
        listen: gateway.local_addr.to_string(),
        uptime_secs: gateway.started.elapsed().as_secs_f64(),
        connections: gateway.connection_views(),
        handshakes: Handshakes {
            waiting: gateway.admission.handshakes_waiting(),
            max: config.max_handshakes,
            max_per_source: config.max_handshakes_per_source,
        },
        limits: Limits {
            max_connections_per_identity: config.max_connections_per_identity,
            max_streams_per_identity: config.max_streams_per_identity,
        },
        refusals: gateway.refusals.totals(),
        streams: gateway.streams.live(),
        recent: gateway.streams.recent(),
        publications: gateway.publishers.views(),
        callbacks: gateway.callbacks.views(config.callbacks.as_ref()),
    }
}

pub fn json(gateway: &Gateway) -> String {
    serde_json::to_string(&view(gateway)).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Each agent connection with its round-trip time, for `status --watch`.
pub fn links(status: &serde_json::Value) -> Vec<(String, Option<f64>)> {
    status["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                format!(
                    "{} {}",
                    c["identity"].as_str().unwrap_or("?"),
                    c["peer"].as_str().unwrap_or("?")
                ),
                c["rtt_ms"].as_f64(),
            )
        })
        .collect()
}

pub fn render(reply: &str) -> Result<String> {
    let status: GatewayStatus = serde_json::from_str(reply)
        .context("the gateway's status answer is not what this version reads")?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gateway listening on {}, up {:.0}s",
        status.listen, status.uptime_secs
    );
    let _ = writeln!(out, "\nagent connections: {}", status.connections.len());
    for c in &status.connections {
        let _ = writeln!(
            out,
            "  {:<24} {:<16} rtt {}  age {:.0}s  {}",
            c.peer,
            c.identity,
            c.rtt_ms.map_or("-".into(), |ms| format!("{ms:.2}ms")),
            c.age_secs,
            match &c.serial {
                Some(serial) =>
                    format!("certificate {serial}, closed at {} unless renewed", c.until),
                None => format!("enrolling, closed at {}", c.until),
            }
        );
    }
    if !status.publications.is_empty() {
        let _ = writeln!(out, "\npublications: {}", status.publications.len());
        for p in &status.publications {
            let publishers: Vec<String> = p
                .publishers
                .iter()
                .map(|x| format!("{} from {} ({} streams)", x.identity, x.peer, x.streams))
                .collect();
            let _ = writeln!(out, "  {:<20} {}", p.name, publishers.join("; "));
        }
    }
    if !status.callbacks.is_empty() {
        let _ = writeln!(out, "\ncallback listeners: {}", status.callbacks.len());
        for c in &status.callbacks {
            let _ = writeln!(
                out,
                "  {:<22} {} from {} ({} streams, {} accepted)",
                c.listen, c.identity, c.agent, c.streams, c.accepted
            );
        }
    }
    let h = &status.handshakes;
    let _ = writeln!(
        out,
        "\nTLS handshakes waiting: {} (at most {}, {} per source)",
        h.waiting, h.max, h.max_per_source
    );
    let refusals: Vec<String> = status
        .refusals
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "refused since start: {}",
        if refusals.is_empty() {
            "none".to_string()
        } else {
            refusals.join(", ")
        }
    );
    out.push_str(&tunnel_transport::streams::render(
        &status.streams,
        &status.recent,
    ));
    Ok(out)
}
