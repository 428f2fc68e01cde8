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
use crate::renewal::{RenewalView, StateName};

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
    /// Per gateway: the reverse connection and what it publishes.
    #[serde(default)]
    pub publications: Vec<crate::publish::PublishView>,
    /// Callback listeners held at gateways for programs here.
    #[serde(default)]
    pub callbacks: Vec<crate::callbacks::CallbackView>,
}

/// One gateway: where it is, this agent's certificate for it, its connections.
#[derive(Serialize, Deserialize)]
pub struct GatewayView {
    pub name: String,
    pub addresses: Vec<String>,
    pub connections: Vec<SlotView>,
    pub certificate: CertificateView,
    pub renewal: RenewalView,
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
                certificate: pool.certificate().view(),
                renewal: agent
                    .renewals
                    .iter()
                    .find(|r| r.gateway() == pool.peer.name)
                    .map_or_else(RenewalView::not_renewed, |r| r.view()),
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
        publications: agent.publishers.iter().map(|p| p.view()).collect(),
        callbacks: agent.callbacks.views(),
    }
}

pub fn json(agent: &Agent) -> String {
    serde_json::to_string(&view(agent)).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// `tunnel-agent services` as text.
pub fn render_services(reply: &str) -> Result<String> {
    let all: Vec<crate::discovery::GatewayReach> = serde_json::from_str(reply)
        .context("the agent's services answer is not what this version reads")?;
    let mut out = String::new();
    for g in &all {
        let Some(reach) = &g.reach else {
            let _ = writeln!(
                out,
                "gateway {}: not asked: {}",
                g.gateway,
                g.error.as_deref().unwrap_or("no answer")
            );
            continue;
        };
        let _ = writeln!(out, "gateway {} (as {}):", g.gateway, reach.identity);
        if reach.services.is_empty() && reach.publications.is_empty() && reach.callbacks.is_none() {
            let _ = writeln!(
                out,
                "  nothing by name (destinations by address or host name may still be allowed: tunnel-run --explain DEST)"
            );
        }
        for s in &reach.services {
            let _ = writeln!(out, "  service     {:<20} -> {}", s.name, s.target);
        }
        if let Some(c) = &reach.callbacks {
            let _ = writeln!(
                out,
                "  callbacks   ports {} at {} (listeners your programs open on them live at the gateway)",
                c.ports, c.address
            );
        }
        for p in &reach.publications {
            let _ = writeln!(
                out,
                "  publication {:<20} {}",
                p.name,
                if p.published {
                    "published now"
                } else {
                    "no agent publishes it now"
                }
            );
        }
    }
    Ok(out)
}

/// Each gateway connection with its round-trip time, for `status --watch`.
pub fn links(status: &serde_json::Value) -> Vec<(String, Option<f64>)> {
    let mut out = Vec::new();
    for g in status["gateways"].as_array().into_iter().flatten() {
        for c in g["connections"].as_array().into_iter().flatten() {
            out.push((
                format!(
                    "{} {} {}",
                    g["name"].as_str().unwrap_or("?"),
                    c["address"].as_str().unwrap_or("?"),
                    c["state"].as_str().unwrap_or("?")
                ),
                c["rtt_ms"].as_f64(),
            ));
        }
    }
    out
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
        if let Some(line) = renewal_line(&g.renewal) {
            let _ = writeln!(out, "  {line}");
        }
        if let Some(line) = lapse_warning(cert) {
            let _ = writeln!(out, "  {line}");
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
    for p in &status.publications {
        let _ = writeln!(
            out,
            "\npublished at {}: {} ({})",
            p.gateway,
            if p.published.is_empty() {
                "nothing".to_string()
            } else {
                p.published.join(", ")
            },
            match &p.error {
                Some(error) => format!("reverse connection {}: {error}", p.state),
                None => format!("reverse connection {}", p.state),
            }
        );
        for (name, why) in &p.refused {
            let _ = writeln!(out, "  REFUSED {name}: {why}");
        }
        if let Some(callbacks) = &p.callbacks {
            let _ = writeln!(out, "  callbacks at {callbacks}");
        }
        if let Some(why) = &p.callbacks_refused {
            let _ = writeln!(out, "  callbacks REFUSED: {why}");
        }
    }
    if !status.callbacks.is_empty() {
        let _ = writeln!(out, "\ncallback listeners: {}", status.callbacks.len());
        for c in &status.callbacks {
            let _ = writeln!(
                out,
                "  {:<22} via {} for uid {} -> {} ({} streams, {} accepted)",
                c.public,
                c.gateway,
                c.uid,
                c.program.as_deref().unwrap_or("(not bound yet)"),
                c.streams,
                c.accepted
            );
        }
    }
    out.push_str(&tunnel_transport::streams::render(
        &status.streams,
        &status.recent,
    ));
    Ok(out)
}

/// The renewal state in a line of text.
fn renewal_line(renewal: &RenewalView) -> Option<String> {
    let next = renewal
        .next_at
        .as_deref()
        .map_or_else(|| "?".to_string(), in_words);
    let error = renewal
        .last_error
        .as_deref()
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default();
    let clock = renewal
        .clock_offset_secs
        .and_then(crate::exchange::describe_offset)
        .map(|words| format!("; {words}"))
        .unwrap_or_default();
    Some(match renewal.state {
        StateName::NotRenewed => return None,
        StateName::Scheduled => format!("renewal scheduled at {next}{clock}"),
        StateName::Retrying => format!("renewal RETRYING, next attempt at {next}{error}{clock}"),
        StateName::Expired => format!(
            "renewal: the credential EXPIRED; trying to recover it, next attempt at {next}{error}{clock}"
        ),
    })
}

/// An RFC 3339 time from the JSON as the rest of the text writes times:
/// `2026-01-04 00:00:00 UTC`.
fn in_words(at: &str) -> String {
    match at.strip_suffix('Z') {
        Some(at) => format!("{} UTC", at.replacen('T', " ", 1)),
        None => at.to_string(),
    }
}

/// A warning when less than a tenth of the certificate's life is left.
fn lapse_warning(cert: &CertificateView) -> Option<String> {
    let lapsing = cert.lifetime_secs > 0
        && cert.remaining_secs > 0
        && cert.remaining_secs.saturating_mul(10) < cert.lifetime_secs;
    lapsing.then(|| {
        format!(
            "WARNING: the certificate lapses in {} (at {}), with less than 10 % of its life left",
            tunnel_proto::duration::format(std::time::Duration::from_secs(
                cert.remaining_secs.unsigned_abs()
            )),
            in_words(&cert.not_after)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(lifetime_secs: i64, remaining_secs: i64) -> CertificateView {
        CertificateView {
            file: "credential.pem".into(),
            identity: Some("alice".into()),
            valid_from: "2026-01-03 12:00:00 UTC".into(),
            valid_until: "2026-01-04 12:00:00 UTC".into(),
            problem: None,
            serial: "0a1b".into(),
            not_before: "2026-01-03T12:00:00Z".into(),
            not_after: "2026-01-04T12:00:00Z".into(),
            lifetime_secs,
            remaining_secs,
        }
    }

    #[test]
    fn a_certificate_about_to_lapse_is_warned_of() {
        assert_eq!(lapse_warning(&certificate(86_400, 43_200)), None);
        assert_eq!(
            lapse_warning(&certificate(86_400, 3_600)).as_deref(),
            Some(
                "WARNING: the certificate lapses in 1h (at 2026-01-04 12:00:00 UTC), with less than 10 % of its life left"
            )
        );
        assert_eq!(lapse_warning(&certificate(86_400, -5)), None);
    }

    #[test]
    fn renewal_states_read_as_words() {
        let view = |state, error: Option<&str>| RenewalView {
            state,
            next_at: Some("2026-01-04T00:00:00Z".into()),
            last_error: error.map(str::to_string),
            clock_offset_secs: Some(0.2),
        };
        assert_eq!(renewal_line(&RenewalView::not_renewed()), None);
        assert_eq!(
            renewal_line(&view(StateName::Scheduled, None)).as_deref(),
            Some("renewal scheduled at 2026-01-04 00:00:00 UTC")
        );
        assert_eq!(
            renewal_line(&view(StateName::Retrying, Some("no connection"))).as_deref(),
            Some(
                "renewal RETRYING, next attempt at 2026-01-04 00:00:00 UTC (last error: no connection)"
            )
        );
        let json = serde_json::to_value(view(StateName::NotRenewed, None)).unwrap();
        assert_eq!(json["state"], "not-renewed");
    }
}
