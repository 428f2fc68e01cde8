//! Admission: what one source or one identity may hold of the gateway at a time.
//!
//! ```text
//! accept ─▶ handshake permit? ── no: closed at once (reset), counted
//!             │ (max_handshakes in all, max_handshakes_per_source per source)
//!             ▼ held until the TLS handshake ends, or handshake_timeout
//!           connection permit? ── no: GOAWAY with the reason, counted
//!             │ (max_connections_per_identity)
//!             ▼ held while the agent's connection lasts
//!           stream permit? ─────── no: answered `over-limit`, counted
//!               (max_streams_per_identity, over all the identity's connections)
//! ```
//!
//! Before the handshake nobody is authenticated, so the only handle on a flood is its
//! source: one IPv4 address, or one IPv6 /64 (what a single host is usually given).
//! After it, limits follow the identity, whichever addresses its agents come from.
//! Each permit gives its place back when dropped, however its task ends.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tunnel_proto::config::GatewayConfig;

#[derive(Debug, Default)]
struct Handshakes {
    waiting: usize,
    by_source: HashMap<IpAddr, usize>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    connections: usize,
    streams: usize,
}

#[derive(Debug)]
pub struct Admission {
    max_handshakes: usize,
    max_handshakes_per_source: usize,
    max_connections_per_identity: usize,
    max_streams_per_identity: usize,
    handshakes: Mutex<Handshakes>,
    identities: Mutex<HashMap<String, Usage>>,
}

/// Why a connection was closed before its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverCap {
    /// `max_handshakes` connections were already waiting.
    Total { max: usize },
    /// `max_handshakes_per_source` connections from this source were already waiting.
    Source { source: IpAddr, max: usize },
}

impl fmt::Display for OverCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OverCap::Total { max } => write!(
                f,
                "connection closed at once: {max} TLS handshakes already wait (max_handshakes)"
            ),
            OverCap::Source { source, max } => write!(
                f,
                "connection closed at once: {max} TLS handshakes from {source} already wait (max_handshakes_per_source)"
            ),
        }
    }
}

/// Why an identity may not have another connection or stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverLimit {
    Connections { identity: String, max: usize },
    Streams { identity: String, max: usize },
}

impl fmt::Display for OverLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        match self {
            OverLimit::Connections { identity, max } => write!(
                f,
                "identity {identity} has reached max_connections_per_identity ({max} connection{} open)",
                plural(*max)
            ),
            OverLimit::Streams { identity, max } => write!(
                f,
                "identity {identity} has reached max_streams_per_identity ({max} stream{} open)",
                plural(*max)
            ),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The source a handshake cap counts against: the IPv4 address (also when it comes
/// mapped into IPv6), or the /64 of an IPv6 address.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

impl Admission {
    pub fn new(config: &GatewayConfig) -> Arc<Admission> {
        Arc::new(Admission {
            max_handshakes: config.max_handshakes as usize,
            max_handshakes_per_source: config.max_handshakes_per_source as usize,
            max_connections_per_identity: config.max_connections_per_identity as usize,
            max_streams_per_identity: config.max_streams_per_identity as usize,
            handshakes: Mutex::default(),
            identities: Mutex::default(),
        })
    }

    /// A place for a connection from `peer` to wait for its TLS handshake.
    pub fn handshake(self: &Arc<Self>, peer: IpAddr) -> Result<HandshakePermit, OverCap> {
        let source = source_of(peer);
        let mut handshakes = lock(&self.handshakes);
        if handshakes.waiting >= self.max_handshakes {
            return Err(OverCap::Total {
                max: self.max_handshakes,
            });
        }
        let from_source = handshakes.by_source.entry(source).or_default();
        if *from_source >= self.max_handshakes_per_source {
            return Err(OverCap::Source {
                source,
                max: self.max_handshakes_per_source,
            });
        }
        *from_source += 1;
        handshakes.waiting += 1;
        Ok(HandshakePermit {
            admission: self.clone(),
            source,
        })
    }

    /// Connections waiting for their TLS handshake now.
    pub fn handshakes_waiting(&self) -> usize {
        lock(&self.handshakes).waiting
    }

    /// A place for one more agent connection of `identity`.
    pub fn connection(self: &Arc<Self>, identity: &str) -> Result<IdentityPermit, OverLimit> {
        self.take(identity, Held::Connection)
    }

    /// A place for one more stream of `identity`.
    pub fn stream(self: &Arc<Self>, identity: &str) -> Result<IdentityPermit, OverLimit> {
        self.take(identity, Held::Stream)
    }

    /// A place for one more stream that arrives for `identity` from outside (to its
    /// publications and callback listeners): a budget of its own, of the same size, so
    /// that connections from strangers never crowd out the identity's own streams.
    pub fn inbound_stream(self: &Arc<Self>, identity: &str) -> Result<IdentityPermit, OverLimit> {
        self.take(&format!("{identity} (inbound)"), Held::Stream)
    }

    fn take(self: &Arc<Self>, identity: &str, held: Held) -> Result<IdentityPermit, OverLimit> {
        let mut identities = lock(&self.identities);
        // Limits are at least 1, so an entry made here is never over them and never
        // left behind empty.
        let usage = identities.entry(identity.to_string()).or_default();
        let (count, max) = match held {
            Held::Connection => (&mut usage.connections, self.max_connections_per_identity),
            Held::Stream => (&mut usage.streams, self.max_streams_per_identity),
        };
        if *count >= max {
            let identity = identity.to_string();
            let over = match held {
                Held::Connection => OverLimit::Connections { identity, max },
                Held::Stream => OverLimit::Streams { identity, max },
            };
            return Err(over);
        }
        *count += 1;
        Ok(IdentityPermit {
            admission: self.clone(),
            identity: identity.to_string(),
            held,
        })
    }
}

/// A connection's place among those waiting for a TLS handshake.
#[derive(Debug)]
pub struct HandshakePermit {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let mut handshakes = lock(&self.admission.handshakes);
        handshakes.waiting = handshakes.waiting.saturating_sub(1);
        if let Some(n) = handshakes.by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                handshakes.by_source.remove(&self.source);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Held {
    Connection,
    Stream,
}

/// A connection's or a stream's place among its identity's.
#[derive(Debug)]
pub struct IdentityPermit {
    admission: Arc<Admission>,
    identity: String,
    held: Held,
}

impl Drop for IdentityPermit {
    fn drop(&mut self) {
        let mut identities = lock(&self.admission.identities);
        if let Some(usage) = identities.get_mut(&self.identity) {
            let count = match self.held {
                Held::Connection => &mut usage.connections,
                Held::Stream => &mut usage.streams,
            };
            *count = count.saturating_sub(1);
            if usage.connections == 0 && usage.streams == 0 {
                identities.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn admission(limits: &str) -> Arc<Admission> {
        let text = format!(
            "listen = \"127.0.0.1:1\"\nca = \"a\"\nca_key = \"b\"\ncert = \"c\"\nkey = \"d\"\n{limits}"
        );
        Admission::new(&GatewayConfig::parse(&text, Path::new("gateway.toml")).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn handshake_caps_per_source_and_in_all() {
        let a = admission("max_handshakes = 3\nmax_handshakes_per_source = 2\n");
        let first = a.handshake(ip("10.0.0.1")).expect("first");
        let _second = a
            .handshake(ip("::ffff:10.0.0.1"))
            .expect("second, same source");
        assert_eq!(
            a.handshake(ip("10.0.0.1")).map(drop),
            Err(OverCap::Source {
                source: ip("10.0.0.1"),
                max: 2
            })
        );
        let _third = a.handshake(ip("10.0.0.2")).expect("another source");
        assert_eq!(
            a.handshake(ip("10.0.0.3")).map(drop),
            Err(OverCap::Total { max: 3 })
        );
        drop(first);
        assert_eq!(a.handshakes_waiting(), 2);
        let _again = a.handshake(ip("10.0.0.1")).expect("a place was given back");
    }

    #[test]
    fn ipv6_sources_are_counted_by_slash_64() {
        let a = admission("max_handshakes_per_source = 1\n");
        let _one = a.handshake(ip("2001:db8:1:2::1")).expect("first");
        assert!(a.handshake(ip("2001:db8:1:2:ffff::9")).is_err());
        assert!(a.handshake(ip("2001:db8:1:3::1")).is_ok());
    }

    #[test]
    fn identity_limits_count_connections_and_streams_apart() {
        let a = admission("max_connections_per_identity = 1\nmax_streams_per_identity = 2\n");
        let conn = a.connection("alice").expect("first connection");
        assert!(matches!(
            a.connection("alice"),
            Err(OverLimit::Connections { max: 1, .. })
        ));
        let _bob = a.connection("bob").expect("another identity");
        let s1 = a.stream("alice").expect("stream 1");
        let _s2 = a.stream("alice").expect("stream 2");
        let over = a.stream("alice").map(drop);
        assert_eq!(
            over.map_err(|e| e.to_string()),
            Err("identity alice has reached max_streams_per_identity (2 streams open)".into())
        );
        drop(s1);
        let _s3 = a.stream("alice").expect("a place was given back");
        drop(conn);
        let _conn = a.connection("alice").expect("connection place given back");
    }
}
