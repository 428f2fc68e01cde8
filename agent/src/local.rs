//! The agent's Unix socket: registrations and name lookups from the preload, and
//! `status`. One request per connection (see `tunnel_proto::local`).
//!
//! Only the agent's own user may use it, or members of the group named in the config
//! (`group`); the peer is identified by the kernel (SO_PEERCRED), not by anything it
//! says. Anyone else gets `ERR forbidden` and nothing is registered.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};

use anyhow::{Context, Result, bail};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{debug, warn};
use tunnel_proto::ConnectError;
use tunnel_proto::local::{
    ANSWER_WITHIN, LocalError, MAX_LINE, Refusal, Reply, Request, VERDICT_WITHIN, VERSION,
    VerdictDelivery,
};
use tunnel_proto::{Host, Target};
use tunnel_transport::control::SharedWith;
use tunnel_transport::plumbing::{Shutdown, accept_until};

use crate::Agent;
use crate::carry::Verdict;
use crate::passed_fd::PassedFd;
use crate::redirect::listener_for;

/// How long a refused peer's connection stays open for its request to arrive.
const REFUSED_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Who may use the socket besides root.
pub struct Access {
    uid: u32,
    group: Option<SharedWith>,
    /// Refused peers are logged once per interval, with a count, so that another user
    /// cannot flood the log.
    refusals: RefusalLog,
}

/// Says when a refusal deserves a log line: the first, then at most one per
/// [`REFUSAL_LOG_EVERY`], carrying how many went unlogged in between.
#[derive(Default)]
struct RefusalLog {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl RefusalLog {
    /// `Some(unlogged before this one)` when this refusal is to be logged.
    fn note(&self) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, unlogged) = &mut *state;
        let now = std::time::Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY) {
            *unlogged += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(unlogged))
    }
}

impl Access {
    pub fn new(group: Option<&str>) -> Result<Access> {
        let group = match group {
            None => None,
            Some(name) => match nix::unistd::Group::from_name(name) {
                Ok(Some(g)) => Some(SharedWith {
                    gid: g.gid.as_raw(),
                    name: name.to_string(),
                }),
                Ok(None) => bail!("group `{name}` (agent.toml `group`) does not exist"),
                Err(e) => return Err(e).with_context(|| format!("looking up group `{name}`")),
            },
        };
        Ok(Access {
            uid: nix::unistd::getuid().as_raw(),
            group,
            refusals: RefusalLog::default(),
        })
    }

    /// The group the socket is shared with, if any.
    pub fn group(&self) -> Option<&SharedWith> {
        self.group.as_ref()
    }

    fn allows(&self, stream: &UnixStream) -> bool {
        let Ok(cred) = stream.peer_cred() else {
            return false;
        };
        if cred.uid() == self.uid || cred.uid() == 0 {
            return true;
        }
        let Some(gid) = self.group.as_ref().map(|g| g.gid) else {
            return false;
        };
        cred.gid() == gid || cred.pid().is_some_and(|pid| in_group(pid, gid))
    }
}

/// Reads a process's supplementary groups from /proc.
fn in_group(pid: i32, gid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Groups:").map(str::to_string))
        })
        .is_some_and(|groups| groups.split_whitespace().any(|g| g == gid.to_string()))
}

pub async fn serve(agent: Arc<Agent>, listener: UnixListener, access: Access, shutdown: Shutdown) {
    let access = Arc::new(access);
    accept_until(
        "agent socket",
        shutdown,
        || listener.accept(),
        |(stream, _)| {
            let agent = agent.clone();
            let access = access.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(&agent, &access, stream).await {
                    debug!("local request: {e:#}");
                }
            });
        },
    )
    .await;
}

/// Reads one request line, and the socket passed with it (a registration's proof).
async fn read_request(stream: &UnixStream) -> Result<(Vec<u8>, Vec<PassedFd>)> {
    let mut buf = Vec::with_capacity(128);
    let mut passed = Vec::new();
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') {
        if buf.len() > MAX_LINE {
            bail!("request longer than {MAX_LINE} bytes");
        }
        let received = stream.async_io(Interest::READABLE, || {
            receive(stream.as_raw_fd(), &mut chunk, &mut passed)
        });
        let n = received.await?;
        if n == 0 {
            bail!("closed before a full request");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((buf, passed))
}

/// One `recvmsg`: bytes into `chunk`, descriptors (SCM_RIGHTS) into `passed`.
fn receive(fd: RawFd, chunk: &mut [u8], passed: &mut Vec<PassedFd>) -> std::io::Result<usize> {
    let mut iov = [IoSliceMut::new(chunk)];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let flags = MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT;
    let message = recvmsg::<()>(fd, &mut iov, Some(&mut space), flags)?;
    for control in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = control {
            passed.extend(fds.into_iter().map(PassedFd::new));
        }
    }
    Ok(message.bytes)
}

async fn reply(stream: &mut UnixStream, reply: Reply) -> Result<()> {
    stream.write_all(reply.encode().as_bytes()).await?;
    Ok(())
}

fn err(refusal: Refusal, message: impl Into<String>) -> Reply {
    Reply::Err {
        refusal,
        message: message.into(),
    }
}

async fn answer(agent: &Arc<Agent>, access: &Access, mut stream: UnixStream) -> Result<()> {
    // Who asks is known before a byte is read: anyone else is answered at once and
    // holds nothing of the agent's.
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    let Some(uid) = uid.filter(|_| access.allows(&stream)) else {
        let cred = stream.peer_cred().ok();
        if let Some(also) = access.refusals.note() {
            warn!(
                uid = cred.map(|c| c.uid()),
                pid = cred.and_then(|c| c.pid()),
                "refused a request from another user{}",
                if also > 0 {
                    format!(" ({also} more refused since the last such line)")
                } else {
                    String::new()
                }
            );
        }
        reply(
            &mut stream,
            err(Refusal::Forbidden, "not the agent's user or group"),
        )
        .await?;
        // Its request may still be on the way: a moment to send it (and read the
        // refusal) before the socket closes, rather than a broken pipe.
        let _ = tokio::time::timeout(REFUSED_LINGER, hung_up(&stream)).await;
        return Ok(());
    };
    // The whole request within the time an answer may take, however it trickles in.
    let (line, mut passed) = tokio::time::timeout(ANSWER_WITHIN, read_request(&stream))
        .await
        .with_context(|| format!("request not complete within {ANSWER_WITHIN:?}"))??;
    let request = match Request::decode(&line) {
        Ok(Some((request, _))) => request,
        Err(e @ LocalError::Unsupported(_)) => {
            return reply(&mut stream, err(Refusal::Unsupported, e.to_string())).await;
        }
        Ok(None) | Err(_) => {
            let message = "malformed request";
            return reply(
                &mut stream,
                err(Refusal::Connect(ConnectError::BadRequest), message),
            )
            .await;
        }
    };
    match request {
        Request::Status => {
            let status = crate::status::json(agent);
            stream.write_all(status.as_bytes()).await?;
            Ok(())
        }
        Request::Version => reply(&mut stream, Reply::Version { version: VERSION }).await,
        Request::Services => {
            let answer = crate::discovery::services(agent).await;
            stream.write_all(answer.as_bytes()).await?;
            Ok(())
        }
        Request::Explain { via, target } => {
            let answer = crate::discovery::explain(agent, &via, target).await;
            stream.write_all(answer.as_bytes()).await?;
            Ok(())
        }
        Request::Resolve { name } => {
            // The preload asks only for names its routes select, which may include
            // routes given to `tunnel-run --route` that this agent's config lacks.
            let answer = match agent.fake_dns.resolve(&name) {
                Ok((v4, v6)) => Reply::Addrs {
                    v4: v4.into(),
                    v6: v6.into(),
                },
                Err(e) => err(Refusal::PoolFull, e.to_string()),
            };
            reply(&mut stream, answer).await
        }
        Request::Name { ip } => {
            let answer = match agent.fake_dns.name_of(ip) {
                Some(name) => Reply::Name { name },
                None => err(Refusal::Unknown, "not a synthetic address"),
            };
            reply(&mut stream, answer).await
        }
        Request::Register {
            source,
            target,
            via,
            verdict,
        } => {
            let socket = passed.pop();
            let request = Registering {
                source,
                target,
                via,
                uid,
                delivery: verdict,
            };
            register(agent, &mut stream, request, socket).await
        }
        Request::Listen { address } => {
            let answer = match passed.pop() {
                Some(socket) => crate::callbacks::listen(agent, address, socket, uid).await,
                None => err(
                    Refusal::Connect(ConnectError::BadRequest),
                    "LISTEN must carry its socket",
                ),
            };
            reply(&mut stream, answer).await
        }
        Request::Peer => {
            let answer = match passed.pop() {
                Some(socket) => agent.callbacks.peer(&socket),
                None => err(
                    Refusal::Connect(ConnectError::BadRequest),
                    "PEER must carry the accepted socket",
                ),
            };
            reply(&mut stream, answer).await
        }
        Request::Verdict { source } => {
            let answer = match agent.registrations.kept_verdict(source, uid) {
                Some(answer) => match until_hangup(&stream, await_verdict(answer)).await {
                    Some(error) => Reply::Verdict { error },
                    None => return Ok(()),
                },
                None => err(
                    Refusal::Unknown,
                    format!("no connection from {source} waits for an answer"),
                ),
            };
            reply(&mut stream, answer).await
        }
    }
}

/// Runs `wait` unless the asking program hangs up first (it was killed, or gave up):
/// a wait nobody will read holds nothing of the agent's.
async fn until_hangup<T>(
    stream: &UnixStream,
    wait: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        answered = wait => Some(answered),
        () = hung_up(stream) => None,
    }
}

/// Returns once the other end has closed (it sends nothing more after its request).
async fn hung_up(stream: &UnixStream) {
    let mut byte = [0u8; 1];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut byte) {
            Ok(0) => return,
            // Stray bytes after the request are ignored.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

/// Waits for the gateway's answer, within the time a connect may take.
async fn await_verdict(mut answer: watch::Receiver<Option<Verdict>>) -> Verdict {
    let known = tokio::time::timeout(VERDICT_WITHIN, answer.wait_for(Option::is_some)).await;
    match known {
        Ok(Ok(verdict)) => verdict.flatten(),
        // The program never connected, or the carrying task ended without an answer.
        Ok(Err(_)) => Some(Refusal::Unavailable),
        Err(_) => Some(Refusal::Connect(ConnectError::TimedOut)),
    }
}

/// Puts back the name behind a synthetic address and picks the gateway.
fn destination(
    agent: &Agent,
    target: Target,
    via: Option<String>,
) -> Result<(Target, String), Reply> {
    let target = match target {
        Target::Addr {
            host: Host::Ip(ip),
            port,
        } if agent.fake_dns.is_synthetic(ip) => match agent.fake_dns.name_of(ip) {
            Some(name) => Target::Addr {
                host: Host::Name(name),
                port,
            },
            None => {
                return Err(err(
                    Refusal::Connect(ConnectError::Refused),
                    format!("{ip} is a synthetic address this agent never handed out"),
                ));
            }
        },
        other => other,
    };
    let chosen = via.or_else(|| agent.routes.route_for(&target).map(|r| r.via.clone()));
    match chosen {
        Some(via) if agent.pool(&via).is_some() => Ok((target, via)),
        Some(via) => Err(err(
            Refusal::Unavailable,
            format!("no gateway named `{via}` in agent.toml"),
        )),
        None => Err(err(
            Refusal::Connect(ConnectError::Denied),
            format!("no route selects {target}"),
        )),
    }
}

/// A `REGISTER` request, with the uid of the process that sent it.
struct Registering {
    source: SocketAddr,
    target: Target,
    via: Option<String>,
    uid: u32,
    delivery: VerdictDelivery,
}

async fn register(
    agent: &Arc<Agent>,
    stream: &mut UnixStream,
    request: Registering,
    socket: Option<PassedFd>,
) -> Result<()> {
    let Registering {
        source,
        target,
        via,
        uid,
        delivery,
    } = request;
    let (target, via) = match destination(agent, target, via) {
        Ok(d) => d,
        Err(refusal) => return reply(stream, refusal).await,
    };
    let (v4, v6) = agent.listener_addresses;
    let listener = listener_for(source, v4, v6);
    // A program that bound 0.0.0.0:N (or [::]:N) before connecting gets the
    // listener's loopback address as its source when it connects to it.
    let source = if source.ip().is_unspecified() {
        SocketAddr::new(listener.ip(), source.port())
    } else {
        source
    };
    if !is_loopback(source.ip()) {
        return reply(
            stream,
            err(
                Refusal::Connect(ConnectError::BadRequest),
                "source must be a loopback address",
            ),
        )
        .await;
    }
    if source.port() == 0 {
        // IP_BIND_ADDRESS_NO_PORT leaves the port to connect time: nothing could name
        // the connection that arrives.
        return reply(
            stream,
            err(
                Refusal::Connect(ConnectError::BadRequest),
                "the socket has no port yet (IP_BIND_ADDRESS_NO_PORT?): bind it to a port first",
            ),
        )
        .await;
    }
    if agent.registrations.is_pending(source) {
        return reply(
            stream,
            err(
                Refusal::Busy,
                format!("{source} is registered already and not yet connected"),
            ),
        )
        .await;
    }
    // The socket travels with its registration: whoever registers a source address
    // holds the socket bound there, so nobody can claim (or spoil) another's.
    let Some(socket) = socket.filter(|s| holds(s, source)) else {
        let message = "a registration must carry its socket, bound at the source it names";
        return reply(
            stream,
            err(Refusal::Connect(ConnectError::BadRequest), message),
        )
        .await;
    };
    debug!(%source, destination = %target, gateway = %via, uid, ?delivery, "registered");
    drop(socket);
    // The gateway's callback address is what the socket shows as its own, so that a
    // program advertises an address the far side can reach.
    let callback = agent
        .publishers
        .iter()
        .find(|p| p.gateway() == via)
        .and_then(|p| p.callback_offer())
        .map(|o| o.address);
    let answer = agent
        .registrations
        .insert(source, target, via, uid, delivery);
    reply(stream, Reply::Ok { listener, callback }).await?;
    if let Some(answer) = answer
        && let Some(error) = until_hangup(stream, await_verdict(answer)).await
    {
        reply(stream, Reply::Verdict { error }).await?;
    }
    Ok(())
}

/// True when `socket` is bound at `source` (a socket bound to `0.0.0.0` or `[::]` shows
/// that address; the registration names the loopback address it will have).
fn holds(socket: &PassedFd, source: SocketAddr) -> bool {
    socket.local_addr().is_ok_and(|local| {
        local.port() == source.port()
            && (local.ip().is_unspecified()
                || local.ip().to_canonical() == source.ip().to_canonical())
    })
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

#[cfg(test)]
mod refusal_log_tests {
    use super::*;

    #[test]
    fn a_flood_of_refusals_is_one_line_with_a_count() {
        let log = RefusalLog::default();
        assert_eq!(log.note(), Some(0));
        for _ in 0..500 {
            assert_eq!(log.note(), None);
        }
        // The next line, once the interval has passed, says how many were not logged.
        log.state.lock().unwrap().0 = Some(std::time::Instant::now() - REFUSAL_LOG_EVERY);
        assert_eq!(log.note(), Some(500));
    }
}
