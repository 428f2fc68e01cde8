//! Carries one connection: bytes both ways between a TCP socket and an HTTP/2 stream.
//!
//! ```text
//!              tcp_to_tunnel: read ──▶ SendStream (END_STREAM on FIN)
//!  TcpStream ◀─────────────────────────────────────────────────────▶ h2 stream
//!              tunnel_to_tcp: write ◀── RecvStream (shutdown(WR) on END_STREAM)
//! ```
//!
//! Each direction ends on its own: a FIN becomes END_STREAM and END_STREAM becomes a
//! FIN, so a program that shuts its write side still reads the reply. An abort on either
//! side (a TCP reset or error, an RST_STREAM, the loss of the tunnel) ends both
//! directions at once: the HTTP/2 stream is reset and the TCP socket is closed with
//! `SO_LINGER` 0, so the program sees a reset and never a clean EOF.

use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tunnel_proto::ConnectError;

use crate::liveness::Health;

/// Largest read from the TCP side in one go.
const CHUNK: usize = 64 * 1024;

/// Byte counts of one carried connection, read by `status` while it runs.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub tcp_to_tunnel: AtomicU64,
    pub tunnel_to_tcp: AtomicU64,
}

/// Why a carried connection ended before both directions closed cleanly.
#[derive(Debug)]
pub enum Abort {
    /// The local socket failed or was reset.
    Tcp(io::Error),
    /// The HTTP/2 stream was reset, or the tunnel connection was lost.
    Tunnel(h2::Error),
    /// The gateway answered the CONNECT with a failure.
    Refused(ConnectError),
    /// No tunnel connection to the gateway could carry the stream.
    Unavailable(String),
    /// The gateway took the right to carry it away while it ran: the identity's
    /// certificate expired or was revoked, or the policy no longer allows it.
    Withdrawn(String),
}

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Abort::Tcp(e) => write!(f, "local socket: {e}"),
            Abort::Tunnel(e) => match e.reason() {
                Some(reason) if e.is_remote() => write!(f, "reset by the far side ({reason:?})"),
                _ => write!(f, "tunnel: {e}"),
            },
            Abort::Refused(e) => write!(f, "{e}"),
            Abort::Unavailable(why) => write!(f, "gateway unavailable: {why}"),
            Abort::Withdrawn(why) => write!(f, "access withdrawn: {why}"),
        }
    }
}

impl std::error::Error for Abort {}

impl Abort {
    /// What a program waiting for the connect's answer is told: the gateway's refusal,
    /// or that no tunnel could carry it.
    pub fn refusal(&self) -> tunnel_proto::local::Refusal {
        match self {
            Abort::Refused(e) => tunnel_proto::local::Refusal::Connect(*e),
            Abort::Tcp(_) | Abort::Tunnel(_) | Abort::Unavailable(_) | Abort::Withdrawn(_) => {
                tunnel_proto::local::Refusal::Unavailable
            }
        }
    }

    /// The word for logs and status: `refused`, `denied`, … for CONNECT failures,
    /// `reset` for aborts after the connection was made.
    pub fn class(&self) -> &'static str {
        match self {
            Abort::Refused(e) => e.as_str(),
            Abort::Tcp(_) | Abort::Tunnel(_) => "reset",
            Abort::Unavailable(_) => "unavailable",
            Abort::Withdrawn(_) => "withdrawn",
        }
    }
}

/// Closes `tcp` with a reset (RST) instead of a FIN.
pub fn reset(tcp: TcpStream) {
    // SO_LINGER {on, 0}: close() discards unsent data and sends RST.
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// Carries bytes between `tcp` and the HTTP/2 stream until both directions have ended
/// (`Ok`) or one aborts (`Err`, after resetting both sides).
///
/// `recv` yields the receiving half once it is known; on the agent it waits for the
/// gateway's answer to the CONNECT while the program's first bytes already travel.
/// `health` counts, for the whole tunnel connection, the bytes that came in (the
/// window tuning reads it).
pub async fn splice(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: impl Future<Output = Result<RecvStream, Abort>>,
    stats: &StreamStats,
    health: &Health,
) -> Result<(), Abort> {
    splice_until(tcp, send, recv, stats, health, std::future::pending()).await
}

/// [`splice`], cut short when `withdrawn` yields a reason: both sides are then reset,
/// as for any abort.
pub async fn splice_until(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    recv: impl Future<Output = Result<RecvStream, Abort>>,
    stats: &StreamStats,
    health: &Health,
    withdrawn: impl Future<Output = String>,
) -> Result<(), Abort> {
    let (mut reader, mut writer) = tcp.split();
    // Until the far side has answered, its answer (a refusal, say) is what ends the
    // stream, not the reset that follows it.
    let answered = AtomicBool::new(false);
    let both = async {
        tokio::try_join!(
            tcp_to_tunnel(&mut reader, &mut send, stats, &answered),
            async {
                let mut recv = recv.await?;
                answered.store(true, Ordering::Relaxed);
                tunnel_to_tcp(&mut recv, &mut writer, stats, health).await
            }
        )
    };
    let ended = tokio::select! {
        ended = both => ended,
        why = withdrawn => Err(Abort::Withdrawn(why)),
    };
    match ended {
        Ok(_) => Ok(()),
        Err(abort) => {
            send.send_reset(Reason::CANCEL);
            reset(tcp);
            Err(abort)
        }
    }
}

async fn tcp_to_tunnel(
    tcp: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    stats: &StreamStats,
    answered: &AtomicBool,
) -> Result<(), Abort> {
    loop {
        // While the program is quiet, a reset from the far side (a revocation, a
        // policy change, the tunnel connection's end) still ends the stream at once,
        // instead of after whatever the receiving half has buffered was delivered.
        tokio::select! {
            readable = tcp.readable() => readable.map_err(Abort::Tcp)?,
            // Polled again whenever the task wakes (try_join polls both halves), so
            // it starts to watch once the answer is in.
            reset = poll_fn(|cx| {
                if answered.load(Ordering::Relaxed) {
                    send.poll_reset(cx)
                } else {
                    std::task::Poll::Pending
                }
            }) => {
                return Err(Abort::Tunnel(match reset {
                    Ok(reason) => h2::Error::from(reason),
                    Err(e) => e,
                }));
            }
        }
        // Allocated only once the socket is readable, and dropped if it was not after
        // all, so idle connections hold no buffer.
        let mut buf = BytesMut::with_capacity(CHUNK);
        let n = match read_some(tcp.as_ref(), &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Abort::Tcp(e)),
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(Abort::Tunnel)?;
            return Ok(());
        }
        stats.tcp_to_tunnel.fetch_add(n as u64, Ordering::Relaxed);
        send_all(send, buf.freeze()).await?;
    }
}

/// Sends `data` on the stream as its flow control allows, in as many frames as the
/// granted capacity needs.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), Abort> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(Abort::Tunnel(e)),
            None => {
                // The stream can no longer send: the far side reset it.
                let reason = poll_fn(|cx| send.poll_reset(cx))
                    .await
                    .unwrap_or(Reason::CANCEL);
                return Err(Abort::Tunnel(h2::Error::from(reason)));
            }
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, false).map_err(Abort::Tunnel)?;
    }
    Ok(())
}

/// One read into `buf`. A read that does not fill it shows the socket drained
/// (edge-triggered epoll), so the reactor is told so at once instead of by one more
/// read failing with EAGAIN: one system call less per message. tokio's own
/// `AsyncRead` does the same; a closed socket's readiness is never cleared, so an
/// end of stream is not missed.
fn read_some(tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let mut short = None;
    let read = tcp.try_io(Interest::READABLE, || {
        let n = tcp.try_read_buf(buf)?;
        if n > 0 && buf.len() < buf.capacity() {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short {
        Some(n) => Ok(n),
        None => read,
    }
}

/// Writes go through tokio's `AsyncWrite`, which likewise takes a partial write as
/// "the socket is full" without a failing system call.
async fn tunnel_to_tcp(
    recv: &mut RecvStream,
    tcp: &mut WriteHalf<'_>,
    stats: &StreamStats,
    health: &Health,
) -> Result<(), Abort> {
    while let Some(data) = recv.data().await {
        let data = data.map_err(Abort::Tunnel)?;
        health.note_received(data.len());
        tcp.write_all(&data).await.map_err(Abort::Tcp)?;
        stats
            .tunnel_to_tcp
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        // Give the window back only once the bytes are on their way to the program, so
        // a slow reader slows the sender instead of filling our memory.
        let _ = recv.flow_control().release_capacity(data.len());
    }
    // END_STREAM: the far side will send no more. Pass the FIN on; our other direction
    // goes on. Everything this side had to send is now sent, so an end of this process
    // from here on may close the socket normally (see `tune_carried_tcp`).
    let socket = socket2::SockRef::from(tcp.as_ref());
    match socket.shutdown(Shutdown::Write) {
        Ok(()) => {
            let _ = socket.set_linger(None);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(Abort::Tcp(e)),
    }
}

/// Carries bytes between two HTTP/2 streams: a consumer agent's and a publishing
/// agent's, joined at the gateway. Each direction ends on its own (END_STREAM passes
/// through); a reset or failure of either resets both.
pub async fn relay(
    (mut a_send, mut a_recv, a_health): (SendStream<Bytes>, RecvStream, &Health),
    (mut b_send, mut b_recv, b_health): (SendStream<Bytes>, RecvStream, &Health),
    stats: &StreamStats,
) -> Result<(), Abort> {
    let both = async {
        tokio::try_join!(
            pipe(&mut a_recv, a_health, &mut b_send, &stats.tcp_to_tunnel),
            pipe(&mut b_recv, b_health, &mut a_send, &stats.tunnel_to_tcp)
        )
    };
    match both.await {
        Ok(_) => Ok(()),
        Err(abort) => {
            a_send.send_reset(Reason::CANCEL);
            b_send.send_reset(Reason::CANCEL);
            Err(abort)
        }
    }
}

/// One direction of [`relay`]: window given back only once the bytes were handed on.
async fn pipe(
    recv: &mut RecvStream,
    received_on: &Health,
    send: &mut SendStream<Bytes>,
    counted: &AtomicU64,
) -> Result<(), Abort> {
    while let Some(data) = recv.data().await {
        let data = data.map_err(Abort::Tunnel)?;
        let len = data.len();
        received_on.note_received(len);
        send_all(send, data).await?;
        counted.fetch_add(len as u64, Ordering::Relaxed);
        let _ = recv.flow_control().release_capacity(len);
    }
    send.send_data(Bytes::new(), true).map_err(Abort::Tunnel)
}
