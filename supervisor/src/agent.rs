//! The supervisor's side of the local protocol (`tunnel_proto::local`): the same
//! requests the preload library makes, over the agent's Unix socket, with the
//! program's socket passed along with its registration.

use std::io::{IoSlice, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tunnel_proto::local::{ANSWER_WITHIN, MAX_LINE, Reply, Request, VERDICT_WITHIN};

/// Where the agent answers, and whose answers are trusted there.
#[derive(Debug, Clone)]
pub struct AgentSocket {
    pub path: PathBuf,
    /// A uid besides ours and root's that may answer (`TUNNEL_AGENT_UID`).
    pub shared_uid: Option<u32>,
}

/// An open request whose first reply has arrived; a waiting registration reads its
/// verdict from it later.
pub struct Exchange {
    stream: UnixStream,
    buffer: Vec<u8>,
}

impl AgentSocket {
    /// Connects, and makes sure our user's agent (or root's, or the shared one's) is
    /// what answers: anyone else's socket in its place would see the program's traffic.
    fn connect(&self) -> std::io::Result<UnixStream> {
        let stream = UnixStream::connect(&self.path)?;
        let peer =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map(|c| c.uid())
                .map_err(std::io::Error::from)?;
        let me = nix::unistd::geteuid().as_raw();
        if peer == me || peer == 0 || Some(peer) == self.shared_uid {
            Ok(stream)
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is answered by uid {peer}, not by this user's agent",
                    self.path.display()
                ),
            ))
        }
    }

    /// Sends `request`, with `passed` as SCM_RIGHTS, and reads the first reply.
    pub fn start(
        &self,
        request: &Request,
        passed: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<(Exchange, Reply)> {
        let deadline = Instant::now() + ANSWER_WITHIN;
        let stream = self.connect()?;
        stream.set_write_timeout(Some(ANSWER_WITHIN))?;
        let wire = request.encode();
        match passed {
            Some(fd) => {
                let fds = [fd.as_raw_fd()];
                let rights = [ControlMessage::ScmRights(&fds)];
                let sent = sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(wire.as_bytes())],
                    &rights,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)?;
                if sent != wire.len() {
                    (&stream).write_all(&wire.as_bytes()[sent..])?;
                }
            }
            None => (&stream).write_all(wire.as_bytes())?,
        }
        let mut exchange = Exchange {
            stream,
            buffer: Vec::with_capacity(128),
        };
        let reply = exchange.next_reply(deadline)?;
        Ok((exchange, reply))
    }

    /// The agent's loopback listeners: a connect to one of them is a preloaded
    /// program's redirected connection (or the agent's own), never routed again.
    pub fn loopback_listeners(&self) -> std::io::Result<Vec<SocketAddr>> {
        let mut stream = self.connect()?;
        stream.set_read_timeout(Some(ANSWER_WITHIN))?;
        stream.write_all(Request::Status.encode().as_bytes())?;
        let mut text = Vec::new();
        stream.take(16 << 20).read_to_end(&mut text)?;
        let status: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok(status["loopback_listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str()?.parse().ok())
            .collect())
    }
}

impl Exchange {
    /// Waits for the gateway's verdict on a waiting registration.
    pub fn verdict(mut self) -> std::io::Result<Reply> {
        self.next_reply(Instant::now() + VERDICT_WITHIN + ANSWER_WITHIN)
    }

    fn next_reply(&mut self, deadline: Instant) -> std::io::Result<Reply> {
        let mut chunk = [0u8; 256];
        loop {
            match Reply::decode(&self.buffer) {
                Ok(Some((reply, used))) => {
                    self.buffer.drain(..used);
                    return Ok(reply);
                }
                Ok(None) if self.buffer.len() <= MAX_LINE => {}
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the agent's answer is not one of the local protocol",
                    ));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The agent's socket for `path`, trusting `TUNNEL_AGENT_UID` as the preload does.
pub fn agent_socket(path: &Path) -> AgentSocket {
    AgentSocket {
        path: path.to_path_buf(),
        shared_uid: std::env::var("TUNNEL_AGENT_UID")
            .ok()
            .and_then(|u| u.trim().parse().ok()),
    }
}
