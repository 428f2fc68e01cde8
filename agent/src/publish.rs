//! Publishing services inside-out (`[[publish]]`): the agent dials the gateway once more
//! with its certificate and ALPN `tunnel-reverse/1`, then serves HTTP/2 on that
//! connection, so the gateway can send it one CONNECT per inbound connection. Nothing
//! listens at the agent's site.
//!
//! ```text
//!  keep_published ── dial (TLS, client certificate, reverse ALPN) ─▶ HTTP/2 server:
//!     GET  /v1/publications ◀─ gateway   answer: Offer {resume, names}
//!     POST /v1/publications ◀─ gateway   which names it holds, which are refused, why
//!     CONNECT NAME          ◀─ gateway   (tunnel-client, tunnel-consumer)
//!        └─ consumer in this agent's own `reach`? ─ connect `to` ─ 200 or the failure
//!           class ─ splice, ends faithful both ways
//!  lost ─▶ backoff ─▶ dial again, with the same resume token: the gateway gives this
//!  agent its publications back at once
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};
use tunnel_proto::ConnectError;
use tunnel_proto::config::Publication;
use tunnel_proto::reverse::{
    ALPN, Accepted, CLIENT_HEADER, CONSUMER_HEADER, Offer, PUBLICATIONS_PATH,
};
use tunnel_proto::{Host, Target};
use tunnel_transport::liveness::{self, Health, INITIAL_STREAM_WINDOW};
use tunnel_transport::messages::{answer_connect, read_body, reply_json};
use tunnel_transport::splice::{self, Abort};
use tunnel_transport::streams::StreamTable;

use crate::callbacks::Callbacks;
use crate::pool::Pool;
use tunnel_proto::callback::{CALLBACK_HEADER, CallbackOffer};

const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What status shows of one gateway's publications.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct PublishView {
    pub gateway: String,
    /// `up` while the reverse connection lives, else `down` with why.
    pub state: String,
    pub error: Option<String>,
    pub published: Vec<String>,
    pub refused: Vec<(String, String)>,
    /// The gateway's callback address and ports, when it carries callbacks.
    #[serde(default)]
    pub callbacks: Option<String>,
    #[serde(default)]
    pub callbacks_refused: Option<String>,
}

pub struct Publisher {
    pool: Arc<Pool>,
    publications: BTreeMap<String, Publication>,
    /// Whether this agent has `[[callback]]` ports through this gateway.
    carries_callbacks: bool,
    /// Those ports.
    callback_ranges: Vec<tunnel_proto::callback::PortRange>,
    /// The gateway's callback address and ports, once it accepted callbacks.
    callback_offer: Mutex<Option<CallbackOffer>>,
    callbacks: Arc<Callbacks>,
    resume: String,
    view: Mutex<PublishView>,
    streams: Arc<StreamTable>,
    connect_timeout: Duration,
    /// PING cadence and patience for the reverse connection (as for the pool's).
    ping: (Duration, Duration),
}

impl Publisher {
    /// Starts publishing `publications` through `pool`'s gateway, and carrying
    /// callbacks when this agent has `[[callback]]` ports there.
    pub fn start(
        pool: Arc<Pool>,
        publications: Vec<Publication>,
        callbacks: Arc<Callbacks>,
        streams: Arc<StreamTable>,
        config: &tunnel_proto::config::AgentConfig,
    ) -> Arc<Publisher> {
        let callback_ranges: Vec<_> = config
            .callbacks
            .iter()
            .filter(|c| c.via == pool.peer.name)
            .map(|c| c.ports)
            .collect();
        let carries_callbacks = !callback_ranges.is_empty();
        let resume = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let publisher = Arc::new(Publisher {
            view: Mutex::new(PublishView {
                gateway: pool.peer.name.clone(),
                state: "connecting".into(),
                ..PublishView::default()
            }),
            pool,
            carries_callbacks,
            callback_ranges,
            callback_offer: Mutex::default(),
            callbacks,
            publications: publications
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect(),
            resume,
            streams,
            connect_timeout: config.connect_timeout,
            ping: (config.ping_interval, config.ping_timeout),
        });
        tokio::spawn(publisher.clone().keep_published());
        publisher
    }

    pub fn gateway(&self) -> &str {
        &self.pool.peer.name
    }

    /// The token that names this agent run's reverse connection at the gateway.
    pub fn resume(&self) -> &str {
        &self.resume
    }

    /// The gateway's callback address and ports, while the reverse connection that
    /// carries callbacks is up.
    pub fn callback_offer(&self) -> Option<CallbackOffer> {
        self.callback_offer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_callback_offer(&self, offer: Option<CallbackOffer>) {
        *self
            .callback_offer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = offer;
    }

    pub fn view(&self) -> PublishView {
        self.view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update(&self, change: impl FnOnce(&mut PublishView)) {
        change(&mut self.view.lock().unwrap_or_else(PoisonError::into_inner));
    }

    async fn keep_published(self: Arc<Self>) {
        let gateway = self.pool.peer.name.clone();
        let mut backoff = BACKOFF_FIRST;
        let mut which = 0usize;
        loop {
            let addresses = &self.pool.peer.addresses;
            let Some(address) = addresses.get(which % addresses.len().max(1)) else {
                return;
            };
            which += 1;
            let began = Instant::now();
            // Armed before the dial, so a renewal during it is not missed.
            let renewed = self.pool.credential_changed().notified();
            let reason = match self.dial(&address.address, &address.server_name).await {
                Ok(tls) => {
                    info!(gateway = %gateway, "reverse connection to {} up", address.address);
                    self.update(|v| {
                        v.state = "up".into();
                        v.error = None;
                    });
                    let me = self.clone();
                    let mut serving = tokio::spawn(async move { me.serve(tls).await });
                    tokio::select! {
                        reason = &mut serving => {
                            if began.elapsed() > Duration::from_secs(10) {
                                backoff = BACKOFF_FIRST;
                            }
                            reason.unwrap_or_else(|e| format!("{e}"))
                        }
                        () = renewed => {
                            // A connection made with the renewed certificate takes the
                            // publications over (the same resume token); the old one
                            // carries its streams until the gateway ends it with its
                            // certificate.
                            info!(gateway = %gateway, "credential renewed: a new reverse connection takes the publications over");
                            backoff = BACKOFF_FIRST;
                            continue;
                        }
                    }
                }
                Err(e) => format!("{e:#}"),
            };
            warn!(gateway = %gateway, "reverse connection to {}: {reason}", address.address);
            self.set_callback_offer(None);
            self.update(|v| {
                v.state = "down".into();
                v.error = Some(reason);
                v.published.clear();
                v.callbacks = None;
            });
            let pause = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// TCP, then TLS with this agent's current certificate and the reverse ALPN.
    async fn dial(
        &self,
        address: &str,
        server_name: &str,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let connect = async {
            let tcp = TcpStream::connect(address)
                .await
                .with_context(|| format!("TCP connect to {address}"))?;
            tunnel_transport::tune_tcp(&tcp);
            let mut config = (**self.pool.connector().config()).clone();
            config.alpn_protocols = vec![ALPN.to_vec()];
            let name = tunnel_transport::tls::server_name(server_name)?;
            let mut tls = TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            tunnel_transport::tls::tune_session(tls.get_mut().1);
            anyhow::Ok(tls)
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| anyhow!("{address}: no answer within connect_timeout"))?
    }

    /// Serves the gateway's requests on one reverse connection until it ends.
    async fn serve(self: &Arc<Self>, tls: tokio_rustls::client::TlsStream<TcpStream>) -> String {
        let handshake = liveness::server_builder().handshake::<_, Bytes>(tls);
        let mut conn = match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return format!("HTTP/2 handshake: {e}"),
            Err(_) => return "HTTP/2 handshake timed out".into(),
        };
        let Some(ping_pong) = conn.ping_pong() else {
            return "no PING handle".into();
        };
        let health = Arc::new(Health::default());
        let (window_tx, mut window_rx) = watch::channel(INITIAL_STREAM_WINDOW);
        let mut windows_open = true;
        let watcher = {
            let health = health.clone();
            let (interval, timeout) = self.ping;
            async move {
                liveness::watch_connection(ping_pong, &health, window_tx, interval, timeout).await
            }
        };
        tokio::pin!(watcher);
        loop {
            tokio::select! {
                request = conn.accept() => match request {
                    Some(Ok((request, respond))) => {
                        let me = self.clone();
                        let health = health.clone();
                        tokio::spawn(async move { me.request(request, respond, health).await });
                    }
                    Some(Err(e)) => return format!("connection error: {e}"),
                    None => return "closed by the gateway".into(),
                },
                // Receive windows follow bandwidth × delay: here the agent receives
                // what the gateway's side sends to the service.
                changed = window_rx.changed(), if windows_open => match changed {
                    Ok(()) => {
                        let window = *window_rx.borrow_and_update();
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

    async fn request(
        self: Arc<Self>,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        health: Arc<Health>,
    ) {
        let path = request.uri().path().to_string();
        match (request.method().clone(), path.as_str()) {
            (Method::GET, PUBLICATIONS_PATH) => {
                let offer = Offer {
                    resume: self.resume.clone(),
                    names: self.publications.keys().cloned().collect(),
                    callbacks: self.carries_callbacks,
                };
                reply_json(&mut respond, StatusCode::OK, &offer);
            }
            (Method::POST, PUBLICATIONS_PATH) => {
                let body = read_body(request.into_body(), 64 * 1024).await;
                match body.and_then(|b| Ok(serde_json::from_slice::<Accepted>(&b)?)) {
                    Ok(accepted) => {
                        let gateway = &self.pool.peer.name;
                        for name in &accepted.published {
                            info!(gateway = %gateway, "published `{name}`");
                        }
                        for (name, why) in &accepted.refused {
                            warn!(gateway = %gateway, "the gateway refused to publish `{name}`: {why}");
                        }
                        if let Some(why) = &accepted.callbacks_refused {
                            warn!(gateway = %gateway, "the gateway refused callbacks: {why}");
                        }
                        if let Some(offer) = &accepted.callbacks {
                            for mine in self.callback_ranges.iter() {
                                if mine.overlap(&offer.ports) != Some(*mine) {
                                    warn!(gateway = %gateway, "[[callback]] ports {mine} are not all among the gateway's callback ports {}: a program's bind on the others fails with EADDRNOTAVAIL", offer.ports);
                                }
                            }
                        }
                        self.set_callback_offer(accepted.callbacks.clone());
                        self.update(|v| {
                            v.published = accepted.published;
                            v.refused = accepted.refused;
                            v.callbacks = accepted
                                .callbacks
                                .map(|c| format!("{} ports {}", c.address, c.ports));
                            v.callbacks_refused = accepted.callbacks_refused;
                        });
                    }
                    Err(e) => debug!("unreadable publication answer: {e:#}"),
                }
                let _ = respond.send_response(Response::new(()), true);
            }
            (Method::CONNECT, _) if request.headers().contains_key(CALLBACK_HEADER) => {
                let port = header(&request, CALLBACK_HEADER).and_then(|p| p.parse::<u16>().ok());
                let client = header(&request, CLIENT_HEADER)
                    .and_then(|c| c.parse::<std::net::SocketAddr>().ok());
                let (Some(port), Some(client)) = (port, client) else {
                    let _ = answer_connect(&mut respond, Err(ConnectError::BadRequest));
                    return;
                };
                let body = request.into_body();
                self.callbacks
                    .inbound(
                        self.gateway(),
                        port,
                        client,
                        (body, respond),
                        &self.streams,
                        &health,
                    )
                    .await;
            }
            (Method::CONNECT, _) => self.inbound(request, respond, &health).await,
            _ => {
                let _ = respond.send_response(
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(())
                        .unwrap_or_default(),
                    true,
                );
            }
        }
    }

    /// One inbound connection: checked against this agent's own `reach`, then carried
    /// to the service once the local connect succeeded.
    async fn inbound(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        health: &Health,
    ) {
        let name = request
            .uri()
            .authority()
            .map(|a| a.host().to_ascii_lowercase())
            .unwrap_or_default();
        let client = header(&request, CLIENT_HEADER).unwrap_or_else(|| "?".into());
        let consumer = header(&request, CONSUMER_HEADER);
        let entry = self.streams.register(
            format!("{name} (published, from {client})"),
            consumer.clone().unwrap_or_else(|| "-".into()),
        );
        let Some(publication) = self.publications.get(&name) else {
            let _ = answer_connect(&mut respond, Err(ConnectError::BadRequest));
            entry.refused(
                ConnectError::BadRequest,
                format!("`{name}` is not published here"),
            );
            return;
        };
        if let Some(reach) = &publication.reach {
            let admitted = reach
                .iter()
                .any(|who| who == "*" || consumer.as_deref() == Some(who.as_str()));
            if !admitted {
                let who = consumer
                    .as_deref()
                    .unwrap_or("a connection at the gateway's port");
                let _ = answer_connect(&mut respond, Err(ConnectError::Denied));
                entry.refused(
                    ConnectError::Denied,
                    format!("{who} is not in the `reach` of [[publish]] `{name}` here"),
                );
                return;
            }
        }
        let Target::Addr { host, port } = &publication.to else {
            let _ = answer_connect(&mut respond, Err(ConnectError::Gateway));
            return;
        };
        let to = match host {
            Host::Ip(ip) => format!("{}", std::net::SocketAddr::new(*ip, *port)),
            Host::Name(name) => format!("{name}:{port}"),
        };
        let connected = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&to)).await;
        let mut tcp = match connected {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                let class = ConnectError::of_connect(&e);
                let _ = answer_connect(&mut respond, Err(class));
                entry.refused(class, format!("{to}: {e}"));
                return;
            }
            Err(_) => {
                let _ = answer_connect(&mut respond, Err(ConnectError::TimedOut));
                entry.refused(ConnectError::TimedOut, format!("{to}: no answer"));
                return;
            }
        };
        tunnel_transport::tune_carried_tcp(&tcp);
        if publication.proxy_protocol {
            // The service learns who connected at the gateway before any byte of theirs.
            let source = client
                .parse::<std::net::SocketAddr>()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
            let destination = tcp
                .peer_addr()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
            let header = tunnel_proto::proxy_protocol::v2_header(source, destination);
            if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut tcp, &header).await {
                let _ = answer_connect(&mut respond, Err(ConnectError::Refused));
                entry.refused(
                    ConnectError::Refused,
                    format!("{to}: writing the PROXY header: {e}"),
                );
                return;
            }
        }
        let Ok(Some(send)) = answer_connect(&mut respond, Ok(())) else {
            entry.finish(&Err(Abort::Refused(ConnectError::Gateway)));
            return;
        };
        let body = request.into_body();
        let result = splice::splice(tcp, send, async { Ok(body) }, entry.stats(), health).await;
        entry.finish(&result);
    }
}

/// A request header's value as text, if it has one.
fn header(request: &Request<RecvStream>, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}
