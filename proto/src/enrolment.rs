//! What agents and the gateway say to each other about certificates, over the same
//! HTTP/2 port the tunnel uses: enrolment with a token, and renewal.
//!
//! ```text
//!  agent (no certificate, CA checked against the token's pin)
//!     POST /v1/enrol  {token_id, secret, csr} ─▶ 200 Issued | 4xx Refused
//!  agent (its current certificate, over its tunnel connection)
//!     POST /v1/renew  {csr}                   ─▶ 200 Issued | 4xx Refused
//! ```
//!
//! Every answer carries the gateway's clock (`gateway_time`), which the agent uses to
//! schedule renewal and to report a skewed clock. Bodies are JSON, at most
//! [`MAX_BODY`] bytes.

use serde::{Deserialize, Serialize};

pub const ENROL_PATH: &str = "/v1/enrol";
pub const RENEW_PATH: &str = "/v1/renew";
pub const EXTEND_PATH: &str = "/v1/extend";
/// What an extension's signature covers, before the connection's TLS exporter value.
pub const EXTEND_CONTEXT: &[u8] = b"tunnel extend v1";
/// The TLS exporter label both ends use for [`EXTEND_PATH`].
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tunnel-extend";
/// Largest request or answer body either side reads.
pub const MAX_BODY: usize = 64 * 1024;
/// Certificates start this long before they are issued, for clocks that differ.
pub const BACKDATE_SECS: i64 = 60;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolRequest {
    pub token_id: String,
    /// The token's secret, base64url ([`crate::token::Secret::encode`]).
    pub secret: String,
    /// A PKCS#10 request (PEM) for the key the agent made; only its key is used.
    pub csr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A PKCS#10 request (PEM) for a fresh key.
    pub csr: String,
}

/// Moves an existing connection onto a newer certificate of the same agent: the key of
/// `certificate` signs [`EXTEND_CONTEXT`] followed by this connection's TLS exporter
/// value, which only the two ends of this one connection know. So a connection made
/// with an older key lives on only if its holder also holds the new one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    /// The newer certificate (PEM).
    pub certificate: String,
    /// The signature (base64url), as the certificate's key algorithm makes it.
    pub signature: String,
}

/// A certificate issued by enrolment or renewal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Issued {
    /// The agent's new certificate (PEM).
    pub certificate: String,
    /// The gateway's CA (PEM).
    pub ca: String,
    pub identity: String,
    pub groups: Vec<String>,
    /// The certificate's serial number, hex.
    pub serial: String,
    pub not_after: i64,
    /// The gateway's clock when it answered (seconds since 1970).
    pub gateway_time: i64,
}

/// Why the gateway would not issue.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum RefusalKind {
    /// No such token (never made, or made at another gateway).
    UnknownToken,
    /// The token's time ran out before it was used.
    TokenExpired,
    /// The token was already used, by another key.
    TokenUsed,
    /// The identity or this certificate was revoked.
    Revoked,
    /// The identity may no longer renew (its enrolment's renewal period ended).
    RenewalEnded,
    /// The certificate expired longer ago than the recovery window.
    TooLate,
    /// This certificate is not the identity's current one.
    Superseded,
    /// The request was malformed.
    BadRequest,
    /// The gateway failed.
    Internal,
}

impl RefusalKind {
    /// The name on the wire and in logs: `token-used`, `revoked`, …
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::UnknownToken => "unknown-token",
            RefusalKind::TokenExpired => "token-expired",
            RefusalKind::TokenUsed => "token-used",
            RefusalKind::Revoked => "revoked",
            RefusalKind::RenewalEnded => "renewal-ended",
            RefusalKind::TooLate => "too-late",
            RefusalKind::Superseded => "superseded",
            RefusalKind::BadRequest => "bad-request",
            RefusalKind::Internal => "internal",
        }
    }
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refused {
    pub error: RefusalKind,
    pub message: String,
    pub gateway_time: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_are_the_wire_names() {
        for kind in [
            RefusalKind::UnknownToken,
            RefusalKind::TokenExpired,
            RefusalKind::TokenUsed,
            RefusalKind::Revoked,
            RefusalKind::RenewalEnded,
            RefusalKind::TooLate,
            RefusalKind::Superseded,
            RefusalKind::BadRequest,
            RefusalKind::Internal,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }
}
