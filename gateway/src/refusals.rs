//! Refusals: why each one happened, how many of each kind, and a log that a flood
//! cannot drown.
//!
//! A flood of refused connections or denied streams would otherwise write a line each
//! (20,000 refusals, 20,000 lines), hiding everything else in the log and costing the
//! gateway as much as the flood itself. So the first refusal of a kind from a peer (a
//! source address before the handshake, an identity after it) is logged at once, in
//! full; those that follow are counted, and once per interval one line says how many
//! there were and what the last one was:
//!
//! ```text
//! WARN tunnel_gateway::refusals: connection closed at once: 32 TLS handshakes from 127.0.0.2 already wait (max_handshakes_per_source) peer=127.0.0.2
//! WARN tunnel_gateway::refusals: 9967 more connections closed at once over a handshake cap in the last 10s; the last: … peer=127.0.0.2
//! ```
//!
//! A peer that stays quiet for a whole interval is forgotten, so its next refusal is
//! logged at once again. Every refusal is also counted by kind for `status`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::warn;
use tunnel_proto::ConnectError;
use tunnel_proto::enrolment::RefusalKind;

/// Peers followed one by one; refusals from further peers share one entry, so that a
/// flood from many addresses cannot grow the table without bound.
const MAX_PEERS: usize = 4096;

/// The peer that stands for all the others once [`MAX_PEERS`] are followed.
const OTHER_PEERS: &str = "other peers";

/// What was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Closed at once: too many connections were waiting for their TLS handshake.
    OverHandshakeCap,
    /// The TLS handshake failed (no certificate, one from another CA, not TLS, …).
    HandshakeFailed,
    /// The TLS handshake did not finish within `handshake_timeout`.
    HandshakeTimedOut,
    /// Refused after the handshake: the identity holds as many connections as allowed.
    OverConnectionLimit,
    /// A stream was refused with this class.
    Stream(ConnectError),
    /// An enrolment or renewal was refused for this reason.
    Certificate(RefusalKind),
}

impl Kind {
    /// The key in `status`.
    pub fn key(self) -> String {
        match self {
            Kind::OverHandshakeCap => "over-handshake-cap".into(),
            Kind::HandshakeFailed => "handshake-failed".into(),
            Kind::HandshakeTimedOut => "handshake-timed-out".into(),
            Kind::OverConnectionLimit => "over-connection-limit".into(),
            Kind::Stream(class) => format!("stream-{class}"),
            Kind::Certificate(kind) => format!("certificate-{kind}"),
        }
    }

    /// What a summary line counts.
    fn plural(self) -> String {
        match self {
            Kind::OverHandshakeCap => "connections closed at once over a handshake cap".into(),
            Kind::HandshakeFailed => "TLS handshakes refused".into(),
            Kind::HandshakeTimedOut => "TLS handshakes timed out".into(),
            Kind::OverConnectionLimit => "connections refused over the identity's limit".into(),
            Kind::Stream(class) => format!("streams {class}"),
            Kind::Certificate(kind) => format!("certificate requests refused: {kind}"),
        }
    }
}

/// Why the gateway refused a stream: the class the agent is told, and the reason its
/// log and status give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub class: ConnectError,
    pub why: String,
}

impl Refusal {
    pub fn new(class: ConnectError, why: impl Into<String>) -> Refusal {
        Refusal {
            class,
            why: why.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.why)
    }
}

/// One peer's refusals of one kind since its last line.
struct Window {
    opened: Instant,
    unlogged: u64,
    last: String,
}

pub struct Refusals {
    interval: Duration,
    windows: Mutex<HashMap<(String, Kind), Window>>,
    totals: Mutex<HashMap<Kind, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Refusals {
    pub fn new(interval: Duration) -> Refusals {
        Refusals {
            interval,
            windows: Mutex::default(),
            totals: Mutex::default(),
        }
    }

    /// Counts a refusal of `peer`, and logs it now if it is the first of its kind from
    /// that peer in this interval.
    pub fn report(&self, peer: &str, kind: Kind, detail: impl fmt::Display) {
        *lock(&self.totals).entry(kind).or_default() += 1;
        let mut windows = lock(&self.windows);
        let followed = windows.len() < MAX_PEERS || windows.contains_key(&(peer.to_string(), kind));
        let peer = if followed { peer } else { OTHER_PEERS };
        match windows.get_mut(&(peer.to_string(), kind)) {
            Some(window) => {
                window.unlogged += 1;
                window.last = detail.to_string();
            }
            None => {
                warn!(peer = %peer, "{detail}");
                windows.insert(
                    (peer.to_string(), kind),
                    Window {
                        opened: Instant::now(),
                        unlogged: 0,
                        last: String::new(),
                    },
                );
            }
        }
    }

    /// Writes one line for each peer refused since its last line, and forgets peers that
    /// were quiet for a whole interval. Called once per interval.
    pub fn flush(&self) {
        let now = Instant::now();
        let seconds = self.interval.as_secs_f64();
        lock(&self.windows).retain(|(peer, kind), window| {
            if window.unlogged > 0 {
                warn!(
                    peer = %peer,
                    "{} more {} in the last {seconds:.0}s; the last: {}",
                    window.unlogged,
                    kind.plural(),
                    window.last
                );
                window.unlogged = 0;
                window.opened = now;
                true
            } else {
                now.duration_since(window.opened) < self.interval
            }
        });
    }

    /// Logs summaries every interval, for as long as the gateway runs.
    pub async fn run(&self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.flush();
        }
    }

    /// Refusals so far, by kind, for `status`.
    pub fn totals(&self) -> BTreeMap<String, u64> {
        lock(&self.totals)
            .iter()
            .map(|(kind, n)| (kind.key(), *n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_one_line_then_a_count() {
        let refusals = Refusals::new(Duration::from_secs(3600));
        for i in 0..1000 {
            refusals.report("10.0.0.1", Kind::OverHandshakeCap, format!("number {i}"));
        }
        refusals.report("10.0.0.2", Kind::OverHandshakeCap, "another peer");
        refusals.report("10.0.0.1", Kind::HandshakeFailed, "another kind");
        {
            let windows = lock(&refusals.windows);
            let first = &windows[&("10.0.0.1".to_string(), Kind::OverHandshakeCap)];
            assert_eq!(first.unlogged, 999);
            assert_eq!(first.last, "number 999");
            assert_eq!(windows.len(), 3);
        }
        refusals.flush();
        let windows = lock(&refusals.windows);
        // Counted and logged: the count starts again; still followed for this interval.
        assert_eq!(
            windows[&("10.0.0.1".to_string(), Kind::OverHandshakeCap)].unlogged,
            0
        );
        assert_eq!(refusals.totals()["over-handshake-cap"], 1001);
        assert_eq!(refusals.totals()["handshake-failed"], 1);
    }

    #[test]
    fn quiet_peers_are_forgotten_and_the_table_is_bounded() {
        let refusals = Refusals::new(Duration::ZERO);
        refusals.report("10.0.0.1", Kind::Stream(ConnectError::Denied), "x");
        refusals.flush();
        assert!(lock(&refusals.windows).is_empty());

        let refusals = Refusals::new(Duration::from_secs(3600));
        for i in 0..MAX_PEERS + 10 {
            refusals.report(&format!("peer{i}"), Kind::HandshakeTimedOut, "x");
        }
        let windows = lock(&refusals.windows);
        assert_eq!(windows.len(), MAX_PEERS + 1);
        assert_eq!(
            windows[&(OTHER_PEERS.to_string(), Kind::HandshakeTimedOut)].unlogged,
            9
        );
    }
}
