//! The pool of HTTP/2 connections to one gateway.
//!
//! ```text
//!  Pool "site-b" ── slot 0: dial ─▶ up (SendRequest) ─▶ lost ─▶ backoff ─▶ dial …
//!                └─ slot 1: …
//! ```
//!
//! Each slot has a task that dials the gateway (TCP, TLS 1.3 with our client
//! certificate, HTTP/2), keeps the connection while PINGs are answered, and redials
//! with jittered exponential backoff when it is lost. A stream that finds no live
//! connection cuts the backoff short: the slots dial at once (no more often than
//! [`DEMAND_REDIAL_GAP`]), so a program never waits out a long backoff after the
//! gateway came back. When the gateway has several
//! addresses (replicas sharing one CA), the slots start spread over them and a slot
//! that loses its connection moves on to the next address. New streams go to the live slot
//! with the fewest streams; a slot whose gateway sent GOAWAY takes no new streams while
//! its old ones finish.
//!
//! The client certificate and key can be replaced while the pool runs (renewal does):
//! every later dial uses the new pair; connections that are up keep theirs.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use h2::SendStream;
use h2::client::{ResponseFuture, SendRequest};
use http::{Method, Request, StatusCode, Uri};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsConnector;
use tracing::{debug, error, info, warn};
use tunnel_proto::Target;
use tunnel_proto::config::{AgentConfig, GatewayPeer};
use tunnel_transport::counted::Counted;
use tunnel_transport::liveness::{self, Health, INITIAL_STREAM_WINDOW};

use crate::certificate::Certificate;
use crate::rewind::Rewind;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// A connection that stayed up this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// While streams wait for a connection, a slot in backoff dials at once, but no sooner
/// than this after its previous attempt began (a gateway that refuses at once is not
/// hammered by a waiting stream).
pub const DEMAND_REDIAL_GAP: Duration = Duration::from_secs(1);

pub struct Pool {
    pub peer: GatewayPeer,
    /// The certificate this agent presents to the gateway (renewal replaces it).
    certificate: RwLock<Arc<Certificate>>,
    /// The TLS set-up of the next dial, with the current certificate and key.
    tls: RwLock<TlsConnector>,
    slots: Vec<Mutex<Slot>>,
    changed: Notify,
    /// Counts the connections that came up, ever: renewal retries at once when one does.
    connected: watch::Sender<u64>,
    /// Woken when the credential is replaced.
    credential_changed: Notify,
    /// Streams waiting in [`Pool::open`] for a live connection.
    waiting: AtomicUsize,
    /// Wakes slots in backoff when a stream starts waiting.
    demand: Notify,
    /// Connections lost or dials failed, ever: a waiting stream gives up once every
    /// slot has failed again since it began to wait.
    pub failures: AtomicU64,
    connect_timeout: Duration,
}

struct Slot {
    address: String,
    state: SlotState,
    since: Instant,
    health: Option<Arc<Health>>,
    streams: Arc<AtomicUsize>,
}

/// What one connection slot is doing. It changes only through [`Pool::set`], and an
/// error lives only in the states it explains, so status never shows a connection
/// `up` beside the error of one that went before it.
///
/// ```text
///   Connecting ──dialled──▶ Up ──GOAWAY──▶ Draining
///       ▲                    │ lost           │ ended
///       └───── Backoff ◀─────┴────────────────┘
/// ```
#[derive(Clone)]
enum SlotState {
    /// Dialling; `after` is why the attempt before this one ended, if there was one.
    Connecting {
        after: Option<String>,
    },
    Up(Live),
    /// GOAWAY received: finishing old streams, taking no new ones.
    Draining,
    /// Waiting until `until` to dial again (sooner when a stream waits).
    Backoff {
        error: String,
        until: Instant,
    },
}

/// The name of a [`SlotState`], as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateName {
    Connecting,
    Up,
    Draining,
    Backoff,
}

impl SlotState {
    fn name(&self) -> StateName {
        match self {
            SlotState::Connecting { .. } => StateName::Connecting,
            SlotState::Up(_) => StateName::Up,
            SlotState::Draining => StateName::Draining,
            SlotState::Backoff { .. } => StateName::Backoff,
        }
    }

    /// Why the slot is not up, when it knows.
    fn error(&self) -> Option<&str> {
        match self {
            SlotState::Connecting { after } => after.as_deref(),
            SlotState::Backoff { error, .. } => Some(error),
            SlotState::Up(_) | SlotState::Draining => None,
        }
    }
}

#[derive(Clone)]
struct Live {
    send: SendRequest<Bytes>,
    health: Arc<Health>,
    /// This connection's TLS exporter value: signed with a renewed key, it moves the
    /// connection onto the renewed certificate (`/v1/extend`).
    exporter: Option<[u8; 32]>,
}

/// A stream just opened on a tunnel connection.
pub struct Opened {
    pub send: SendStream<Bytes>,
    pub response: ResponseFuture,
    pub health: Arc<Health>,
    /// Counts the stream against its connection until dropped.
    pub _count: Counted,
}

/// A request's answer whose body stays open (see [`Pool::hold`]).
pub struct Leased {
    pub response: http::Response<h2::RecvStream>,
    /// Counts the stream against its connection while held.
    pub count: Counted,
}

#[derive(Serialize, serde::Deserialize)]
pub struct SlotView {
    pub address: String,
    pub state: StateName,
    pub state_secs: f64,
    pub rtt_ms: Option<f64>,
    pub streams: usize,
    /// Why the connection is not up: in `backoff`, what ended the last attempt; in
    /// `connecting`, what ended the one before. Absent while `up` or `draining`.
    pub error: Option<String>,
    /// In `backoff`: seconds until the next dial (sooner if a stream waits).
    pub retry_in_secs: Option<f64>,
}

fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    /// Makes the pool and starts its slot tasks. A certificate that cannot work (expired,
    /// from another CA, not a client certificate) is an error here, before any dial.
    pub fn start(peer: GatewayPeer, config: &AgentConfig) -> Result<Arc<Pool>> {
        let tls = tunnel_transport::tls::client_config(&peer.ca, &peer.cert, &peer.key)
            .with_context(|| format!("gateway `{}`", peer.name))?;
        let certificate = Certificate::load(&peer.ca, &peer.cert, peer.renews)
            .with_context(|| format!("gateway `{}`", peer.name))?;
        match certificate.problem_at(tunnel_transport::certs::unix_now()) {
            Some(problem) if problem.stops_the_agent() => {
                return Err(anyhow!(problem).context(format!("gateway `{}`", peer.name)));
            }
            // Renewal says so, and recovers it.
            Some(crate::certificate::Problem::CredentialExpired { .. }) => {}
            Some(problem) => error!(gateway = %peer.name, "{problem}"),
            None => {}
        }
        let certificate = Arc::new(certificate);
        let mut addresses = Vec::new();
        for a in &peer.addresses {
            let server_name = tunnel_transport::tls::server_name(&a.server_name)
                .with_context(|| format!("gateway `{}`", peer.name))?;
            addresses.push((a.address.clone(), server_name));
        }
        let slot = || {
            Mutex::new(Slot {
                address: String::new(),
                state: SlotState::Connecting { after: None },
                since: Instant::now(),
                health: None,
                streams: Arc::default(),
            })
        };
        let pool = Arc::new(Pool {
            slots: (0..peer.connections).map(|_| slot()).collect(),
            certificate: RwLock::new(certificate),
            tls: RwLock::new(TlsConnector::from(tls)),
            peer,
            changed: Notify::new(),
            connected: watch::Sender::new(0),
            credential_changed: Notify::new(),
            waiting: AtomicUsize::new(0),
            demand: Notify::new(),
            failures: AtomicU64::new(0),
            connect_timeout: config.connect_timeout,
        });
        let dialer = Dialer {
            addresses,
            ping_interval: config.ping_interval,
            ping_timeout: config.ping_timeout,
        };
        for index in 0..pool.slots.len() {
            tokio::spawn(keep_connected(pool.clone(), index, dialer.clone()));
        }
        if !pool.peer.renews {
            let watched = pool.clone();
            tokio::spawn(async move {
                let gateway = watched.peer.name.clone();
                crate::certificate::watch_expiry(|| watched.certificate(), &gateway).await;
            });
        }
        Ok(pool)
    }

    /// The certificate this agent presents to the gateway now.
    pub fn certificate(&self) -> Arc<Certificate> {
        self.certificate
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes every later dial present a new certificate and key (`tls`); connections
    /// that are up, and their streams, go on as they are.
    pub fn use_credential(
        &self,
        tls: Arc<tokio_rustls::rustls::ClientConfig>,
        certificate: Arc<Certificate>,
    ) {
        *self.tls.write().unwrap_or_else(PoisonError::into_inner) = TlsConnector::from(tls);
        *self
            .certificate
            .write()
            .unwrap_or_else(PoisonError::into_inner) = certificate;
        self.credential_changed.notify_waiters();
    }

    /// Woken when the credential is replaced (renewal, a new enrolment).
    pub fn credential_changed(&self) -> &Notify {
        &self.credential_changed
    }

    /// Moves every live connection onto the renewed certificate `certificate_pem`, by
    /// signing its TLS exporter value with the renewed `key` (the gateway would
    /// otherwise end it when the certificate it was made with ends). Returns how many
    /// were moved; a failure is logged and that connection ends with its old
    /// certificate, its streams then reset as they would have been.
    pub async fn extend_all(&self, certificate_pem: &str, key: &rcgen::KeyPair) -> usize {
        use rcgen::SigningKey as _;
        let live: Vec<(usize, Live)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| match &lock(slot).state {
                SlotState::Up(live) => Some((i, live.clone())),
                _ => None,
            })
            .collect();
        let mut moved = 0;
        for (index, live) in live {
            let Some(exporter) = live.exporter else {
                continue;
            };
            let mut message = tunnel_proto::enrolment::EXTEND_CONTEXT.to_vec();
            message.extend_from_slice(&exporter);
            let extended = async {
                let signature = key.sign(&message).context("signing")?;
                let body = serde_json::to_vec(&tunnel_proto::enrolment::ExtendRequest {
                    certificate: certificate_pem.to_string(),
                    signature: data_encoding::BASE64URL_NOPAD.encode(&signature),
                })?;
                let request = crate::exchange::request(
                    &self.server_name_of(index),
                    tunnel_proto::enrolment::EXTEND_PATH,
                )?;
                let (response, send) = live
                    .send
                    .clone()
                    .ready()
                    .await?
                    .send_request(request, false)?;
                let (status, answer) =
                    crate::exchange::answer(response, send, Bytes::from(body)).await?;
                if !status.is_success() {
                    anyhow::bail!("{status}: {}", String::from_utf8_lossy(&answer));
                }
                anyhow::Ok(())
            };
            match tokio::time::timeout(self.connect_timeout, extended).await {
                Ok(Ok(())) => moved += 1,
                Ok(Err(e)) => {
                    warn!(gateway = %self.peer.name, slot = index, "moving the connection onto the renewed certificate failed: {e:#}")
                }
                Err(_) => {
                    warn!(gateway = %self.peer.name, slot = index, "moving the connection onto the renewed certificate: no answer")
                }
            }
        }
        moved
    }

    /// Tells of every connection that comes up (a count).
    pub fn connections_made(&self) -> watch::Receiver<u64> {
        self.connected.subscribe()
    }

    /// With a credential the agent renews that has expired, a stream waits (up to
    /// `connect_timeout`) for its renewal: the gateway takes streams only from a valid
    /// certificate, and a program should hear why, not a bare denial.
    async fn valid_credential(&self) -> Result<()> {
        if !self.peer.renews {
            return Ok(());
        }
        let deadline = Instant::now() + self.connect_timeout;
        loop {
            let changed = self.credential_changed.notified();
            let certificate = self.certificate();
            if certificate.not_after() >= tunnel_transport::certs::unix_now() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, changed).await.is_err() {
                return Err(anyhow!(
                    "the credential for gateway `{}` expired on {} and has not been renewed yet (see `tunnel-agent status`)",
                    self.peer.name,
                    tunnel_transport::certs::utc(certificate.not_after())
                ));
            }
        }
    }

    /// The TLS set-up every new dial uses (this agent's current certificate).
    pub fn connector(&self) -> TlsConnector {
        self.tls
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn views(&self) -> Vec<SlotView> {
        self.slots
            .iter()
            .map(|slot| {
                let slot = lock(slot);
                SlotView {
                    address: slot.address.clone(),
                    state: slot.state.name(),
                    state_secs: slot.since.elapsed().as_secs_f64(),
                    rtt_ms: slot
                        .health
                        .as_ref()
                        .and_then(|h| h.rtt())
                        .map(|d| d.as_secs_f64() * 1000.0),
                    streams: slot.streams.load(Ordering::Relaxed),
                    error: slot.state.error().map(str::to_string),
                    retry_in_secs: match &slot.state {
                        SlotState::Backoff { until, .. } => Some(
                            until
                                .saturating_duration_since(Instant::now())
                                .as_secs_f64(),
                        ),
                        _ => None,
                    },
                }
            })
            .collect()
    }

    /// The one way a slot changes state: `next` sees the current state and says the
    /// new one, or `None` to leave it. Wakes the streams waiting for a connection.
    fn change(&self, index: usize, next: impl FnOnce(&SlotState) -> Option<SlotState>) {
        if let Some(slot) = self.slots.get(index) {
            let mut slot = lock(slot);
            let Some(state) = next(&slot.state) else {
                return;
            };
            if let SlotState::Up(live) = &state {
                slot.health = Some(live.health.clone());
                self.connected.send_modify(|n| *n += 1);
            }
            slot.state = state;
            slot.since = Instant::now();
        }
        self.changed.notify_waiters();
    }

    fn set(&self, index: usize, state: SlotState) {
        self.change(index, |_| Some(state));
    }

    /// True when no slot is up, dialling or draining: every one waits out a failure.
    fn all_backing_off(&self) -> bool {
        self.slots
            .iter()
            .all(|slot| matches!(lock(slot).state, SlotState::Backoff { .. }))
    }

    /// The live slot with the fewest streams.
    fn pick(&self) -> Option<(usize, Live, Arc<AtomicUsize>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let slot = lock(slot);
                let SlotState::Up(live) = &slot.state else {
                    return None;
                };
                Some((i, live.clone(), slot.streams.clone()))
            })
            .min_by_key(|(_, _, streams)| streams.load(Ordering::Relaxed))
    }

    /// A failure in the user's terms: certificate problems named as such.
    fn describe(&self, failure: &anyhow::Error) -> String {
        self.certificate()
            .explain(failure)
            .unwrap_or_else(|| format!("{failure:#}"))
    }

    /// Why no connection is up: the first slot's error that says.
    fn why_down(&self) -> String {
        self.slots
            .iter()
            .find_map(|s| lock(s).state.error().map(str::to_string))
            .unwrap_or_else(|| "still connecting".into())
    }

    /// Sleeps out a backoff `pause` that began at `dial_began`'s attempt, ending early
    /// (but not within [`DEMAND_REDIAL_GAP`] of that attempt) while a stream waits.
    async fn back_off(&self, pause: Duration, dial_began: Instant) {
        let end = Instant::now() + pause;
        let soonest = (dial_began + DEMAND_REDIAL_GAP).min(end);
        loop {
            // Armed before the count is read, so a stream that starts waiting in
            // between still wakes us.
            let woken = self.demand.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.waiting.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep_until(soonest.into()).await;
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(end.into()) => return,
                () = &mut woken => {}
            }
        }
    }

    /// Opens a CONNECT stream to `target`. The request goes out at once; the answer is
    /// awaited by the caller while the program's first bytes already travel.
    pub async fn open(&self, target: &Target) -> Result<Opened> {
        let uri = Uri::builder()
            .authority(target.to_string())
            .build()
            .with_context(|| format!("`{target}` is not a valid CONNECT authority"))?;
        self.valid_credential().await?;
        self.send(|_| {
            Request::builder()
                .method(Method::CONNECT)
                .uri(uri.clone())
                .body(())
                .context("building the CONNECT request")
        })
        .await
    }

    /// Sends a request with a body (enrolment's `POST`s) on the live connection with the
    /// fewest streams, waiting for one as [`Pool::open`] does, and reads the whole
    /// answer (at most [`MAX_BODY`](tunnel_proto::enrolment::MAX_BODY) bytes).
    pub async fn exchange(&self, path: &str, body: Bytes) -> Result<(StatusCode, Bytes)> {
        let opened = self
            .send(|server_name| crate::exchange::request(server_name, path))
            .await?;
        crate::exchange::answer(opened.response, opened.send, body).await
    }

    /// Sends a request with a body and returns the gateway's answer with its body still
    /// open: a lease that lasts while the answer is held (a callback listener). The
    /// stream is reset when the returned value is dropped.
    pub async fn hold(&self, path: &str, body: Bytes) -> Result<Leased> {
        self.valid_credential().await?;
        let opened = self
            .send(|server_name| crate::exchange::request(server_name, path))
            .await?;
        let Opened {
            mut send,
            response,
            _count,
            ..
        } = opened;
        send.reserve_capacity(body.len());
        send.send_data(body, true)
            .context("sending the request body")?;
        let response = response.await.context("waiting for the gateway's answer")?;
        Ok(Leased {
            response,
            count: _count,
        })
    }

    /// Opens a stream with the request `build` makes (given the name of the gateway
    /// the chosen connection dialled) on the live connection with the fewest streams,
    /// waiting up to `connect_timeout` for one.
    async fn send(&self, build: impl Fn(&str) -> Result<Request<()>>) -> Result<Opened> {
        let deadline = Instant::now() + self.connect_timeout;
        let mut waiting: Option<(Waiting<'_>, u64)> = None;
        let addresses = || {
            let list: Vec<&str> = self
                .peer
                .addresses
                .iter()
                .map(|a| a.address.as_str())
                .collect();
            list.join(", ")
        };
        loop {
            // Register interest before looking, so a slot coming up in between wakes us.
            let changed = self.changed.notified();
            let Some((index, live, streams)) = self.pick() else {
                let (_, failures_then) = waiting.get_or_insert_with(|| {
                    (Waiting::start(self), self.failures.load(Ordering::SeqCst))
                });
                // Every slot has failed again since this stream began to wait (the
                // dials a waiting stream asks for come at once): the gateway cannot be
                // reached now, and waiting out connect_timeout would only hold the
                // program (a checked connect waits for this answer).
                let failed_since = self.failures.load(Ordering::SeqCst) - *failures_then;
                if failed_since >= self.slots.len() as u64 && self.all_backing_off() {
                    return Err(anyhow!(
                        "gateway `{}` ({}) cannot be reached: {}",
                        self.peer.name,
                        addresses(),
                        self.why_down()
                    ));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || tokio::time::timeout(left, changed).await.is_err() {
                    return Err(anyhow!(
                        "no connection to gateway `{}` ({}) within {:.0}s: {}",
                        self.peer.name,
                        addresses(),
                        self.connect_timeout.as_secs_f64(),
                        self.why_down()
                    ));
                }
                continue;
            };
            let request = build(&self.server_name_of(index))?;
            let sent = match live.send.ready().await {
                Ok(mut ready) => ready.send_request(request, false),
                Err(e) => Err(e),
            };
            match sent {
                Ok((response, send)) => {
                    return Ok(Opened {
                        send,
                        response,
                        health: live.health,
                        _count: Counted::enter(&streams),
                    });
                }
                Err(e) => {
                    // GOAWAY or a broken connection: take it out of rotation and try
                    // another slot; its task notices the end and redials.
                    debug!(gateway = %self.peer.name, slot = index, "stream refused: {e}");
                    self.change(index, |state| {
                        matches!(state, SlotState::Up(_)).then_some(SlotState::Draining)
                    });
                }
            }
        }
    }

    /// The name the gateway's certificate carries at the address slot `index` dialled.
    fn server_name_of(&self, index: usize) -> String {
        let address = self
            .slots
            .get(index)
            .map(|slot| lock(slot).address.clone())
            .unwrap_or_default();
        self.peer
            .addresses
            .iter()
            .find(|a| a.address == address)
            .or_else(|| self.peer.addresses.first())
            .map(|a| a.server_name.clone())
            .unwrap_or_default()
    }
}

/// Counts a stream among those waiting for a connection, and wakes the slots in
/// backoff, until dropped.
struct Waiting<'a>(&'a Pool);

impl<'a> Waiting<'a> {
    fn start(pool: &'a Pool) -> Waiting<'a> {
        pool.waiting.fetch_add(1, Ordering::SeqCst);
        pool.demand.notify_waiters();
        Waiting(pool)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct Dialer {
    addresses: Vec<(String, tokio_rustls::rustls::pki_types::ServerName<'static>)>,
    ping_interval: Duration,
    ping_timeout: Duration,
}

async fn keep_connected(pool: Arc<Pool>, index: usize, dialer: Dialer) {
    let name = pool.peer.name.clone();
    let mut backoff = BACKOFF_FIRST;
    let mut which = index % dialer.addresses.len().max(1);
    loop {
        let Some((address, server_name)) = dialer.addresses.get(which) else {
            return;
        };
        let after = pool.slots.get(index).and_then(|slot| {
            let mut slot = lock(slot);
            slot.address = address.clone();
            slot.state.error().map(str::to_string)
        });
        pool.set(index, SlotState::Connecting { after });
        let dial_began = Instant::now();
        let dialed = tokio::time::timeout(
            pool.connect_timeout,
            dial(address, server_name, &pool.connector()),
        )
        .await;
        let error = match dialed {
            Err(_) => format!(
                "{address}: no answer within {:.0}s",
                pool.connect_timeout.as_secs_f64()
            ),
            Ok(Err(e)) => format!("{address}: {}", pool.describe(&e)),
            Ok(Ok(connection)) => {
                let up_since = Instant::now();
                info!(gateway = %name, slot = index, "connected to {address}");
                let reason = run_connection(&pool, index, connection, &dialer).await;
                if up_since.elapsed() > STABLE {
                    backoff = BACKOFF_FIRST;
                }
                format!("{address}: {reason}")
            }
        };
        warn!(gateway = %name, slot = index, "connection lost or failed: {error}");
        pool.failures.fetch_add(1, Ordering::SeqCst);
        // Full jitter on an exponential ceiling, so that many agents do not redial in step.
        let pause = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
        pool.set(
            index,
            SlotState::Backoff {
                error,
                until: Instant::now() + pause,
            },
        );
        which = (which + 1) % dialer.addresses.len();
        pool.back_off(pause, dial_began).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

type Connection = (
    (
        SendRequest<Bytes>,
        h2::client::Connection<Rewind<tokio_rustls::client::TlsStream<TcpStream>>, Bytes>,
    ),
    Option<[u8; 32]>,
);

async fn dial(
    address: &str,
    server_name: &tokio_rustls::rustls::pki_types::ServerName<'static>,
    tls: &TlsConnector,
) -> Result<Connection> {
    let tcp = TcpStream::connect(address)
        .await
        .with_context(|| format!("TCP connect to {address}"))?;
    tunnel_transport::tune_tcp(&tcp);
    let mut tls = tls
        .connect(server_name.clone(), tcp)
        .await
        .context("TLS handshake")?;
    tunnel_transport::tls::tune_session(tls.get_mut().1);
    // In TLS 1.3 the gateway judges our certificate after the handshake is over on our
    // side. Its first bytes (its HTTP/2 SETTINGS) or its alert say whether it took us:
    // wait for them before the connection counts as up, and before writing anything,
    // which would turn the gateway's close after an alert into a reset that hides it.
    let mut first = vec![0u8; 16 * 1024];
    let n = tls
        .read(&mut first)
        .await
        .context("waiting for the gateway to accept our certificate")?;
    if n == 0 {
        anyhow::bail!("the gateway closed the connection right after the TLS handshake");
    }
    first.truncate(n);
    let exporter = tunnel_transport::tls::exporter(tls.get_ref().1);
    let h2 = liveness::client_builder()
        .handshake(Rewind::new(first, tls))
        .await
        .context("HTTP/2 handshake")?;
    Ok((h2, exporter))
}

/// Drives one connection until it ends; returns why.
async fn run_connection(
    pool: &Pool,
    index: usize,
    connection: Connection,
    dialer: &Dialer,
) -> String {
    let ((send, mut conn), exporter) = connection;
    let Some(ping_pong) = conn.ping_pong() else {
        return "no PING handle".into();
    };
    let health = Arc::new(Health::default());
    pool.set(
        index,
        SlotState::Up(Live {
            send,
            health: health.clone(),
            exporter,
        }),
    );
    let (window_tx, mut window_rx) = watch::channel(INITIAL_STREAM_WINDOW);
    let watcher = liveness::watch_connection(
        ping_pong,
        &health,
        window_tx,
        dialer.ping_interval,
        dialer.ping_timeout,
    );
    tokio::pin!(watcher);
    let mut windows_open = true;
    loop {
        tokio::select! {
            ended = &mut conn => return match ended {
                Ok(()) => "closed by the gateway".into(),
                Err(e) => pool.describe(&anyhow::Error::new(e)),
            },
            changed = window_rx.changed(), if windows_open => match changed {
                Ok(()) => {
                    let window = *window_rx.borrow_and_update();
                    debug!(gateway = %pool.peer.name, slot = index, window, "stream window grows");
                    conn.set_target_window_size(liveness::connection_window(window));
                    if let Err(e) = conn.set_initial_window_size(window) {
                        return format!("window update failed: {e}");
                    }
                }
                Err(_) => windows_open = false,
            },
            error = &mut watcher => return error.to_string(),
        }
    }
}
