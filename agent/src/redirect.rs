//! Connections redirected by the preload: the loopback listeners that programs' own
//! sockets connect to, and the registrations that say where each one was going.
//!
//! ```text
//! preload: REGISTER source → target ──▶ Registrations (keyed by source address)
//! program's socket ──connect──▶ loopback listener ──accept(peer = source)──▶ take
//!                                   │ matched: carry(target)   unmatched: reset
//! ```
//!
//! A registration that no connection claims within [`CLAIM_WITHIN`] is dropped, so a
//! program that registers and never connects leaks nothing.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{debug, warn};
use tunnel_proto::Target;

use crate::Agent;
use crate::carry::{Verdict, carry};

const CLAIM_WITHIN: Duration = Duration::from_secs(30);

/// Where one registered connection goes.
pub struct Registration {
    pub target: Target,
    pub via: String,
    /// For a blocking connect: where the gateway's answer goes.
    pub verdict: Option<oneshot::Sender<Verdict>>,
    made: Instant,
}

#[derive(Default)]
pub struct Registrations {
    by_source: Mutex<HashMap<SocketAddr, Registration>>,
}

fn key(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl Registrations {
    pub fn insert(
        &self,
        source: SocketAddr,
        target: Target,
        via: String,
        verdict: Option<oneshot::Sender<Verdict>>,
    ) {
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
                verdict,
                made: Instant::now(),
            },
        );
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

    pub fn take(&self, source: SocketAddr) -> Option<Registration> {
        let mut map = self
            .by_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.remove(&key(source))
            .filter(|r| r.made.elapsed() < CLAIM_WITHIN)
    }

    pub fn len(&self) -> usize {
        self.by_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
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

pub async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("loopback listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match agent.registrations.take(peer) {
            Some(r) => {
                tokio::spawn(carry(agent.clone(), tcp, r.target, r.via, r.verdict));
            }
            None => {
                // Not announced by our preload: some other program found the port.
                debug!(%peer, "unregistered connection on the loopback listener dropped");
                tunnel_transport::splice::reset(tcp);
            }
        }
    }
}
