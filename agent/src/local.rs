//! The agent's Unix socket: registrations and name lookups from the preload, and
//! `status`. One request per connection (see `tunnel_proto::local`).
//!
//! Only the agent's own user may use it, or members of the group named in the config
//! (`group`); the peer is identified by the kernel (SO_PEERCRED), not by anything it
//! says. Anyone else gets `ERR forbidden` and nothing is registered.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

use crate::Agent;
use crate::carry::Verdict;
use crate::redirect::listener_for;

/// Who may use the socket besides root.
pub struct Access {
    uid: u32,
    group: Option<SharedWith>,
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

pub async fn serve(agent: Arc<Agent>, listener: UnixListener, access: Access) {
    let access = Arc::new(access);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let agent = agent.clone();
        let access = access.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(&agent, &access, stream).await {
                debug!("local request: {e:#}");
            }
        });
    }
}

async fn read_line(stream: &mut UnixStream) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') {
        if buf.len() > MAX_LINE {
            bail!("request longer than {MAX_LINE} bytes");
        }
        let n = tokio::time::timeout(ANSWER_WITHIN, stream.read(&mut chunk))
            .await
            .with_context(|| format!("request not sent within {ANSWER_WITHIN:?}"))??;
        if n == 0 {
            bail!("closed before a full request");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
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

async fn answer(agent: &Agent, access: &Access, mut stream: UnixStream) -> Result<()> {
    let line = read_line(&mut stream).await?;
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    let Some(uid) = uid.filter(|_| access.allows(&stream)) else {
        let cred = stream.peer_cred().ok();
        warn!(
            uid = cred.map(|c| c.uid()),
            pid = cred.and_then(|c| c.pid()),
            "refused a request from another user"
        );
        return reply(
            &mut stream,
            err(Refusal::Forbidden, "not the agent's user or group"),
        )
        .await;
    };
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
            let status = crate::status::json(agent).to_string();
            stream.write_all(status.as_bytes()).await?;
            Ok(())
        }
        Request::Version => reply(&mut stream, Reply::Version { version: VERSION }).await,
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
        } => register(agent, &mut stream, source, target, via, uid, verdict).await,
        Request::Verdict { source } => {
            let answer = match agent.registrations.kept_verdict(source, uid) {
                Some(answer) => Reply::Verdict {
                    error: await_verdict(answer).await,
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

async fn register(
    agent: &Agent,
    stream: &mut UnixStream,
    source: SocketAddr,
    target: Target,
    via: Option<String>,
    uid: u32,
    delivery: VerdictDelivery,
) -> Result<()> {
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
    debug!(%source, destination = %target, gateway = %via, uid, ?delivery, "registered");
    let answer = agent
        .registrations
        .insert(source, target, via, uid, delivery);
    reply(stream, Reply::Ok { listener }).await?;
    if let Some(answer) = answer {
        let error = await_verdict(answer).await;
        reply(stream, Reply::Verdict { error }).await?;
    }
    Ok(())
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}
