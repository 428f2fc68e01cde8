//! The agent's own certificate for one gateway: checked when the agent starts, watched
//! while it runs, and named when a handshake fails because of it (or because of the
//! gateway's), instead of a bare TLS error.
//!
//! ```text
//!  start ── Certificate::load ── expired / foreign CA / not a client cert ─▶ refuse to start
//!                              ├─ not yet valid ─▶ error in log and status, keep dialling
//!                              └─ expired renewed credential ─▶ error, keep dialling:
//!                                 the gateway renews it within its recovery window
//!  running ── watch_expiry ─▶ "alice.pem expired on …" in the log; status says it too
//!             (renewed credentials are watched by `renewal`, which replaces them here)
//!  dial fails ── explain ─▶ "the gateway refused alice.pem: …" in the slot's error
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio_rustls::rustls::pki_types::{CertificateDer, UnixTime};
use tokio_rustls::rustls::{self, AlertDescription, CertificateError};
use tracing::error;
use tunnel_transport::certs::{CertInfo, unix_now, utc};

/// What the agent knows about the certificate it presents to one gateway.
#[derive(Debug)]
pub struct Certificate {
    pub file: PathBuf,
    ca: PathBuf,
    info: CertInfo,
    /// Lower-case hex of its serial number, as the gateway writes it.
    serial: String,
    /// True for a `credential` the agent renews itself.
    renews: bool,
    /// The verdict of the CA file on the certificate, times aside.
    issued_by_ca: Result<(), Problem>,
}

/// A certificate the gateway will refuse, in the user's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error(
        "{file} expired on {}: ask the gateway's operator for a new one (tunnel-gateway issue)",
        utc(*not_after)
    )]
    Expired { file: String, not_after: i64 },
    #[error(
        "{file} expired on {}: the agent keeps trying to renew it (the gateway accepts that for a while after expiry); if the gateway refuses, enrol again with a new token: tunnel-agent enroll",
        utc(*not_after)
    )]
    CredentialExpired { file: String, not_after: i64 },
    #[error(
        "{file} is not valid until {} (this machine's clock says {}): check the clocks here and at the gateway",
        utc(*not_before),
        utc(*now)
    )]
    NotYetValid {
        file: String,
        not_before: i64,
        now: i64,
    },
    #[error(
        "{file} was not issued by the CA in {ca} ({}): use the ca.pem that came with the certificate, or ask the gateway's operator for a certificate from its CA (tunnel-gateway issue)",
        issuers(issuer, ca_subject)
    )]
    ForeignCa {
        file: String,
        ca: String,
        issuer: String,
        ca_subject: String,
    },
    #[error(
        "{file} is not a client certificate (it is not for client authentication): use the one `tunnel-gateway issue` wrote"
    )]
    NotForClients { file: String },
    #[error("{file} is not accepted by the CA in {ca}: {why}")]
    Refused {
        file: String,
        ca: String,
        why: String,
    },
}

impl Problem {
    /// A problem that time may cure (and the gateway's clock judges) does not stop the
    /// agent; every other one would make every connection fail.
    pub fn stops_the_agent(&self) -> bool {
        !matches!(
            self,
            Problem::NotYetValid { .. } | Problem::CredentialExpired { .. }
        )
    }
}

/// The certificate part of `tunnel-agent status`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct CertificateView {
    pub file: String,
    pub identity: Option<String>,
    pub valid_from: String,
    pub valid_until: String,
    pub problem: Option<String>,
    /// Lower-case hex of the serial number.
    pub serial: String,
    /// RFC 3339, e.g. `2026-11-30T12:00:00Z`.
    pub not_before: String,
    pub not_after: String,
    /// From issue (not_before plus the backdating) to not_after.
    pub lifetime_secs: i64,
    /// Until not_after by this machine's clock (negative once expired).
    pub remaining_secs: i64,
}

pub use tunnel_transport::certs::rfc3339;

impl Certificate {
    /// Reads `cert` (its first certificate is ours) and judges it against `ca`;
    /// `renews` says it is a credential the agent renews itself.
    pub fn load(ca: &Path, cert: &Path, renews: bool) -> Result<Certificate> {
        let chain = tunnel_transport::tls::load_certs(cert)?;
        let leaf = chain.first().context("no certificate")?;
        let info = CertInfo::parse(leaf).with_context(|| cert.display().to_string())?;
        let serial = crate::credential::serial_of(leaf).unwrap_or_default();
        // Judged inside the certificate's own validity, so that only the issuer counts.
        let within = (info.not_before + 1).min(info.not_after).max(0);
        let within = UnixTime::since_unix_epoch(Duration::from_secs(within.unsigned_abs()));
        let verdict = tunnel_transport::tls::verify_client_chain(ca, &chain, within)?;
        let file = cert.display().to_string();
        let ca_name = ca.display().to_string();
        let issued_by_ca = verdict.map_err(|e| match e {
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => Problem::ForeignCa {
                file: file.clone(),
                ca: ca_name.clone(),
                issuer: info.issuer.clone(),
                ca_subject: ca_subjects(ca),
            },
            rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
            ) => Problem::NotForClients { file: file.clone() },
            other => Problem::Refused {
                file: file.clone(),
                ca: ca_name.clone(),
                why: other.to_string(),
            },
        });
        Ok(Certificate {
            file: cert.to_path_buf(),
            ca: ca.to_path_buf(),
            info,
            serial,
            renews,
            issued_by_ca,
        })
    }

    fn name(&self) -> String {
        self.file.display().to_string()
    }

    /// What is wrong with the certificate at `now` (seconds since 1970), if anything.
    pub fn problem_at(&self, now: i64) -> Option<Problem> {
        if now > self.info.not_after && self.renews {
            return Some(Problem::CredentialExpired {
                file: self.name(),
                not_after: self.info.not_after,
            });
        }
        if now > self.info.not_after {
            return Some(Problem::Expired {
                file: self.name(),
                not_after: self.info.not_after,
            });
        }
        if now < self.info.not_before {
            return Some(Problem::NotYetValid {
                file: self.name(),
                not_before: self.info.not_before,
                now,
            });
        }
        self.issued_by_ca.clone().err()
    }

    pub fn view(&self) -> CertificateView {
        let now = unix_now();
        CertificateView {
            file: self.name(),
            identity: self.info.common_name().map(str::to_string),
            valid_from: utc(self.info.not_before),
            valid_until: utc(self.info.not_after),
            problem: self.problem_at(now).map(|p| p.to_string()),
            serial: self.serial.clone(),
            not_before: rfc3339(self.info.not_before),
            not_after: rfc3339(self.info.not_after),
            lifetime_secs: self.lifetime_secs(),
            remaining_secs: self.info.not_after.saturating_sub(now),
        }
    }

    /// Seconds since 1970 from which it is valid.
    pub fn not_before(&self) -> i64 {
        self.info.not_before
    }

    /// Seconds since 1970 until which it is valid.
    pub fn not_after(&self) -> i64 {
        self.info.not_after
    }

    /// The identity it carries (its common name).
    pub fn identity(&self) -> Option<&str> {
        self.info.common_name()
    }

    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Its life from issue to expiry: the gateway backdates certificates by
    /// [`BACKDATE_SECS`](tunnel_proto::enrolment::BACKDATE_SECS), which is not life.
    pub fn lifetime_secs(&self) -> i64 {
        crate::renewal::lifetime_secs(self.info.not_before, self.info.not_after)
    }
}

/// Logs the moment the current certificate (`current` says which it is) expires while
/// the agent runs: connections that are up stay up; the gateway refuses new ones.
pub async fn watch_expiry(current: impl Fn() -> Arc<Certificate>, gateway: &str) {
    let mut reported = None;
    loop {
        let certificate = current();
        let left = certificate.info.not_after.saturating_sub(unix_now());
        if left < 0 {
            if reported.as_deref() != Some(certificate.serial.as_str()) {
                error!(
                    gateway,
                    "{}; new connections to the gateway will be refused",
                    Problem::Expired {
                        file: certificate.name(),
                        not_after: certificate.info.not_after,
                    }
                );
                reported = Some(certificate.serial.clone());
            }
            // A replaced certificate is noticed within a minute.
            tokio::time::sleep(Duration::from_secs(60)).await;
            continue;
        }
        // In steps of at most a day, so that a changed clock or certificate is noticed.
        let step = left.unsigned_abs().min(86_400) + 1;
        tokio::time::sleep(Duration::from_secs(step)).await;
    }
}

impl Certificate {
    /// Says why a dial or a connection failed when certificates are the reason; `None`
    /// for every other failure.
    pub fn explain(&self, failure: &anyhow::Error) -> Option<String> {
        let now = unix_now();
        let cause = failure
            .chain()
            .find_map(tunnel_transport::tls::rustls_error)
            .cloned()
            .or_else(|| alert_in_text(&format!("{failure:#}")).map(rustls::Error::AlertReceived))?;
        let file = self.name();
        let ca = self.ca.display();
        Some(match cause {
            rustls::Error::AlertReceived(alert) => {
                let name = alert_name(alert)?;
                match alert {
                    AlertDescription::CertificateExpired => match self.problem_at(now) {
                        Some(
                            p @ (Problem::Expired { .. }
                            | Problem::CredentialExpired { .. }
                            | Problem::NotYetValid { .. }),
                        ) => {
                            format!("the gateway refused the certificate (alert {name}): {p}")
                        }
                        _ => format!(
                            "the gateway refused {file} as expired or not yet valid (alert {name}), though by this machine's clock it is valid from {} until {}: the gateway's clock may be wrong; tell its operator",
                            utc(self.info.not_before),
                            utc(self.info.not_after)
                        ),
                    },
                    AlertDescription::UnknownCA | AlertDescription::DecryptError => format!(
                        "the gateway does not know the CA that issued {file} (alert {name}; the certificate's issuer is `{}`): it is not a certificate from this gateway's CA; ask its operator for one (tunnel-gateway issue)",
                        self.info.issuer
                    ),
                    AlertDescription::CertificateRevoked => {
                        format!("the gateway has revoked {file} (alert {name}): ask its operator for a new one")
                    }
                    _ => format!(
                        "the gateway refused {file} (alert {name}): ask its operator for a new one (tunnel-gateway issue)"
                    ),
                }
            }
            rustls::Error::InvalidCertificate(invalid) => match invalid {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                    "the gateway's certificate was not issued by the CA in {ca}: that is not this gateway's CA; get ca.pem from its operator, with a certificate its CA issued (tunnel-gateway issue)"
                ),
                CertificateError::ExpiredContext { not_after, .. } => format!(
                    "the gateway's certificate expired on {}: its operator must renew it",
                    utc(secs(not_after))
                ),
                CertificateError::Expired => {
                    "the gateway's certificate has expired: its operator must renew it".into()
                }
                CertificateError::NotValidYetContext { not_before, .. } => format!(
                    "the gateway's certificate is not valid until {} (this machine's clock says {}): check the clocks here and at the gateway",
                    utc(secs(not_before)),
                    utc(now)
                ),
                CertificateError::NotValidYet => {
                    "the gateway's certificate is not valid yet: check the clocks here and at the gateway".into()
                }
                CertificateError::NotValidForNameContext { expected, presented } => format!(
                    "the gateway's certificate is not valid for `{}` (it names {}): address the gateway by one of those names, or set server_name in agent.toml",
                    expected.to_str(),
                    presented.join(", ")
                ),
                CertificateError::NotValidForName => format!(
                    "the gateway's certificate is not valid for the name this agent uses for it: set server_name in agent.toml to a name in its certificate (ca {ca})"
                ),
                _ => return None,
            },
            _ => return None,
        })
    }
}

/// How the certificate's issuer and the CA file differ, for messages.
fn issuers(issuer: &str, ca_subject: &str) -> String {
    if issuer == ca_subject {
        format!(
            "the CA file holds a CA of the same name, `{issuer}`, but with another key: one of them was made anew"
        )
    } else {
        format!("the certificate's issuer is `{issuer}`, the CA file holds `{ca_subject}`")
    }
}

/// The subjects of the certificates in a CA file, for messages.
fn ca_subjects(ca: &Path) -> String {
    let subjects: Vec<String> = tunnel_transport::tls::load_certs(ca)
        .unwrap_or_default()
        .iter()
        .filter_map(|der: &CertificateDer<'_>| CertInfo::parse(der).ok())
        .map(|info| info.subject)
        .collect();
    subjects.join("`, `")
}

fn secs(t: UnixTime) -> i64 {
    i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
}

/// The alerts that are about certificates, by the names TLS gives them.
fn alert_name(alert: AlertDescription) -> Option<&'static str> {
    Some(match alert {
        AlertDescription::CertificateExpired => "certificate_expired",
        AlertDescription::UnknownCA => "unknown_ca",
        AlertDescription::DecryptError => "decrypt_error",
        AlertDescription::BadCertificate => "bad_certificate",
        AlertDescription::UnsupportedCertificate => "unsupported_certificate",
        AlertDescription::CertificateRevoked => "certificate_revoked",
        AlertDescription::CertificateUnknown => "certificate_unknown",
        AlertDescription::CertificateRequired => "certificate_required",
        AlertDescription::AccessDenied => "access_denied",
        _ => return None,
    })
}

/// An alert that reached us only as text (h2 keeps an I/O error's message, not the
/// error): rustls words it `received fatal alert: UnknownCA`.
fn alert_in_text(text: &str) -> Option<AlertDescription> {
    let (_, rest) = text.split_once("received fatal alert: ")?;
    let word: String = rest
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    [
        AlertDescription::CertificateExpired,
        AlertDescription::UnknownCA,
        AlertDescription::DecryptError,
        AlertDescription::BadCertificate,
        AlertDescription::UnsupportedCertificate,
        AlertDescription::CertificateRevoked,
        AlertDescription::CertificateUnknown,
        AlertDescription::CertificateRequired,
        AlertDescription::AccessDenied,
    ]
    .into_iter()
    .find(|alert| format!("{alert:?}") == word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_utc_with_a_z() {
        assert_eq!(rfc3339(1_767_441_600), "2026-01-03T12:00:00Z");
    }

    #[test]
    fn an_alert_known_only_as_text_is_found() {
        assert_eq!(
            alert_in_text("127.0.0.1:1: received fatal alert: UnknownCA"),
            Some(AlertDescription::UnknownCA)
        );
        assert_eq!(
            alert_in_text("received fatal alert: CertificateExpired (more)"),
            Some(AlertDescription::CertificateExpired)
        );
        assert_eq!(
            alert_in_text("received fatal alert: HandshakeFailure"),
            None
        );
        assert_eq!(alert_in_text("broken pipe"), None);
    }

    #[test]
    fn only_a_not_yet_valid_certificate_or_an_expired_renewed_credential_lets_the_agent_start() {
        assert!(
            !Problem::CredentialExpired {
                file: "credential.pem".into(),
                not_after: 1_767_441_600
            }
            .stops_the_agent()
        );
        let file = "alice.pem".to_string();
        assert!(
            !Problem::NotYetValid {
                file: file.clone(),
                not_before: 1,
                now: 0
            }
            .stops_the_agent()
        );
        assert!(
            Problem::Expired {
                file: file.clone(),
                not_after: 1_767_441_600
            }
            .stops_the_agent()
        );
        assert_eq!(
            Problem::Expired {
                file,
                not_after: 1_767_441_600
            }
            .to_string(),
            "alice.pem expired on 2026-01-03 12:00:00 UTC: ask the gateway's operator for a new one (tunnel-gateway issue)"
        );
    }
}
