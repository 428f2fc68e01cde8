//! Talks to the agent over its Unix socket, one connection per request, closed before
//! the hook returns (the library keeps no file descriptor).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use tunnel_proto::local::{ANSWER_WITHIN, MAX_LINE, Reply, Request, VERDICT_WITHIN};

/// How long a local answer may take (the agent answers registrations at once).
const LOCAL_TIMEOUT: Duration = ANSWER_WITHIN;
/// How long a connect may wait for the gateway's verdict: the agent answers
/// `timed-out` itself at [`VERDICT_WITHIN`]; this is only for an agent that hangs.
const VERDICT_TIMEOUT: Duration = VERDICT_WITHIN.saturating_add(ANSWER_WITHIN);

/// A uid besides our own and root's that may answer as the agent (`TUNNEL_AGENT_UID`,
/// for an agent shared with a group); `u32::MAX` when none.
static SHARED_AGENT_UID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

/// Read once with the rest of the environment.
pub fn trust_agent_uid(uid: Option<u32>) {
    SHARED_AGENT_UID.store(
        uid.unwrap_or(u32::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Connects to the agent's socket, and makes sure an agent we trust answers there: a
/// process of our own user, root, or the shared agent's user. Anyone else could have
/// put a socket in the agent's place (a directory in /tmp made first) to read the
/// program's traffic; the program's connect is refused instead.
fn connect(agent: &Path) -> Result<UnixStream, AgentError> {
    use std::os::fd::AsRawFd;
    let stream = UnixStream::connect(agent).map_err(AgentError::Unreachable)?;
    let peer = crate::sys::peer_uid(stream.as_raw_fd());
    let shared = SHARED_AGENT_UID.load(std::sync::atomic::Ordering::Relaxed);
    match peer {
        Some(uid) if uid == 0 || uid == crate::sys::own_uid() || uid == shared => Ok(stream),
        Some(uid) => Err(AgentError::Unreachable(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is answered by uid {uid}, not by this user's agent (set TUNNEL_AGENT_UID to trust a shared agent)",
                agent.display()
            ),
        ))),
        None => Err(AgentError::Unreachable(
            std::io::ErrorKind::PermissionDenied.into(),
        )),
    }
}

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
        Exchange::start_passing(agent, request, None)
    }

    /// Sends `request` with the program's socket `passed` (a registration's proof that
    /// the caller holds the socket).
    pub fn start_passing(
        agent: &Path,
        request: &Request,
        passed: Option<std::os::fd::RawFd>,
    ) -> Result<(Exchange, Reply), AgentError> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + LOCAL_TIMEOUT;
        let mut stream = connect(agent)?;
        let wire = request.encode();
        stream
            .set_read_timeout(Some(LOCAL_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(LOCAL_TIMEOUT)))
            .and_then(|()| match passed {
                Some(fd) => crate::sys::send_with_fd(stream.as_raw_fd(), wire.as_bytes(), fd),
                None => stream.write_all(wire.as_bytes()),
            })
            .map_err(AgentError::Unreachable)?;
        let mut exchange = Exchange {
            stream,
            buffer: Vec::with_capacity(128),
        };
        let reply = exchange.next_reply(deadline)?;
        Ok((exchange, reply))
    }

    /// Waits for the gateway's verdict on a blocking registration.
    pub fn verdict(mut self) -> Result<Reply, AgentError> {
        self.next_reply(Instant::now() + VERDICT_TIMEOUT)
    }

    /// Reads the next reply by `deadline`. A signal that interrupts the read (EINTR,
    /// which SO_RCVTIMEO makes happen even under SA_RESTART) only makes it read again.
    fn next_reply(&mut self, deadline: Instant) -> Result<Reply, AgentError> {
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
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::Unreachable(std::io::ErrorKind::TimedOut.into()));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(AgentError::Unreachable)?;
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(AgentError::Unreachable(e)),
            };
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

/// The gateway's answer for the non-blocking connect registered from `source`: the
/// agent answers once it is known, so this waits as long as a blocking connect would.
pub fn ask_for_verdict(agent: &Path, source: std::net::SocketAddr) -> Result<Reply, AgentError> {
    let mut stream = connect(agent)?;
    stream
        .set_write_timeout(Some(LOCAL_TIMEOUT))
        .and_then(|()| stream.write_all(Request::Verdict { source }.encode().as_bytes()))
        .map_err(AgentError::Unreachable)?;
    let mut exchange = Exchange {
        stream,
        buffer: Vec::with_capacity(64),
    };
    exchange.next_reply(Instant::now() + VERDICT_TIMEOUT)
}
