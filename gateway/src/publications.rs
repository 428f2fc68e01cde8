//! Inside-out: services that agents publish here over reverse connections they
//! dialled, and the connections the gateway sends them: from its `listen` ports (for
//! programs at its own site) and from other agents that reach a publication by name
//! (the "patch panel": both sides only dial out).
//!
//! ```text
//!  agent X ─TLS, ALPN tunnel-reverse/1─▶ accept (server.rs) ─▶ serve_publisher:
//!     gateway as HTTP/2 client: GET /v1/publications → Offer {resume, names}
//!     each name checked against [publish.NAME].by ─▶ Publishers (a lease per name,
//!     held while the connection lives; the same `resume` takes it over at once)
//!
//!  program ─TCP─▶ [publish.NAME].listen (source in `from`)  ┐
//!  agent Y ─CONNECT NAME (identity in `reach`)─▶ stream()   ┴▶ open(): the least-loaded
//!     live publisher, the next one if its connection is gone ─▶ CONNECT NAME on the
//!     reverse connection (tunnel-client, tunnel-consumer) ─▶ 200 ─▶ splice / relay
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use tunnel_proto::ConnectError;
use tunnel_proto::config::PublishRule;
use tunnel_proto::connect::{ERROR_HEADER, decode_outcome};
use tunnel_proto::reverse::{Accepted, CLIENT_HEADER, CONSUMER_HEADER, Offer, PUBLICATIONS_PATH};
use tunnel_transport::certs::CertInfo;
use tunnel_transport::counted::Counted;
use tunnel_transport::liveness::{self, Health, INITIAL_STREAM_WINDOW};
use tunnel_transport::messages::read_body;
use tunnel_transport::plumbing::{Shutdown, accept_until};
use tunnel_transport::splice;

use crate::policy::Caller;
use crate::refusals::{Kind, Refusal};
use crate::server::Gateway;

/// One agent connection that publishes a name.
#[derive(Clone)]
pub struct Publisher {
    connection: u64,
    identity: String,
    peer: SocketAddr,
    resume: String,
    send: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    since: Instant,
    /// The reverse connection's health: what its streams receive tunes its windows.
    health: Arc<Health>,
}

/// The names published now, each with its live publishers.
#[derive(Default)]
pub struct Publishers {
    live: Mutex<BTreeMap<String, Vec<Publisher>>>,
    /// Reverse connections that carry callbacks, by (identity, resume token): the
    /// latest connection of an agent run.
    reverse: Mutex<BTreeMap<(String, String), Publisher>>,
}

/// A publication as status shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PublicationView {
    pub name: String,
    pub publishers: Vec<PublisherView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PublisherView {
    pub identity: String,
    pub peer: String,
    pub streams: usize,
    pub age_secs: f64,
}

/// A stream opened to a publisher; counts against it until dropped.
pub struct Opened {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub publisher: String,
    /// The publisher's reverse connection's health (for window tuning).
    pub health: Arc<Health>,
    _count: Counted,
    /// Counts against the publisher's `max_streams_per_identity`.
    _permit: crate::admission::IdentityPermit,
}

/// Whether `caller` is named in `list` (identities, `group:NAME`, `*`).
pub fn names(list: &[String], caller: &Caller) -> bool {
    list.iter().any(|who| {
        who == "*"
            || *who == caller.identity
            || who
                .strip_prefix("group:")
                .is_some_and(|g| caller.groups.iter().any(|mine| mine == g))
    })
}

impl Publishers {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<Publisher>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `name` for the publisher on `connection`, as `rule` allows.
    #[allow(clippy::too_many_arguments)]
    fn offer(
        &self,
        name: &str,
        rule: &PublishRule,
        caller: &Caller,
        connection: u64,
        peer: SocketAddr,
        resume: &str,
        send: &SendRequest<Bytes>,
        health: &Arc<Health>,
    ) -> Result<(), String> {
        if !names(&rule.by, caller) {
            return Err(format!(
                "{caller} may not publish `{name}` ([publish.{name}] by = {:?})",
                rule.by
            ));
        }
        let mut live = self.lock();
        let holders = live.entry(name.to_string()).or_default();
        // The same agent run coming back: its old connection's lease is its own.
        holders.retain(|p| !(p.identity == caller.identity && p.resume == resume));
        if rule.exclusive
            && let Some(holder) = holders.first()
        {
            return Err(format!(
                "`{name}` is exclusive and held by {} (from {}, for {:.0}s)",
                holder.identity,
                holder.peer,
                holder.since.elapsed().as_secs_f64()
            ));
        }
        holders.push(Publisher {
            connection,
            identity: caller.identity.clone(),
            peer,
            resume: resume.to_string(),
            send: send.clone(),
            streams: Arc::default(),
            since: Instant::now(),
            health: health.clone(),
        });
        Ok(())
    }

    /// The reverse connection of the agent run `resume` of `identity`, if it is up.
    pub fn reverse_of(&self, identity: &str, resume: &str) -> Option<Publisher> {
        self.reverse
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(identity.to_string(), resume.to_string()))
            .cloned()
    }

    /// The connection ended: its leases go.
    pub fn remove_connection(&self, connection: u64) {
        self.reverse
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, p| p.connection != connection);
        let mut live = self.lock();
        for holders in live.values_mut() {
            holders.retain(|p| p.connection != connection);
        }
        live.retain(|_, holders| !holders.is_empty());
    }

    /// Publishers of `name`, the least loaded first.
    fn candidates(&self, name: &str) -> Vec<Publisher> {
        let mut list = self.lock().get(name).cloned().unwrap_or_default();
        list.sort_by_key(|p| p.streams.load(Ordering::Relaxed));
        list
    }

    /// Takes `publisher` out of rotation (its connection is going).
    fn drop_publisher(&self, name: &str, connection: u64) {
        if let Some(holders) = self.lock().get_mut(name) {
            holders.retain(|p| p.connection != connection);
        }
    }

    pub fn views(&self) -> Vec<PublicationView> {
        self.lock()
            .iter()
            .map(|(name, holders)| PublicationView {
                name: name.clone(),
                publishers: holders
                    .iter()
                    .map(|p| PublisherView {
                        identity: p.identity.clone(),
                        peer: p.peer.to_string(),
                        streams: p.streams.load(Ordering::Relaxed),
                        age_secs: p.since.elapsed().as_secs_f64(),
                    })
                    .collect(),
            })
            .collect()
    }
}

/// The most names one reverse connection may offer.
const MAX_NAMES_OFFERED: usize = 256;

/// Registers what a reverse connection offers: the names it holds, the refused ones
/// with why, and its callbacks.
pub fn accept_offer(
    gateway: &Gateway,
    caller: &Caller,
    connection: u64,
    peer: SocketAddr,
    offer: &tunnel_proto::reverse::Offer,
    send: &SendRequest<Bytes>,
    health: &Arc<Health>,
) -> Accepted {
    let mut published = Vec::new();
    let mut refused = Vec::new();
    let rules = &gateway.config.publications;
    let offered: std::collections::BTreeSet<String> =
        offer.names.iter().map(|n| n.to_ascii_lowercase()).collect();
    if offered.len() > MAX_NAMES_OFFERED {
        let why = format!(
            "{} names offered at once; at most {MAX_NAMES_OFFERED} are taken",
            offered.len()
        );
        gateway.refusals.report(
            &caller.identity,
            Kind::Stream(ConnectError::Denied),
            format!("publications refused: {why}"),
        );
        refused.push(("*".to_string(), why));
    }
    for name in offered.into_iter().take(MAX_NAMES_OFFERED) {
        let outcome = match rules.get(&name) {
            None => Err(format!(
                "there is no [publish.{name}] in the gateway's config"
            )),
            Some(rule) => gateway.publishers.offer(
                &name,
                rule,
                caller,
                connection,
                peer,
                &offer.resume,
                send,
                health,
            ),
        };
        match outcome {
            Ok(()) => {
                info!(%peer, identity = %caller, "published `{name}`");
                published.push(name);
            }
            Err(why) => {
                gateway.refusals.report(
                    &caller.identity,
                    Kind::Stream(ConnectError::Denied),
                    format!("publication of `{name}` refused: {why}"),
                );
                refused.push((name, why));
            }
        }
    }
    let (mut callbacks, mut callbacks_refused) = (None, None);
    if offer.callbacks {
        match &gateway.config.callbacks {
            None => {
                callbacks_refused = Some("this gateway has no [callbacks]".to_string());
            }
            Some(rule) if !names(&rule.for_, caller) => {
                callbacks_refused = Some(format!(
                    "{caller} is not in [callbacks] for = {:?}",
                    rule.for_
                ));
            }
            Some(rule) => {
                gateway
                    .publishers
                    .reverse
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(
                        (caller.identity.clone(), offer.resume.clone()),
                        Publisher {
                            connection,
                            identity: caller.identity.clone(),
                            peer,
                            resume: offer.resume.clone(),
                            send: send.clone(),
                            streams: Arc::default(),
                            since: Instant::now(),
                            health: health.clone(),
                        },
                    );
                callbacks = Some(tunnel_proto::callback::CallbackOffer {
                    address: rule.address,
                    ports: rule.ports,
                });
            }
        }
        if let Some(why) = &callbacks_refused {
            gateway.refusals.report(
                &caller.identity,
                Kind::Stream(ConnectError::Denied),
                format!("callbacks refused: {why}"),
            );
        }
    }
    Accepted {
        published,
        refused,
        callbacks,
        callbacks_refused,
    }
}

/// Opens a stream to a publisher of `name` for a connection from `client` (and, by
/// name, from the agent of `consumer`): the least-loaded publisher first, the next
/// one when its connection is gone. The publisher's agent answers once its own
/// connect succeeded, or with the failure class.
pub async fn open(
    gateway: &Gateway,
    name: &str,
    client: SocketAddr,
    consumer: Option<&str>,
    early: &mut Early<'_>,
) -> Result<Opened, Refusal> {
    let candidates = gateway.publishers.candidates(name);
    if candidates.is_empty() {
        return Err(Refusal::new(
            ConnectError::Refused,
            format!("no agent publishes `{name}` now"),
        ));
    }
    let mut over = None;
    for publisher in candidates {
        let Ok(uri) = http::Uri::builder().authority(name).build() else {
            return Err(Refusal::new(
                ConnectError::BadRequest,
                format!("`{name}` is not a name"),
            ));
        };
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(uri)
            .header(CLIENT_HEADER, plain(client).to_string());
        if let Some(consumer) = consumer {
            request = request.header(CONSUMER_HEADER, consumer);
        }
        let Ok(request) = request.body(()) else {
            return Err(Refusal::new(ConnectError::Gateway, "building a request"));
        };
        let what = format!("the agent publishing `{name}`");
        match open_on(gateway, &publisher, request, &what, early).await {
            Attempt::Opened(opened) => return Ok(opened),
            Attempt::Refused(refusal) => return Err(refusal),
            Attempt::OverLimit(limit) => over = Some(limit),
            Attempt::Gone => {
                // Its connection is gone or going: the next publisher takes it.
                gateway
                    .publishers
                    .drop_publisher(name, publisher.connection);
            }
        }
    }
    Err(match over {
        Some(limit) => Refusal::new(
            ConnectError::OverLimit,
            format!("every agent publishing `{name}` is at its stream limit: {limit}"),
        ),
        None => Refusal::new(
            ConnectError::Refused,
            format!("no agent publishing `{name}` could be reached"),
        ),
    })
}

/// The first bytes of a connection that arrived at the gateway's side, sent right
/// behind the CONNECT instead of after its answer (a round trip less before the
/// service sees the client's request), and kept, so that the next publisher gets them
/// too when this one turns out to be gone. At most [`EARLY_MAX`] bytes; the rest
/// waits for the answer.
pub struct Early<'a> {
    tcp: Option<&'a TcpStream>,
    sent: bytes::BytesMut,
    done: bool,
}

/// The most a connection sends before its publisher answered.
const EARLY_MAX: usize = 64 * 1024;

impl<'a> Early<'a> {
    /// Nothing to send early (a stream from a consumer agent, relayed as a whole).
    pub fn none() -> Early<'static> {
        Early {
            tcp: None,
            sent: bytes::BytesMut::new(),
            done: true,
        }
    }

    /// The bytes `tcp` sends while its publisher is asked.
    pub fn from(tcp: &'a TcpStream) -> Early<'a> {
        Early {
            tcp: Some(tcp),
            sent: bytes::BytesMut::new(),
            done: false,
        }
    }

    /// What was read so far, for a new stream.
    fn so_far(&self) -> Option<Bytes> {
        (!self.sent.is_empty()).then(|| Bytes::copy_from_slice(&self.sent))
    }

    /// Waits for the client's next bytes (never returns once there is nothing more to
    /// take early: at the end of its stream, an error, or the cap).
    async fn more(&mut self) -> Bytes {
        let Some(tcp) = self.tcp.filter(|_| !self.done) else {
            return std::future::pending().await;
        };
        loop {
            if tcp.readable().await.is_err() {
                self.done = true;
                return std::future::pending().await;
            }
            let mut chunk = vec![0u8; EARLY_MAX - self.sent.len()];
            match tcp.try_read(&mut chunk) {
                // The end of its stream: the splice meets it next.
                Ok(0) => {
                    self.done = true;
                    return std::future::pending().await;
                }
                Ok(n) => {
                    chunk.truncate(n);
                    self.sent.extend_from_slice(&chunk);
                    self.done = self.sent.len() >= EARLY_MAX;
                    return Bytes::from(chunk);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // An error: the splice meets it next.
                Err(_) => {
                    self.done = true;
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// `address` with an IPv4-mapped IPv6 address (what a dual-stack listener sees of an
/// IPv4 peer) as plain IPv4: the form an IPv4 program expects of its peer.
pub fn plain(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// What became of one CONNECT sent over a reverse connection.
pub enum Attempt {
    Opened(Opened),
    /// The agent answered with a failure, or not in time.
    Refused(Refusal),
    /// Its identity is at its stream limit (why).
    OverLimit(String),
    /// The reverse connection is gone or going.
    Gone,
}

/// Sends `request` (a CONNECT) over `publisher`'s reverse connection and waits for the
/// agent's answer; `what` names the agent in refusals. The stream counts against the
/// publisher's identity's stream limit while it lives.
pub async fn open_on(
    gateway: &Gateway,
    publisher: &Publisher,
    request: Request<()>,
    what: &str,
    early: &mut Early<'_>,
) -> Attempt {
    let permit = match gateway.admission.inbound_stream(&publisher.identity) {
        Ok(permit) => permit,
        Err(limit) => return Attempt::OverLimit(limit.to_string()),
    };
    let count = Counted::enter(&publisher.streams);
    let sent = match publisher.send.clone().ready().await {
        Ok(mut ready) => ready.send_request(request, false),
        Err(e) => Err(e),
    };
    let (response, mut send) = match sent {
        Ok(sent) => sent,
        Err(e) => {
            debug!(publisher = %publisher.peer, "reverse connection unusable: {e}");
            return Attempt::Gone;
        }
    };
    // The client's first bytes go right behind the CONNECT; the agent writes them to
    // the service once its connect succeeded.
    if let Some(first) = early.so_far() {
        let _ = send.send_data(first, false);
    }
    let answered = tokio::time::timeout(gateway.config.connect_timeout, async {
        tokio::pin!(response);
        loop {
            tokio::select! {
                answer = &mut response => break answer,
                more = early.more() => {
                    let _ = send.send_data(more, false);
                }
            }
        }
    })
    .await;
    let response = match answered {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            debug!(publisher = %publisher.peer, "reverse connection failed: {e}");
            return Attempt::Gone;
        }
        Err(_) => {
            return Attempt::Refused(Refusal::new(
                ConnectError::TimedOut,
                format!(
                    "{what} ({}) did not answer within connect_timeout",
                    publisher.identity
                ),
            ));
        }
    };
    let header = response
        .headers()
        .get(ERROR_HEADER)
        .map(http::HeaderValue::as_bytes);
    if let Err(class) = decode_outcome(response.status().as_u16(), header) {
        return Attempt::Refused(Refusal::new(
            class,
            format!(
                "{what} ({}) could not connect to it: {class}",
                publisher.identity
            ),
        ));
    }
    Attempt::Opened(Opened {
        send,
        recv: response.into_body(),
        publisher: publisher.identity.clone(),
        health: publisher.health.clone(),
        _count: count,
        _permit: permit,
    })
}

/// Binds the `listen` port of every publication that has one.
pub async fn bind_listeners(gateway: &Gateway) -> anyhow::Result<Vec<(String, TcpListener)>> {
    let mut out = Vec::new();
    for (name, rule) in &gateway.config.publications {
        if let Some(listen) = rule.listen {
            let listener = TcpListener::bind(listen).await.map_err(|e| {
                anyhow::anyhow!("listening on {listen} for [publish.{name}] (its listen): {e}")
            })?;
            info!(
                "publication `{name}` offered on {}",
                listener.local_addr().map_or(listen, |a| a)
            );
            out.push((name.clone(), listener));
        }
    }
    Ok(out)
}

/// Accepts connections on a publication's `listen` port until `shutdown`: each from a
/// source in `from` goes to a publisher; any other is closed at once.
pub async fn serve_listener(
    gateway: Arc<Gateway>,
    name: String,
    listener: TcpListener,
    shutdown: Shutdown,
) {
    let label = format!("publication `{name}`");
    accept_until(
        &label,
        shutdown,
        || listener.accept(),
        |(tcp, client)| {
            let gateway = gateway.clone();
            let name = name.clone();
            tokio::spawn(async move { carry_inbound(gateway, name, tcp, client).await });
        },
    )
    .await;
}

async fn carry_inbound(
    gateway: Arc<Gateway>,
    name: String,
    tcp: tokio::net::TcpStream,
    client: SocketAddr,
) {
    let admitted = gateway.config.publications.get(&name).is_some_and(|rule| {
        rule.from
            .iter()
            .any(|net| net.contains(&client.ip().to_canonical()))
    });
    if !admitted {
        gateway.refusals.report(
            &client.ip().to_string(),
            Kind::Stream(ConnectError::Denied),
            format!("connection from {client} to publication `{name}` refused: not in its `from`"),
        );
        splice::reset(tcp);
        return;
    }
    tunnel_transport::tune_carried_tcp(&tcp);
    let entry = gateway
        .streams
        .register(format!("{name} (from {client})"), "-".into());
    let opened = match open(&gateway, &name, client, None, &mut Early::from(&tcp)).await {
        Ok(opened) => opened,
        Err(refusal) => {
            gateway.refusals.report(
                &client.ip().to_string(),
                Kind::Stream(refusal.class),
                format!(
                    "connection from {client} to publication `{name}` {}: {}",
                    refusal.class, refusal.why
                ),
            );
            entry.refused(refusal.class, refusal.why);
            splice::reset(tcp);
            return;
        }
    };
    let (recv, health) = (opened.recv, opened.health);
    let result = splice::splice(tcp, opened.send, async { Ok(recv) }, entry.stats(), &health).await;
    entry.finish(&result);
}

/// How long a publisher's agent has to say what it publishes.
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks a reverse connection's agent what it publishes and takes what the config
/// allows; tells the agent the result.
async fn take_offer(
    gateway: &Gateway,
    send: &mut SendRequest<Bytes>,
    caller: &Caller,
    connection: u64,
    peer: SocketAddr,
    health: &Arc<Health>,
) -> anyhow::Result<Accepted> {
    let request = Request::builder()
        .method(Method::GET)
        .uri(format!("https://gateway{PUBLICATIONS_PATH}"))
        .body(())?;
    let (response, _) = send.clone().ready().await?.send_request(request, true)?;
    let response = tokio::time::timeout(OFFER_TIMEOUT, response).await??;
    let body =
        tokio::time::timeout(OFFER_TIMEOUT, read_body(response.into_body(), 64 * 1024)).await??;
    let offer: Offer = serde_json::from_slice(&body)?;
    let accepted = accept_offer(gateway, caller, connection, peer, &offer, send, health);
    let json = serde_json::to_vec(&accepted)?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("https://gateway{PUBLICATIONS_PATH}"))
        .body(())?;
    let (response, mut body) = send.clone().ready().await?.send_request(request, false)?;
    body.send_data(Bytes::from(json), true)?;
    // Dropping the answer's future would cancel the stream before the agent read it.
    tokio::time::timeout(OFFER_TIMEOUT, response).await??;
    Ok(accepted)
}

/// A reverse connection: the gateway is the HTTP/2 client. It holds the agent's
/// publications while it lives, and ends (its streams reset) as any agent connection
/// does: at its certificate's end unless renewed, at revocation, or at shutdown.
pub async fn serve_publisher(
    gateway: Arc<Gateway>,
    tls_stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    identity: String,
    certificate: CertInfo,
    mut shutdown: Shutdown,
) {
    let handshake = tunnel_transport::liveness::client_builder().handshake::<_, Bytes>(tls_stream);
    let (mut send, mut conn) =
        match tokio::time::timeout(gateway.config.handshake_timeout, handshake).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                warn!(%peer, %identity, "reverse connection: HTTP/2 handshake failed: {e}");
                return;
            }
            Err(_) => {
                warn!(%peer, %identity, "reverse connection: HTTP/2 handshake timed out");
                return;
            }
        };
    let health = Arc::new(Health::default());
    let (id, mut current_rx) = gateway
        .register(peer, &identity, Some(&certificate), &health, 0)
        .await;
    let caller = gateway.caller(&identity);
    let offered = take_offer(&gateway, &mut send, &caller, id, peer, &health);
    tokio::pin!(offered);
    let mut offer_pending = true;
    let mut revocations = gateway.revocations.subscribe();
    let Some(ping_pong) = conn.ping_pong() else {
        gateway.unregister(id);
        return;
    };
    let (window_tx, mut window_rx) = watch::channel(INITIAL_STREAM_WINDOW);
    let mut windows_open = true;
    let watcher = {
        let health = health.clone();
        let (interval, timeout) = (gateway.config.ping_interval, gateway.config.ping_timeout);
        async move { liveness::watch_connection(ping_pong, &health, window_tx, interval, timeout).await }
    };
    tokio::pin!(watcher);
    let reason = loop {
        let current = current_rx.borrow_and_update().clone();
        let deadline = current
            .as_ref()
            .map_or(certificate.not_after, |c| c.not_after);
        let expiry = tokio::time::Instant::now() + crate::server::until_unix(deadline);
        tokio::select! {
            ended = &mut conn => break match ended {
                Ok(()) => "closed".to_string(),
                Err(e) => format!("connection error: {e}"),
            },
            taken = &mut offered, if offer_pending => {
                offer_pending = false;
                match taken {
                    Ok(accepted) if accepted.published.is_empty() && accepted.callbacks.is_none() => {
                        break "it publishes nothing the gateway allows, and carries no callbacks".to_string();
                    }
                    Ok(_) => {}
                    Err(e) => break format!("asking what it publishes: {e:#}"),
                }
            }
            _ = current_rx.changed() => {}
            () = tokio::time::sleep_until(expiry) => {
                break format!("the certificate of {identity} expired on {}", tunnel_transport::certs::utc(deadline));
            }
            Ok(()) = revocations.changed() => {
                let list = revocations.borrow_and_update().clone();
                if let Some(why) = crate::server::revoked(&list, &identity, Some(&certificate), current.as_ref()) {
                    break why;
                }
            }
            // Receive windows follow bandwidth × delay, as on an agent's own connections:
            // here the gateway receives what the published service sends.
            changed = window_rx.changed(), if windows_open => match changed {
                Ok(()) => {
                    let window = *window_rx.borrow_and_update();
                    conn.set_target_window_size(liveness::connection_window(window));
                    if let Err(e) = conn.set_initial_window_size(window) {
                        break format!("window update failed: {e}");
                    }
                }
                Err(_) => windows_open = false,
            },
            () = shutdown.fired() => break "the gateway is stopping".to_string(),
            error = &mut watcher => break error.to_string(),
        }
    };
    gateway.unregister(id);
    // Its streams end with it: the connection is dropped here, and each stream's
    // splice sees the loss as a reset.
    drop(conn);
    info!(%peer, %identity, "reverse connection ended: {reason}");
}

/// Whether `name` is a publication name of this gateway.
pub fn is_publication(gateway: &Gateway, name: &str) -> bool {
    gateway.config.publications.contains_key(name)
}

/// A consumer agent's CONNECT to a publication by name: `reach` checked, then a stream
/// to a publisher, joined to the consumer's.
pub async fn reach_by_name(
    gateway: &Gateway,
    caller: &Caller,
    name: &str,
    client: SocketAddr,
) -> Result<Opened, Refusal> {
    let allowed = gateway
        .config
        .publications
        .get(name)
        .is_some_and(|rule| names(&rule.reach, caller));
    if !allowed {
        return Err(Refusal::new(
            ConnectError::Denied,
            format!("{caller} is not in the `reach` of [publish.{name}]"),
        ));
    }
    open(
        gateway,
        name,
        client,
        Some(&caller.identity),
        &mut Early::none(),
    )
    .await
}
