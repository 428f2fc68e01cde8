//! A userspace delay-and-rate relay: what a wide-area link does to a TCP stream, for a
//! kernel without netem.
//!
//! ```text
//! client ──▶ relay listener ─┬─ reader: chunks stamped on arrival ─▶ queue (≤ limit bytes)
//!                            └─ writer: leaves at max(arrival, link free) + size/rate,
//!                                       delivered one-way-delay later ─▶ upstream
//! ```
//!
//! Each direction is a serial link of `rate` bits per second with `rtt / 2` of
//! propagation delay and a buffer of about two bandwidth-delay products; a full buffer
//! stops the reader, so TCP's own flow control sees the link. The TCP handshake with
//! the relay itself is local: a new connection costs no emulated round trip until data
//! crosses it.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub rtt: Duration,
    pub bits_per_sec: f64,
}

impl Link {
    fn buffer_bytes(&self) -> usize {
        let bdp = self.bits_per_sec / 8.0 * self.rtt.as_secs_f64();
        (bdp * 2.0).max(1024.0 * 1024.0) as usize
    }
}

/// Starts a relay from a new loopback port to `upstream`; it runs until the process
/// ends. Returns the port's address.
pub fn start(upstream: SocketAddr, link: Link) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the relay")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(upstream) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            direction(client, server, link);
            direction(server2, client2, link);
        }
    });
    Ok(addr)
}

struct Queue {
    chunks: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    closed: bool,
}

fn direction(mut from: TcpStream, mut to: TcpStream, link: Link) {
    let queue = Arc::new((
        Mutex::new(Queue {
            chunks: VecDeque::new(),
            bytes: 0,
            closed: false,
        }),
        Condvar::new(),
    ));
    let limit = link.buffer_bytes();
    let reader_queue = queue.clone();
    thread::spawn(move || {
        let (lock, ready) = &*reader_queue;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let Ok(mut q) = lock.lock() else { return };
            if n == 0 {
                q.closed = true;
                ready.notify_all();
                return;
            }
            while q.bytes + n > limit && q.bytes > 0 {
                let Ok(next) = ready.wait(q) else { return };
                q = next;
            }
            q.bytes += n;
            q.chunks.push_back((Instant::now(), buf[..n].to_vec()));
            ready.notify_all();
        }
    });
    thread::spawn(move || {
        let (lock, ready) = &*queue;
        let one_way = link.rtt / 2;
        let mut link_free = Instant::now();
        loop {
            let (arrived, chunk) = {
                let Ok(mut q) = lock.lock() else { return };
                loop {
                    if let Some(front) = q.chunks.pop_front() {
                        q.bytes -= front.1.len();
                        ready.notify_all();
                        break front;
                    }
                    if q.closed {
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                    let Ok(next) = ready.wait(q) else { return };
                    q = next;
                }
            };
            let serialise = Duration::from_secs_f64(chunk.len() as f64 * 8.0 / link.bits_per_sec);
            link_free = link_free.max(arrived) + serialise;
            let deliver = link_free + one_way;
            let now = Instant::now();
            if deliver > now {
                thread::sleep(deliver - now);
            }
            if to.write_all(&chunk).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    });
}
