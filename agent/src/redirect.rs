//! Connections redirected by the preload: the loopback listeners that programs' own
//! sockets connect to, and the registrations that say where each one was going.
//!
//! ```text
//! preload: REGISTER source → target ──▶ Registrations (keyed by source address, with
//!                                        the registering uid from SO_PEERCRED)
//! program's socket ──connect──▶ loopback listener ──accept(peer = source)
//!        │ owner of the connecting socket (sock_diag) = registering uid? ──▶ take
//!        │ matched: carry(target)   unmatched or another user's: reset, registration kept
//! ```
//!
//! A registration that no connection claims within [`CLAIM_WITHIN`] is dropped, so a
//! program that registers and never connects leaks nothing. The gateway's answer for a
//! non-blocking connect (`later`) is kept for [`VERDICT_KEPT`], for the program's
//! `getsockopt(SO_ERROR)` to ask for.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};
use tunnel_proto::Target;
use tunnel_proto::local::VerdictDelivery;

use crate::Agent;
use crate::carry::{Verdict, VerdictSender, carry};
use tunnel_transport::plumbing::{Shutdown, accept_until};

const CLAIM_WITHIN: Duration = Duration::from_secs(30);
/// How long a non-blocking connect's answer waits to be asked for.
const VERDICT_KEPT: Duration = Duration::from_secs(120);

/// Where one registered connection goes.
pub struct Registration {
    pub target: Target,
    pub via: String,
    /// The user that registered it: only a socket of this user may claim it.
    pub uid: u32,
    /// Where the gateway's answer goes, for a program that asks for it.
    pub verdict: Option<VerdictSender>,
    made: Instant,
}

/// A non-blocking connect's answer, kept until the program asks (or it expires).
struct KeptVerdict {
    uid: u32,
    answer: watch::Receiver<Option<Verdict>>,
    made: Instant,
}

#[derive(Default)]
pub struct Registrations {
    by_source: Mutex<HashMap<SocketAddr, Registration>>,
    kept: Mutex<HashMap<SocketAddr, KeptVerdict>>,
}

fn key(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl Registrations {
    /// Stores a registration; for `Wait` returns where its answer will appear.
    pub fn insert(
        &self,
        source: SocketAddr,
        target: Target,
        via: String,
        uid: u32,
        delivery: VerdictDelivery,
    ) -> Option<watch::Receiver<Option<Verdict>>> {
        let (verdict, answer) = match delivery {
            VerdictDelivery::Never => (None, None),
            VerdictDelivery::Wait | VerdictDelivery::Later => {
                let (tx, rx) = watch::channel(None);
                (Some(tx), Some(rx))
            }
        };
        let now = Instant::now();
        let answer = match (delivery, answer) {
            (VerdictDelivery::Later, Some(answer)) => {
                let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
                kept.retain(|_, k| k.made.elapsed() < VERDICT_KEPT);
                kept.insert(
                    key(source),
                    KeptVerdict {
                        uid,
                        answer,
                        made: now,
                    },
                );
                None
            }
            (_, answer) => answer,
        };
        let mut map = self
            .by_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, r| r.made.elapsed() < CLAIM_WITHIN);
        map.insert(
            key(source),
            Registration {
                target,
                via,
                uid,
                verdict,
                made: now,
            },
        );
        answer
    }

    /// The kept answer for a non-blocking connect from `source`, if `uid` registered it.
    pub fn kept_verdict(
        &self,
        source: SocketAddr,
        uid: u32,
    ) -> Option<watch::Receiver<Option<Verdict>>> {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.get(&key(source))
            .filter(|k| k.uid == uid && k.made.elapsed() < VERDICT_KEPT)
            .map(|k| k.answer.clone())
    }

    /// True when an unexpired registration for `source` waits for its connection.
    pub fn is_pending(&self, source: SocketAddr) -> bool {
        let map = self
            .by_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(&key(source))
            .is_some_and(|r| r.made.elapsed() < CLAIM_WITHIN)
    }

    /// Takes the registration for `source` if the connecting socket's owner is the
    /// user that registered it. Another user's connection leaves it in place for the
    /// program it belongs to.
    pub fn take_owned(&self, source: SocketAddr, owner: Option<u32>) -> Claim {
        let mut map = self
            .by_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(registration) = map
            .get(&key(source))
            .filter(|r| r.made.elapsed() < CLAIM_WITHIN)
        else {
            return Claim::Unregistered;
        };
        if owner != Some(registration.uid) {
            return Claim::NotTheOwner {
                registered_by: registration.uid,
            };
        }
        map.remove(&key(source))
            .map_or(Claim::Unregistered, Claim::Taken)
    }

    pub fn len(&self) -> usize {
        self.by_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// What a connection on the loopback listener gets.
pub enum Claim {
    Taken(Registration),
    /// Nothing registered this source address.
    Unregistered,
    /// Registered, but the connecting socket belongs to someone else.
    NotTheOwner {
        registered_by: u32,
    },
}

/// The loopback listeners: IPv4 always, IPv6 where the host has `::1`.
pub struct Listeners {
    pub v4: TcpListener,
    pub v6: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind() -> Result<Listeners> {
        let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the loopback listener on 127.0.0.1")?;
        let v6 = match TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await {
            Ok(l) => Some(l),
            Err(e) => {
                debug!("no IPv6 loopback listener ({e}); IPv6 sockets use ::ffff:127.0.0.1");
                None
            }
        };
        Ok(Listeners { v4, v6 })
    }

    pub fn addresses(&self) -> (SocketAddr, Option<SocketAddr>) {
        let v4 = self
            .v4
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        (v4, self.v6.as_ref().and_then(|l| l.local_addr().ok()))
    }
}

/// The listener a socket bound at `source` should connect to.
pub fn listener_for(source: SocketAddr, v4: SocketAddr, v6: Option<SocketAddr>) -> SocketAddr {
    match (source, v6) {
        (SocketAddr::V6(s), Some(v6)) if s.ip().to_ipv4_mapped().is_none() => v6,
        (SocketAddr::V6(_), _) => {
            // An IPv6 socket without ::1: the IPv4 listener, in mapped form.
            let SocketAddr::V4(v4) = v4 else { return v4 };
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        (SocketAddr::V4(_), _) => v4,
    }
}

pub async fn serve(agent: Arc<Agent>, listener: TcpListener, shutdown: Shutdown) {
    accept_until(
        "loopback listener",
        shutdown,
        || listener.accept(),
        |(tcp, peer)| {
            let owner = match tcp.local_addr() {
                Ok(ours) => agent.socket_owners.uid_of_peer(peer, ours),
                Err(e) => Err(e),
            };
            let owner = owner.unwrap_or_else(|e| {
                warn!(%peer, "cannot tell who owns the connecting socket ({e}): dropped");
                None
            });
            match agent.registrations.take_owned(peer, owner) {
                Claim::Taken(r) => {
                    tokio::spawn(carry(agent.clone(), tcp, r.target, r.via, r.verdict));
                }
                Claim::Unregistered => {
                    // Not announced by our preload: some other program found the port.
                    debug!(%peer, "unregistered connection on the loopback listener dropped");
                    tunnel_transport::splice::reset(tcp);
                }
                Claim::NotTheOwner { registered_by } => {
                    warn!(
                        %peer,
                        owner = ?owner,
                        registered_by,
                        "a connection from another user's registered address was dropped"
                    );
                    tunnel_transport::splice::reset(tcp);
                }
            }
        },
    )
    .await;
}
