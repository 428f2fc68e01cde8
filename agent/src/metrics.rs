//! The agent's metrics page (`metrics = "ADDRESS:PORT"` in agent.toml; see
//! `tunnel_transport::metrics`): streams by gateway and destination class, bytes each
//! way, how streams ended, the pool's connections by state, round trips, dials, and
//! the seconds left on each gateway's certificate.

use std::sync::atomic::Ordering;

use tunnel_transport::metrics::Exposition;

use crate::Agent;
use crate::pool::StateName;

pub fn render(agent: &Agent) -> String {
    let mut page = Exposition::default();
    page.streams("tunnel_agent", "gateway", &agent.streams.totals());

    let name = "tunnel_agent_connections";
    page.family(
        name,
        "gauge",
        "Tunnel connections to each gateway, by state.",
    );
    for pool in &agent.pools {
        let views = pool.views();
        for (state, label) in [
            (StateName::Connecting, "connecting"),
            (StateName::Up, "up"),
            (StateName::Draining, "draining"),
            (StateName::Backoff, "backoff"),
        ] {
            let n = views.iter().filter(|v| v.state == state).count();
            page.sample(
                name,
                &[("gateway", &pool.peer.name), ("state", label)],
                n as f64,
            );
        }
    }

    let name = "tunnel_agent_connection_rtt_seconds";
    page.family(
        name,
        "gauge",
        "Round trip of each gateway's live connections (HTTP/2 PING), their mean.",
    );
    for pool in &agent.pools {
        let rtts: Vec<f64> = pool.views().iter().filter_map(|v| v.rtt_ms).collect();
        if !rtts.is_empty() {
            let mean = rtts.iter().sum::<f64>() / rtts.len() as f64 / 1000.0;
            page.sample(name, &[("gateway", &pool.peer.name)], mean);
        }
    }

    let name = "tunnel_agent_dials_total";
    page.family(
        name,
        "counter",
        "Connections dialled to each gateway, by result.",
    );
    for pool in &agent.pools {
        let made = *pool.connections_made().borrow();
        let failed = pool.failures.load(Ordering::Relaxed);
        page.sample(
            name,
            &[("gateway", &pool.peer.name), ("result", "up")],
            made as f64,
        );
        page.sample(
            name,
            &[("gateway", &pool.peer.name), ("result", "failed")],
            failed as f64,
        );
    }

    let name = "tunnel_agent_certificate_expiry_seconds";
    page.family(
        name,
        "gauge",
        "Seconds until this agent's certificate for each gateway expires (negative: expired).",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for pool in &agent.pools {
        let left = pool.certificate().not_after() - now;
        page.sample(name, &[("gateway", &pool.peer.name)], left as f64);
    }
    page.finish()
}
