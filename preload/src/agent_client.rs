//! Talks to the agent over its Unix socket, one connection per request, closed before
//! the hook returns (the library keeps no file descriptor).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tunnel_proto::local::{MAX_LINE, Reply, Request};

/// How long a local answer may take (the agent answers registrations at once).
const LOCAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a blocking connect may wait for the gateway's verdict.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(75);

#[derive(Debug)]
pub enum AgentError {
    /// No agent answers: a routed destination fails closed.
    Unreachable(std::io::Error),
    /// The agent answered something this library does not understand.
    Garbled,
}

/// An open request: the first reply has arrived; a blocking registration reads the
/// verdict from it later.
pub struct Exchange {
    stream: UnixStream,
    buffer: Vec<u8>,
}

impl Exchange {
    pub fn start(agent: &Path, request: &Request) -> Result<(Exchange, Reply), AgentError> {
        let mut stream = UnixStream::connect(agent).map_err(AgentError::Unreachable)?;
        stream
            .set_read_timeout(Some(LOCAL_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(LOCAL_TIMEOUT)))
            .and_then(|()| stream.write_all(request.encode().as_bytes()))
            .map_err(AgentError::Unreachable)?;
        let mut exchange = Exchange {
            stream,
            buffer: Vec::with_capacity(128),
        };
        let reply = exchange.next_reply()?;
        Ok((exchange, reply))
    }

    /// Waits for the gateway's verdict on a blocking registration.
    pub fn verdict(mut self) -> Result<Reply, AgentError> {
        self.stream
            .set_read_timeout(Some(VERDICT_TIMEOUT))
            .map_err(AgentError::Unreachable)?;
        self.next_reply()
    }

    fn next_reply(&mut self) -> Result<Reply, AgentError> {
        let mut chunk = [0u8; 256];
        loop {
            match Reply::decode(&self.buffer) {
                Ok(Some((reply, used))) => {
                    self.buffer.drain(..used);
                    return Ok(reply);
                }
                Ok(None) if self.buffer.len() <= MAX_LINE => {}
                _ => return Err(AgentError::Garbled),
            }
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(AgentError::Unreachable)?;
            if n == 0 {
                return Err(AgentError::Unreachable(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One request, one reply.
pub fn ask(agent: &Path, request: &Request) -> Result<Reply, AgentError> {
    Exchange::start(agent, request).map(|(_, reply)| reply)
}
