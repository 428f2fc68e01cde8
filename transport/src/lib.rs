//! What the agent and the gateway share, so that it exists once.
//!
//! # Layout
//!
//! ```text
//!  program ─TCP─▶ agent ══ TLS 1.3 (tls) + HTTP/2 CONNECT ══▶ gateway ─TCP─▶ destination
//!                   │  splice: TCP ⇄ h2 stream, FIN ⇄ END_STREAM, reset ⇄ RST_STREAM
//!                   │  liveness: PING for dead-peer detection and window tuning
//!                   └─ streams: what status shows; control: the status socket
//! ```
//!
//! - [`tls`]: rustls set-up for both ends, identity from the client certificate.
//! - [`atomic_file`]: files replaced whole or not at all (credentials, state).
//! - [`certs`]: what a certificate says about itself (names, dates), for both ends.
//! - [`splice`]: one carried connection, both directions, faithful ends.
//! - [`messages`]: CONNECT answers and small JSON bodies, both ways.
//! - [`liveness`]: PING, RTT, and receive windows that follow bandwidth × delay.
//! - [`streams`]: live and recently ended connections, for `status`.
//! - [`control`]: the Unix socket that answers `status`.
//! - [`metrics`]: `GET /metrics` for Prometheus, for both daemons.
//! - [`watch`]: `status --watch`, redrawn once a second with rates.
//! - [`plumbing`]: one shutdown handle and one accept loop for every listener.
//! - [`counted`]: one drop guard for "how many now" counters.
//! - [`daemon`]: logging, the runtime, and telling systemd the daemon is ready.
#![forbid(unsafe_code)]

pub mod atomic_file;
pub mod certs;
pub mod control;
pub mod counted;
pub mod daemon;
pub mod liveness;
pub mod messages;
pub mod metrics;
pub mod plumbing;
pub mod splice;
pub mod streams;
pub mod tls;
pub mod watch;

/// Sets TCP_NODELAY: carried protocols are often request/response, and the tunnel
/// batches on its own. Socket buffer sizes are left to the kernel's autotuning.
pub fn tune_tcp(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
}

/// Sets up a carried connection's TCP socket (the program's on the agent, the
/// destination's on the gateway): TCP_NODELAY, and `SO_LINGER` 0, so that if this
/// process ends before the connection ended cleanly (a crash, SIGKILL, running out of
/// memory) the kernel resets it instead of closing it with a FIN that would pass for
/// the end of the data. [`splice`] disarms the linger once the direction towards this
/// socket has ended cleanly.
pub fn tune_carried_tcp(tcp: &tokio::net::TcpStream) {
    tune_tcp(tcp);
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}
