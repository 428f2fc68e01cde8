//! HTTP/2 PING on every tunnel connection, for two jobs:
//!
//! - **Liveness.** An idle connection is pinged every `interval`; a PING unanswered
//!   within `timeout` means the connection is dead (a gateway killed, a NAT that forgot
//!   us), so its streams are failed and the pool reconnects, within seconds instead of
//!   the minutes TCP would take.
//! - **Receive windows that follow bandwidth × delay.** While data flows, PINGs go back
//!   to back. The bytes that arrive during one PING round trip estimate what the link
//!   holds (its bandwidth-delay product). When that comes near the current stream
//!   window, the window is what limits the stream, so it grows fourfold, up to
//!   [`MAX_STREAM_WINDOW`]. Windows only grow; they are credit, not memory, and the
//!   splice returns credit only as the program takes the bytes.
//!
//! The pinger does not own the HTTP/2 connection (whoever drives it does), so window
//! changes travel over a `watch` channel for the driver to apply.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use h2::{Ping, PingPong};
use tokio::sync::{Notify, watch};

/// The stream window a connection starts with.
pub const INITIAL_STREAM_WINDOW: u32 = 256 * 1024;
/// The largest stream window the tuning will set (covers 1 Gbit/s at 200 ms).
pub const MAX_STREAM_WINDOW: u32 = 32 * 1024 * 1024;

/// Largest HTTP/2 frame either end sends: a full 64 KiB read goes out as one frame.
const MAX_FRAME: u32 = 64 * 1024;

/// The agent's HTTP/2 settings: the same windows and frames as the gateway's, so that
/// the window tuning below starts from one place on both ends.
pub fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(INITIAL_STREAM_WINDOW)
        .initial_connection_window_size(connection_window(INITIAL_STREAM_WINDOW))
        .max_frame_size(MAX_FRAME);
    builder
}

/// The gateway's HTTP/2 settings (see [`client_builder`]).
pub fn server_builder() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(INITIAL_STREAM_WINDOW)
        .initial_connection_window_size(connection_window(INITIAL_STREAM_WINDOW))
        .max_frame_size(MAX_FRAME);
    builder
}

/// The connection-level window that goes with a stream window: room for several
/// busy streams at once.
pub fn connection_window(stream_window: u32) -> u32 {
    stream_window.saturating_mul(4).min(i32::MAX as u32)
}

/// What the pinger learns about one tunnel connection; read by `status`.
#[derive(Debug, Default)]
pub struct Health {
    /// Bytes received on all streams of the connection (the splices add to it).
    pub received: AtomicU64,
    /// The last PING round trip, in microseconds (0 before the first answer).
    pub rtt_micros: AtomicU64,
    /// Wakes an idle pinger when data starts to flow, so the windows grow at once.
    data_arrived: Notify,
}

impl Health {
    /// Called by the splices for every chunk received from the tunnel.
    pub fn note_received(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
        self.data_arrived.notify_one();
    }

    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

/// Runs until the connection is found dead, and says why.
pub async fn watch_connection(
    mut ping_pong: PingPong,
    health: &Health,
    window: watch::Sender<u32>,
    interval: Duration,
    timeout: Duration,
) -> anyhow::Error {
    let mut stream_window = *window.borrow();
    loop {
        let before = health.received.load(Ordering::Relaxed);
        let start = Instant::now();
        if let Err(e) = ping(&mut ping_pong, timeout).await {
            return e;
        }
        let rtt = start.elapsed();
        health
            .rtt_micros
            .store(rtt.as_micros().max(1) as u64, Ordering::Relaxed);
        let in_flight = health.received.load(Ordering::Relaxed) - before;
        if let Some(grown) = grown_window(stream_window, in_flight) {
            stream_window = grown;
            let _ = window.send(stream_window);
        }
        if in_flight >= worth_measuring(stream_window) {
            // Heavy traffic: measure again right away (a short pause keeps PINGs from
            // crowding a fast local link).
            tokio::time::sleep(Duration::from_millis(1).max(rtt / 8)).await;
        } else {
            // Idle or light traffic (a request and its answer now and then): the
            // window is far from limiting anything, and a PING between every request
            // and answer would only add frames to their path. Next PING after
            // `interval`, or as soon as enough data flows to be worth measuring.
            let since = health.received.load(Ordering::Relaxed);
            let idle = tokio::time::sleep(interval);
            tokio::pin!(idle);
            loop {
                tokio::select! {
                    _ = &mut idle => break,
                    _ = health.data_arrived.notified() => {
                        let arrived = health.received.load(Ordering::Relaxed) - since;
                        if arrived >= worth_measuring(stream_window) {
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// Bytes in one PING round trip (or since the last one) from which a measurement is
/// worth making: a sixteenth of the stream window. Below it, the window cannot be
/// what limits the traffic.
fn worth_measuring(stream_window: u32) -> u64 {
    u64::from(stream_window / 16).max(1)
}

/// The next stream window, when `in_flight` bytes arrived during one PING round trip
/// with `window` in force: four times larger when the window was nearly used up (so
/// it, not the link, limited the stream), else unchanged (`None`). Fourfold steps
/// reach a long fat link's window in a few round trips.
pub fn grown_window(window: u32, in_flight: u64) -> Option<u32> {
    (window < MAX_STREAM_WINDOW && in_flight >= u64::from(window) * 2 / 3)
        .then(|| window.saturating_mul(4).min(MAX_STREAM_WINDOW))
}

async fn ping(ping_pong: &mut PingPong, timeout: Duration) -> Result<()> {
    match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
        Ok(Ok(_pong)) => Ok(()),
        Ok(Err(e)) => Err(anyhow!("connection closed: {e}")),
        Err(_) => Err(anyhow!(
            "no answer to PING within {:.1}s: connection presumed dead",
            timeout.as_secs_f64()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_only_when_it_limits_the_stream() {
        let w = INITIAL_STREAM_WINDOW;
        assert_eq!(grown_window(w, 1000), None);
        assert_eq!(grown_window(w, u64::from(w)), Some(4 * w));
        // A window-limited stream keeps doubling up to the cap, then stays there.
        let mut window = w;
        while let Some(next) = grown_window(window, u64::from(window)) {
            assert!(next > window);
            window = next;
        }
        assert_eq!(window, MAX_STREAM_WINDOW);
        assert!(connection_window(MAX_STREAM_WINDOW) <= i32::MAX as u32);
    }
}
