//! Connecting to the destination, with a deadline, and saying why it failed in the
//! terms the agent understands.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tunnel_proto::ConnectError;

const ENETUNREACH: i32 = 101;
const EHOSTUNREACH: i32 = 113;

/// Tries the addresses in order within one overall `timeout`.
pub async fn connect(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        let mut last = ConnectError::Unreachable;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = classify(&e),
            }
        }
        Err(last)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(ConnectError::TimedOut))
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
