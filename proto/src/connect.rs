//! What the CONNECT answer says about a carried connection.
//!
//! The gateway answers a CONNECT with `200` once the destination accepted the connection,
//! or with an error status and a `tunnel-error` header naming the failure class. The agent
//! turns the class into what the local program sees: for a blocking connect the errno, for
//! everything else a TCP reset, and into its log and status.
//!
//! | class            | status | errno          |
//! |------------------|--------|----------------|
//! | `denied`         | 403    | EACCES         |
//! | `refused`        | 502    | ECONNREFUSED   |
//! | `unreachable`    | 502    | EHOSTUNREACH   |
//! | `timed-out`      | 504    | ETIMEDOUT      |
//! | `name-not-found` | 502    | EHOSTUNREACH   |
//! | `bad-request`    | 400    | EINVAL         |
//! | `over-limit`     | 429    | ECONNREFUSED   |
//! | `gateway`        | 502    | ECONNREFUSED   |

use std::fmt;

/// Name of the response header that carries the failure class.
pub const ERROR_HEADER: &str = "tunnel-error";

/// Why the gateway could not connect a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectError {
    /// The gateway's policy does not allow this identity to reach the destination.
    Denied,
    /// The destination answered with a reset (nothing listens on that port).
    Refused,
    /// No route to the destination host or network.
    Unreachable,
    /// The destination did not answer within the gateway's connect timeout.
    TimedOut,
    /// The gateway could not resolve the name.
    NameNotFound,
    /// The request itself was malformed (bad destination, not a CONNECT).
    BadRequest,
    /// The identity already has as many streams open as the gateway allows it.
    OverLimit,
    /// Anything else that went wrong at the gateway.
    Gateway,
}

/// The answer to a CONNECT, as the agent sees it.
pub type Outcome = Result<(), ConnectError>;

// Linux errno values; the preload maps them to the program's errno. Kept here as
// numbers so this crate needs no libc.
const EACCES: i32 = 13;
const EINVAL: i32 = 22;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
const ETIMEDOUT: i32 = 110;

impl ConnectError {
    /// The class of a failed TCP connect, as the end that tried it reports it.
    pub fn of_connect(e: &std::io::Error) -> ConnectError {
        const ENETUNREACH: i32 = 101;
        match (e.kind(), e.raw_os_error()) {
            (std::io::ErrorKind::ConnectionRefused, _) => ConnectError::Refused,
            (std::io::ErrorKind::TimedOut, _) => ConnectError::TimedOut,
            (_, Some(ENETUNREACH | EHOSTUNREACH)) => ConnectError::Unreachable,
            (std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable, _) => {
                ConnectError::Unreachable
            }
            _ => ConnectError::Gateway,
        }
    }

    pub const ALL: [ConnectError; 8] = [
        ConnectError::Denied,
        ConnectError::Refused,
        ConnectError::Unreachable,
        ConnectError::TimedOut,
        ConnectError::NameNotFound,
        ConnectError::BadRequest,
        ConnectError::OverLimit,
        ConnectError::Gateway,
    ];

    /// The value of the `tunnel-error` header; also what logs and status print.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectError::Denied => "denied",
            ConnectError::Refused => "refused",
            ConnectError::Unreachable => "unreachable",
            ConnectError::TimedOut => "timed-out",
            ConnectError::NameNotFound => "name-not-found",
            ConnectError::BadRequest => "bad-request",
            ConnectError::OverLimit => "over-limit",
            ConnectError::Gateway => "gateway",
        }
    }

    pub fn parse(text: &str) -> Option<ConnectError> {
        ConnectError::ALL.into_iter().find(|e| e.as_str() == text)
    }

    pub fn status(self) -> u16 {
        match self {
            ConnectError::Denied => 403,
            ConnectError::BadRequest => 400,
            ConnectError::OverLimit => 429,
            ConnectError::TimedOut => 504,
            ConnectError::Refused
            | ConnectError::Unreachable
            | ConnectError::NameNotFound
            | ConnectError::Gateway => 502,
        }
    }

    pub fn errno(self) -> i32 {
        match self {
            ConnectError::Denied => EACCES,
            ConnectError::Refused | ConnectError::OverLimit | ConnectError::Gateway => ECONNREFUSED,
            ConnectError::Unreachable | ConnectError::NameNotFound => EHOSTUNREACH,
            ConnectError::TimedOut => ETIMEDOUT,
            ConnectError::BadRequest => EINVAL,
        }
    }
}

/// Reads a CONNECT answer: the status code and the `tunnel-error` header, if any.
/// A 2xx status is success whatever the header says; an error status with a missing or
/// unknown header is classed by its status alone.
pub fn decode_outcome(status: u16, error_header: Option<&[u8]>) -> Outcome {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let named = error_header
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| ConnectError::parse(h.trim()));
    Err(named.unwrap_or(match status {
        403 => ConnectError::Denied,
        400 => ConnectError::BadRequest,
        429 => ConnectError::OverLimit,
        504 => ConnectError::TimedOut,
        _ => ConnectError::Gateway,
    }))
}

/// The status and header value that [`decode_outcome`] reads back as `outcome`.
pub fn encode_outcome(outcome: Outcome) -> (u16, Option<&'static str>) {
    match outcome {
        Ok(()) => (200, None),
        Err(e) => (e.status(), Some(e.as_str())),
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for ConnectError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_round_trips() {
        for e in ConnectError::ALL {
            let (status, header) = encode_outcome(Err(e));
            assert_eq!(decode_outcome(status, header.map(str::as_bytes)), Err(e));
        }
        assert_eq!(decode_outcome(200, None), Ok(()));
        assert_eq!(
            decode_outcome(502, Some(b"\xff")),
            Err(ConnectError::Gateway)
        );
        assert_eq!(decode_outcome(403, None), Err(ConnectError::Denied));
    }
}
