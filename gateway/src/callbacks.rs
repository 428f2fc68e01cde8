//! Callback listeners (`[callbacks]`): an agent whose program listens on a port of its
//! `[[callback]]` range asks for that port here; the gateway listens on it at its
//! callback address while the agent holds the lease (the request's stream), and sends
//! each connection that arrives back over the agent's reverse connection.
//!
//! ```text
//!  agent ─POST /v1/callbacks {resume, port, ports}─▶ listen(): for? port free? under
//!     the identity's limit? its reverse connection up? ─ bind ─▶ 200 {address, port},
//!     stream left open ─▶ serve(): accept until the agent resets the stream (its
//!     program closed the listener or exited) or its connection ends
//!  far peer ─TCP─▶ address:port ─▶ CONNECT callback.invalid (tunnel-callback: port,
//!     tunnel-client: far peer) on the reverse connection ─▶ 200 ─▶ splice
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};
use tunnel_proto::ConnectError;
use tunnel_proto::callback::{
    CALLBACK_AUTHORITY, CALLBACK_HEADER, ListenRefusal, ListenRequest, Listening, PortRange,
};
use tunnel_proto::config::gateway::CallbackRule;
use tunnel_proto::connect::ERROR_HEADER;
use tunnel_proto::reverse::CLIENT_HEADER;
use tunnel_transport::messages::read_body;
use tunnel_transport::splice;

use crate::policy::Caller;
use crate::publications::{Attempt, names, open_on};
use crate::refusals::Kind;
use crate::server::Gateway;

/// The callback listeners open now, by port.
pub struct CallbackListeners {
    open: Mutex<BTreeMap<u16, Lease>>,
    /// Set when the gateway stops: every listener closes at once (a lease would
    /// otherwise keep its connection, and the drain, open).
    closing: tokio::sync::watch::Sender<bool>,
}

impl Default for CallbackListeners {
    fn default() -> Self {
        CallbackListeners {
            open: Mutex::default(),
            closing: tokio::sync::watch::Sender::new(false),
        }
    }
}

struct Lease {
    identity: String,
    agent: SocketAddr,
    since: Instant,
    streams: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

/// A callback listener as status shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct CallbackView {
    pub listen: String,
    pub identity: String,
    pub agent: String,
    pub streams: usize,
    pub accepted: usize,
    pub age_secs: f64,
}

/// Takes the port out of the table when the listener goes.
struct Held<'a> {
    table: &'a CallbackListeners,
    port: u16,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.table.lock().remove(&self.port);
    }
}

impl CallbackListeners {
    /// Closes every callback listener and refuses new ones (the gateway is stopping).
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, Lease>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn views(&self, rule: Option<&CallbackRule>) -> Vec<CallbackView> {
        let address = rule.map(|r| r.address);
        self.lock()
            .iter()
            .map(|(port, lease)| CallbackView {
                listen: address.map_or_else(
                    || port.to_string(),
                    |a| SocketAddr::new(a, *port).to_string(),
                ),
                identity: lease.identity.clone(),
                agent: lease.agent.to_string(),
                streams: lease.streams.load(Ordering::Relaxed),
                accepted: lease.accepted.load(Ordering::Relaxed),
                age_secs: lease.since.elapsed().as_secs_f64(),
            })
            .collect()
    }
}

/// A refusal of a lease: its class and why.
struct Refused(ListenRefusal, String);

fn refuse(respond: &mut SendResponse<Bytes>, refusal: ListenRefusal) {
    let response = Response::builder()
        .status(refusal.status())
        .header(ERROR_HEADER, refusal.as_str())
        .body(());
    if let Ok(response) = response {
        let _ = respond.send_response(response, true);
    }
}

/// `POST /v1/callbacks` from an agent: opens the listener and serves it while the
/// lease lasts.
pub async fn listen(
    gateway: Arc<Gateway>,
    caller: Caller,
    agent: SocketAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    // Who asks is checked before a byte of the body is read.
    if let Err(Refused(class, why)) = permitted(&gateway, &caller) {
        gateway.refusals.report(
            &caller.identity,
            Kind::Stream(ConnectError::Denied),
            format!("callback listener refused: {why}"),
        );
        refuse(&mut respond, class);
        return;
    }
    let body = read_body(request.into_body(), 4096).await;
    let asked = body
        .ok()
        .and_then(|b| serde_json::from_slice::<ListenRequest>(&b).ok());
    let Some(asked) = asked else {
        refuse(&mut respond, ListenRefusal::NotAvailable);
        return;
    };
    let opened = open_listener(&gateway, &caller, agent, &asked).await;
    let (listener, port) = match opened {
        Ok(opened) => opened,
        Err(Refused(class, why)) => {
            gateway.refusals.report(
                &caller.identity,
                Kind::Stream(ConnectError::Denied),
                format!("callback listener on port {} refused: {why}", asked.port),
            );
            refuse(&mut respond, class);
            return;
        }
    };
    let _held = Held {
        table: &gateway.callbacks,
        port,
    };
    let Some(rule) = &gateway.config.callbacks else {
        return;
    };
    let listening = Listening {
        address: rule.address,
        port,
    };
    let json = serde_json::to_vec(&listening).unwrap_or_default();
    let response = Response::builder()
        .header("content-type", "application/json")
        .body(());
    let Ok(response) = response else { return };
    let Ok(mut lease) = respond.send_response(response, false) else {
        return;
    };
    if lease.send_data(Bytes::from(json), false).is_err() {
        return;
    }
    info!(identity = %caller, %agent, "callback listener on {} open", SocketAddr::new(rule.address, port));
    let (streams, accepted) = {
        let table = gateway.callbacks.lock();
        let Some(entry) = table.get(&port) else {
            return;
        };
        (entry.streams.clone(), entry.accepted.clone())
    };
    let mut closing = gateway.callbacks.closing.subscribe();
    let ended = loop {
        tokio::select! {
            () = async {
                let _ = closing.wait_for(|closing| *closing).await;
            } => break "the gateway is stopping".to_string(),
            incoming = listener.accept() => match incoming {
                Ok((tcp, client)) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let gateway = gateway.clone();
                    let identity = caller.identity.clone();
                    let resume = asked.resume.clone();
                    let streams = streams.clone();
                    tokio::spawn(async move {
                        let _count = tunnel_transport::counted::Counted::enter(&streams);
                        carry(&gateway, &identity, &resume, port, tcp, client).await;
                    });
                }
                Err(e) => {
                    debug!(port, "callback accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            reset = std::future::poll_fn(|cx| lease.poll_reset(cx)) => {
                break match reset {
                    Ok(reason) => format!("the agent ended the lease ({reason:?})"),
                    Err(e) => format!("its connection ended ({e})"),
                };
            }
        }
    };
    info!(identity = %caller, %agent, "callback listener on {} closed: {ended}", SocketAddr::new(rule.address, port));
}

/// The gateway's `[callbacks]`, when `caller` may open listeners.
fn permitted<'a>(gateway: &'a Gateway, caller: &Caller) -> Result<&'a CallbackRule, Refused> {
    if *gateway.callbacks.closing.borrow() {
        return Err(Refused(
            ListenRefusal::NotAvailable,
            "the gateway is stopping".into(),
        ));
    }
    let Some(rule) = &gateway.config.callbacks else {
        return Err(Refused(
            ListenRefusal::NotAvailable,
            "this gateway has no [callbacks]".into(),
        ));
    };
    if !names(&rule.for_, caller) {
        return Err(Refused(
            ListenRefusal::Denied,
            format!("{caller} is not in [callbacks] for = {:?}", rule.for_),
        ));
    }
    Ok(rule)
}

/// Checks a lease request and binds its listener: the port asked for, or a free one
/// of both ranges for port 0.
async fn open_listener(
    gateway: &Gateway,
    caller: &Caller,
    agent: SocketAddr,
    asked: &ListenRequest,
) -> Result<(TcpListener, u16), Refused> {
    let rule = permitted(gateway, caller)?;
    if gateway
        .publishers
        .reverse_of(&caller.identity, &asked.resume)
        .is_none()
    {
        return Err(Refused(
            ListenRefusal::NoReverse,
            "the agent's reverse connection is not up".into(),
        ));
    }
    let candidates: Vec<u16> = if asked.port == 0 {
        let Some(both) = rule.ports.overlap(&asked.ports) else {
            return Err(Refused(
                ListenRefusal::NotAvailable,
                format!(
                    "the agent's ports {} and the gateway's {} have none in common",
                    asked.ports, rule.ports
                ),
            ));
        };
        spread(both)
    } else if rule.ports.contains(asked.port) {
        vec![asked.port]
    } else {
        return Err(Refused(
            ListenRefusal::NotAvailable,
            format!(
                "port {} is not among the gateway's callback ports {}",
                asked.port, rule.ports
            ),
        ));
    };
    let mut last = None;
    for port in candidates {
        // The port is taken in the table before it is bound (under one lock with the
        // identity's count): two leases never race for one port, nor past the limit.
        {
            let mut table = gateway.callbacks.lock();
            if table.contains_key(&port) {
                last = Some(format!("port {port} is held by another callback listener"));
                continue;
            }
            let held = table
                .values()
                .filter(|l| l.identity == caller.identity)
                .count();
            if held >= rule.max_per_identity as usize {
                return Err(Refused(
                    ListenRefusal::OverLimit,
                    format!(
                        "{caller} holds {held} callback listeners, [callbacks] max_per_identity"
                    ),
                ));
            }
            table.insert(
                port,
                Lease {
                    identity: caller.identity.clone(),
                    agent,
                    since: Instant::now(),
                    streams: Arc::default(),
                    accepted: Arc::default(),
                },
            );
        }
        match TcpListener::bind(SocketAddr::new(rule.bind, port)).await {
            Ok(listener) => return Ok((listener, port)),
            Err(e) => {
                gateway.callbacks.lock().remove(&port);
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    last = Some(format!("port {port} is in use at the gateway"));
                    continue;
                }
                return Err(Refused(
                    ListenRefusal::NotAvailable,
                    format!(
                        "binding {}: {e} (is [callbacks] bind an address of this host?)",
                        SocketAddr::new(rule.bind, port)
                    ),
                ));
            }
        }
    }
    Err(Refused(
        ListenRefusal::InUse,
        last.unwrap_or_else(|| "no free callback port".into()),
    ))
}

/// The ports of `range`, starting at a random one, so that leases spread.
fn spread(range: PortRange) -> Vec<u16> {
    let ports: Vec<u16> = range.ports().collect();
    let start = fastrand::usize(..ports.len().max(1));
    ports[start..]
        .iter()
        .chain(&ports[..start])
        .copied()
        .collect()
}

/// One connection that arrived at a callback listener: sent to the agent over its
/// reverse connection, joined once the agent has connected its program.
async fn carry(
    gateway: &Gateway,
    identity: &str,
    resume: &str,
    port: u16,
    tcp: TcpStream,
    client: SocketAddr,
) {
    tunnel_transport::tune_carried_tcp(&tcp);
    let entry = gateway.streams.register(
        format!("callback :{port} (from {client})"),
        identity.to_string(),
    );
    let Some(reverse) = gateway.publishers.reverse_of(identity, resume) else {
        entry.refused(
            ConnectError::Refused,
            "the agent's reverse connection is down".to_string(),
        );
        splice::reset(tcp);
        return;
    };
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(CALLBACK_AUTHORITY)
        .header(CALLBACK_HEADER, port.to_string())
        .header(
            CLIENT_HEADER,
            crate::publications::plain(client).to_string(),
        )
        .body(());
    let Ok(request) = request else {
        splice::reset(tcp);
        return;
    };
    let what = format!("the agent listening on callback port {port}");
    let early = &mut crate::publications::Early::from(&tcp);
    let opened = match open_on(gateway, &reverse, request, &what, early).await {
        Attempt::Opened(opened) => opened,
        Attempt::Refused(refusal) => {
            entry.refused(refusal.class, refusal.why);
            splice::reset(tcp);
            return;
        }
        Attempt::OverLimit(why) => {
            entry.refused(ConnectError::OverLimit, why);
            splice::reset(tcp);
            return;
        }
        Attempt::Gone => {
            entry.refused(
                ConnectError::Refused,
                "the agent's reverse connection is gone".to_string(),
            );
            splice::reset(tcp);
            return;
        }
    };
    let (recv, health) = (opened.recv, opened.health);
    let result = splice::splice(tcp, opened.send, async { Ok(recv) }, entry.stats(), &health).await;
    entry.finish(&result);
}

/// A warning when callback ports lie in the kernel's range for outgoing connections
/// (`ip_local_port_range`) without being reserved (`ip_local_reserved_ports`): any
/// outgoing connection of this host may hold one of them for a while, and a program
/// that asks for it then gets `EADDRINUSE`.
pub fn ephemeral_overlap(ports: PortRange) -> Option<String> {
    let read = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).ok();
    let range = read("ip_local_port_range")?;
    let mut bounds = range
        .split_whitespace()
        .filter_map(|p| p.parse::<u16>().ok());
    let ephemeral = PortRange {
        first: bounds.next()?,
        last: bounds.next()?,
    };
    let overlap = ports.overlap(&ephemeral)?;
    let reserved: Vec<PortRange> = read("ip_local_reserved_ports")
        .unwrap_or_default()
        .trim()
        .split(',')
        .filter_map(|r| PortRange::parse(r).ok())
        .collect();
    let all_reserved = overlap
        .ports()
        .all(|port| reserved.iter().any(|r| r.contains(port)));
    (!all_reserved).then(|| {
        format!(
            "[callbacks] ports {ports} overlap this host's ports for outgoing connections ({ephemeral}, net.ipv4.ip_local_port_range): an outgoing connection may hold one and a program then gets EADDRINUSE for it; choose ports outside that range, or reserve them: sysctl -w net.ipv4.ip_local_reserved_ports={overlap}"
        )
    })
}

/// Fails when the callback listeners could not be bound where `[callbacks]` says: an
/// address that is not this host's (a NAT's public address needs `bind`).
pub fn check_bind(rule: &CallbackRule) -> anyhow::Result<()> {
    match std::net::TcpListener::bind(SocketAddr::new(rule.bind, 0)) {
        Ok(_) => Ok(()),
        Err(e) if rule.bind == rule.address => Err(anyhow::anyhow!(
            "[callbacks] address {} cannot be listened on here ({e}): when it is not an address of this host (a NAT's public address), add bind = \"0.0.0.0\" or this host's own address",
            rule.address
        )),
        Err(e) => Err(anyhow::anyhow!(
            "[callbacks] bind {} cannot be listened on here ({e}): give an address of this host, or \"0.0.0.0\"",
            rule.bind
        )),
    }
}
