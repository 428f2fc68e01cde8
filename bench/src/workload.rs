//! The same server and the same client for every path, so that only the path differs.
//!
//! The destination server answers a one-byte command on each connection:
//!
//! | command | then | server does |
//! |---|---|---|
//! | `U` | bytes until FIN | counts them, answers the count (8 bytes, big-endian) |
//! | `D` | u32 milliseconds | sends bytes for that long, then closes |
//! | `E` | anything | echoes until FIN (round trips) |
//! | `C` | nothing | answers one byte and closes (new connections) |
//! | `H` | an HTTP request line | answers a small HTTP response at once (time to first byte) |
//!
//! The client side runs in a process of its own (`tunnel-bench client …`), so that a
//! path can wrap it (`tunnel-run`, `proxychains4`), and prints one JSON line.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

const CHUNK: usize = 128 * 1024;

/// Acceptor threads of the destination server: short commands (`C`, `H`) are answered
/// on the acceptor itself, so that the server's own cost (a thread, a buffer per
/// connection) does not cap the new-connection figure of any path.
const ACCEPTORS: usize = 8;

/// Starts the destination server on `ip`, port chosen by the kernel.
pub fn serve(ip: &str) -> Result<SocketAddr> {
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    let addr = listener.local_addr()?;
    for _ in 0..ACCEPTORS {
        let listener = listener.try_clone()?;
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = answer(stream);
            }
        });
    }
    Ok(addr)
}

/// Reads the command; answers a short one at once, hands a long one to a thread.
fn answer(mut s: TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    let mut command = [0u8; 1];
    s.read_exact(&mut command)?;
    match command[0] {
        b'C' => s.write_all(b"k")?,
        b'H' => {
            let mut request = [0u8; 1024];
            if s.read(&mut request)? > 0 {
                s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")?;
            }
        }
        long => {
            thread::spawn(move || handle(s, long));
            return Ok(());
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    Ok(())
}

fn handle(mut s: TcpStream, command: u8) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    match command {
        b'U' => {
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes())?;
        }
        b'D' => {
            let mut ms = [0u8; 4];
            s.read_exact(&mut ms)?;
            let until = Instant::now() + Duration::from_millis(u64::from(u32::from_be_bytes(ms)));
            while Instant::now() < until {
                s.write_all(&buf)?;
            }
        }
        b'E' => loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n])?;
        },
        other => bail!("unknown command {other}"),
    }
    let _ = s.shutdown(Shutdown::Write);
    Ok(())
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    Ok(s)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Bytes per second over `streams` connections for `secs`, towards the server.
fn bulk_up(addr: SocketAddr, secs: f64, streams: usize) -> Result<serde_json::Value> {
    let start = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            thread::spawn(move || -> Result<u64> {
                let mut s = connect(addr)?;
                s.write_all(b"U")?;
                let buf = vec![0x5au8; CHUNK];
                let until = Instant::now() + Duration::from_secs_f64(secs);
                while Instant::now() < until {
                    s.write_all(&buf)?;
                }
                s.shutdown(Shutdown::Write)?;
                let mut count = [0u8; 8];
                s.read_exact(&mut count)?;
                Ok(u64::from_be_bytes(count))
            })
        })
        .collect();
    let mut bytes = 0;
    for h in handles {
        bytes += h
            .join()
            .map_err(|_| anyhow::anyhow!("a sender panicked"))??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(json!({ "bytes": bytes, "secs": elapsed, "bits_per_sec": bytes as f64 * 8.0 / elapsed }))
}

/// Bytes per second over `streams` connections for `secs`, from the server.
fn bulk_down(addr: SocketAddr, secs: f64, streams: usize) -> Result<serde_json::Value> {
    let start = Instant::now();
    let ms = (secs * 1000.0) as u32;
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            thread::spawn(move || -> Result<u64> {
                let mut s = connect(addr)?;
                let mut request = vec![b'D'];
                request.extend_from_slice(&ms.to_be_bytes());
                s.write_all(&request)?;
                s.shutdown(Shutdown::Write)?;
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0u64;
                loop {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        return Ok(total);
                    }
                    total += n as u64;
                }
            })
        })
        .collect();
    let mut bytes = 0;
    for h in handles {
        bytes += h
            .join()
            .map_err(|_| anyhow::anyhow!("a receiver panicked"))??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(json!({ "bytes": bytes, "secs": elapsed, "bits_per_sec": bytes as f64 * 8.0 / elapsed }))
}

/// 64-byte ping-pong on one connection: round-trip percentiles in microseconds.
fn round_trips(addr: SocketAddr, count: usize) -> Result<serde_json::Value> {
    let mut s = connect(addr)?;
    s.write_all(b"E")?;
    let ping = [0x42u8; 64];
    let mut pong = [0u8; 64];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + count / 10 {
        let t = Instant::now();
        s.write_all(&ping)?;
        s.read_exact(&mut pong)?;
        if i >= count / 10 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(json!({ "p50_us": percentile(&samples, 0.5), "p99_us": percentile(&samples, 0.99) }))
}

/// New connections from `threads` threads for `secs`: rate and connect latency.
fn new_connections(addr: SocketAddr, secs: f64, threads: usize) -> Result<serde_json::Value> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, done, samples) = (stop.clone(), done.clone(), samples.clone());
            thread::spawn(move || -> Result<()> {
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let mut s = connect(addr)?;
                    mine.push(t.elapsed().as_secs_f64() * 1e6);
                    s.write_all(b"C")?;
                    let mut k = [0u8; 1];
                    s.read_exact(&mut k)?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                samples
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .extend(mine);
                Ok(())
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a connector panicked"))??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut samples =
        std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    samples.sort_by(f64::total_cmp);
    Ok(json!({
        "per_sec": done.load(Ordering::Relaxed) as f64 / elapsed,
        "connect_p50_us": percentile(&samples, 0.5),
        "connect_p99_us": percentile(&samples, 0.99),
    }))
}

/// Time from the start of connect to the first byte of an HTTP answer, milliseconds.
/// `blocking`: a plain blocking connect; else a non-blocking one with a poll for
/// completion, as curl, browsers and event loops do.
fn first_byte(addr: SocketAddr, count: usize, blocking: bool) -> Result<serde_json::Value> {
    let mut samples = Vec::new();
    for _ in 0..count {
        let t = Instant::now();
        let mut s = if blocking {
            connect(addr)?
        } else {
            // Non-blocking connect and poll (std's connect_timeout), then the check that
            // curl, libuv and asyncio make before they send: getsockopt(SO_ERROR).
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(30))?;
            if let Some(e) = s.take_error()? {
                return Err(e.into());
            }
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            s
        };
        s.write_all(b"HGET / HTTP/1.0\r\n\r\n")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    Ok(json!({ "p50_ms": percentile(&samples, 0.5) }))
}

/// An event loop's view of `count` non-blocking connects made at once: each socket is
/// polled for writability and then checked with `getsockopt(SO_ERROR)`, as curl, libuv
/// and asyncio do. Reports the longest time one check held the loop (its longest
/// stall) and when the last connection was known to be up, in milliseconds.
fn connect_burst(addr: SocketAddr, count: usize) -> Result<serde_json::Value> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, connect, getsockopt, socket, sockopt,
    };
    use std::os::fd::{AsFd, OwnedFd};

    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let target = SockaddrStorage::from(addr);
    let start = Instant::now();
    let mut pending: Vec<OwnedFd> = Vec::with_capacity(count);
    for _ in 0..count {
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK, None)?;
        match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &target) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => pending.push(fd),
            Err(e) => bail!("connect: {e}"),
        }
    }
    let mut longest_stall = Duration::ZERO;
    let mut connected = Vec::with_capacity(count);
    while !pending.is_empty() {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("{} connects unanswered after 60 s", pending.len());
        }
        let mut fds: Vec<PollFd> = pending
            .iter()
            .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLOUT))
            .collect();
        poll(&mut fds, PollTimeout::from(100u16))?;
        let ready: Vec<bool> = fds
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let mut still = Vec::with_capacity(pending.len());
        for (fd, ready) in pending.into_iter().zip(ready) {
            if !ready {
                still.push(fd);
                continue;
            }
            let checked = Instant::now();
            let error = getsockopt(&fd, sockopt::SocketError)?;
            longest_stall = longest_stall.max(checked.elapsed());
            if error != 0 {
                bail!("connect failed: errno {error}");
            }
            connected.push(fd);
        }
        pending = still;
    }
    Ok(json!({
        "longest_stall_ms": longest_stall.as_secs_f64() * 1000.0,
        "all_connected_ms": start.elapsed().as_secs_f64() * 1000.0,
    }))
}

/// Holds `count` idle connections open until stdin closes.
fn hold_idle(addr: SocketAddr, count: usize) -> Result<serde_json::Value> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        held.push(
            TcpStream::connect(addr).with_context(|| format!("idle connection {}", held.len()))?,
        );
    }
    println!("{}", json!({ "holding": held.len() }));
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(json!({ "released": held.len() }))
}

/// Pass-through connects (a destination no route selects), `count` of them, on one
/// non-blocking socket: nanoseconds per call.
fn passthrough(count: usize) -> Result<serde_json::Value> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    // A UDP connect is a pure system call, no handshake: what is left is the hook.
    let target: SocketAddr = "127.0.0.1:9".parse()?;
    let _ = socket.as_raw_fd();
    let start = Instant::now();
    for _ in 0..count {
        socket.connect(target)?;
    }
    let ns = start.elapsed().as_nanos() as f64 / count as f64;
    Ok(json!({ "ns_per_call": ns }))
}

/// Runs one client operation (the `client` subcommand) and returns its JSON.
pub fn client(op: &str, addr: SocketAddr, arg: f64, streams: usize) -> Result<serde_json::Value> {
    match op {
        "bulk-up" => bulk_up(addr, arg, streams),
        "bulk-down" => bulk_down(addr, arg, streams),
        "rr" => round_trips(addr, arg as usize),
        "connect" => new_connections(addr, arg, streams),
        "ttfb" => first_byte(addr, arg as usize, true),
        "ttfb-nonblocking" => first_byte(addr, arg as usize, false),
        "connect-burst" => connect_burst(addr, arg as usize),
        "idle" => hold_idle(addr, arg as usize),
        "passthrough" => passthrough(arg as usize),
        other => bail!("unknown client operation {other}"),
    }
}

/// A destination that accepts connections and holds them without a word: for the
/// idle-stream memory figure, without a thread per connection.
pub fn serve_idle(ip: &str) -> Result<SocketAddr> {
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    Ok(addr)
}
