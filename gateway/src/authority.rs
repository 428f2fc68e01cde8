//! The gateway's certificate authority: made once by `tunnel-gateway init`, then used to
//! sign the gateway's own certificate and the agents' certificates: as files
//! (`tunnel-gateway issue`), or for a key an agent made itself and sent as a signing
//! request (enrolment and renewal). Every certificate starts
//! [`BACKDATE_SECS`](tunnel_proto::enrolment::BACKDATE_SECS) before it is issued, for
//! clocks that differ between sites, and has a random serial number.

use std::net::IpAddr;

use anyhow::bail;
use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use tunnel_proto::enrolment::BACKDATE_SECS;

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"***")
            .finish()
    }
}

/// A CA that can sign certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

/// A certificate for a key an agent made: what enrolment and renewal hand back.
#[derive(Debug, Clone)]
pub struct Signed {
    pub cert_pem: String,
    /// Lower-case hex, as `revoke --serial` takes it.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

fn validity(params: &mut CertificateParams, lifetime: std::time::Duration) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::seconds(BACKDATE_SECS);
    params.not_after = now
        + Duration::seconds(
            i64::try_from(lifetime.as_secs())
                .unwrap_or(i64::MAX / 4)
                .min(3650 * 86_400),
        );
    params.serial_number = Some(random_serial()?);
    Ok(())
}

/// 16 random bytes, the first in 1..=127 so that the number is positive and its DER
/// encoding minimal.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    crate::secrets::fill_random(&mut bytes)?;
    bytes[0] = (bytes[0] & 0x7f).max(1);
    Ok(SerialNumber::from_slice(&bytes))
}

fn days(n: u32) -> std::time::Duration {
    std::time::Duration::from_secs(u64::from(n) * 86_400)
}

fn named(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn client_params(identity: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = named(identity);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params
}

/// SHA-256 of the SubjectPublicKeyInfo of the key in a signing request: what a token is
/// bound to when first redeemed.
pub fn request_key_digest(csr_pem: &str) -> Result<[u8; 32]> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .context("not a valid certificate signing request (PEM)")?;
    let spki = csr.public_key.subject_public_key_info();
    if spki.is_empty() {
        bail!("the signing request holds no public key");
    }
    Ok(tunnel_proto::token::pin_of_public_key(&spki))
}

impl Authority {
    /// A new CA named `name`, valid for ten years.
    pub fn generate(name: &str) -> Result<(Authority, Issued)> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = named(&format!("tunnel CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, days(3650))?;
        let cert = params.self_signed(&key).context("signing the CA")?;
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        let authority = Authority {
            issuer: Issuer::new(params, key),
            cert_pem: issued.cert_pem.clone(),
        };
        Ok((authority, issued))
    }

    /// Loads a CA from its certificate and key (PEM text).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Authority> {
        let key = KeyPair::from_pem(key_pem).context("reading the CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).context("reading the CA certificate")?;
        Ok(Authority {
            issuer,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// A server certificate for the gateway, valid for `names` (DNS names or addresses).
    pub fn issue_server(&self, names: &[String], valid_days: u32) -> Result<Issued> {
        let mut params = CertificateParams::default();
        params.distinguished_name = named(names.first().map_or("gateway", String::as_str));
        for name in names {
            params.subject_alt_names.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.clone()
                        .try_into()
                        .with_context(|| format!("`{name}` is not a valid DNS name"))?,
                ),
            });
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(params, days(valid_days))
    }

    /// A client certificate and a new key for `identity`, as files.
    pub fn issue_client(&self, identity: &str, lifetime: std::time::Duration) -> Result<Issued> {
        self.sign(client_params(identity), lifetime)
    }

    /// A client certificate for `identity` on the key of the signing request `csr_pem`
    /// (the agent's own; nothing else of the request is used).
    pub fn sign_request(
        &self,
        identity: &str,
        csr_pem: &str,
        lifetime: std::time::Duration,
    ) -> Result<Signed> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .context("not a valid certificate signing request (PEM)")?;
        let mut params = client_params(identity);
        validity(&mut params, lifetime)?;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .context("signing a certificate")?;
        let info = tunnel_transport::certs::CertInfo::parse(cert.der())?;
        Ok(Signed {
            cert_pem: cert.pem(),
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    fn sign(&self, mut params: CertificateParams, lifetime: std::time::Duration) -> Result<Issued> {
        validity(&mut params, lifetime)?;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generating a key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a certificate")?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use tunnel_transport::certs::CertInfo;

    #[test]
    fn an_issued_certificate_tells_its_names_and_dates() {
        let (ca, _) = Authority::generate("site-b").expect("CA");
        let issued = ca
            .issue_server(&["gw.example.org".into(), "10.1.2.3".into()], 2)
            .expect("server cert");
        let der = rustls_pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
            .expect("PEM");
        let info = CertInfo::parse(&der).expect("parse");
        assert_eq!(info.names, ["gw.example.org", "10.1.2.3"]);
        assert_eq!(info.common_name(), Some("gw.example.org"));
        assert_eq!(info.issuer, "CN=tunnel CA site-b");
        let days = (info.not_after - info.not_before) / 86_400;
        assert_eq!(days, 2, "{info:?}");
    }
}
