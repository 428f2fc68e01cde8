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
//!   RESOLVE <name>                 ◀──────  ADDRS <ipv4> <ipv6>  (synthetic addresses)
//!   NAME <ip>                      ◀──────  NAME <name>          (reverse of RESOLVE)
//!   any request                    ◀──────  ERR <class> [message]
//! ```
//!
//! `target` is the wire form of [`Target`]; for a synthetic address the agent puts the
//! name back. `via` is `-` when the agent should choose (synthetic addresses).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::target::{Target, is_valid_name, is_valid_service_name};

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
    Resolve {
        name: String,
    },
    Name {
        ip: IpAddr,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Registered: connect the program's socket to this listener.
    Ok {
        listener: SocketAddr,
    },
    /// The gateway's answer for a blocking connect: `None` is success, else the class.
    Verdict {
        error: Option<String>,
    },
    Addrs {
        v4: IpAddr,
        v6: IpAddr,
    },
    Name {
        name: String,
    },
    Err {
        class: String,
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

fn class_word(word: &str) -> bool {
    !word.is_empty()
        && word.len() <= 32
        && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
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
            "OK" => Reply::Ok {
                listener: rest.parse().map_err(|_| bad())?,
            },
            "VERDICT" if rest == "ok" => Reply::Verdict { error: None },
            "VERDICT" if class_word(rest) => Reply::Verdict {
                error: Some(rest.to_string()),
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
                let (class, message) = rest.split_once(' ').unwrap_or((rest, ""));
                if !class_word(class) {
                    return Err(bad());
                }
                Reply::Err {
                    class: class.to_string(),
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
            Reply::Ok { listener } => writeln!(f, "OK {listener}"),
            Reply::Verdict { error: None } => writeln!(f, "VERDICT ok"),
            Reply::Verdict { error: Some(c) } => writeln!(f, "VERDICT {c}"),
            Reply::Addrs { v4, v6 } => writeln!(f, "ADDRS {v4} {v6}"),
            Reply::Name { name } => writeln!(f, "NAME {name}"),
            Reply::Err { class, message } if message.is_empty() => writeln!(f, "ERR {class}"),
            Reply::Err { class, message } => {
                // A message never breaks the line framing.
                let message: String = message
                    .chars()
                    .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
                    .take(MAX_LINE / 2)
                    .collect();
                writeln!(f, "ERR {class} {message}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_round_trip_and_partial_lines() {
        let r = Request::Register {
            source: "127.0.0.1:40000".parse().unwrap_or_else(|e| panic!("{e}")),
            target: Target::parse("db.site-b.internal:5432").unwrap_or_else(|e| panic!("{e}")),
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
        assert!(Request::decode(&[b'a'; MAX_LINE + 2]).is_err());
    }
}
