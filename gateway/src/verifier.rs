//! Who may finish a TLS handshake with the gateway, and as what.
//!
//! ```text
//!  no certificate ─────────────────────────────▶ Enrolling: only POST /v1/enrol
//!  certificate from our CA, valid, not revoked ─▶ Agent: streams, POST /v1/renew
//!  … expired less than recovery_window ago ────▶ Recovering: only POST /v1/renew
//!  revoked, foreign, expired longer ago ────────▶ handshake refused (alert)
//! ```
//!
//! The CA's own verifier (webpki) judges chains and signatures; this adds revocation
//! and the recovery window, and lets a client without a certificate in for enrolment.
//! Session resumption is off (see [`server_config`]): a resumed session would skip
//! this check, and so could outlive a revocation or an expiry.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls::{RootCertStore, ServerConfig};
use tokio::sync::watch;
use tunnel_transport::certs::CertInfo;

use crate::state::Revocations;

#[derive(Debug)]
pub struct Verifier {
    ca: Arc<dyn ClientCertVerifier>,
    revocations: watch::Receiver<Arc<Revocations>>,
    recovery_window: Duration,
}

/// How the gateway sees a client whose handshake it finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// No certificate: may enrol with a token, nothing else.
    Enrolling,
    /// A valid certificate.
    Agent(CertInfo),
    /// A certificate that expired within the recovery window: may renew, nothing else.
    Recovering(CertInfo),
}

impl Client {
    /// Judges the certificate a finished handshake presented (already verified).
    pub fn of(certificate: Option<&CertificateDer<'_>>, now: i64) -> Result<Client> {
        let Some(der) = certificate else {
            return Ok(Client::Enrolling);
        };
        let info = CertInfo::parse(der)?;
        Ok(if now > info.not_after {
            Client::Recovering(info)
        } else {
            Client::Agent(info)
        })
    }
}

fn expired(error: &Error) -> bool {
    matches!(
        error,
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        )
    )
}

impl Verifier {
    fn judge(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verdict = self.ca.verify_client_cert(end_entity, intermediates, now);
        let info = CertInfo::parse(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let verified = match verdict {
            Ok(verified) => verified,
            Err(e) if expired(&e) => {
                let since = i64::try_from(now.as_secs()).unwrap_or(i64::MAX) - info.not_after;
                let window = i64::try_from(self.recovery_window.as_secs()).unwrap_or(i64::MAX);
                if since > window {
                    return Err(e);
                }
                // Judged again as of its last valid second: everything but the date
                // must hold.
                let last = UnixTime::since_unix_epoch(Duration::from_secs(
                    info.not_after.max(0).unsigned_abs(),
                ));
                self.ca
                    .verify_client_cert(end_entity, intermediates, last)?
            }
            Err(e) => return Err(e),
        };
        let identity = info.common_name().unwrap_or_default();
        if self
            .revocations
            .borrow()
            .verdict(identity, &info.serial, info.not_before)
            .is_some()
        {
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }
}

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Enrolment comes without a certificate; such a connection may do nothing else.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.ca.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.judge(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.ca.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.ca.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.ca.supported_verify_schemes()
    }
}

/// The gateway's TLS: its certificate followed by the CA's (so that an enrolling agent
/// can check the CA against its token's pin), clients judged by [`Verifier`], no
/// session resumption.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    revocations: watch::Receiver<Arc<Revocations>>,
    recovery_window: Duration,
) -> Result<Arc<ServerConfig>> {
    let ca_certs = tunnel_transport::tls::load_certs(ca)?;
    let mut roots = RootCertStore::empty();
    for cert in &ca_certs {
        roots
            .add(cert.clone())
            .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    let provider = tunnel_transport::tls::provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building the client-certificate verifier")?;
    let verifier = Arc::new(Verifier {
        ca: webpki,
        revocations,
        recovery_window,
    });
    let mut chain = tunnel_transport::tls::load_certs(cert)?;
    for ca_cert in ca_certs {
        if !chain.contains(&ca_cert) {
            chain.push(ca_cert);
        }
    }
    tunnel_transport::tls::finish_server_config(verifier, chain, cert, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::Authority;
    use rustls::pki_types::pem::PemObject;

    fn verifier(ca: &Authority, revocations: Revocations, window: Duration) -> Verifier {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        Verifier {
            ca: WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                tunnel_transport::tls::provider(),
            )
            .build()
            .unwrap(),
            revocations: watch::channel(Arc::new(revocations)).1,
            recovery_window: window,
        }
    }

    fn at(secs: i64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs.unsigned_abs()))
    }

    #[test]
    fn expired_within_the_window_passes_revoked_never_does() {
        let (ca, _) = Authority::generate("t").unwrap();
        let issued = ca.issue_client("alice", Duration::from_secs(100)).unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let info = CertInfo::parse(&der).unwrap();
        let v = verifier(&ca, Revocations::default(), Duration::from_secs(3600));
        assert!(v.judge(&der, &[], at(info.not_after - 10)).is_ok());
        assert!(v.judge(&der, &[], at(info.not_after + 3000)).is_ok());
        assert!(v.judge(&der, &[], at(info.not_after + 4000)).is_err());
        assert_eq!(
            Client::of(Some(&der), info.not_after + 1).unwrap(),
            Client::Recovering(info.clone())
        );

        let mut revoked = Revocations::default();
        revoked.serials.insert(info.serial.clone(), 1);
        let v = verifier(&ca, revoked, Duration::from_secs(3600));
        assert_eq!(
            v.judge(&der, &[], at(info.not_after - 10)).err(),
            Some(Error::InvalidCertificate(CertificateError::Revoked))
        );
    }
}
