//! Connecting to the destination, with a deadline, and saying why it failed in the
//! terms the agent understands.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tunnel_proto::ConnectError;

use crate::refusals::Refusal;

/// Tries the addresses in order within one overall `timeout`; a failure says which
/// address failed and how.
pub async fn connect(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, Refusal> {
    let attempt = async {
        let mut last = Refusal::new(ConnectError::Unreachable, "no address to connect to");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => {
                    let class = ConnectError::of_connect(&e);
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
