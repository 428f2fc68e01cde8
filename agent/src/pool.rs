//! The pool of HTTP/2 connections to one gateway.
//!
//! ```text
//!  Pool "site-b" ── slot 0: dial ─▶ up (SendRequest) ─▶ lost ─▶ backoff ─▶ dial …
//!                └─ slot 1: …
//! ```
//!
//! Each slot has a task that dials the gateway (TCP, TLS 1.3 with our client
//! certificate, HTTP/2), keeps the connection while PINGs are answered, and redials
//! with jittered exponential backoff when it is lost. When the gateway has several
//! addresses (replicas sharing one CA), the slots start spread over them and a slot
//! that loses its connection moves on to the next address. New streams go to the live slot
//! with the fewest streams; a slot whose gateway sent GOAWAY takes no new streams while
//! its old ones finish.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use h2::SendStream;
use h2::client::{ResponseFuture, SendRequest};
use http::{Method, Request, Uri};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};
use tunnel_proto::Target;
use tunnel_proto::config::{AgentConfig, GatewayPeer};
use tunnel_transport::liveness::{self, Health, INITIAL_STREAM_WINDOW};

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// A connection that stayed up this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);

pub struct Pool {
    pub peer: GatewayPeer,
    slots: Vec<Mutex<Slot>>,
    changed: Notify,
    connect_timeout: Duration,
}

#[derive(Default)]
struct Slot {
    address: String,
    state: SlotState,
    since: Option<Instant>,
    last_error: Option<String>,
    live: Option<Live>,
    health: Option<Arc<Health>>,
    streams: Arc<AtomicUsize>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotState {
    #[default]
    Connecting,
    Up,
    /// GOAWAY received: finishing old streams, taking no new ones.
    Draining,
    Backoff,
}

#[derive(Clone)]
struct Live {
    send: SendRequest<Bytes>,
    health: Arc<Health>,
}

/// A stream just opened on a tunnel connection.
pub struct Opened {
    pub send: SendStream<Bytes>,
    pub response: ResponseFuture,
    pub health: Arc<Health>,
    /// Counts the stream against its connection until dropped.
    pub _count: StreamCount,
}

pub struct StreamCount(Arc<AtomicUsize>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Serialize)]
pub struct SlotView {
    pub address: String,
    pub state: SlotState,
    pub state_secs: f64,
    pub rtt_ms: Option<f64>,
    pub streams: usize,
    pub last_error: Option<String>,
}

fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    /// Makes the pool and starts its slot tasks.
    pub fn start(peer: GatewayPeer, config: &AgentConfig) -> Result<Arc<Pool>> {
        let tls = tunnel_transport::tls::client_config(&peer.ca, &peer.cert, &peer.key)
            .with_context(|| format!("gateway `{}`", peer.name))?;
        let mut addresses = Vec::new();
        for a in &peer.addresses {
            let server_name = tunnel_transport::tls::server_name(&a.server_name)
                .with_context(|| format!("gateway `{}`", peer.name))?;
            addresses.push((a.address.clone(), server_name));
        }
        let pool = Arc::new(Pool {
            slots: (0..peer.connections).map(|_| Mutex::default()).collect(),
            peer,
            changed: Notify::new(),
            connect_timeout: config.connect_timeout,
        });
        let dialer = Dialer {
            tls: TlsConnector::from(tls),
            addresses,
            ping_interval: config.ping_interval,
            ping_timeout: config.ping_timeout,
        };
        for index in 0..pool.slots.len() {
            tokio::spawn(keep_connected(pool.clone(), index, dialer.clone()));
        }
        Ok(pool)
    }

    pub fn views(&self) -> Vec<SlotView> {
        self.slots
            .iter()
            .map(|slot| {
                let slot = lock(slot);
                SlotView {
                    address: slot.address.clone(),
                    state: slot.state,
                    state_secs: slot.since.map_or(0.0, |s| s.elapsed().as_secs_f64()),
                    rtt_ms: slot
                        .health
                        .as_ref()
                        .and_then(|h| h.rtt())
                        .map(|d| d.as_secs_f64() * 1000.0),
                    streams: slot.streams.load(Ordering::Relaxed),
                    last_error: slot.last_error.clone(),
                }
            })
            .collect()
    }

    fn set(&self, index: usize, state: SlotState, live: Option<Live>, error: Option<String>) {
        if let Some(slot) = self.slots.get(index) {
            let mut slot = lock(slot);
            slot.state = state;
            slot.since = Some(Instant::now());
            if let Some(live) = &live {
                slot.health = Some(live.health.clone());
            }
            slot.live = live;
            if error.is_some() {
                slot.last_error = error;
            }
        }
        self.changed.notify_waiters();
    }

    /// The live slot with the fewest streams.
    fn pick(&self) -> Option<(usize, Live, Arc<AtomicUsize>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let slot = lock(slot);
                let live = slot.live.clone()?;
                Some((i, live, slot.streams.clone()))
            })
            .min_by_key(|(_, _, streams)| streams.load(Ordering::Relaxed))
    }

    /// Opens a CONNECT stream to `target`. The request goes out at once; the answer is
    /// awaited by the caller while the program's first bytes already travel.
    pub async fn open(&self, target: &Target) -> Result<Opened> {
        let deadline = Instant::now() + self.connect_timeout;
        let uri = Uri::builder()
            .authority(target.to_string())
            .build()
            .with_context(|| format!("`{target}` is not a valid CONNECT authority"))?;
        loop {
            // Register interest before looking, so a slot coming up in between wakes us.
            let changed = self.changed.notified();
            let Some((index, live, streams)) = self.pick() else {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || tokio::time::timeout(left, changed).await.is_err() {
                    let why = self
                        .slots
                        .iter()
                        .find_map(|s| lock(s).last_error.clone())
                        .unwrap_or_else(|| "still connecting".into());
                    let addresses: Vec<&str> = self
                        .peer
                        .addresses
                        .iter()
                        .map(|a| a.address.as_str())
                        .collect();
                    return Err(anyhow!(
                        "no connection to gateway `{}` ({}) within {:.0}s: {why}",
                        self.peer.name,
                        addresses.join(", "),
                        self.connect_timeout.as_secs_f64()
                    ));
                }
                continue;
            };
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(uri.clone())
                .body(())
                .context("building the CONNECT request")?;
            let sent = match live.send.ready().await {
                Ok(mut ready) => ready.send_request(request, false),
                Err(e) => Err(e),
            };
            match sent {
                Ok((response, send)) => {
                    streams.fetch_add(1, Ordering::Relaxed);
                    return Ok(Opened {
                        send,
                        response,
                        health: live.health,
                        _count: StreamCount(streams),
                    });
                }
                Err(e) => {
                    // GOAWAY or a broken connection: take it out of rotation and try
                    // another slot; its task notices the end and redials.
                    debug!(gateway = %self.peer.name, slot = index, "stream refused: {e}");
                    let mut slot = lock(&self.slots[index]);
                    if slot.state == SlotState::Up {
                        slot.state = SlotState::Draining;
                        slot.since = Some(Instant::now());
                        slot.live = None;
                    }
                }
            }
        }
    }
}

#[derive(Clone)]
struct Dialer {
    tls: TlsConnector,
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
        if let Some(slot) = pool.slots.get(index) {
            lock(slot).address = address.clone();
        }
        pool.set(index, SlotState::Connecting, None, None);
        let dialed = tokio::time::timeout(
            pool.connect_timeout,
            dial(address, server_name, &dialer.tls),
        )
        .await;
        let error = match dialed {
            Err(_) => format!(
                "{address}: no answer within {:.0}s",
                pool.connect_timeout.as_secs_f64()
            ),
            Ok(Err(e)) => format!("{address}: {e:#}"),
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
        pool.set(index, SlotState::Backoff, None, Some(error));
        which = (which + 1) % dialer.addresses.len();
        // Full jitter on an exponential ceiling, so that many agents do not redial in step.
        let pause = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

type Connection = (
    SendRequest<Bytes>,
    h2::client::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>,
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
    h2::client::Builder::new()
        .initial_window_size(INITIAL_STREAM_WINDOW)
        .initial_connection_window_size(liveness::connection_window(INITIAL_STREAM_WINDOW))
        .max_frame_size(64 * 1024)
        .handshake(tls)
        .await
        .context("HTTP/2 handshake")
}

/// Drives one connection until it ends; returns why.
async fn run_connection(
    pool: &Pool,
    index: usize,
    connection: Connection,
    dialer: &Dialer,
) -> String {
    let (send, mut conn) = connection;
    let Some(ping_pong) = conn.ping_pong() else {
        return "no PING handle".into();
    };
    let health = Arc::new(Health::default());
    pool.set(
        index,
        SlotState::Up,
        Some(Live {
            send,
            health: health.clone(),
        }),
        None,
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
                Err(e) => format!("{e}"),
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
