//! The local protocol between the preload library and the agent, over the agent's Unix
//! socket. One request per connection; text lines of at most [`MAX_LINE`] bytes.
//!
//! ```text
//! preload                                   agent
//!   REGISTER <source> <target> <via|-> <wait|later|nowait>
//!                                  ◀──────  OK <listener>        (registration stored)
//!   connect(app's fd, listener) ────────▶   accepted, matched by source address
//!                                             and by the uid of the connecting socket
//!                                  ◀──────  VERDICT ok | VERDICT <class>   (wait only)
//!
//!   VERDICT <source>               ◀──────  VERDICT ok | VERDICT <class>
//!     (a `later` registration's answer, asked for when the program checks a
//!      non-blocking connect: it waits until the gateway has answered)
//!
//!   LISTEN <address>  (socket passed, not bound yet)
//!                                  ◀──────  LISTENING <public address>
//!     (a bind on a `[[callback]]` port, or on a gateway's callback address with port
//!      0: the gateway listens there for the program; the agent keeps the socket until
//!      it listens, then follows it, and ends the lease when it is gone)
//!   PEER  (an accepted socket passed) ◀───  PEER <far peer> <public address>
//!     (who connected to a callback listener at the gateway)
//!
//!   RESOLVE <name>                 ◀──────  ADDRS <ipv4> <ipv6>  (synthetic addresses)
//!   NAME <ip>                      ◀──────  NAME <name>          (reverse of RESOLVE)
//!   any request                    ◀──────  ERR <class> [message]
//! ```
//!
//! `target` is the wire form of [`Target`]; for a synthetic address the agent puts the
//! name back. `via` is `-` when the agent should choose (synthetic addresses).
//! Every failure is a [`Refusal`], one word on the wire, with the errno a program sees.
//!
//! `OK` may carry a second word, the callback address of the registration's gateway:
//! what `getsockname` shows on the redirected socket, so that a program advertises an
//! address the far site can reach (FTP's `PORT`).
//!
//! Versions: this is version [`VERSION`]. `VERSION` asks the agent for its own; a
//! request an agent does not know gets `ERR unsupported`, so a newer library can tell
//! an older agent apart and fall back, and new requests are new words.
//!
//! `STATUS` answers with the agent's status as JSON (not a line), then closes; so do
//! `SERVICES` (per gateway, what this agent's identity may reach by name) and
//! `EXPLAIN <gateway> <target>` (that gateway's policy answer for the target).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::callback::ListenRefusal;
use crate::connect::ConnectError;
use crate::target::{Target, is_valid_name, is_valid_service_name};

/// The version of this protocol.
pub const VERSION: u32 = 1;

/// The requests of this version, by their first word.
const KNOWN_REQUESTS: [&str; 10] = [
    "REGISTER", "VERDICT", "RESOLVE", "NAME", "STATUS", "VERSION", "LISTEN", "PEER", "SERVICES",
    "EXPLAIN",
];

/// How long the agent may take to answer anything but a verdict.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// How long the agent waits for the gateway's answer to a registered connection before
/// it answers `timed-out` itself. The library waits [`ANSWER_WITHIN`] longer than this
/// for the agent, so that the agent's answer, not the library's clock, decides.
pub const VERDICT_WITHIN: Duration = Duration::from_secs(60);

/// Why a request failed, or why a registered connection did not go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The gateway's answer to the CONNECT (see [`ConnectError`]).
    Connect(ConnectError),
    /// No working connection to the gateway could carry it.
    Unavailable,
    /// The requesting process is not the agent's user, root, or in its group.
    Forbidden,
    /// The source address is registered already and not yet connected.
    Busy,
    /// The synthetic address pool is full.
    PoolFull,
    /// Nothing is known of the address or registration asked about.
    Unknown,
    /// The request is not one this agent knows (a newer library).
    Unsupported,
    /// A callback listener the gateway did not open.
    Listen(ListenRefusal),
}

impl Refusal {
    const LOCAL: [Refusal; 6] = [
        Refusal::Unavailable,
        Refusal::Forbidden,
        Refusal::Busy,
        Refusal::PoolFull,
        Refusal::Unknown,
        Refusal::Unsupported,
    ];

    /// The word on the wire, in logs and in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Connect(e) => e.as_str(),
            Refusal::Listen(e) => e.as_str(),
            Refusal::Unavailable => "unavailable",
            Refusal::Forbidden => "forbidden",
            Refusal::Busy => "busy",
            Refusal::PoolFull => "pool-full",
            Refusal::Unknown => "unknown",
            Refusal::Unsupported => "unsupported",
        }
    }

    pub fn parse(word: &str) -> Option<Refusal> {
        ConnectError::parse(word)
            .map(Refusal::Connect)
            .or_else(|| ListenRefusal::parse(word).map(Refusal::Listen))
            .or_else(|| Refusal::LOCAL.into_iter().find(|r| r.as_str() == word))
    }

    /// What `connect` fails with, in the program: the far side's errno, or
    /// `ECONNREFUSED` for anything that kept the connection from being tried (fail
    /// closed).
    pub fn errno(self) -> i32 {
        const ECONNREFUSED: i32 = 111;
        match self {
            Refusal::Connect(e) => e.errno(),
            Refusal::Listen(e) => e.errno(),
            Refusal::Unavailable
            | Refusal::Forbidden
            | Refusal::Busy
            | Refusal::PoolFull
            | Refusal::Unknown
            | Refusal::Unsupported => ECONNREFUSED,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<ConnectError> for Refusal {
    fn from(e: ConnectError) -> Refusal {
        Refusal::Connect(e)
    }
}

/// Longest line either side accepts.
pub const MAX_LINE: usize = 1024;

/// When the program learns the gateway's answer for a registered connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictDelivery {
    /// A blocking connect: on the registration's own connection, as soon as it is known.
    Wait,
    /// A non-blocking connect: kept by the agent for a `VERDICT` request.
    Later,
    /// Not at all (an optimistic route): a failure arrives as a reset.
    Never,
}

impl VerdictDelivery {
    fn as_str(self) -> &'static str {
        match self {
            VerdictDelivery::Wait => "wait",
            VerdictDelivery::Later => "later",
            VerdictDelivery::Never => "nowait",
        }
    }

    fn parse(text: &str) -> Option<VerdictDelivery> {
        [
            VerdictDelivery::Wait,
            VerdictDelivery::Later,
            VerdictDelivery::Never,
        ]
        .into_iter()
        .find(|d| d.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Register {
        source: SocketAddr,
        target: Target,
        via: Option<String>,
        verdict: VerdictDelivery,
    },
    /// The gateway's answer for a `later` registration from `source`.
    Verdict {
        source: SocketAddr,
    },
    /// The agent's status, as JSON.
    Status,
    /// The agent's protocol version.
    Version,
    Resolve {
        name: String,
    },
    Name {
        ip: IpAddr,
    },
    /// A callback listener at the gateway for the socket passed with it; `address` is
    /// what the program asked to bind.
    Listen {
        address: SocketAddr,
    },
    /// Who connected to the callback listener whose accepted socket is passed with it.
    Peer,
    /// What this agent's identity may reach by name, per gateway (JSON).
    Services,
    /// A gateway's policy answer for `target` (JSON).
    Explain {
        via: String,
        target: Target,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Registered: connect the program's socket to this listener. `callback`: the
    /// gateway's callback address, when it has one for this agent.
    Ok {
        listener: SocketAddr,
        callback: Option<IpAddr>,
    },
    /// The callback listener is open at the gateway, at this address.
    Listening {
        public: SocketAddr,
    },
    /// An accepted callback connection: who connected, and where.
    Peer {
        far: SocketAddr,
        public: SocketAddr,
    },
    /// The gateway's answer for a registered connection: `None` is success.
    Verdict {
        error: Option<Refusal>,
    },
    Addrs {
        v4: IpAddr,
        v6: IpAddr,
    },
    Name {
        name: String,
    },
    Version {
        version: u32,
    },
    Err {
        refusal: Refusal,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("line is not UTF-8")]
    NotText,
    #[error("unknown or malformed message: {0:?}")]
    Malformed(String),
    #[error("unknown request {0:?} (this is local protocol {VERSION})")]
    Unsupported(String),
}

/// Splits off one line: `Ok(None)` while incomplete.
fn line(buf: &[u8]) -> Result<Option<(&str, usize)>, LocalError> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(end) if end > MAX_LINE => Err(LocalError::TooLong),
        Some(end) => {
            let text = std::str::from_utf8(&buf[..end]).map_err(|_| LocalError::NotText)?;
            Ok(Some((text, end + 1)))
        }
        None if buf.len() > MAX_LINE => Err(LocalError::TooLong),
        None => Ok(None),
    }
}

impl Request {
    pub fn decode(buf: &[u8]) -> Result<Option<(Request, usize)>, LocalError> {
        let Some((text, used)) = line(buf)? else {
            return Ok(None);
        };
        let bad = || LocalError::Malformed(text.chars().take(80).collect());
        let words: Vec<&str> = text.split(' ').collect();
        let request = match words.as_slice() {
            ["REGISTER", source, target, via, mode] => Request::Register {
                source: source.parse().map_err(|_| bad())?,
                target: Target::parse(target).map_err(|_| bad())?,
                via: match *via {
                    "-" => None,
                    v if is_valid_service_name(v) => Some(v.to_string()),
                    _ => return Err(bad()),
                },
                verdict: VerdictDelivery::parse(mode).ok_or_else(bad)?,
            },
            ["VERDICT", source] => Request::Verdict {
                source: source.parse().map_err(|_| bad())?,
            },
            ["RESOLVE", name] if is_valid_name(name) => Request::Resolve {
                name: name.to_ascii_lowercase(),
            },
            ["NAME", ip] => Request::Name {
                ip: ip.parse().map_err(|_| bad())?,
            },
            ["LISTEN", address] => Request::Listen {
                address: address.parse().map_err(|_| bad())?,
            },
            ["PEER"] => Request::Peer,
            ["SERVICES"] => Request::Services,
            ["EXPLAIN", via, target] if is_valid_service_name(via) => Request::Explain {
                via: via.to_string(),
                target: Target::parse(target).map_err(|_| bad())?,
            },
            ["STATUS"] => Request::Status,
            ["VERSION"] => Request::Version,
            [verb, ..] if !KNOWN_REQUESTS.contains(verb) => {
                return Err(LocalError::Unsupported(verb.chars().take(32).collect()));
            }
            _ => return Err(bad()),
        };
        Ok(Some((request, used)))
    }

    pub fn encode(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Register {
                source,
                target,
                via,
                verdict,
            } => writeln!(
                f,
                "REGISTER {source} {target} {} {}",
                via.as_deref().unwrap_or("-"),
                verdict.as_str()
            ),
            Request::Verdict { source } => writeln!(f, "VERDICT {source}"),
            Request::Resolve { name } => writeln!(f, "RESOLVE {name}"),
            Request::Name { ip } => writeln!(f, "NAME {ip}"),
            Request::Listen { address } => writeln!(f, "LISTEN {address}"),
            Request::Peer => writeln!(f, "PEER"),
            Request::Services => writeln!(f, "SERVICES"),
            Request::Explain { via, target } => writeln!(f, "EXPLAIN {via} {target}"),
            Request::Status => writeln!(f, "STATUS"),
            Request::Version => writeln!(f, "VERSION"),
        }
    }
}

impl Reply {
    pub fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, LocalError> {
        let Some((text, used)) = line(buf)? else {
            return Ok(None);
        };
        let bad = || LocalError::Malformed(text.chars().take(80).collect());
        let (head, rest) = text.split_once(' ').unwrap_or((text, ""));
        let reply = match head {
            "OK" => {
                let (listener, callback) = match rest.split_once(' ') {
                    Some((l, c)) => (l, Some(c.parse().map_err(|_| bad())?)),
                    None => (rest, None),
                };
                Reply::Ok {
                    listener: listener.parse().map_err(|_| bad())?,
                    callback,
                }
            }
            "LISTENING" => Reply::Listening {
                public: rest.parse().map_err(|_| bad())?,
            },
            "PEER" => {
                let (far, public) = rest.split_once(' ').ok_or_else(bad)?;
                Reply::Peer {
                    far: far.parse().map_err(|_| bad())?,
                    public: public.parse().map_err(|_| bad())?,
                }
            }
            "VERDICT" if rest == "ok" => Reply::Verdict { error: None },
            "VERDICT" => Reply::Verdict {
                error: Some(Refusal::parse(rest).ok_or_else(bad)?),
            },
            "VERSION" => Reply::Version {
                version: rest.parse().map_err(|_| bad())?,
            },
            "ADDRS" => {
                let (v4, v6) = rest.split_once(' ').ok_or_else(bad)?;
                Reply::Addrs {
                    v4: v4.parse().map_err(|_| bad())?,
                    v6: v6.parse().map_err(|_| bad())?,
                }
            }
            "NAME" if is_valid_name(rest) => Reply::Name {
                name: rest.to_string(),
            },
            "ERR" => {
                let (word, message) = rest.split_once(' ').unwrap_or((rest, ""));
                Reply::Err {
                    refusal: Refusal::parse(word).ok_or_else(bad)?,
                    message: message.to_string(),
                }
            }
            _ => return Err(bad()),
        };
        Ok(Some((reply, used)))
    }

    pub fn encode(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Ok {
                listener,
                callback: None,
            } => writeln!(f, "OK {listener}"),
            Reply::Ok {
                listener,
                callback: Some(ip),
            } => writeln!(f, "OK {listener} {ip}"),
            Reply::Listening { public } => writeln!(f, "LISTENING {public}"),
            Reply::Peer { far, public } => writeln!(f, "PEER {far} {public}"),
            Reply::Verdict { error: None } => writeln!(f, "VERDICT ok"),
            Reply::Verdict { error: Some(r) } => writeln!(f, "VERDICT {r}"),
            Reply::Addrs { v4, v6 } => writeln!(f, "ADDRS {v4} {v6}"),
            Reply::Name { name } => writeln!(f, "NAME {name}"),
            Reply::Version { version } => writeln!(f, "VERSION {version}"),
            Reply::Err { refusal, message } if message.is_empty() => {
                writeln!(f, "ERR {refusal}")
            }
            Reply::Err { refusal, message } => {
                // A message never breaks the line framing.
                let message: String = message
                    .chars()
                    .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
                    .take(MAX_LINE / 2)
                    .collect();
                writeln!(f, "ERR {refusal} {message}")
            }
        }
    }
}

/// The loopback addresses a redirected socket without an address of its own is bound
/// to before it registers (the agent knows the connection that arrives by its source),
/// in the order to try them, for a connect to `destination`: IPv4's for IPv4; for an
/// IPv4 destination in mapped form (Java, dual-stack servers) the mapped IPv4 loopback
/// first, so the socket's own address is IPv4-mapped as a direct connection's would be
/// and protocols that send it (FTP's EPRT) stay IPv4; else ::1 first, where IPv6 is up,
/// then the mapped IPv4 loopback (a dual-stack socket).
pub fn loopback_sources(destination: SocketAddr) -> &'static [IpAddr] {
    use std::net::{Ipv4Addr, Ipv6Addr};
    const MAPPED: IpAddr = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
    const V4: &[IpAddr] = &[IpAddr::V4(Ipv4Addr::LOCALHOST)];
    const MAPPED_FIRST: &[IpAddr] = &[MAPPED, IpAddr::V6(Ipv6Addr::LOCALHOST)];
    const V6_FIRST: &[IpAddr] = &[IpAddr::V6(Ipv6Addr::LOCALHOST), MAPPED];
    match destination {
        SocketAddr::V4(_) => V4,
        SocketAddr::V6(d) if d.ip().to_ipv4_mapped().is_some() => MAPPED_FIRST,
        SocketAddr::V6(_) => V6_FIRST,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_reads_back_and_fails_closed() {
        let all = ConnectError::ALL
            .into_iter()
            .map(Refusal::Connect)
            .chain(ListenRefusal::ALL.into_iter().map(Refusal::Listen))
            .chain(Refusal::LOCAL);
        for refusal in all {
            assert_eq!(Refusal::parse(refusal.as_str()), Some(refusal));
            assert_ne!(refusal.errno(), 0);
        }
        assert_eq!(Refusal::parse("unrouted"), None);
        assert_eq!(Refusal::Forbidden.errno(), 111);
    }

    #[test]
    fn register_round_trip_and_partial_lines() {
        let r = Request::Register {
            source: "127.0.0.1:40000".parse().unwrap(),
            target: Target::parse("db.site-b.internal:5432").unwrap(),
            via: Some("site-b".into()),
            verdict: VerdictDelivery::Later,
        };
        let wire = r.encode();
        assert_eq!(
            Request::decode(&wire.as_bytes()[..wire.len() - 1]),
            Ok(None)
        );
        assert_eq!(Request::decode(wire.as_bytes()), Ok(Some((r, wire.len()))));
        assert!(Request::decode(b"REGISTER x y z w\n").is_err());
        assert!(matches!(
            Request::decode(b"SHUTDOWN 127.0.0.1:5000\n"),
            Err(LocalError::Unsupported(verb)) if verb == "SHUTDOWN"
        ));
        assert!(Request::decode(&[b'a'; MAX_LINE + 2]).is_err());
    }

    #[test]
    fn callback_messages_round_trip() {
        for reply in [
            Reply::Ok {
                listener: "127.0.0.1:1".parse().unwrap(),
                callback: Some("203.0.113.7".parse().unwrap()),
            },
            Reply::Ok {
                listener: "[::1]:1".parse().unwrap(),
                callback: None,
            },
            Reply::Listening {
                public: "203.0.113.7:50010".parse().unwrap(),
            },
            Reply::Peer {
                far: "10.1.2.3:20".parse().unwrap(),
                public: "203.0.113.7:50010".parse().unwrap(),
            },
            Reply::Err {
                refusal: Refusal::Listen(ListenRefusal::InUse),
                message: "port 50010 is in use".into(),
            },
        ] {
            let wire = reply.encode();
            assert_eq!(
                Reply::decode(wire.as_bytes()),
                Ok(Some((reply, wire.len())))
            );
        }
        for request in [
            Request::Listen {
                address: "0.0.0.0:50010".parse().unwrap(),
            },
            Request::Peer,
            Request::Services,
            Request::Explain {
                via: "site-b".into(),
                target: Target::parse("db.site-b.internal:5432").unwrap(),
            },
        ] {
            let wire = request.encode();
            assert_eq!(
                Request::decode(wire.as_bytes()),
                Ok(Some((request, wire.len())))
            );
        }
        assert_eq!(Refusal::Listen(ListenRefusal::InUse).errno(), 98);
    }
}
