//! Connecting to the destination, with a deadline, and saying why it failed in the
//! terms the agent understands.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tunnel_proto::ConnectError;

use crate::refusals::Refusal;

const ENETUNREACH: i32 = 101;
const EHOSTUNREACH: i32 = 113;

/// Tries the addresses in order within one overall `timeout`; a failure says which
/// address failed and how.
pub async fn connect(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, Refusal> {
    let attempt = async {
        let mut last = Refusal::new(ConnectError::Unreachable, "no address to connect to");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => {
                    let class = classify(&e);
                    let why = match class {
                        ConnectError::Refused => {
                            format!("{addr} refused the connection (nothing listens there)")
                        }
                        _ => format!("{addr}: {e}"),
                    };
                    last = Refusal::new(class, why);
                }
            }
        }
        Err(last)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            let tried: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
            Err(Refusal::new(
                ConnectError::TimedOut,
                format!(
                    "no answer from {} within connect_timeout ({:.0}s)",
                    tried.join(", "),
                    timeout.as_secs_f64()
                ),
            ))
        })
}

pub fn classify(e: &io::Error) -> ConnectError {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::ConnectionRefused, _) => ConnectError::Refused,
        (io::ErrorKind::TimedOut, _) => ConnectError::TimedOut,
        (_, Some(ENETUNREACH | EHOSTUNREACH)) => ConnectError::Unreachable,
        (io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable, _) => {
            ConnectError::Unreachable
        }
        _ => ConnectError::Gateway,
    }
}
