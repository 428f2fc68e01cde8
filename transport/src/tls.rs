//! TLS 1.3 with client certificates, set up once for both ends.
//!
//! The gateway requires a certificate from its own CA and reads the caller's identity
//! from its common name; the agent checks the gateway's certificate against the same CA
//! and the gateway's name. Both offer only ALPN `h2`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

const ALPN_H2: &[u8] = b"h2";

/// The one crypto provider both ends use.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a valid PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{}: holds no certificate (expected a PEM block `BEGIN CERTIFICATE`)",
            path.display()
        );
    }
    Ok(certs)
}

/// Reads the private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        anyhow!(
            "{}: no usable private key ({e}); expected a PEM `PRIVATE KEY` block",
            path.display()
        )
    })
}

fn roots(ca: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    Ok(roots)
}

fn unusable_pair(cert: &Path, key: &Path) -> String {
    format!(
        "{} and {} do not make a usable certificate and key pair",
        cert.display(),
        key.display()
    )
}

/// The gateway's TLS: TLS 1.3 only, ALPN `h2`, clients judged by `verifier`, the
/// certificate `chain` (leaf first) with the key in `key` (`cert` names the file the
/// leaf came from, for messages). Session resumption is off: a resumed session skips
/// the client's certificate check, and so could outlive its expiry or revocation.
pub fn finish_server_config(
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    chain: Vec<CertificateDer<'static>>,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 set-up")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, load_key(key)?)
        .with_context(|| unusable_pair(cert, key))?;
    // h2 for an agent's own connections; the reverse ALPN for those on which it
    // serves the gateway (inside-out, see tunnel_proto::reverse).
    config.alpn_protocols = vec![ALPN_H2.to_vec(), tunnel_proto::reverse::ALPN.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The agent's TLS towards one gateway.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 set-up")?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .with_context(|| unusable_pair(cert, key))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Judges a client certificate chain (`certs`, leaf first) as a gateway whose CA is
/// `ca` would at time `at`: the agent checks its own before dialling. The outer error
/// is a file that cannot be read; the inner one is the verdict.
pub fn verify_client_chain(
    ca: &Path,
    certs: &[CertificateDer<'static>],
    at: UnixTime,
) -> Result<Result<(), rustls::Error>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .build()
        .context("building the client-certificate verifier")?;
    let Some((leaf, intermediates)) = certs.split_first() else {
        return Ok(Err(rustls::Error::NoCertificatesPresented));
    };
    Ok(verifier
        .verify_client_cert(leaf, intermediates, at)
        .map(drop))
}

/// The rustls error behind a failed TLS or HTTP/2 operation, wherever it sits in the
/// chain: tokio-rustls wraps it in an `io::Error`, h2 in its own error.
pub fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        let io = e
            .downcast_ref::<std::io::Error>()
            .or_else(|| e.downcast_ref::<h2::Error>().and_then(h2::Error::get_io));
        if let Some(found) = io
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// The name the gateway's certificate must carry, in rustls's form.
pub fn server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_string())
        .map_err(|_| anyhow!("`{name}` is not a valid server name for TLS"))
}

/// The identity a client certificate carries: its subject's common name.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// How many bytes of encrypted records a connection may queue before the socket takes
/// them. rustls's default (64 KiB) is exactly one HTTP/2 DATA frame's payload, so each
/// full frame (payload plus its 9-byte header) was cut in two: four full records, then
/// a record and a system call for the last 9 bytes. A larger limit lets a whole frame,
/// or several, go out in one write; HTTP/2 flow control still bounds what is queued.
pub const SEND_BUFFER_LIMIT: usize = 1024 * 1024;

/// Applies [`SEND_BUFFER_LIMIT`] to an established connection (either end).
pub fn tune_session<D>(session: &mut rustls::ConnectionCommon<D>) {
    session.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
}

/// 32 bytes only the two ends of one TLS connection can compute (RFC 8446 exporter):
/// a signature over them proves a key holder is at this end of this connection.
pub fn exporter<D>(session: &rustls::ConnectionCommon<D>) -> Option<[u8; 32]> {
    session
        .export_keying_material([0u8; 32], tunnel_proto::enrolment::EXPORTER_LABEL, None)
        .ok()
}
