//! The table of carried connections that `status` shows: those live now, with their
//! byte counts, and the most recent that ended, with how they ended.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tunnel_proto::ConnectError;

use crate::splice::{Abort, StreamStats};

/// How many ended connections `status` remembers.
const RECENT: usize = 64;

/// Which end of the tunnel keeps the table: it decides which way "to the destination" is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// TCP is the local program; the tunnel leads to the destination.
    Agent,
    /// TCP is the destination; the tunnel leads back to the program.
    Gateway,
}

#[derive(Debug)]
pub struct StreamTable {
    side: Side,
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Live>>,
    recent: Mutex<VecDeque<Ended>>,
    /// Counts since start, per peer, for the metrics: ended streams only (the live
    /// ones are added when asked).
    totals: Mutex<BTreeMap<String, PeerTotals>>,
}

/// What one peer's streams did since start (see [`StreamTable::totals`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerTotals {
    /// Streams opened, by destination class.
    pub opened: BTreeMap<&'static str, u64>,
    /// Streams live now, by destination class.
    pub active: BTreeMap<&'static str, u64>,
    /// Ended streams, by outcome (`closed`, or the failure class).
    pub outcomes: BTreeMap<String, u64>,
    pub bytes_to_destination: u64,
    pub bytes_from_destination: u64,
}

/// The kind of destination a stream's description names, for metrics: a bounded set.
pub fn destination_class(destination: &str) -> &'static str {
    if destination.starts_with("callback ") {
        "callback"
    } else if destination.contains(" (published") || destination.contains(" (from ") {
        "publication"
    } else {
        match tunnel_proto::Target::parse(destination) {
            Ok(tunnel_proto::Target::Addr {
                host: tunnel_proto::Host::Ip(_),
                ..
            }) => "address",
            Ok(tunnel_proto::Target::Addr { .. }) => "name",
            Ok(tunnel_proto::Target::Service(_)) => "service",
            Err(_) => "other",
        }
    }
}

#[derive(Debug)]
struct Live {
    destination: String,
    peer: String,
    started: Instant,
    stats: Arc<StreamStats>,
}

/// A live connection as `status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LiveView {
    pub id: u64,
    pub destination: String,
    /// The gateway (on the agent) or the identity (on the gateway).
    pub peer: String,
    pub bytes_to_destination: u64,
    pub bytes_from_destination: u64,
    pub age_secs: f64,
}

/// An ended connection as `status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Ended {
    pub id: u64,
    pub destination: String,
    pub peer: String,
    /// `closed` for a clean end; else the failure class (`refused`, `denied`, `reset`, …).
    pub outcome: String,
    pub detail: String,
    pub bytes_to_destination: u64,
    pub bytes_from_destination: u64,
    pub duration_secs: f64,
    pub ended_unix: u64,
}

/// A connection's place in the table; it leaves the table when finished or dropped.
#[derive(Debug)]
pub struct Registered {
    table: Arc<StreamTable>,
    id: u64,
    stats: Arc<StreamStats>,
    finished: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StreamTable {
    pub fn new(side: Side) -> Arc<StreamTable> {
        Arc::new(StreamTable {
            side,
            next_id: AtomicU64::new(1),
            live: Mutex::default(),
            recent: Mutex::default(),
            totals: Mutex::default(),
        })
    }

    /// Each peer's totals since start, live streams included.
    pub fn totals(&self) -> BTreeMap<String, PeerTotals> {
        let mut totals = lock(&self.totals).clone();
        for l in lock(&self.live).values() {
            let (to, from) = self.directions(&l.stats);
            let t = totals.entry(l.peer.clone()).or_default();
            *t.active
                .entry(destination_class(&l.destination))
                .or_default() += 1;
            t.bytes_to_destination += to;
            t.bytes_from_destination += from;
        }
        totals
    }

    pub fn register(self: &Arc<Self>, destination: String, peer: String) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stats = Arc::new(StreamStats::default());
        *lock(&self.totals)
            .entry(peer.clone())
            .or_default()
            .opened
            .entry(destination_class(&destination))
            .or_default() += 1;
        lock(&self.live).insert(
            id,
            Live {
                destination,
                peer,
                started: Instant::now(),
                stats: stats.clone(),
            },
        );
        Registered {
            table: self.clone(),
            id,
            stats,
            finished: false,
        }
    }

    fn directions(&self, stats: &StreamStats) -> (u64, u64) {
        let out = stats.tcp_to_tunnel.load(Ordering::Relaxed);
        let back = stats.tunnel_to_tcp.load(Ordering::Relaxed);
        match self.side {
            Side::Agent => (out, back),
            Side::Gateway => (back, out),
        }
    }

    pub fn live(&self) -> Vec<LiveView> {
        lock(&self.live)
            .iter()
            .map(|(id, l)| {
                let (to, from) = self.directions(&l.stats);
                LiveView {
                    id: *id,
                    destination: l.destination.clone(),
                    peer: l.peer.clone(),
                    bytes_to_destination: to,
                    bytes_from_destination: from,
                    age_secs: l.started.elapsed().as_secs_f64(),
                }
            })
            .collect()
    }

    pub fn live_count(&self) -> usize {
        lock(&self.live).len()
    }

    pub fn recent(&self) -> Vec<Ended> {
        lock(&self.recent).iter().cloned().collect()
    }

    fn end(&self, id: u64, outcome: &str, detail: String) {
        let Some(l) = lock(&self.live).remove(&id) else {
            return;
        };
        let (to, from) = self.directions(&l.stats);
        {
            let mut totals = lock(&self.totals);
            let t = totals.entry(l.peer.clone()).or_default();
            *t.outcomes.entry(outcome.to_string()).or_default() += 1;
            t.bytes_to_destination += to;
            t.bytes_from_destination += from;
        }
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(Ended {
            id,
            destination: l.destination,
            peer: l.peer,
            outcome: outcome.to_string(),
            detail,
            bytes_to_destination: to,
            bytes_from_destination: from,
            duration_secs: l.started.elapsed().as_secs_f64(),
            ended_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
    }
}

impl Registered {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// Records how the connection ended.
    pub fn finish(mut self, result: &Result<(), Abort>) {
        self.finished = true;
        match result {
            Ok(()) => self.table.end(self.id, "closed", String::new()),
            Err(abort) => self.table.end(self.id, abort.class(), abort.to_string()),
        }
    }

    /// Records a CONNECT that was refused, with the reason to show beside its class.
    pub fn refused(mut self, class: ConnectError, reason: String) {
        self.finished = true;
        self.table.end(self.id, class.as_str(), reason);
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if !self.finished {
            self.table
                .end(self.id, "dropped", "ended without a result".into());
        }
    }
}

/// The live and recently ended streams, as both daemons' `status` prints them.
pub fn render(streams: &[LiveView], recent: &[Ended]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "\nlive streams: {}", streams.len());
    for s in streams {
        let _ = writeln!(
            out,
            "  #{:<6} {:<32} {:<16} out {:>12} B  in {:>12} B  age {:.1}s",
            s.id,
            s.destination,
            s.peer,
            s.bytes_to_destination,
            s.bytes_from_destination,
            s.age_secs
        );
    }
    let shown = recent.len().min(RECENT_SHOWN);
    let _ = writeln!(
        out,
        "\nrecently ended: {} (the last {shown} shown)",
        recent.len()
    );
    for s in recent.iter().rev().take(RECENT_SHOWN) {
        let detail = if s.detail == s.outcome {
            ""
        } else {
            s.detail.as_str()
        };
        let _ = writeln!(
            out,
            "  #{:<6} {:<32} {:<16} {:<14} out {:>12} B  in {:>12} B  {}",
            s.id,
            s.destination,
            s.peer,
            s.outcome,
            s.bytes_to_destination,
            s.bytes_from_destination,
            detail
        );
    }
    out
}

/// How many ended streams the text status lists (JSON has them all).
const RECENT_SHOWN: usize = 20;
