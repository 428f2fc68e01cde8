//! The agent's credential: a private key made on this machine (it never leaves it), the
//! request that asks the gateway to certify it, and the checks on what comes back
//! before it replaces anything.
//!
//! ```text
//!  fresh_key ─▶ request (PKCS#10, CN = identity) ─▶ gateway ─▶ Issued
//!  check_issued: its key is ours, it chains to the CA ─▶ pem (key + certificate)
//! ```

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::{self, RootCertStore};
use tunnel_transport::certs::CertInfo;

/// A new private key (ECDSA P-256).
pub fn fresh_key() -> Result<KeyPair> {
    KeyPair::generate().context("generating a private key")
}

/// Reads the private key of PEM text (a key file, or a credential file where it comes
/// with the certificate).
pub fn key_from_pem(pem: &str) -> Result<KeyPair> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow!("no PEM `PRIVATE KEY` block ({e})"))?;
    KeyPair::try_from(der.secret_der()).map_err(|e| anyhow!("not a usable private key: {e}"))
}

/// A certificate request (PEM) for `key`, naming `identity`. The gateway takes only the
/// key from it; the identity is the one it enrolled.
pub fn request(key: &KeyPair, identity: &str) -> Result<String> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, identity);
    params.distinguished_name = name;
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .context("making the certificate request")
}

/// What a credential file holds: the private key, then the certificate.
pub fn pem(key: &KeyPair, certificate_pem: &str) -> String {
    let mut text = key.serialize_pem();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(certificate_pem.trim_end());
    text.push('\n');
    text
}

/// The certificates of PEM text, in order.
pub fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        bail!("no certificate in it");
    }
    Ok(certs)
}

/// The serial number of a certificate as the gateway writes it: lower-case hex of its
/// bytes.
pub fn serial_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(
        cert.raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// The SubjectPublicKeyInfo (DER) of a certificate.
pub fn public_key_of(der: &[u8]) -> Result<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow!("not a readable X.509 certificate: {e}"))?;
    Ok(cert.public_key().raw.to_vec())
}

/// Checks a certificate the gateway issued before anything is replaced: it certifies
/// `key` (not some other key) and a CA in `ca` issued it for clients. Returns what it
/// says about itself.
pub fn check_issued(
    certificate_pem: &str,
    key: &KeyPair,
    ca: &[CertificateDer<'static>],
) -> Result<CertInfo> {
    let chain = certificates(certificate_pem).context("the issued certificate")?;
    let leaf = chain.first().context("the issued certificate is missing")?;
    if public_key_of(leaf)? != key.subject_public_key_info() {
        bail!("the gateway sent a certificate for another key than the one this agent made");
    }
    let info = CertInfo::parse(leaf).context("the issued certificate")?;
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots
            .add(cert.clone())
            .context("the gateway's CA certificate is not usable")?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .context("building the client-certificate verifier")?;
    // Judged inside its own validity, so that this machine's clock does not count.
    let within = (info.not_before + 1).min(info.not_after).max(0);
    let within = UnixTime::since_unix_epoch(Duration::from_secs(within.unsigned_abs()));
    verifier
        .verify_client_cert(leaf, &chain[1..], within)
        .map_err(|e| anyhow!("the issued certificate does not chain to the gateway's CA: {e}"))?;
    Ok(info)
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose};

    /// A CA for tests: its certificate (PEM) and what signs with it.
    pub fn test_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    }

    /// A client certificate for `key` signed by `ca`.
    pub fn test_client(ca: &Issuer<'static, KeyPair>, key: &KeyPair, identity: &str) -> String {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.signed_by(key, ca).unwrap().pem()
    }

    #[test]
    fn a_request_carries_the_key_and_the_identity() {
        let key = fresh_key().unwrap();
        let csr = request(&key, "alice").unwrap();
        assert!(
            csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{csr}"
        );
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert_eq!(
            parsed.public_key.subject_public_key_info(),
            key.subject_public_key_info()
        );
    }

    #[test]
    fn an_issued_certificate_must_be_for_our_key_and_from_the_ca() {
        let (ca_pem, ca) = test_ca("tunnel CA site-b");
        let ca_certs = certificates(&ca_pem).unwrap();
        let key = fresh_key().unwrap();
        let good = test_client(&ca, &key, "alice");
        let info = check_issued(&good, &key, &ca_certs).unwrap();
        assert_eq!(info.common_name(), Some("alice"));

        let other_key = fresh_key().unwrap();
        let error = check_issued(&good, &other_key, &ca_certs).unwrap_err();
        assert!(error.to_string().contains("another key"), "{error:#}");

        let (_, other_ca) = test_ca("tunnel CA elsewhere");
        let foreign = test_client(&other_ca, &key, "alice");
        let error = check_issued(&foreign, &key, &ca_certs).unwrap_err();
        assert!(error.to_string().contains("does not chain"), "{error:#}");
    }

    #[test]
    fn a_credential_file_holds_a_key_and_a_certificate_both_readable() {
        let (_, ca) = test_ca("tunnel CA site-b");
        let key = fresh_key().unwrap();
        let cert = test_client(&ca, &key, "alice");
        let text = pem(&key, &cert);
        assert_eq!(certificates(&text).unwrap().len(), 1);
        let again = key_from_pem(&text).unwrap();
        assert_eq!(
            again.subject_public_key_info(),
            key.subject_public_key_info()
        );
        let der = &certificates(&cert).unwrap()[0];
        let serial = serial_of(der).unwrap();
        assert!(
            !serial.is_empty()
                && serial
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }
}
