//! The gateway's metrics page (`metrics = "ADDRESS:PORT"` in gateway.toml; see
//! `tunnel_transport::metrics`): streams by identity and destination class, bytes each
//! way, how streams ended, refusals by kind (denials and their reasons' classes,
//! handshakes that failed), agent connections, round trips, the seconds left on the
//! agents' certificates, and what inside-out holds.

use tunnel_transport::metrics::Exposition;

use crate::server::Gateway;

pub fn render(gateway: &Gateway) -> String {
    let mut page = Exposition::default();
    page.streams("tunnel_gateway", "identity", &gateway.streams.totals());

    let name = "tunnel_gateway_refusals_total";
    page.family(
        name,
        "counter",
        "Refusals since start, by kind: handshakes that failed or timed out, streams denied or over a limit, and why in class.",
    );
    for (kind, n) in gateway.refusals.totals() {
        page.sample(name, &[("kind", &kind)], n as f64);
    }

    page.single(
        "tunnel_gateway_connections_accepted_total",
        "counter",
        "Agent connections that completed their TLS handshake and were taken.",
        gateway.connections_accepted() as f64,
    );
    page.single(
        "tunnel_gateway_handshakes_waiting",
        "gauge",
        "Connections waiting for their TLS handshake.",
        gateway.admission.handshakes_waiting() as f64,
    );

    let (count, rtts, soonest) = {
        let connections = gateway
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rtts: Vec<f64> = connections
            .values()
            .filter_map(|c| c.health.rtt())
            .map(|d| d.as_secs_f64())
            .collect();
        let soonest = connections
            .values()
            .map(|c| {
                c.current
                    .borrow()
                    .as_ref()
                    .map_or(c.deadline, |current| current.not_after)
            })
            .min();
        (connections.len(), rtts, soonest)
    };
    page.single(
        "tunnel_gateway_agent_connections",
        "gauge",
        "Agent connections open now (reverse ones included).",
        count as f64,
    );

    let name = "tunnel_gateway_connection_rtt_seconds";
    page.family(
        name,
        "gauge",
        "Round trip of the agent connections (HTTP/2 PING), their mean.",
    );
    if !rtts.is_empty() {
        page.sample(name, &[], rtts.iter().sum::<f64>() / rtts.len() as f64);
    }

    let name = "tunnel_gateway_agent_certificate_expiry_seconds";
    page.family(
        name,
        "gauge",
        "Seconds until the soonest agent connection must end unless its certificate is renewed.",
    );
    if let Some(deadline) = soonest {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        page.sample(name, &[], (deadline - now) as f64);
    }

    let published = gateway
        .publishers
        .views()
        .iter()
        .filter(|p| !p.publishers.is_empty())
        .count();
    page.single(
        "tunnel_gateway_publications",
        "gauge",
        "Names published by at least one agent now.",
        published as f64,
    );

    page.single(
        "tunnel_gateway_callback_listeners",
        "gauge",
        "Callback listeners open for agents' programs now.",
        gateway
            .callbacks
            .views(gateway.config.callbacks.as_ref())
            .len() as f64,
    );
    page.finish()
}
