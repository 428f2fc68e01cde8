//! Inside-out: connections that start at the gateway's side travel to an agent over a
//! connection the agent dialled.
//!
//! ```text
//!  agent ──TLS (client certificate), ALPN tunnel-reverse/1──▶ gateway
//!        ◀══ HTTP/2, roles swapped: the gateway is the client ══
//!  gateway: GET /v1/publications            agent: 200 {resume, names}
//!  gateway: CONNECT lab-db                  agent: connects its `to`, answers 200,
//!           tunnel-client: 10.20.1.7:51234         or the failure class (as for any
//!           tunnel-consumer: bob                   CONNECT), then carries the bytes
//! ```
//!
//! HTTP/2 lets only its client open streams, so the agent, which only ever dials out,
//! serves HTTP/2 on a second connection of its own: after the TLS handshake the gateway
//! speaks first, as a client. The ALPN name tells the gateway which kind of connection
//! it accepted.

use serde::{Deserialize, Serialize};

/// ALPN of a reverse connection (a normal one offers `h2`).
pub const ALPN: &[u8] = b"tunnel-reverse/1";
/// Where the gateway asks what the agent publishes.
pub const PUBLICATIONS_PATH: &str = "/v1/publications";
/// The address of the program that connected at the gateway's side (`ip:port`).
pub const CLIENT_HEADER: &str = "tunnel-client";
/// The identity of the agent that reached the publication by name; absent for a
/// connection at the gateway's `listen` port.
pub const CONSUMER_HEADER: &str = "tunnel-consumer";

/// What an agent publishes over one reverse connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// The same for every connection of one agent run: a reconnecting agent takes its
    /// own publications back at once, even before the gateway noticed the old
    /// connection is gone.
    pub resume: String,
    /// Names, lower case.
    pub names: Vec<String>,
    /// Whether this connection also carries callbacks (`[[callback]]` through this
    /// gateway): the connections that reach its programs' listeners at the gateway.
    #[serde(default)]
    pub callbacks: bool,
}

/// The gateway's answer about each offered name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// Published now.
    pub published: Vec<String>,
    /// Refused, with why.
    pub refused: Vec<(String, String)>,
    /// Callbacks, when offered and allowed: the gateway's callback address and ports.
    #[serde(default)]
    pub callbacks: Option<crate::callback::CallbackOffer>,
    /// Callbacks offered but refused, with why.
    #[serde(default)]
    pub callbacks_refused: Option<String>,
}
