//! Destination patterns, shared by the agent's routes and the gateway's allow rules.
//!
//! ```text
//! pattern  = host-pattern [ ":" ports ]
//! host     = "*"                       any destination
//!          | "*." name                 any name under that domain (not the domain itself)
//!          | name                      exactly that name
//!          | ip | ip "/" len           an address or a CIDR block
//!          | "[" ipv6 [ "/" len ] "]"  IPv6, bracketed when a port follows
//! ports    = port | port "-" port | "*"
//! ```
//!
//! Names compare without regard to case and to a trailing dot.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::target::{Host, Target, is_valid_name};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Any,
    /// Matches names ending in `.{suffix}`.
    Subdomains(String),
    Name(String),
    Net(IpNet),
}

/// An inclusive port range; `1..=65535` means any port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

impl Ports {
    pub const ANY: Ports = Ports {
        first: 1,
        last: u16::MAX,
    };

    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    pub host: HostPattern,
    pub ports: Ports,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    #[error("empty pattern")]
    Empty,
    #[error("`{0}`: the port must be N, N-M (N ≤ M, 1 to 65535) or *")]
    BadPorts(String),
    #[error(
        "`{0}` is not a host pattern: use *, *.domain, a host name, an address, or a CIDR block (IPv6 in [brackets] when a port follows)"
    )]
    BadHost(String),
    #[error("`{0}`: the CIDR block has host bits set; did you mean `{1}`?")]
    HostBitsSet(String, String),
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        let (host, ports) = split_host_ports(text)?;
        let ports = match ports {
            None => Ports::ANY,
            Some(p) => parse_ports(p).ok_or_else(|| PatternError::BadPorts(text.to_string()))?,
        };
        Ok(Pattern {
            host: parse_host_pattern(host, text)?,
            ports,
        })
    }

    /// True when this pattern accepts a connection to `ip:port`.
    pub fn matches_ip(&self, ip: IpAddr, port: u16) -> bool {
        self.ports.contains(port)
            && match &self.host {
                HostPattern::Any => true,
                HostPattern::Net(net) => net.contains(&ip.to_canonical()),
                HostPattern::Name(_) | HostPattern::Subdomains(_) => false,
            }
    }

    /// True when this pattern accepts a connection to the (not yet resolved) `name:port`.
    pub fn matches_name(&self, name: &str, port: u16) -> bool {
        if !self.ports.contains(port) {
            return false;
        }
        let name = name.strip_suffix('.').unwrap_or(name);
        match &self.host {
            HostPattern::Any => true,
            HostPattern::Name(n) => n.eq_ignore_ascii_case(name),
            HostPattern::Subdomains(suffix) => {
                let (name, suffix) = (name.as_bytes(), suffix.as_bytes());
                name.len() > suffix.len() + 1
                    && name.get(name.len() - suffix.len() - 1) == Some(&b'.')
                    && name
                        .get(name.len() - suffix.len()..)
                        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
            }
            HostPattern::Net(_) => false,
        }
    }

    /// True when this pattern accepts the target (a service never matches a pattern).
    pub fn matches(&self, target: &Target) -> bool {
        match target {
            Target::Addr {
                host: Host::Ip(ip),
                port,
            } => self.matches_ip(*ip, *port),
            Target::Addr {
                host: Host::Name(name),
                port,
            } => self.matches_name(name, *port),
            Target::Service(_) => false,
        }
    }

    /// True when the pattern names `ip` by address (an address or CIDR block that holds it),
    /// as opposed to reaching it through `*` or a host name. Used to unlock addresses that
    /// are refused by default (loopback, link-local, metadata).
    pub fn names_ip(&self, ip: IpAddr) -> bool {
        matches!(&self.host, HostPattern::Net(net) if net.contains(&ip.to_canonical()))
    }
}

fn split_host_ports(text: &str) -> Result<(&str, Option<&str>), PatternError> {
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| PatternError::BadHost(text.to_string()))?;
        return match after {
            "" => Ok((inside, None)),
            _ => match after.strip_prefix(':') {
                Some(ports) => Ok((inside, Some(ports))),
                None => Err(PatternError::BadHost(text.to_string())),
            },
        };
    }
    if text.matches(':').count() > 1 {
        // A bare IPv6 address or block; a port needs brackets.
        return Ok((text, None));
    }
    Ok(match text.split_once(':') {
        Some((host, ports)) => (host, Some(ports)),
        None => (text, None),
    })
}

fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

fn parse_ports(text: &str) -> Option<Ports> {
    if text == "*" {
        return Some(Ports::ANY);
    }
    let (first, last) = match text.split_once('-') {
        Some((a, b)) => (parse_port(a)?, parse_port(b)?),
        None => {
            let p = parse_port(text)?;
            (p, p)
        }
    };
    (first <= last).then_some(Ports { first, last })
}

fn parse_host_pattern(host: &str, whole: &str) -> Result<HostPattern, PatternError> {
    if host == "*" {
        return Ok(HostPattern::Any);
    }
    // A fully qualified name may end in a dot; so may an address written like one
    // (`10.7.2.1.`), which is the address, not a name no lookup would ever give.
    let host = host
        .strip_suffix('.')
        .filter(|h| !h.is_empty())
        .unwrap_or(host);
    if let Ok(ip) = IpAddr::from_str(host) {
        return Ok(HostPattern::Net(IpNet::from(ip.to_canonical())));
    }
    if host.contains('/') {
        let net = IpNet::from_str(host).map_err(|_| PatternError::BadHost(whole.to_string()))?;
        if net.trunc() != net {
            return Err(PatternError::HostBitsSet(
                whole.to_string(),
                net.trunc().to_string(),
            ));
        }
        return Ok(HostPattern::Net(net));
    }
    if let Some(suffix) = host.strip_prefix("*.") {
        if is_valid_name(suffix) {
            return Ok(HostPattern::Subdomains(suffix.to_ascii_lowercase()));
        }
    } else if is_valid_name(host) {
        return Ok(HostPattern::Name(host.to_ascii_lowercase()));
    }
    Err(PatternError::BadHost(whole.to_string()))
}

impl FromStr for Pattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::parse(s)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bracket = matches!(self.host, HostPattern::Net(IpNet::V6(_)));
        match &self.host {
            HostPattern::Any => f.write_str("*")?,
            HostPattern::Subdomains(s) => write!(f, "*.{s}")?,
            HostPattern::Name(n) => f.write_str(n)?,
            HostPattern::Net(net) if bracket => write!(f, "[{net}]")?,
            HostPattern::Net(net) => write!(f, "{net}")?,
        }
        match self.ports {
            Ports::ANY => Ok(()),
            Ports { first, last } if first == last => write!(f, ":{first}"),
            Ports { first, last } => write!(f, ":{first}-{last}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn cidr_and_ports() {
        let ip = |s: &str| IpAddr::from_str(s).unwrap();
        assert!(p("10.20.0.0/16").matches_ip(ip("10.20.3.4"), 80));
        assert!(!p("10.20.0.0/16").matches_ip(ip("10.21.3.4"), 80));
        assert!(p("[fd00::/8]:22").matches_ip(ip("fd12::1"), 22));
        assert!(!p("[fd00::/8]:22").matches_ip(ip("fd12::1"), 23));
        assert!(p("10.0.0.1:8000-8999").matches_ip(ip("::ffff:10.0.0.1"), 8080));
        assert!(p("127.0.0.1").names_ip(ip("127.0.0.1")));
        assert!(!p("*").names_ip(ip("127.0.0.1")));
        assert!(p("*").matches_ip(ip("127.0.0.1"), 1));
        // An address written with a trailing dot is that address (found by fuzzing: it
        // was a name that printed as the address, so the route table did not read back).
        assert_eq!(p("10.7.2.1."), p("10.7.2.1"));
        assert!(Pattern::parse(".").is_err());
    }

    #[test]
    fn names() {
        assert!(p("*.site-b.internal").matches_name("db.Site-B.internal.", 5432));
        assert!(!p("*.site-b.internal").matches_name("site-b.internal", 5432));
        assert!(!p("*.site-b.internal").matches_name("xsite-b.internal", 5432));
        assert!(p("db.site-b.internal:5432").matches_name("DB.site-b.internal", 5432));
        assert!(!p("db.site-b.internal:5432").matches_name("db.site-b.internal", 5433));
        assert!(!p("10.0.0.0/8").matches_name("db", 1));
    }

    #[test]
    fn errors() {
        assert!(matches!(
            Pattern::parse("10.0.0.1/8"),
            Err(PatternError::HostBitsSet(_, _))
        ));
        assert!(matches!(
            Pattern::parse("db:0"),
            Err(PatternError::BadPorts(_))
        ));
        assert!(matches!(
            Pattern::parse("db:9-1"),
            Err(PatternError::BadPorts(_))
        ));
        assert!(matches!(
            Pattern::parse("db*.x"),
            Err(PatternError::BadHost(_))
        ));
        assert!(matches!(
            Pattern::parse("[fd00::1"),
            Err(PatternError::BadHost(_))
        ));
    }
}
