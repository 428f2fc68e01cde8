//! Trusting a gateway by the pin in an enrolment token, before the agent has its CA.
//!
//! ```text
//!  gateway presents [leaf, CA] ─▶ one of the CA certificates has SHA-256(SPKI) == pin?
//!        no ─▶ refuse the handshake (nothing was sent)
//!        yes ─▶ the leaf verifies under that CA alone (its names need not match:
//!               the pin is the trust anchor) ─▶ accept; the leaf's names are kept
//! ```

use std::sync::{Arc, Mutex, PoisonError};

use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    CryptoProvider, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::{
    self, CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tunnel_proto::token::{format_pin, pin_of_public_key};
use tunnel_transport::certs::CertInfo;

/// What the handshake showed of the gateway, for the messages and the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// The pins of the CA certificates it presented (none: it sent only its own).
    pub presented_pins: Vec<[u8; 32]>,
    /// The pinned CA, when one matched.
    pub ca: Option<CertificateDer<'static>>,
    /// The names its certificate is valid for.
    pub names: Vec<String>,
}

/// Why a gateway was not trusted, in the user's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mistrust {
    /// No certificate it sent has the token's pin.
    WrongCa {
        presented: Vec<[u8; 32]>,
        expected: [u8; 32],
    },
    /// Its CA has the pin, but its own certificate does not verify under it.
    LeafRefused(String),
}

impl Mistrust {
    /// The message for the gateway at `address`.
    pub fn explain(&self, address: &str) -> String {
        match self {
            Mistrust::WrongCa {
                presented,
                expected,
            } if presented.is_empty() => format!(
                "the gateway at {address} sent no CA certificate with its own, so it cannot be checked against the token's pin ({}): it may be of an older version; nothing was sent",
                format_pin(expected)
            ),
            Mistrust::WrongCa {
                presented,
                expected,
            } => {
                let pins: Vec<String> = presented.iter().map(format_pin).collect();
                format!(
                    "the gateway at {address} is not the one this token was made for: its CA's pin is {}, the token names {}; nothing was sent",
                    pins.join(" or "),
                    format_pin(expected)
                )
            }
            Mistrust::LeafRefused(why) => format!(
                "the gateway at {address} has the token's CA, but its own certificate does not verify under it ({why}); nothing was sent"
            ),
        }
    }
}

/// A server certificate verifier that trusts exactly the CA whose public key has the
/// token's pin.
#[derive(Debug)]
pub struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    seen: Mutex<Seen>,
    mistrust: Mutex<Option<Mistrust>>,
}

impl PinnedCa {
    pub fn new(pin: [u8; 32]) -> PinnedCa {
        PinnedCa {
            pin,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            seen: Mutex::default(),
            mistrust: Mutex::default(),
        }
    }

    /// What the last handshake showed.
    pub fn seen(&self) -> Seen {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why the last handshake's gateway was refused, if it was.
    pub fn mistrust(&self) -> Option<Mistrust> {
        self.mistrust
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn refuse(&self, mistrust: Mistrust) -> rustls::Error {
        let error =
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure);
        *self.mistrust.lock().unwrap_or_else(PoisonError::into_inner) = Some(mistrust);
        error
    }

    /// The verdict on a presented chain, with what it showed.
    fn judge(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> (Seen, Result<(), Mistrust>) {
        let mut seen = Seen::default();
        for cert in intermediates {
            let Ok(spki) = crate::credential::public_key_of(cert) else {
                continue;
            };
            let pin = pin_of_public_key(&spki);
            seen.presented_pins.push(pin);
            if pin == self.pin && seen.ca.is_none() {
                seen.ca = Some(cert.clone().into_owned());
            }
        }
        seen.names = CertInfo::parse(end_entity)
            .map(|info| info.names)
            .unwrap_or_default();
        let Some(ca) = seen.ca.clone() else {
            let presented = seen.presented_pins.clone();
            return (
                seen,
                Err(Mistrust::WrongCa {
                    presented,
                    expected: self.pin,
                }),
            );
        };
        let mut roots = RootCertStore::empty();
        if let Err(e) = roots.add(ca) {
            return (seen, Err(Mistrust::LeafRefused(e.to_string())));
        }
        let verifier =
            match WebPkiServerVerifier::builder_with_provider(roots.into(), self.provider.clone())
                .build()
            {
                Ok(verifier) => verifier,
                Err(e) => return (seen, Err(Mistrust::LeafRefused(e.to_string()))),
            };
        let verdict = match verifier.verify_server_cert(end_entity, &[], server_name, &[], now) {
            Ok(_) => Ok(()),
            // The pin, not the name, is what makes this gateway the right one.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(()),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            )) => Err(Mistrust::LeafRefused(
                "it is expired or not yet valid by this machine's clock: check this machine's clock, or tell the gateway's operator".into(),
            )),
            Err(e) => Err(Mistrust::LeafRefused(e.to_string())),
        };
        (seen, verdict)
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (seen, verdict) = self.judge(end_entity, intermediates, server_name, now);
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = seen;
        match verdict {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(mistrust) => Err(self.refuse(mistrust)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::tests::test_ca;
    use crate::credential::{certificates, public_key_of};
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};

    fn server_cert(ca: &rcgen::Issuer<'static, KeyPair>, name: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.signed_by(&key, ca).unwrap().der().clone()
    }

    fn name(text: &str) -> ServerName<'static> {
        ServerName::try_from(text.to_string()).unwrap()
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn the_pinned_ca_is_trusted_even_under_another_name() {
        let (ca_pem, ca) = test_ca("tunnel CA site-b");
        let ca_der = certificates(&ca_pem).unwrap().remove(0);
        let pin = pin_of_public_key(&public_key_of(&ca_der).unwrap());
        let leaf = server_cert(&ca, "gw.site-b.example.org");
        let verifier = PinnedCa::new(pin);
        verifier
            .verify_server_cert(
                &leaf,
                std::slice::from_ref(&ca_der),
                &name("10.0.0.1"),
                &[],
                now(),
            )
            .unwrap();
        let seen = verifier.seen();
        assert_eq!(seen.names, ["gw.site-b.example.org"]);
        assert_eq!(seen.ca, Some(ca_der));
        assert_eq!(verifier.mistrust(), None);
    }

    #[test]
    fn another_ca_is_refused_and_both_pins_are_named() {
        let (ca_pem, _) = test_ca("tunnel CA site-b");
        let ca_der = certificates(&ca_pem).unwrap().remove(0);
        let pin = pin_of_public_key(&public_key_of(&ca_der).unwrap());
        let (other_pem, other) = test_ca("tunnel CA impostor");
        let other_der = certificates(&other_pem).unwrap().remove(0);
        let other_pin = pin_of_public_key(&public_key_of(&other_der).unwrap());
        let leaf = server_cert(&other, "gw.site-b.example.org");
        let verifier = PinnedCa::new(pin);
        assert!(
            verifier
                .verify_server_cert(
                    &leaf,
                    &[other_der],
                    &name("gw.site-b.example.org"),
                    &[],
                    now()
                )
                .is_err()
        );
        let message = verifier.mistrust().unwrap().explain("192.0.2.7:7443");
        assert_eq!(
            message,
            format!(
                "the gateway at 192.0.2.7:7443 is not the one this token was made for: its CA's pin is {}, the token names {}; nothing was sent",
                format_pin(&other_pin),
                format_pin(&pin)
            )
        );
    }

    #[test]
    fn a_leaf_from_another_ca_beside_the_pinned_one_is_refused() {
        let (ca_pem, _) = test_ca("tunnel CA site-b");
        let ca_der = certificates(&ca_pem).unwrap().remove(0);
        let pin = pin_of_public_key(&public_key_of(&ca_der).unwrap());
        let (_, other) = test_ca("tunnel CA impostor");
        let leaf = server_cert(&other, "gw.site-b.example.org");
        let verifier = PinnedCa::new(pin);
        assert!(
            verifier
                .verify_server_cert(&leaf, &[ca_der], &name("gw.site-b.example.org"), &[], now())
                .is_err()
        );
        assert!(matches!(
            verifier.mistrust(),
            Some(Mistrust::LeafRefused(_))
        ));
    }

    #[test]
    fn a_gateway_that_sends_only_its_own_certificate_is_refused() {
        let (ca_pem, ca) = test_ca("tunnel CA site-b");
        let ca_der = certificates(&ca_pem).unwrap().remove(0);
        let pin = pin_of_public_key(&public_key_of(&ca_der).unwrap());
        let leaf = server_cert(&ca, "gw.site-b.example.org");
        let verifier = PinnedCa::new(pin);
        assert!(
            verifier
                .verify_server_cert(&leaf, &[], &name("gw.site-b.example.org"), &[], now())
                .is_err()
        );
        let message = verifier.mistrust().unwrap().explain("gw:7443");
        assert!(message.contains("sent no CA certificate"), "{message}");
    }
}
