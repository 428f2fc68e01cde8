//! Callbacks: a program under the tunnel that listens on a port of a `[[callback]]`
//! range gets that listener opened at the gateway's callback address, so that the far
//! site can connect *back* to it (FTP active mode, GridFTP data channels, GRAM
//! callback contacts).
//!
//! ```text
//!  program: bind(50010) ─▶ preload: LISTEN (socket passed) ─▶ agent
//!  agent ─POST /v1/callbacks {resume, port, ports}─▶ gateway (on a normal connection)
//!        ◀─ 200 {address, port}, the stream left open: the lease; the gateway listens
//!           on address:port while it lives, and stops when it ends
//!  far site ─TCP─▶ gateway address:port ─CONNECT callback (tunnel-callback: port,
//!        tunnel-client: far peer)─▶ agent, over its reverse connection (`resume`)
//!  agent ─TCP─▶ the program's own listener; its accept() shows the far peer
//! ```
//!
//! Refusals of a lease carry one [`ListenRefusal`] word in the `tunnel-error` header,
//! which the program sees as the errno a local `bind` would give.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

/// Where an agent asks for a callback listener.
pub const CALLBACKS_PATH: &str = "/v1/callbacks";
/// On a reverse CONNECT: the gateway port the connection arrived at.
pub const CALLBACK_HEADER: &str = "tunnel-callback";
/// The authority of a callback CONNECT (the port is in [`CALLBACK_HEADER`]).
pub const CALLBACK_AUTHORITY: &str = "callback.invalid";

/// A range of TCP ports, `"50000-50100"` or one port `"50000"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn parse(text: &str) -> Result<PortRange, String> {
        let bad = || {
            format!("`{text}` is not a port range: FIRST-LAST, e.g. \"50000-50100\", or one port")
        };
        let (first, last) = match text.trim().split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (text.trim(), text.trim()),
        };
        let first: u16 = first.parse().map_err(|_| bad())?;
        let last: u16 = last.parse().map_err(|_| bad())?;
        if first == 0 || last < first {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn ports(&self) -> RangeInclusive<u16> {
        self.first..=self.last
    }

    /// The ports both ranges hold, if any.
    pub fn overlap(&self, other: &PortRange) -> Option<PortRange> {
        let first = self.first.max(other.first);
        let last = self.last.min(other.last);
        (first <= last).then_some(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// An agent's request for a listener at the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenRequest {
    /// The resume token of the agent's reverse connection, which carries the
    /// connections that arrive.
    pub resume: String,
    /// The port the program asked for; 0: any free one of `ports`.
    pub port: u16,
    /// The agent's `[[callback]]` range the port comes from.
    pub ports: PortRange,
}

/// The listener the gateway opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listening {
    /// The callback address (as the far site sees the gateway).
    pub address: IpAddr,
    pub port: u16,
}

/// What the gateway tells a reverse connection about callbacks, after its offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackOffer {
    pub address: IpAddr,
    pub ports: PortRange,
}

/// Why a callback listener was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenRefusal {
    /// The port is taken at the gateway (`EADDRINUSE`).
    InUse,
    /// The gateway has no callbacks, or not on that port (`EADDRNOTAVAIL`).
    NotAvailable,
    /// This identity may not open callback listeners (`EACCES`).
    Denied,
    /// The identity holds as many listeners as the gateway allows (`EADDRINUSE`).
    OverLimit,
    /// The agent's reverse connection is not up (`EADDRNOTAVAIL`).
    NoReverse,
}

impl ListenRefusal {
    pub const ALL: [ListenRefusal; 5] = [
        ListenRefusal::InUse,
        ListenRefusal::NotAvailable,
        ListenRefusal::Denied,
        ListenRefusal::OverLimit,
        ListenRefusal::NoReverse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ListenRefusal::InUse => "in-use",
            ListenRefusal::NotAvailable => "not-available",
            ListenRefusal::Denied => "listen-denied",
            ListenRefusal::OverLimit => "listen-over-limit",
            ListenRefusal::NoReverse => "no-reverse",
        }
    }

    pub fn parse(word: &str) -> Option<ListenRefusal> {
        ListenRefusal::ALL.into_iter().find(|r| r.as_str() == word)
    }

    /// The HTTP status the gateway answers with.
    pub fn status(self) -> u16 {
        match self {
            ListenRefusal::InUse => 409,
            ListenRefusal::NotAvailable | ListenRefusal::NoReverse => 404,
            ListenRefusal::Denied => 403,
            ListenRefusal::OverLimit => 429,
        }
    }

    /// What `bind` fails with in the program.
    pub fn errno(self) -> i32 {
        const EACCES: i32 = 13;
        const EADDRINUSE: i32 = 98;
        const EADDRNOTAVAIL: i32 = 99;
        match self {
            ListenRefusal::InUse | ListenRefusal::OverLimit => EADDRINUSE,
            ListenRefusal::NotAvailable | ListenRefusal::NoReverse => EADDRNOTAVAIL,
            ListenRefusal::Denied => EACCES,
        }
    }
}

impl fmt::Display for ListenRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        let r = PortRange::parse("50000-50100").unwrap();
        assert!(r.contains(50000) && r.contains(50100) && !r.contains(50101));
        assert_eq!(r.to_string(), "50000-50100");
        assert_eq!(PortRange::parse(" 7000 ").unwrap().to_string(), "7000");
        for bad in ["", "0-10", "10-5", "a-b", "70000", "1-2-3"] {
            assert!(PortRange::parse(bad).is_err(), "{bad}");
        }
        let other = PortRange::parse("50050-60000").unwrap();
        assert_eq!(r.overlap(&other), PortRange::parse("50050-50100").ok());
        assert_eq!(r.overlap(&PortRange::parse("1-2").unwrap()), None);
    }

    #[test]
    fn refusals_read_back() {
        for r in ListenRefusal::ALL {
            assert_eq!(ListenRefusal::parse(r.as_str()), Some(r));
        }
    }
}
