//! What a certificate says about itself (names, dates), for messages and status, on
//! both sides. Issuing certificates is the gateway's alone (its `authority` module).

use std::net::IpAddr;

use anyhow::Result;
use time::OffsetDateTime;

/// What a certificate says about itself, for messages and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject, as `CN=alice`.
    pub subject: String,
    /// The issuer, as `CN=tunnel CA site-b`.
    pub issuer: String,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The DNS names and addresses it is valid for.
    pub names: Vec<String>,
    /// The serial number: lower-case hex of its bytes, as `revoke --serial` takes it.
    pub serial: String,
    /// SHA-256 of its SubjectPublicKeyInfo (the pin of a CA; a key's fingerprint).
    pub key_digest: [u8; 32],
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<CertInfo> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow::anyhow!("not a readable X.509 certificate: {e}"))?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        names.push((*dns).to_string());
                    }
                    x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                        let ip = match bytes.len() {
                            4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                            _ => None,
                        };
                        names.extend(ip.map(|ip| ip.to_string()));
                    }
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            names,
            serial: serial_hex(cert.raw_serial()),
            key_digest: tunnel_proto::token::pin_of_public_key(cert.public_key().raw),
        })
    }

    /// The first certificate of PEM text.
    pub fn parse_pem(pem: &str) -> Result<CertInfo> {
        use rustls_pki_types::pem::PemObject as _;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
        CertInfo::parse(&der)
    }

    /// The subject's common name, if it has one.
    pub fn common_name(&self) -> Option<&str> {
        self.subject
            .split(", ")
            .find_map(|part| part.strip_prefix("CN="))
    }
}

/// Serial-number bytes as `revoke --serial` and status write them: lower-case hex,
/// leading zero bytes dropped.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// Date and time of a moment, UTC, or `None` outside what `time` can represent.
fn moment(unix_secs: i64) -> Option<(i32, u8, u8, u8, u8, u8)> {
    let t = OffsetDateTime::from_unix_timestamp(unix_secs).ok()?;
    Some((
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
    ))
}

/// A moment in RFC 3339, as JSON status gives it: `2026-01-03T12:00:00Z`.
pub fn rfc3339(unix_secs: i64) -> String {
    match moment(unix_secs) {
        Some((y, mo, d, h, mi, s)) => format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
        None => unix_secs.to_string(),
    }
}

/// A moment as people read it: `2026-01-03 12:00:00 UTC`.
pub fn utc(unix_secs: i64) -> String {
    match moment(unix_secs) {
        Some((y, mo, d, h, mi, s)) => format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC"),
        None => format!("{unix_secs} seconds after 1970"),
    }
}

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_reads_like_a_date() {
        assert_eq!(utc(1_767_441_600), "2026-01-03 12:00:00 UTC");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(rfc3339(1_767_441_600), "2026-01-03T12:00:00Z");
    }
}
