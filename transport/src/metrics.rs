//! Prometheus metrics for both daemons (`metrics = "127.0.0.1:9464"` in either config):
//! `GET /metrics` answers with the text exposition format, made at each scrape from
//! the counters the daemon keeps anyway (the stream table's totals, the refusal
//! counts, the connections' state), so nothing is counted twice.
//!
//! Names follow the conventions (`_total` for counters, base units `_seconds` and
//! `_bytes`), and labels are bounded: a gateway or identity, a destination class, an
//! outcome class, a connection state; never a connection or a stream.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::plumbing::{Shutdown, accept_until};
use crate::streams::PeerTotals;

/// The content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metrics page being written.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// Label values escaped as the format wants them.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exposition {
    /// Starts a metric family: its HELP and TYPE lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            let list: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", list.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// The stream families from the stream table's totals, each peer labelled with
    /// `peer_label` (`gateway` on the agent, `identity` on the gateway).
    pub fn streams(
        &mut self,
        prefix: &str,
        peer_label: &str,
        totals: &BTreeMap<String, PeerTotals>,
    ) {
        let opened = format!("{prefix}_streams_opened_total");
        self.family(&opened, "counter", "Streams opened, by destination class.");
        for (peer, t) in totals {
            for (class, n) in &t.opened {
                self.sample(&opened, &[(peer_label, peer), ("class", class)], *n as f64);
            }
        }
        let active = format!("{prefix}_streams_active");
        self.family(&active, "gauge", "Streams open now, by destination class.");
        for (peer, t) in totals {
            for (class, n) in &t.active {
                self.sample(&active, &[(peer_label, peer), ("class", class)], *n as f64);
            }
        }
        let ended = format!("{prefix}_streams_ended_total");
        self.family(
            &ended,
            "counter",
            "Streams ended, by outcome: closed, or the failure class (refused, denied, reset, ...).",
        );
        for (peer, t) in totals {
            for (outcome, n) in &t.outcomes {
                self.sample(
                    &ended,
                    &[(peer_label, peer), ("outcome", outcome)],
                    *n as f64,
                );
            }
        }
        let bytes = format!("{prefix}_stream_bytes_total");
        self.family(
            &bytes,
            "counter",
            "Bytes carried, toward the destination and back from it.",
        );
        for (peer, t) in totals {
            self.sample(
                &bytes,
                &[(peer_label, peer), ("direction", "to_destination")],
                t.bytes_to_destination as f64,
            );
            self.sample(
                &bytes,
                &[(peer_label, peer), ("direction", "from_destination")],
                t.bytes_from_destination as f64,
            );
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// What makes the page, at each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds the metrics address; the error names the config key.
pub async fn bind(address: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address} for metrics (the config's `metrics`)"))
}

/// Serves `GET /metrics` until `shutdown`.
pub async fn serve(listener: TcpListener, render: Render, shutdown: Shutdown) {
    if let Ok(address) = listener.local_addr() {
        info!("metrics on http://{address}/metrics");
    }
    accept_until(
        "metrics",
        shutdown,
        || listener.accept(),
        |(tcp, _)| {
            let render = render.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let render = render.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&request, &render)) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tcp), service);
                if let Err(e) = served.await {
                    debug!("metrics connection: {e}");
                }
            });
        },
    )
    .await;
}

fn answer<B>(request: &Request<B>, render: &Render) -> Response<Full<Bytes>> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, render()),
        (&Method::GET, "/") => (StatusCode::OK, "tunnel metrics: see /metrics\n".to_string()),
        _ => (
            StatusCode::NOT_FOUND,
            "not found: try /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_in_the_text_format_with_escaped_labels() {
        let mut page = Exposition::default();
        page.family("tunnel_x_total", "counter", "Things.");
        page.sample("tunnel_x_total", &[("gateway", "a\"b")], 3.0);
        page.sample("tunnel_x_total", &[], 0.5);
        assert_eq!(
            page.finish(),
            "# HELP tunnel_x_total Things.\n# TYPE tunnel_x_total counter\ntunnel_x_total{gateway=\"a\\\"b\"} 3\ntunnel_x_total 0.5\n"
        );
    }
}
