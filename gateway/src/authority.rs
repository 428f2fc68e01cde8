//! The gateway's certificate authority: made once by `tunnel-gateway init`, then used to
//! sign the gateway's own certificate and one client certificate per identity. Only the
//! gateway issues certificates, so only it links rcgen.

use std::net::IpAddr;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

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

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks that differ between sites.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(i64::from(days));
}

fn named(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
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
        validity(&mut params, 3650);
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
    pub fn issue_server(&self, names: &[String], days: u32) -> Result<Issued> {
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
        self.sign(params, days)
    }

    /// A client certificate whose common name is `identity`.
    pub fn issue_client(&self, identity: &str, days: u32) -> Result<Issued> {
        let mut params = CertificateParams::default();
        params.distinguished_name = named(identity);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(params, days)
    }

    fn sign(&self, mut params: CertificateParams, days: u32) -> Result<Issued> {
        validity(&mut params, days);
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
