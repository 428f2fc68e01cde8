//! What `tunnel-agent status` shows: gateways and their connections, forward ports,
//! live streams and how recent ones ended.

use std::fmt::Write;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::Agent;

pub fn json(agent: &Agent) -> Value {
    let gateways: Vec<Value> = agent
        .pools
        .iter()
        .map(|pool| {
            json!({
                "name": pool.peer.name,
                "addresses": pool.peer.addresses.iter().map(|a| a.address.as_str()).collect::<Vec<_>>(),
                "connections": pool.views(),
                "certificate": pool.certificate.view(),
            })
        })
        .collect();
    let loopback_listeners: Vec<String> =
        [Some(agent.listener_addresses.0), agent.listener_addresses.1]
            .into_iter()
            .flatten()
            .map(|a| a.to_string())
            .collect();
    json!({
        "local_protocol": tunnel_proto::local::VERSION,
        "uptime_secs": agent.started.elapsed().as_secs_f64(),
        "gateways": gateways,
        "forwards": agent.forwards,
        "synthetic_names": agent.fake_dns.view(),
        "registrations_pending": agent.registrations.len(),
        "loopback_listeners": loopback_listeners,
        "streams": agent.streams.live(),
        "recent": agent.streams.recent(),
    })
}

pub fn render(reply: &str) -> Result<String> {
    let v: Value = serde_json::from_str(reply).context("the agent's status answer is not JSON")?;
    let empty = Vec::new();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "agent up {:.0}s",
        v["uptime_secs"].as_f64().unwrap_or(0.0)
    );
    for g in v["gateways"].as_array().unwrap_or(&empty) {
        let addresses: Vec<&str> = g["addresses"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        let _ = writeln!(
            out,
            "\ngateway {} at {}",
            g["name"].as_str().unwrap_or("?"),
            addresses.join(", ")
        );
        let cert = &g["certificate"];
        match cert["problem"].as_str() {
            Some(problem) => {
                let _ = writeln!(out, "  certificate PROBLEM: {problem}");
            }
            None => {
                let _ = writeln!(
                    out,
                    "  certificate {} ({}) valid until {}",
                    cert["file"].as_str().unwrap_or("?"),
                    cert["identity"].as_str().unwrap_or("?"),
                    cert["valid_until"].as_str().unwrap_or("?")
                );
            }
        }
        for (i, c) in g["connections"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                out,
                "  connection {i}: {:<22} {:<10} for {:.0}s  rtt {}  streams {}{}",
                c["address"].as_str().unwrap_or("?"),
                c["state"].as_str().unwrap_or("?"),
                c["state_secs"].as_f64().unwrap_or(0.0),
                c["rtt_ms"]
                    .as_f64()
                    .map_or("-".into(), |ms| format!("{ms:.2}ms")),
                c["streams"],
                match (c["error"].as_str(), c["retry_in_secs"].as_f64()) {
                    (Some(e), Some(retry)) => format!("  (retry in {retry:.0}s; {e})"),
                    (Some(e), None) => format!("  (after: {e})"),
                    (None, _) => String::new(),
                }
            );
        }
    }
    if let Some(problem) = v["synthetic_names"]["problem"].as_str() {
        let _ = writeln!(
            out,
            "\nsynthetic names PROBLEM: {problem} ({} names refused)",
            v["synthetic_names"]["refused"]
        );
    }
    let forwards = v["forwards"].as_array().unwrap_or(&empty);
    if !forwards.is_empty() {
        let _ = writeln!(out, "\nforward ports:");
        for f in forwards {
            let _ = writeln!(
                out,
                "  {} -> {} via {}",
                f["listen"].as_str().unwrap_or("?"),
                f["to"].as_str().unwrap_or("?"),
                f["via"].as_str().unwrap_or("?")
            );
        }
    }
    out.push_str(&tunnel_transport::streams::render(&v));
    Ok(out)
}
