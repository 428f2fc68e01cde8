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
//! - [`certs`]: the gateway's CA (rcgen).
//! - [`splice`]: one carried connection, both directions, faithful ends.
//! - [`liveness`]: PING, RTT, and receive windows that follow bandwidth × delay.
//! - [`streams`]: live and recently ended connections, for `status`.
//! - [`control`]: the Unix socket that answers `status`.
#![forbid(unsafe_code)]

pub mod certs;
pub mod control;
pub mod daemon;
pub mod liveness;
pub mod splice;
pub mod streams;
pub mod tls;

/// Sets TCP_NODELAY: carried protocols are often request/response, and the tunnel
/// batches on its own. Socket buffer sizes are left to the kernel's autotuning.
pub fn tune_tcp(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
}
