//! A destination as it travels in a CONNECT request: `host:port`, or the bare name of a
//! service that the gateway defines.
//!
//! The wire form is the `:authority` of the HTTP/2 CONNECT: `db.example.org:5432`,
//! `10.0.0.1:22`, `[fd00::1]:22`, or `pg` for the service named `pg`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// Longest host name accepted (RFC 1035 limit for the text form).
pub const MAX_NAME_LEN: usize = 253;

/// A host: an address, or a name that the gateway resolves at its own site.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    /// Lower-case, without a trailing dot.
    Name(String),
}

/// Where a carried connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Addr {
        host: Host,
        port: u16,
    },
    /// A named access point defined by the gateway (`[service.NAME]`).
    Service(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("empty destination")]
    Empty,
    #[error("`{0}` has no port: write host:port (IPv6 as [addr]:port), or a service name")]
    MissingPort(String),
    #[error("`{0}`: port must be a number from 1 to 65535")]
    BadPort(String),
    #[error("`{0}` is not a valid host name or address")]
    BadHost(String),
}

impl Host {
    /// Parses a host without port: an IPv4/IPv6 address (IPv6 may be bracketed) or a
    /// DNS name (letters, digits, `-`, `_`, dot-separated labels of 1 to 63 bytes).
    pub fn parse(text: &str) -> Result<Host, TargetError> {
        let unbracketed = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(text);
        if let Ok(ip) = IpAddr::from_str(unbracketed) {
            return Ok(Host::Ip(ip));
        }
        let name = text.strip_suffix('.').unwrap_or(text);
        if is_valid_name(name) {
            Ok(Host::Name(name.to_ascii_lowercase()))
        } else {
            Err(TargetError::BadHost(text.to_string()))
        }
    }
}

/// True for a DNS-style name: dot-separated labels of 1..=63 bytes from
/// `[A-Za-z0-9_-]`, not starting or ending with `-`, at most [`MAX_NAME_LEN`] bytes.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// True for a service name: a single label (no dots), so that it can never be taken for a
/// host name with a port.
pub fn is_valid_service_name(name: &str) -> bool {
    !name.contains('.') && is_valid_name(name) && !name.bytes().all(|b| b.is_ascii_digit())
}

impl Target {
    /// Parses the wire form (see the module docs).
    pub fn parse(text: &str) -> Result<Target, TargetError> {
        if text.is_empty() {
            return Err(TargetError::Empty);
        }
        if let Ok(sa) = SocketAddr::from_str(text) {
            if sa.port() == 0 {
                return Err(TargetError::BadPort(text.to_string()));
            }
            return Ok(Target::Addr {
                host: Host::Ip(sa.ip()),
                port: sa.port(),
            });
        }
        // "[v6]:port" handled above; a bare IPv6 address has several colons and no port.
        if text.starts_with('[') || text.matches(':').count() > 1 {
            if IpAddr::from_str(text.trim_start_matches('[').trim_end_matches(']')).is_ok() {
                return Err(TargetError::MissingPort(text.to_string()));
            }
            return Err(TargetError::BadHost(text.to_string()));
        }
        match text.rsplit_once(':') {
            Some((host, port)) => {
                let port =
                    parse_port(port).ok_or_else(|| TargetError::BadPort(text.to_string()))?;
                Ok(Target::Addr {
                    host: Host::parse(host)?,
                    port,
                })
            }
            None if is_valid_service_name(text) => Ok(Target::Service(text.to_ascii_lowercase())),
            None => match Host::parse(text) {
                Ok(_) => Err(TargetError::MissingPort(text.to_string())),
                Err(e) => Err(e),
            },
        }
    }

    pub fn port(&self) -> Option<u16> {
        match self {
            Target::Addr { port, .. } => Some(*port),
            Target::Service(_) => None,
        }
    }
}

fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

impl FromStr for Target {
    type Err = TargetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Target::parse(s)
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr { host, port } => write!(f, "{host}:{port}"),
            Target::Service(name) => f.write_str(name),
        }
    }
}

impl From<SocketAddr> for Target {
    fn from(sa: SocketAddr) -> Self {
        Target::Addr {
            host: Host::Ip(sa.ip()),
            port: sa.port(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_form() {
        assert_eq!(
            Target::parse("DB.Site-B.internal.:5432"),
            Ok(Target::Addr {
                host: Host::Name("db.site-b.internal".into()),
                port: 5432
            })
        );
        assert_eq!(
            Target::parse("[fd00::1]:22").map(|t| t.to_string()),
            Ok("[fd00::1]:22".to_string())
        );
        assert_eq!(Target::parse("pg"), Ok(Target::Service("pg".into())));
        assert_eq!(
            Target::parse("10.0.0.1:0"),
            Err(TargetError::BadPort("10.0.0.1:0".into()))
        );
        assert!(matches!(
            Target::parse("fd00::1"),
            Err(TargetError::MissingPort(_))
        ));
        assert!(matches!(
            Target::parse("db.example.org"),
            Err(TargetError::MissingPort(_))
        ));
        assert!(matches!(
            Target::parse("a b:1"),
            Err(TargetError::BadHost(_))
        ));
        assert!(matches!(
            Target::parse("x:+1"),
            Err(TargetError::BadPort(_))
        ));
    }
}
