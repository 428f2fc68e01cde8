//! `status --watch`, for both daemons: the status asked again once a second and
//! redrawn whole, with rates per stream and per peer (the difference of each live
//! stream's byte counts since the last snapshot), round-trip times, and the recent
//! failures with their reasons, above the ordinary status text.
//!
//! Plain ANSI (home, clear), so it works over ssh and in tmux. With a terminal on
//! stdin, the terminal is put out of line mode, with its echo and signal keys off, so
//! that `q` and Ctrl-C arrive as keys and end the watch with the terminal restored.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{self, LocalFlags, SetArg, SpecialCharacterIndices, Termios};
use serde_json::Value;

use crate::streams::{Ended, LiveView};

/// How often the status is asked again.
pub const EVERY: Duration = Duration::from_secs(1);
/// Failures shown.
const FAILURES_SHOWN: usize = 8;

/// A daemon's connections, each named with its round-trip time (ms), from its status.
pub type Links = dyn Fn(&Value) -> Vec<(String, Option<f64>)>;

/// What one daemon's watch needs: its status, as JSON; the status as text; and its
/// connections with their round-trip times.
pub struct Source<'a> {
    pub title: &'a str,
    pub fetch: &'a mut dyn FnMut() -> Result<String>,
    pub render: &'a dyn Fn(&str) -> Result<String>,
    pub links: &'a Links,
}

/// One stream's byte counts at one moment.
#[derive(Clone, Copy)]
struct Seen {
    out: u64,
    back: u64,
    at: Instant,
}

/// Rates between two snapshots.
#[derive(Default)]
pub struct Rates {
    previous: BTreeMap<u64, Seen>,
}

/// One stream's rates, in bytes per second (out: toward the destination).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub out: f64,
    pub back: f64,
}

impl Rates {
    /// The rate of each live stream since the last call (none for a stream first seen
    /// now), keyed by stream id.
    pub fn update(&mut self, streams: &[LiveView], now: Instant) -> BTreeMap<u64, Rate> {
        let mut rates = BTreeMap::new();
        let mut next = BTreeMap::new();
        for s in streams {
            let seen = Seen {
                out: s.bytes_to_destination,
                back: s.bytes_from_destination,
                at: now,
            };
            if let Some(before) = self.previous.get(&s.id) {
                let secs = now.duration_since(before.at).as_secs_f64();
                if secs > 0.0 {
                    rates.insert(
                        s.id,
                        Rate {
                            out: seen.out.saturating_sub(before.out) as f64 / secs,
                            back: seen.back.saturating_sub(before.back) as f64 / secs,
                        },
                    );
                }
            }
            next.insert(s.id, seen);
        }
        self.previous = next;
        rates
    }
}

/// A rate for people: bits per second with a unit.
pub fn human_rate(bytes_per_sec: f64) -> String {
    let bits = bytes_per_sec * 8.0;
    if bits >= 1e9 {
        format!("{:.2} Gbit/s", bits / 1e9)
    } else if bits >= 1e6 {
        format!("{:.1} Mbit/s", bits / 1e6)
    } else if bits >= 1e3 {
        format!("{:.1} kbit/s", bits / 1e3)
    } else {
        format!("{bits:.0} bit/s")
    }
}

/// The screen for one snapshot: rates per peer and per stream, round trips, recent
/// failures, then the status text.
pub fn screen(source: &Source<'_>, reply: &str, rates: &mut Rates, now: Instant) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} --watch   every {}s   q or Ctrl-C quits\n",
        source.title,
        EVERY.as_secs()
    );
    let value: Value = match serde_json::from_str(reply) {
        Ok(v) => v,
        Err(e) => {
            let _ = writeln!(out, "unreadable status answer: {e}");
            return out;
        }
    };
    let streams: Vec<LiveView> =
        serde_json::from_value(value["streams"].clone()).unwrap_or_default();
    let recent: Vec<Ended> = serde_json::from_value(value["recent"].clone()).unwrap_or_default();
    let by_stream = rates.update(&streams, now);
    let mut by_peer: BTreeMap<&str, (f64, f64, usize)> = BTreeMap::new();
    for s in &streams {
        let entry = by_peer.entry(s.peer.as_str()).or_default();
        entry.2 += 1;
        if let Some(rate) = by_stream.get(&s.id) {
            entry.0 += rate.out;
            entry.1 += rate.back;
        }
    }
    let _ = writeln!(
        out,
        "per peer                          out            in  streams"
    );
    if by_peer.is_empty() {
        let _ = writeln!(out, "  (no live streams)");
    }
    for (peer, (up, down, count)) in &by_peer {
        let _ = writeln!(
            out,
            "  {peer:<24} {:>13} {:>13}  {count}",
            human_rate(*up),
            human_rate(*down)
        );
    }
    let _ = writeln!(out, "\nconnections                     round trip");
    for (link, rtt) in (source.links)(&value) {
        let rtt = rtt.map_or_else(|| "-".to_string(), |ms| format!("{ms:.2} ms"));
        let _ = writeln!(out, "  {link:<30} {rtt:>10}");
    }
    let _ = writeln!(
        out,
        "\nstreams                                                out            in"
    );
    for s in &streams {
        let (up, down) = by_stream
            .get(&s.id)
            .map_or(("…".to_string(), "…".to_string()), |r| {
                (human_rate(r.out), human_rate(r.back))
            });
        let _ = writeln!(
            out,
            "  #{:<6} {:<32} {:<14} {up:>13} {down:>13}",
            s.id, s.destination, s.peer
        );
    }
    let failures: Vec<&Ended> = recent
        .iter()
        .rev()
        .filter(|e| e.outcome != "closed")
        .take(FAILURES_SHOWN)
        .collect();
    let _ = writeln!(out, "\nrecent failures");
    if failures.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for e in failures {
        let _ = writeln!(
            out,
            "  #{:<6} {:<32} {:<14} {:<12} {}",
            e.id, e.destination, e.peer, e.outcome, e.detail
        );
    }
    match (source.render)(reply) {
        Ok(text) => {
            let _ = writeln!(out, "\n{text}");
        }
        Err(e) => {
            let _ = writeln!(out, "\n{e:#}");
        }
    }
    out
}

/// Puts a terminal on stdin into key-at-a-time mode, and back when dropped.
struct Keys {
    saved: Option<Termios>,
}

impl Keys {
    fn take() -> Keys {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Keys { saved: None };
        }
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return Keys { saved: None };
        };
        let mut raw = saved.clone();
        // No line editing, no echo, and Ctrl-C as a key: the watch ends itself, with
        // the terminal restored.
        raw.local_flags
            .remove(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG);
        raw.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        raw.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return Keys { saved: None };
        }
        Keys { saved: Some(saved) }
    }

    /// Waits up to `within` for a key; true when it asks to quit (q, Q, Ctrl-C, or the
    /// end of stdin).
    fn quit_within(&self, within: Duration) -> bool {
        let stdin = std::io::stdin();
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(millis)) {
                Ok(0) => return false,
                Ok(_) => {
                    let mut key = [0u8; 1];
                    match stdin.lock().read(&mut key) {
                        Ok(0) => {
                            // stdin closed (not a terminal): nothing will ask to quit,
                            // so only a signal ends the watch; wait out the interval.
                            std::thread::sleep(left);
                            return false;
                        }
                        Ok(_) if matches!(key[0], b'q' | b'Q' | 0x03) => return true,
                        Ok(_) => {}
                        Err(_) => {
                            std::thread::sleep(left);
                            return false;
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => {
                    std::thread::sleep(left);
                    return false;
                }
            }
        }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

/// Redraws the status once a second until `q` or Ctrl-C.
pub fn run(source: &mut Source<'_>) -> Result<()> {
    let keys = Keys::take();
    let mut rates = Rates::default();
    let mut stdout = std::io::stdout();
    loop {
        let text = match (source.fetch)() {
            Ok(reply) => screen(source, &reply, &mut rates, Instant::now()),
            Err(e) => format!("{} --watch\n\n{e:#}\n(asking again)", source.title),
        };
        // Home, clear the screen; lines end in CR LF, as a terminal out of line mode
        // needs.
        let frame = format!("\x1b[H\x1b[2J{}", text.replace('\n', "\r\n"));
        if stdout
            .write_all(frame.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(());
        }
        if keys.quit_within(EVERY) {
            let _ = stdout.write_all(b"\r\n");
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(id: u64, out: u64, back: u64) -> LiveView {
        LiveView {
            id,
            destination: "db:5432".into(),
            peer: "site-b".into(),
            bytes_to_destination: out,
            bytes_from_destination: back,
            age_secs: 1.0,
        }
    }

    #[test]
    fn rates_are_byte_differences_over_time_per_stream() {
        let mut rates = Rates::default();
        let start = Instant::now();
        assert!(rates.update(&[live(1, 0, 0)], start).is_empty());
        let later = start + Duration::from_secs(2);
        let got = rates.update(&[live(1, 2_000_000, 500), live(2, 10, 10)], later);
        assert_eq!(
            got.get(&1),
            Some(&Rate {
                out: 1_000_000.0,
                back: 250.0
            })
        );
        assert!(!got.contains_key(&2), "a stream first seen has no rate yet");
        assert_eq!(human_rate(1_000_000.0), "8.0 Mbit/s");
        assert_eq!(human_rate(2e9), "16.00 Gbit/s");
    }
}
