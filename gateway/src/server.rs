//! The gateway's listener: TLS with client certificates, one HTTP/2 connection per
//! agent connection, one CONNECT stream per carried connection.
//!
//! ```text
//! TcpListener ─accept─▶ handshake cap (admission.rs) ── over: reset at once
//!                          ▼
//!                       TLS handshake (client cert from our CA, or refused)
//!                          │ identity = certificate's common name
//!                          ▼
//!                       identity's connection limit ── over: GOAWAY + reason (goaway.rs)
//!                          ▼
//!                  h2 server connection ── PING: liveness, RTT, window tuning
//!                          │ one task per CONNECT stream:
//!                          ▼
//!   identity's stream limit ─▶ policy (identity → allowed?) ─▶ outbound connect ─▶ 200 ─▶ splice
//!        │ over                      │ no                           │ failed
//!        ▼                           ▼                              ▼
//!   429 over-limit              403 denied        502/504 + tunnel-error: refused | timed-out | …
//! ```
//!
//! Every refusal says why, and is counted and logged through `refusals.rs`, which
//! keeps a flood of them to one line per peer per interval.
//!
//! Each accepted connection, with all its streams, runs on one worker (`workers.rs`).
//!
//! Shutdown: stop accepting, send GOAWAY on every connection, let streams in flight
//! finish; the caller bounds how long that may take.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};
use tunnel_proto::callback::CALLBACKS_PATH;
use tunnel_proto::config::GatewayConfig;
use tunnel_proto::discovery::{EXPLAIN_PATH, SERVICES_PATH};
use tunnel_proto::enrolment::{ENROL_PATH, EXTEND_PATH, RENEW_PATH};
use tunnel_proto::{ConnectError, Target};
use tunnel_transport::certs::{CertInfo, rfc3339, unix_now, utc};
use tunnel_transport::liveness::{self, Health, INITIAL_STREAM_WINDOW};
use tunnel_transport::messages::answer_connect;
use tunnel_transport::plumbing::{Shutdown, accept_until};
use tunnel_transport::splice::{self, Abort};
use tunnel_transport::streams::{Side, StreamTable};

use crate::admission::{Admission, HandshakePermit};
use crate::authority::Authority;
use crate::goaway;
use crate::grants::Grants;
use crate::issuing;
use crate::outbound;
use crate::policy::{Caller, Policy};
use crate::publications::{self, Publishers};
use crate::refusals::{Kind, Refusal, Refusals};
use crate::state::{Revocations, State};
use crate::verifier::Client;
use crate::workers::Workers;

/// How long a refused agent connection may take to read its refusal and close.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Everything the connection and stream tasks share.
pub struct Gateway {
    pub config: GatewayConfig,
    /// Replaced whole when the config file changes (see `reload.rs`).
    policy: RwLock<Arc<Policy>>,
    pub state: State,
    pub authority: Authority,
    /// The revocation list as last read; connections watch it.
    pub revocations: watch::Sender<Arc<Revocations>>,
    /// Identity → groups, from the enrolment records.
    groups: RwLock<BTreeMap<String, Vec<String>>>,
    pub grants: Arc<Grants>,
    pub publishers: Publishers,
    pub callbacks: crate::callbacks::CallbackListeners,
    pub admission: Arc<Admission>,
    pub refusals: Refusals,
    pub streams: Arc<StreamTable>,
    pub connections: Mutex<BTreeMap<u64, ConnectionInfo>>,
    next_connection: AtomicU64,
    pub local_addr: SocketAddr,
    pub started: Instant,
}

pub struct ConnectionInfo {
    pub peer: SocketAddr,
    pub identity: String,
    pub since: Instant,
    pub health: Arc<Health>,
    /// The certificate that vouches for it now: its handshake's, then one renewed on
    /// it or proved on it (`/v1/extend`); none while enrolling.
    pub current: watch::Sender<Option<Current>>,
    /// When it must end (seconds since 1970), unless renewed.
    pub deadline: i64,
}

/// The certificate that vouches for a connection now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

#[derive(Serialize, serde::Deserialize)]
pub struct ConnectionView {
    pub id: u64,
    pub peer: String,
    pub identity: String,
    pub age_secs: f64,
    pub rtt_ms: Option<f64>,
    /// The serial of the certificate it authenticated with.
    pub serial: Option<String>,
    /// When it will be closed unless its certificate is renewed (RFC 3339).
    pub until: String,
}

impl Gateway {
    /// Opens the state directory and the CA (which signs enrolments and renewals).
    pub fn new(config: GatewayConfig, local_addr: SocketAddr) -> Result<Arc<Gateway>> {
        let state = State::open(&config.state_dir)?;
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let authority =
            Authority::load(&read(&config.ca)?, &read(&config.ca_key)?).with_context(|| {
                format!(
                    "loading the CA from {} and {}",
                    config.ca.display(),
                    config.ca_key.display()
                )
            })?;
        let revocations = state.revocations()?;
        let gateway = Arc::new(Gateway {
            policy: RwLock::new(Arc::new(Policy::new(&config))),
            state,
            authority,
            revocations: watch::Sender::new(Arc::new(revocations)),
            groups: RwLock::default(),
            grants: Arc::default(),
            publishers: Publishers::default(),
            callbacks: Default::default(),
            admission: Admission::new(&config),
            refusals: Refusals::new(config.log_summary_interval),
            config,
            streams: StreamTable::new(Side::Gateway),
            connections: Mutex::default(),
            next_connection: AtomicU64::new(1),
            local_addr,
            started: Instant::now(),
        });
        gateway.refresh_identities();
        Ok(gateway)
    }

    /// Agent connections taken since start (each got a connection number).
    pub fn connections_accepted(&self) -> u64 {
        self.next_connection
            .load(Ordering::Relaxed)
            .saturating_sub(1)
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(policy);
    }

    /// An identity with the groups its enrolment gave it.
    pub fn caller(&self, identity: &str) -> Caller {
        let groups = self
            .groups
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(identity)
            .cloned()
            .unwrap_or_default();
        Caller {
            identity: identity.to_string(),
            groups,
        }
    }

    /// Reads the enrolled identities' groups again from the state directory.
    pub fn refresh_identities(&self) {
        match self.state.identities() {
            Ok(records) => {
                let groups = records
                    .into_iter()
                    .map(|r| (r.identity, r.groups))
                    .collect();
                *self.groups.write().unwrap_or_else(PoisonError::into_inner) = groups;
            }
            Err(e) => warn!("reading the enrolled identities: {e:#}"),
        }
    }

    /// The certificate that vouches for connection `id` now.
    pub fn current_of(&self, id: u64) -> Option<Current> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .and_then(|c| c.current.borrow().clone())
    }

    /// Makes `certificate` the one that vouches for connection `id` from now on: its
    /// holder renewed on this connection, or proved on it that it holds the key.
    pub fn vouch(&self, id: u64, certificate: Current) {
        if let Some(c) = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            c.current.send_replace(Some(certificate));
        }
    }

    /// Records an agent connection for status, renewal and revocation; returns its id
    /// and the certificate that vouches for it now (changed by renewals of its
    /// lineage). `limited_until` is its end if it has no valid certificate.
    pub async fn register(
        self: &Arc<Self>,
        peer: SocketAddr,
        identity: &str,
        certificate: Option<&CertInfo>,
        health: &Arc<Health>,
        limited_until: i64,
    ) -> (u64, watch::Receiver<Option<Current>>) {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let (current_tx, current_rx) = watch::channel(certificate.map(|c| Current {
            serial: c.serial.clone(),
            not_before: c.not_before,
            not_after: c.not_after,
        }));
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                ConnectionInfo {
                    peer,
                    identity: identity.to_string(),
                    since: Instant::now(),
                    health: health.clone(),
                    current: current_tx,
                    deadline: limited_until,
                },
            );
        (id, current_rx)
    }

    pub fn unregister(&self, id: u64) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        self.publishers.remove_connection(id);
    }

    pub fn connection_views(&self) -> Vec<ConnectionView> {
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        connections
            .iter()
            .map(|(id, c)| ConnectionView {
                id: *id,
                peer: c.peer.to_string(),
                identity: c.identity.clone(),
                age_secs: c.since.elapsed().as_secs_f64(),
                rtt_ms: c.health.rtt().map(|d| d.as_secs_f64() * 1000.0),
                serial: c.current.borrow().as_ref().map(|c| c.serial.clone()),
                until: rfc3339(
                    c.current
                        .borrow()
                        .as_ref()
                        .map_or(c.deadline, |current| current.not_after),
                ),
            })
            .collect()
    }
}

/// Connections the kernel may hold completed for us before we accept them. Under a
/// flood of connects a short queue (tokio's and the standard library's is 128)
/// overflows within a burst, and every connect that finds it full, a real agent's
/// too, waits a second or more for its SYN to be sent again. The kernel caps this at
/// `net.core.somaxconn` (4096 by default).
const ACCEPT_BACKLOG: i32 = 4096;

/// The gateway's listening socket, with [`ACCEPT_BACKLOG`].
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(ACCEPT_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Accepts agents until `shutdown` fires, then asks every connection to drain and
/// returns once the last one has ended.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    tls: TlsAcceptor,
    workers: Workers,
    shutdown: Shutdown,
) {
    // Each connection task holds a sender; when all are gone, every connection ended.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let connection_shutdown = shutdown.clone();
    accept_until(
        "agent listener",
        shutdown,
        || listener.accept(),
        |(tcp, peer)| {
            let permit = match gateway.admission.handshake(peer.ip()) {
                Ok(permit) => permit,
                Err(over) => {
                    // A reset frees the socket at once, on both ends; a polite close would
                    // leave it in TIME_WAIT here.
                    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                    drop(tcp);
                    gateway
                        .refusals
                        .report(&source(peer.ip()), Kind::OverHandshakeCap, over);
                    return;
                }
            };
            // Handed to a worker: the socket moves to that worker's runtime.
            let tcp = match tcp.into_std() {
                Ok(tcp) => tcp,
                Err(e) => {
                    warn!(%peer, "could not hand the connection to a worker: {e}");
                    return;
                }
            };
            let (gateway, tls, shutdown) =
                (gateway.clone(), tls.clone(), connection_shutdown.clone());
            let done = done_tx.clone();
            workers.spawn(move || async move {
                connection(gateway, tcp, peer, permit, tls, shutdown).await;
                drop(done);
            });
        },
    )
    .await;
    drop(listener);
    drop(done_tx);
    let _ = done_rx.recv().await;
}

/// One accepted connection, from the TLS handshake to its end. Its task stays small
/// until the client has proved itself: a silent socket holds only the socket and this
/// future's first state (measured: ~1 KiB in all); the TLS session is made once the
/// first bytes arrive, and the HTTP/2 state once a certificate from our CA is
/// presented, each in an allocation of its own.
async fn connection(
    gateway: Arc<Gateway>,
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    permit: HandshakePermit,
    tls: TlsAcceptor,
    shutdown: Shutdown,
) {
    let tcp = match TcpStream::from_std(tcp) {
        Ok(tcp) => tcp,
        Err(e) => {
            warn!(%peer, "could not register the connection: {e}");
            return;
        }
    };
    tunnel_transport::tune_tcp(&tcp);
    let deadline = tokio::time::Instant::now() + gateway.config.handshake_timeout;
    match tokio::time::timeout_at(deadline, tcp.readable()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return handshake_failed(&gateway, peer, &e),
        Err(_) => return handshake_timed_out(&gateway, peer),
    }
    Box::pin(handshake(
        gateway, tcp, peer, permit, tls, deadline, shutdown,
    ))
    .await;
}

/// The TLS handshake of a connection whose client has begun to speak.
async fn handshake(
    gateway: Arc<Gateway>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: HandshakePermit,
    tls: TlsAcceptor,
    deadline: tokio::time::Instant,
    shutdown: Shutdown,
) {
    let accepted = tokio::time::timeout_at(deadline, tls.accept(tcp)).await;
    drop(permit);
    match accepted {
        Ok(Ok(tls_stream)) => Box::pin(agent(gateway, tls_stream, peer, shutdown)).await,
        Ok(Err(e)) => handshake_failed(&gateway, peer, &e),
        Err(_) => handshake_timed_out(&gateway, peer),
    }
}

fn handshake_failed(gateway: &Gateway, peer: SocketAddr, e: &std::io::Error) {
    let detail = format!("TLS handshake refused: {e} (from {peer})");
    gateway
        .refusals
        .report(&source(peer.ip()), Kind::HandshakeFailed, detail);
}

fn handshake_timed_out(gateway: &Gateway, peer: SocketAddr) {
    let detail = format!(
        "TLS handshake timed out after {:.0}s, handshake_timeout (from {peer})",
        gateway.config.handshake_timeout.as_secs_f64()
    );
    gateway
        .refusals
        .report(&source(peer.ip()), Kind::HandshakeTimedOut, detail);
}

/// How a source appears in logs: its address, or its /64 for IPv6 (what the handshake
/// caps count).
fn source(ip: IpAddr) -> String {
    match crate::admission::source_of(ip) {
        IpAddr::V6(net) => format!("{net}/64"),
        v4 => v4.to_string(),
    }
}

/// How long a connection without a valid certificate (enrolling, or recovering an
/// expired one) may stay: long enough for one request.
const LIMITED_CONNECTION: Duration = Duration::from_secs(30);

/// What a connection may do, from the certificate its handshake presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// No certificate: `POST /v1/enrol` only.
    Enrolling,
    /// A valid certificate: streams and renewal.
    Agent,
    /// An expired certificate within the recovery window: renewal only, until it
    /// renews (then it is an `Agent` connection).
    Recovering,
}

/// An agent's connection, once its TLS handshake succeeded: HTTP/2, one task per stream.
async fn agent(
    gateway: Arc<Gateway>,
    mut tls_stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    mut shutdown: Shutdown,
) {
    tunnel_transport::tls::tune_session(tls_stream.get_mut().1);
    let client = Client::of(
        tls_stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first()),
        unix_now(),
    );
    let (mut role, certificate) = match client {
        Ok(Client::Enrolling) => (Role::Enrolling, None),
        Ok(Client::Agent(info)) => (Role::Agent, Some(info)),
        Ok(Client::Recovering(info)) => (Role::Recovering, Some(info)),
        Err(e) => {
            let detail =
                format!("client certificate unreadable ({e:#}): connection refused (from {peer})");
            gateway
                .refusals
                .report(&source(peer.ip()), Kind::HandshakeFailed, detail);
            return;
        }
    };
    let identity = match &certificate {
        None => "(enrolling)".to_string(),
        Some(info) => match info.common_name() {
            Some(cn) => cn.to_string(),
            None => {
                let detail = format!(
                    "client certificate has no common name: connection refused (from {peer})"
                );
                gateway
                    .refusals
                    .report(&source(peer.ip()), Kind::HandshakeFailed, detail);
                return;
            }
        },
    };
    // Clients without a certificate count together per source address, under one
    // name, against the per-identity connection limit: a flood from one place cannot
    // hold more, nor keep others from enrolling.
    let counted_as = match role {
        Role::Enrolling => format!("(enrolling from {})", source(peer.ip())),
        Role::Agent | Role::Recovering => identity.clone(),
    };
    let _connection_permit = match gateway.admission.connection(&counted_as) {
        Ok(permit) => permit,
        Err(over) => {
            let reason = over.to_string();
            gateway.refusals.report(
                &identity,
                Kind::OverConnectionLimit,
                format!("connection from {peer} refused: {reason}"),
            );
            goaway::refuse(
                tls_stream,
                h2::Reason::ENHANCE_YOUR_CALM,
                &reason,
                REFUSAL_LINGER,
            )
            .await;
            return;
        }
    };

    if tls_stream.get_ref().1.alpn_protocol() == Some(tunnel_proto::reverse::ALPN) {
        if role != Role::Agent {
            let detail =
                format!("reverse connection from {peer} refused: it needs a valid certificate");
            gateway
                .refusals
                .report(&identity, Kind::HandshakeFailed, detail);
            return;
        }
        let Some(certificate) = certificate else {
            return;
        };
        return Box::pin(publications::serve_publisher(
            gateway,
            tls_stream,
            peer,
            identity,
            certificate,
            shutdown,
        ))
        .await;
    }
    // A connection that may only ask for a certificate needs no more than a stream
    // or two; more would let it hold many request bodies at once.
    let streams = match role {
        Role::Agent => gateway.config.max_streams_per_connection,
        Role::Enrolling | Role::Recovering => 2,
    };
    let exporter = tunnel_transport::tls::exporter(tls_stream.get_ref().1);
    let handshake = liveness::server_builder()
        .max_concurrent_streams(streams)
        .handshake::<_, Bytes>(tls_stream);
    let mut conn = match tokio::time::timeout(gateway.config.handshake_timeout, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            warn!(%peer, %identity, "HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => {
            warn!(%peer, %identity, "HTTP/2 handshake timed out");
            return;
        }
    };
    let Some(ping_pong) = conn.ping_pong() else {
        return;
    };

    let health = Arc::new(Health::default());
    let limited_until = unix_now() + LIMITED_CONNECTION.as_secs() as i64;
    let (id, mut current_rx) = gateway
        .register(
            peer,
            &identity,
            certificate.as_ref(),
            &health,
            limited_until,
        )
        .await;
    match role {
        Role::Enrolling => debug!(%peer, "client without a certificate: enrolment only"),
        Role::Recovering => {
            info!(%peer, %identity, "agent with an expired certificate connected: renewal only")
        }
        Role::Agent => info!(%peer, %identity, "agent connected"),
    }

    let (window_tx, mut window_rx) = watch::channel(INITIAL_STREAM_WINDOW);
    let watcher = {
        let health = health.clone();
        let (interval, timeout) = (gateway.config.ping_interval, gateway.config.ping_timeout);
        async move { liveness::watch_connection(ping_pong, &health, window_tx, interval, timeout).await }
    };
    tokio::pin!(watcher);
    let mut revocations = gateway.revocations.subscribe();
    let mut draining = false;
    let mut windows_open = true;
    let reason = loop {
        let current = current_rx.borrow_and_update().clone();
        // A renewal of its lineage (on this connection or another of the agent's) gives
        // a recovering connection a valid certificate again.
        if role == Role::Recovering && current.as_ref().is_some_and(|c| c.not_after > unix_now()) {
            role = Role::Agent;
            info!(%peer, %identity, "recovered: the connection may carry streams again");
        }
        let deadline = match (role, &current) {
            (Role::Agent, Some(current)) => current.not_after,
            _ => limited_until,
        };
        let expiry = tokio::time::Instant::now() + until_unix(deadline);
        tokio::select! {
            request = conn.accept() => match request {
                Some(Ok((request, respond))) => {
                    let context = RequestContext {
                        gateway: &gateway,
                        role,
                        identity: &identity,
                        current: current.as_ref(),
                        exporter,
                        connection: id,
                        peer,
                        health: &health,
                    };
                    dispatch(context, request, respond);
                }
                Some(Err(e)) => break format!("connection error: {e}"),
                None => break "closed".to_string(),
            },
            _ = current_rx.changed() => {}
            () = tokio::time::sleep_until(expiry) => {
                let why = match role {
                    Role::Agent => format!("the certificate of {identity} expired on {}", utc(deadline)),
                    Role::Enrolling | Role::Recovering => format!("no certificate issued within {}s", LIMITED_CONNECTION.as_secs()),
                };
                break cut(&gateway, &mut conn, id, &why).await;
            }
            Ok(()) = revocations.changed() => {
                // Revoking the certificate it was made with, or the one that vouches
                // for it now, ends it.
                let list = revocations.borrow_and_update().clone();
                if let Some(why) = revoked(&list, &identity, certificate.as_ref(), current.as_ref()) {
                    break cut(&gateway, &mut conn, id, &why).await;
                }
            }
            changed = window_rx.changed(), if windows_open => match changed {
                Ok(()) => {
                    let window = *window_rx.borrow_and_update();
                    debug!(%peer, window, "stream window grows");
                    conn.set_target_window_size(liveness::connection_window(window));
                    if let Err(e) = conn.set_initial_window_size(window) {
                        break format!("window update failed: {e}");
                    }
                }
                Err(_) => windows_open = false,
            },
            () = shutdown.fired(), if !draining => {
                draining = true;
                info!(%peer, %identity, "draining: GOAWAY sent");
                conn.graceful_shutdown();
            }
            error = &mut watcher, if !draining => break error.to_string(),
        }
    };
    gateway.unregister(id);
    info!(%peer, %identity, "agent connection ended: {reason}");
}

/// Why a connection made with `certificate` and vouched for by `current` may no longer
/// live, if either is revoked.
pub fn revoked(
    list: &Revocations,
    identity: &str,
    certificate: Option<&CertInfo>,
    current: Option<&Current>,
) -> Option<String> {
    let now = current.and_then(|c| list.verdict(identity, &c.serial, c.not_before));
    now.or_else(|| certificate.and_then(|c| list.verdict(identity, &c.serial, c.not_before)))
}

/// Time from now until `unix` seconds since 1970 (zero if past).
pub fn until_unix(unix: i64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(unix.max(0).unsigned_abs()).saturating_sub(now)
}

type ServerConnection = h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>;

/// Ends a connection whose right to exist is gone: every stream on it is reset (so the
/// programs see resets, never a clean end), then the connection is closed.
async fn cut(gateway: &Gateway, conn: &mut ServerConnection, id: u64, why: &str) -> String {
    let streams = gateway.grants.withdraw_connection(id, why);
    warn!(connection = id, streams, "closing the connection: {why}");
    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
    // Let the resets and the GOAWAY go out before the socket closes.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = conn.accept().await {}
    })
    .await;
    why.to_string()
}

/// What a request on a connection needs to know about it.
struct RequestContext<'a> {
    gateway: &'a Arc<Gateway>,
    role: Role,
    identity: &'a str,
    current: Option<&'a Current>,
    exporter: Option<[u8; 32]>,
    connection: u64,
    peer: SocketAddr,
    health: &'a Arc<Health>,
}

/// Sends each request to its handler, as far as the connection's role allows.
fn dispatch(
    context: RequestContext<'_>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let RequestContext {
        gateway,
        role,
        identity,
        current,
        exporter,
        connection,
        peer,
        health,
    } = context;
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    match (role, &method, path.as_str(), current) {
        (Role::Agent, &Method::CONNECT, _, _) => {
            tokio::spawn(stream(
                gateway.clone(),
                identity.to_string(),
                connection,
                health.clone(),
                request,
                respond,
            ));
        }
        (Role::Agent, &Method::POST, SERVICES_PATH, _) => {
            crate::discovery::services(gateway, &gateway.caller(identity), respond);
        }
        (Role::Agent, &Method::POST, EXPLAIN_PATH, _) => {
            tokio::spawn(crate::discovery::explain(
                gateway.clone(),
                gateway.caller(identity),
                request.into_body(),
                respond,
            ));
        }
        (Role::Agent, &Method::POST, CALLBACKS_PATH, _) => {
            tokio::spawn(crate::callbacks::listen(
                gateway.clone(),
                gateway.caller(identity),
                peer,
                request,
                respond,
            ));
        }
        (Role::Enrolling, &Method::POST, ENROL_PATH, _) => {
            tokio::spawn(issuing::enrol(
                gateway.clone(),
                peer,
                request.into_body(),
                respond,
            ));
        }
        (Role::Agent | Role::Recovering, &Method::POST, RENEW_PATH, Some(current)) => {
            let presented = issuing::presented(identity, current);
            tokio::spawn(issuing::renew(
                gateway.clone(),
                (peer, connection),
                presented,
                request.into_body(),
                respond,
            ));
        }
        (Role::Agent | Role::Recovering, &Method::POST, EXTEND_PATH, Some(_)) => {
            tokio::spawn(issuing::extend(
                gateway.clone(),
                (peer, connection),
                identity.to_string(),
                exporter,
                request.into_body(),
                respond,
            ));
        }
        _ => {
            let why = match role {
                Role::Enrolling => "a client without a certificate may only enrol",
                Role::Recovering => "an expired certificate may only be renewed",
                Role::Agent => {
                    "not a CONNECT, nor a certificate, callback, services or explain request"
                }
            };
            let detail = format!("{method} {} refused from {peer}: {why}", request.uri());
            gateway
                .refusals
                .report(identity, Kind::Stream(ConnectError::Denied), detail);
            let _ = answer_connect(&mut respond, Err(ConnectError::Denied));
        }
    }
}

async fn stream(
    gateway: Arc<Gateway>,
    identity: String,
    connection: u64,
    health: Arc<Health>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let target = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .and_then(|a| Target::parse(a).ok());
    let Some(target) = target else {
        let detail = format!(
            "stream {}: not a CONNECT to host:port or a service: {} {}",
            ConnectError::BadRequest,
            request.method(),
            request.uri()
        );
        gateway
            .refusals
            .report(&identity, Kind::Stream(ConnectError::BadRequest), detail);
        let _ = answer_connect(&mut respond, Err(ConnectError::BadRequest));
        return;
    };
    let entry = gateway
        .streams
        .register(target.to_string(), identity.clone());

    let caller = gateway.caller(&identity);
    // A publication by name: as a service (`lab-db`), or as a host name with any port
    // (`lab-db:5432`, what a preloaded program connecting to "lab-db" asks for).
    let publication = match &target {
        Target::Service(name) => Some(name.clone()),
        Target::Addr {
            host: tunnel_proto::Host::Name(name),
            ..
        } => Some(name.to_ascii_lowercase()),
        Target::Addr { .. } => None,
    };
    if let Some(name) = &publication
        && publications::is_publication(&gateway, name)
    {
        return publication_stream(
            gateway,
            health,
            caller,
            name.clone(),
            request,
            respond,
            entry,
        )
        .await;
    }
    let policy = gateway.policy();
    let connected = match gateway.admission.stream(&identity) {
        Err(over) => Err(Refusal::new(ConnectError::OverLimit, over.to_string())),
        Ok(permit) => match policy.addresses(&caller, &target).await {
            Ok(addrs) => outbound::connect(&addrs, gateway.config.connect_timeout)
                .await
                .map(|tcp| (tcp, permit)),
            Err(refusal) => Err(refusal),
        },
    };
    let (tcp, _permit) = match connected {
        Ok(connected) => connected,
        Err(refusal) => {
            return refuse_stream(&gateway, &identity, &target, refusal, &mut respond, entry);
        }
    };
    tunnel_transport::tune_carried_tcp(&tcp);
    let Ok(addr) = tcp.peer_addr() else {
        entry.finish(&Err(Abort::Refused(ConnectError::Gateway)));
        return;
    };
    // Held from before the answer, so a policy reload in between is not missed.
    let (_grant, withdrawn) = gateway.grants.enter(connection, &identity, &target, addr);
    if let Err(why) = gateway.policy().still_allows(&caller, &target, addr) {
        let _ = answer_connect(&mut respond, Err(ConnectError::Denied));
        entry.refused(ConnectError::Denied, why);
        return;
    }
    let send = match answer_connect(&mut respond, Ok(())) {
        Ok(Some(send)) => send,
        _ => {
            entry.finish(&Err(Abort::Refused(ConnectError::Gateway)));
            return;
        }
    };
    debug!(%identity, destination = %target, "connected");
    let body = request.into_body();
    let result = splice::splice_until(
        tcp,
        send,
        async { Ok(body) },
        entry.stats(),
        &health,
        withdrawn,
    )
    .await;
    if let Err(e) = &result {
        info!(%identity, destination = %target, "stream aborted: {e}");
    }
    entry.finish(&result);
}

/// A consumer agent's stream to a publication, joined to a stream to its publisher.
async fn publication_stream(
    gateway: Arc<Gateway>,
    health: Arc<Health>,
    caller: Caller,
    name: String,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    entry: tunnel_transport::streams::Registered,
) {
    let identity = caller.identity.clone();
    let opened = match gateway.admission.stream(&identity) {
        Err(over) => Err(Refusal::new(ConnectError::OverLimit, over.to_string())),
        Ok(permit) => publications::reach_by_name(&gateway, &caller, &name, gateway.local_addr)
            .await
            .map(|opened| (opened, permit)),
    };
    let (opened, _permit) = match opened {
        Ok(opened) => opened,
        Err(refusal) => {
            return refuse_stream(&gateway, &identity, &name, refusal, &mut respond, entry);
        }
    };
    let send = match answer_connect(&mut respond, Ok(())) {
        Ok(Some(send)) => send,
        _ => {
            entry.finish(&Err(Abort::Refused(ConnectError::Gateway)));
            return;
        }
    };
    debug!(%identity, publication = %name, publisher = %opened.publisher, "joined");
    let result = splice::relay(
        (send, request.into_body(), &health),
        (opened.send, opened.recv, &opened.health),
        entry.stats(),
    )
    .await;
    if let Err(e) = &result {
        info!(%identity, publication = %name, "stream aborted: {e}");
    }
    entry.finish(&result);
}

/// Refuses a stream: counted and logged (through the summaries), answered with its
/// class, and recorded with why.
fn refuse_stream(
    gateway: &Gateway,
    identity: &str,
    destination: &dyn std::fmt::Display,
    refusal: Refusal,
    respond: &mut SendResponse<Bytes>,
    entry: tunnel_transport::streams::Registered,
) {
    let detail = format!("stream to {destination} {}: {}", refusal.class, refusal.why);
    gateway
        .refusals
        .report(identity, Kind::Stream(refusal.class), detail);
    let _ = answer_connect(respond, Err(refusal.class));
    entry.refused(refusal.class, refusal.why);
}
