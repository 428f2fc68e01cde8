//! Callback listeners (`[[callback]]`): a program that binds a port of a callback
//! range (or the gateway's callback address with port 0) gets its listener at the
//! gateway; the connections that arrive there come back over the reverse connection
//! and are connected to the program's own socket, bound on loopback.
//!
//! ```text
//!  preload: LISTEN <asked> + socket ─▶ listen(): which gateway? ─ POST /v1/callbacks
//!     ─▶ 200 {address, port}: LISTENING address:port; the answer's stream is the lease
//!  keep(): holds the socket until the program listens on it (its loopback address,
//!     its inode), then follows it by inode (sock_diag) every 500 ms; gone, or never
//!     listening within LISTEN_GRACE ─▶ lease dropped (the gateway closes the port)
//!  reverse CONNECT (tunnel-callback: port, tunnel-client: far peer) ─▶ inbound():
//!     bind 127.0.0.1:0, note (that address → far peer), connect to the program's
//!     listener ─ 200 ─ splice
//!  preload: PEER + accepted socket ─▶ peer(): its peer is one of ours ─ the far peer
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::StatusCode;
use serde::Serialize;
use tokio::net::TcpSocket;
use tracing::{debug, info, warn};
use tunnel_proto::ConnectError;
use tunnel_proto::callback::{
    CALLBACKS_PATH, CallbackOffer, ListenRefusal, ListenRequest, Listening,
};
use tunnel_proto::connect::ERROR_HEADER;
use tunnel_proto::local::{Refusal, Reply};
use tunnel_transport::liveness::Health;
use tunnel_transport::messages::answer_connect;
use tunnel_transport::splice::{self, Abort};
use tunnel_transport::streams::StreamTable;

use crate::Agent;
use crate::passed_fd::PassedFd;

/// How long a program has from `bind` to `listen` before its lease is given up.
const LISTEN_GRACE: Duration = Duration::from_secs(30);
/// How often a listening program's socket is looked for.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// How long an inbound connection waits for the program to listen.
const CONNECT_PATIENCE: Duration = Duration::from_secs(2);

/// The callback listeners this agent holds at its gateways.
pub struct Callbacks {
    /// Says whose a local socket is, and whether a program's listener is still there.
    owners: Arc<crate::sock_owner::SocketOwners>,
    leases: Mutex<BTreeMap<(String, u16), Arc<Lease>>>,
    /// This agent's end of each connection it made to a program's listener → (the far
    /// peer at the gateway's side, the public address it connected to).
    peers: Mutex<HashMap<SocketAddr, (SocketAddr, SocketAddr)>>,
}

struct Lease {
    gateway: String,
    public: SocketAddr,
    /// The program's listener, once its socket is bound.
    program: Mutex<Option<SocketAddr>>,
    /// Set once the program's socket was seen listening: a refused connect then means
    /// it is gone, not that it is not listening yet.
    listened: std::sync::atomic::AtomicBool,
    /// The program's socket (its inode), once known.
    inode: Mutex<Option<u32>>,
    uid: u32,
    since: Instant,
    streams: Arc<AtomicUsize>,
    accepted: AtomicUsize,
}

/// A callback listener as status shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CallbackView {
    pub gateway: String,
    pub public: String,
    pub program: Option<String>,
    pub uid: u32,
    pub streams: usize,
    pub accepted: usize,
    pub age_secs: f64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn err(refusal: Refusal, message: impl Into<String>) -> Reply {
    Reply::Err {
        refusal,
        message: message.into(),
    }
}

impl Callbacks {
    pub fn new(owners: Arc<crate::sock_owner::SocketOwners>) -> Callbacks {
        Callbacks {
            owners,
            leases: Mutex::default(),
            peers: Mutex::default(),
        }
    }

    pub fn views(&self) -> Vec<CallbackView> {
        lock(&self.leases)
            .values()
            .map(|l| CallbackView {
                gateway: l.gateway.clone(),
                public: l.public.to_string(),
                program: lock(&l.program).map(|p| p.to_string()),
                uid: l.uid,
                streams: l.streams.load(Ordering::Relaxed),
                accepted: l.accepted.load(Ordering::Relaxed),
                age_secs: l.since.elapsed().as_secs_f64(),
            })
            .collect()
    }

    /// `PEER`: who connected to a callback listener, for the program's accepted socket
    /// (whose peer is this agent's end of the connection).
    pub fn peer(&self, accepted: &PassedFd) -> Reply {
        let ours = accepted.peer_addr().ok();
        match ours.and_then(|a| lock(&self.peers).get(&a).copied()) {
            Some((far, public)) => Reply::Peer { far, public },
            None => err(
                Refusal::Unknown,
                "not a connection from a callback listener",
            ),
        }
    }
}

/// The gateway whose callbacks `asked` (what the program binds) belongs to, with the
/// port range it comes from: a port in a `[[callback]]` range, or port 0 at a gateway's
/// callback address.
fn gateway_for(agent: &Agent, asked: SocketAddr) -> Result<(String, CallbackOffer), Reply> {
    let offer_of = |via: &str| {
        agent
            .publishers
            .iter()
            .find(|p| p.gateway() == via)
            .and_then(|p| p.callback_offer())
    };
    let ip = asked.ip().to_canonical();
    let chosen = if asked.port() != 0 {
        agent
            .config
            .callbacks
            .iter()
            .find(|c| c.ports.contains(asked.port()))
            .map(|c| (c.via.clone(), c.ports))
    } else {
        agent.config.callbacks.iter().find_map(|c| {
            offer_of(&c.via)
                .filter(|o| o.address.to_canonical() == ip)
                .map(|_| (c.via.clone(), c.ports))
        })
    };
    let Some((via, ports)) = chosen else {
        return Err(err(
            Refusal::Listen(ListenRefusal::NotAvailable),
            format!("{asked} is not a callback port or address of this agent"),
        ));
    };
    let refused = agent
        .publishers
        .iter()
        .find(|p| p.gateway() == via)
        .and_then(|p| p.view().callbacks_refused);
    match (offer_of(&via), refused) {
        (Some(offer), _) => Ok((
            via,
            CallbackOffer {
                address: offer.address,
                ports,
            },
        )),
        (None, Some(why)) => Err(err(
            Refusal::Listen(ListenRefusal::Denied),
            format!("the gateway `{via}` refused callbacks: {why}"),
        )),
        (None, None) => Err(err(
            Refusal::Listen(ListenRefusal::NoReverse),
            format!("the reverse connection to `{via}` is not up"),
        )),
    }
}

/// Where a lease is asked for: the gateway's pool, this agent run's resume token, and
/// the `[[callback]]` range.
struct Asking {
    pool: Arc<crate::pool::Pool>,
    resume: String,
    ports: tunnel_proto::callback::PortRange,
}

/// A lease the gateway granted: the answer's body stays open while it lasts.
struct Held {
    body: RecvStream,
    _count: tunnel_transport::counted::Counted,
}

impl Held {
    /// Returns when the gateway ends the lease (its listener went: the connection was
    /// lost, or the gateway stopped). It sends nothing more on it.
    async fn ended(&mut self) {
        while let Some(chunk) = self.body.data().await {
            if chunk.is_err() {
                break;
            }
        }
    }
}

/// Asks the gateway for a listener on `port` (0: any of the range).
async fn ask_gateway(asking: &Asking, port: u16) -> Result<(Listening, Held), Reply> {
    let gateway = &asking.pool.peer.name;
    let request = ListenRequest {
        resume: asking.resume.clone(),
        port,
        ports: asking.ports,
    };
    let body = Bytes::from(serde_json::to_vec(&request).unwrap_or_default());
    let leased = match asking.pool.hold(CALLBACKS_PATH, body).await {
        Ok(leased) => leased,
        Err(e) => return Err(err(Refusal::Unavailable, format!("{e:#}"))),
    };
    let crate::pool::Leased { response, count } = leased;
    if response.status() != StatusCode::OK {
        let class = response
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(ListenRefusal::parse)
            .unwrap_or(ListenRefusal::NotAvailable);
        return Err(err(
            Refusal::Listen(class),
            format!("the gateway `{gateway}` refused port {port} (see its log for why)",),
        ));
    }
    let (_, mut body) = response.into_parts();
    match first_message::<Listening>(&mut body).await {
        Some(listening) => Ok((
            listening,
            Held {
                body,
                _count: count,
            },
        )),
        None => Err(err(
            Refusal::Unavailable,
            "the gateway's answer was unreadable",
        )),
    }
}

/// `LISTEN`: opens the program's listener at its gateway and keeps the lease while the
/// program's socket lives.
pub async fn listen(agent: &Arc<Agent>, asked: SocketAddr, socket: PassedFd, uid: u32) -> Reply {
    if socket.local_addr().is_ok_and(|a| a.port() != 0) {
        return err(
            Refusal::Connect(ConnectError::BadRequest),
            "the socket is bound already",
        );
    }
    let (via, offer) = match gateway_for(agent, asked) {
        Ok(found) => found,
        Err(reply) => return reply,
    };
    let (Some(pool), Some(publisher)) = (
        agent.pool(&via),
        agent.publishers.iter().find(|p| p.gateway() == via),
    ) else {
        return err(Refusal::Unavailable, format!("no gateway `{via}`"));
    };
    let asking = Asking {
        pool: pool.clone(),
        resume: publisher.resume().to_string(),
        ports: offer.ports,
    };
    let (listening, held) = match ask_gateway(&asking, asked.port()).await {
        Ok(granted) => granted,
        Err(reply) => return reply,
    };
    let public = SocketAddr::new(listening.address, listening.port);
    let lease = Arc::new(Lease {
        gateway: via.clone(),
        public,
        program: Mutex::default(),
        listened: std::sync::atomic::AtomicBool::new(false),
        inode: Mutex::default(),
        uid,
        since: Instant::now(),
        streams: Arc::default(),
        accepted: AtomicUsize::new(0),
    });
    let key = (via.clone(), listening.port);
    lock(&agent.callbacks.leases).insert(key.clone(), lease.clone());
    info!(gateway = %via, uid, "callback listener at {public} for a program");
    let agent = agent.clone();
    tokio::spawn(async move {
        // Dropping the lease (at the end of keep) resets its stream: the gateway
        // closes the port.
        let ended = keep(&agent, &lease, &asking, socket, held).await;
        {
            let mut leases = lock(&agent.callbacks.leases);
            if leases.get(&key).is_some_and(|l| Arc::ptr_eq(l, &lease)) {
                leases.remove(&key);
            }
        }
        info!(gateway = %lease.gateway, "callback listener at {} closed: {ended}", lease.public);
    });
    Reply::Listening { public }
}

/// Reads one JSON message from the start of a body that stays open.
async fn first_message<T: serde::de::DeserializeOwned>(body: &mut RecvStream) -> Option<T> {
    let mut read = Vec::new();
    let within = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = body.data().await {
            let chunk = chunk.ok()?;
            let _ = body.flow_control().release_capacity(chunk.len());
            read.extend_from_slice(&chunk);
            if let Ok(value) = serde_json::from_slice(&read) {
                return Some(value);
            }
            if read.len() > 4096 {
                return None;
            }
        }
        None
    });
    within.await.ok().flatten()
}

/// Keeps a lease while the program's socket lives (asking for the same port again when
/// the gateway's listener went with a lost connection); returns why it ended.
async fn keep(
    agent: &Agent,
    lease: &Lease,
    asking: &Asking,
    socket: PassedFd,
    held: Held,
) -> String {
    let mut held = held;
    // Until it listens, the socket held here says where it is bound.
    let started = Instant::now();
    let inode = socket.inode().ok();
    *lock(&lease.inode) = inode;
    let listening = loop {
        if let Ok(local) = socket.local_addr()
            && local.port() != 0
        {
            let local = reachable(local);
            *lock(&lease.program) = Some(local);
            if inode.is_some() && agent.socket_owners.listener_inode(local).ok().flatten() == inode
            {
                break local;
            }
        }
        if started.elapsed() > LISTEN_GRACE {
            return format!("the program did not listen within {LISTEN_GRACE:?}");
        }
        tokio::select! {
            () = held.ended() => match lease_again(lease, asking, || true).await {
                Ok(again) => held = again,
                Err(why) => return why,
            },
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    };
    drop(socket);
    lease.listened.store(true, Ordering::Relaxed);
    let still_listening = || match agent.socket_owners.listener_inode(listening) {
        Ok(found) => found == inode,
        Err(e) => {
            warn!("looking for the program's listener at {listening}: {e}");
            true
        }
    };
    loop {
        tokio::select! {
            () = held.ended() => match lease_again(lease, asking, still_listening).await {
                Ok(again) => held = again,
                Err(why) => return why,
            },
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        if !still_listening() {
            return "the program closed its listener".into();
        }
    }
}

/// After the gateway's listener went with a lost connection: asks for the same port
/// again, with back-off, while `wanted` says the program still listens.
async fn lease_again(
    lease: &Lease,
    asking: &Asking,
    wanted: impl Fn() -> bool,
) -> Result<Held, String> {
    let port = lease.public.port();
    warn!(gateway = %lease.gateway, "callback listener at {}: the gateway's listener went; asking for it again", lease.public);
    let mut pause = Duration::from_millis(200);
    loop {
        if !wanted() {
            return Err("the program closed its listener".into());
        }
        match ask_gateway(asking, port).await {
            Ok((listening, held)) if listening.port == port => {
                info!(gateway = %lease.gateway, "callback listener at {} open again", lease.public);
                return Ok(held);
            }
            Ok(_) => return Err("the gateway gave another port".into()),
            Err(Reply::Err {
                refusal: Refusal::Listen(ListenRefusal::InUse | ListenRefusal::Denied),
                message,
            }) => return Err(format!("asked again: {message}")),
            Err(_) => {}
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Where this agent reaches a socket bound at `local`: an unspecified address is
/// reached on loopback.
fn reachable(local: SocketAddr) -> SocketAddr {
    match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), local.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), local.port())
        }
        _ => local,
    }
}

impl Callbacks {
    /// A connection that arrived at the callback listener on `port` of `gateway`, from
    /// `client`: connected to the program's listener, then carried.
    pub async fn inbound(
        &self,
        gateway: &str,
        port: u16,
        client: SocketAddr,
        (body, mut respond): (RecvStream, SendResponse<Bytes>),
        streams: &Arc<StreamTable>,
        health: &Health,
    ) {
        let entry = streams.register(format!("callback :{port} (from {client})"), "-".into());
        let lease = lock(&self.leases)
            .get(&(gateway.to_string(), port))
            .cloned();
        let Some(lease) = lease else {
            let _ = answer_connect(&mut respond, Err(ConnectError::Refused));
            entry.refused(
                ConnectError::Refused,
                format!("no callback listener on port {port} here"),
            );
            return;
        };
        lease.accepted.fetch_add(1, Ordering::Relaxed);
        let _count = tunnel_transport::counted::Counted::enter(&lease.streams);
        let started = Instant::now();
        let (tcp, ours) = loop {
            let program = *lock(&lease.program);
            let attempt = match program {
                Some(program) => self.connect(&lease, program, client).await,
                None => Err(std::io::ErrorKind::ConnectionRefused.into()),
            };
            match attempt {
                Ok(connected) => break connected,
                Err(e)
                    if started.elapsed() < CONNECT_PATIENCE
                        && !lease.listened.load(Ordering::Relaxed) =>
                {
                    debug!(port, "program not listening yet: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    let class = ConnectError::of_connect(&e);
                    let _ = answer_connect(&mut respond, Err(class));
                    entry.refused(class, format!("the program's listener: {e}"));
                    return;
                }
            }
        };
        let Ok(Some(send)) = answer_connect(&mut respond, Ok(())) else {
            lock(&self.peers).remove(&ours);
            entry.finish(&Err(Abort::Refused(ConnectError::Gateway)));
            return;
        };
        tunnel_transport::tune_carried_tcp(&tcp);
        let result = splice::splice(tcp, send, async { Ok(body) }, entry.stats(), health).await;
        lock(&self.peers).remove(&ours);
        entry.finish(&result);
    }

    /// Connects to the program's listener from a loopback address noted first, so the
    /// program's `PEER` question can be answered the moment it accepts. Only the
    /// program's own socket gets the connection: its listener must still be the one
    /// the lease was made for, and the socket that took the connection must be its
    /// user's (another user who binds the port once the program closed it gets
    /// nothing).
    async fn connect(
        &self,
        lease: &Lease,
        program: SocketAddr,
        client: SocketAddr,
    ) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        if lease.listened.load(Ordering::Relaxed) {
            let now = self.owners.listener_inode(program)?;
            if now.is_none() || now != *lock(&lease.inode) {
                return Err(refused());
            }
        }
        let socket = match program {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        let loopback: IpAddr = match program {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        socket.bind(SocketAddr::new(loopback, 0))?;
        let ours = socket.local_addr()?;
        lock(&self.peers).insert(ours, (client, lease.public));
        let connected = match socket.connect(program).await {
            Ok(tcp) => match self.owned_by(program, ours, lease.uid).await {
                Ok(()) => Ok(tcp),
                Err(e) => {
                    splice::reset(tcp);
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        match connected {
            Ok(tcp) => Ok((tcp, ours)),
            Err(e) => {
                lock(&self.peers).remove(&ours);
                Err(e)
            }
        }
    }

    /// Checks that the socket at the program's end of `tcp` belongs to `uid`.
    async fn owned_by(
        &self,
        program: SocketAddr,
        ours: SocketAddr,
        uid: u32,
    ) -> std::io::Result<()> {
        // The kernel may take a moment to turn the handshake into the accepted socket.
        for _ in 0..20 {
            match self.owners.uid_of_peer(program, ours)? {
                Some(owner) if owner == uid => return Ok(()),
                Some(owner) => {
                    warn!(%program, owner, expected = uid, "a callback connection was taken by another user's socket: reset");
                    return Err(std::io::ErrorKind::ConnectionRefused.into());
                }
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        Err(std::io::ErrorKind::ConnectionRefused.into())
    }
}
