//! What an agent may ask its gateway about its own reach, without connecting anywhere:
//! the named services and publications its identity may reach (`tunnel-agent
//! services`), and the policy's answer for one destination (`tunnel-run --explain`).
//!
//! ```text
//!  agent ─POST /v1/services {}──────────────▶ gateway: Reach {services, publications}
//!  agent ─POST /v1/explain {target}─────────▶ gateway: Answer {allowed, class, why,
//!                                             addresses}  (names resolved, nothing dialled)
//! ```

use serde::{Deserialize, Serialize};

pub const SERVICES_PATH: &str = "/v1/services";
pub const EXPLAIN_PATH: &str = "/v1/explain";

/// What the caller may reach by name at one gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reach {
    /// The identity the gateway knows the caller as.
    pub identity: String,
    pub services: Vec<ServiceReach>,
    pub publications: Vec<PublicationReach>,
    /// The gateway's callback address and ports, when this identity's programs may
    /// open listeners there.
    #[serde(default)]
    pub callbacks: Option<crate::callback::CallbackOffer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceReach {
    pub name: String,
    /// Where the gateway connects for it.
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicationReach {
    pub name: String,
    /// Whether an agent publishes it now.
    pub published: bool,
}

/// A destination to explain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    /// `host:port`, an address with its port, or a service name.
    pub target: String,
}

/// The gateway's policy answer for one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub identity: String,
    pub target: String,
    pub allowed: bool,
    /// The refusal class when not allowed (`denied`, `name-not-found`, …).
    pub class: Option<String>,
    /// Why, in the operator's terms.
    pub why: String,
    /// Where the gateway would connect (resolved, not dialled).
    pub addresses: Vec<String>,
}
