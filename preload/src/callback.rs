//! Listeners that live at the gateway (`[[callback]]`): a `bind` on a callback port (or
//! on the gateway's callback address with port 0) opens the listener at the gateway
//! first, then binds the program's socket on loopback, where the agent brings each
//! connection that arrives there. What the program asks of these sockets afterwards
//! shows the far side's view: `getsockname` the public address, `accept` and
//! `getpeername` the far peer. Safe code: the hooks turned the raw pointers into Rust
//! values.
//!
//! ```text
//!  bind(fd, 0.0.0.0:50010) ─ port in TUNNEL_CALLBACKS ─▶ LISTEN 0.0.0.0:50010 (fd passed)
//!     ◀─ LISTENING 203.0.113.7:50010 ─ real bind(fd, 127.0.0.1:0) ─ 0
//!     ◀─ ERR in-use ─ -1 EADDRINUSE (the socket stays unbound: the program may try
//!        its next port on it)
//!  bind(fd, 203.0.113.7:0) ─ real bind: EADDRNOTAVAIL ─▶ LISTEN 203.0.113.7:0 ─ …
//!  accept(fd) ─ real accept ─ a callback listener? ─▶ PEER (accepted fd passed)
//!     ◀─ PEER <far peer> <public> ─ the far peer in the program's sockaddr
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use libc::c_int;
use parking_lot::Mutex;
use tunnel_proto::local::{Reply, Request};

use crate::agent_client::Exchange;
use crate::detour::{Bypass, Detour, Errno, catching};
use crate::state::{State, state};
use crate::sys;

/// A socket whose listener lives at the gateway, or one accepted from it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Which socket: its inode, so a reused fd number is never taken for it.
    inode: u64,
    /// The address the far side connects to (the gateway's callback address).
    public: SocketAddr,
    /// For an accepted socket: who connected.
    far: Option<SocketAddr>,
}

/// Callback listeners and the sockets accepted from them, by fd.
static SOCKETS: Mutex<BTreeMap<c_int, Entry>> = Mutex::new(BTreeMap::new());
/// How many entries [`SOCKETS`] has: `accept` and `getsockname` look only when some.
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Entries kept before the stale ones (closed sockets) are swept.
const SWEEP_ABOVE: usize = 256;

/// True when this process has callback listeners or sockets accepted from them.
#[inline(always)]
pub fn any() -> bool {
    COUNT.load(Ordering::Relaxed) != 0
}

fn record(fd: c_int, entry: Entry) {
    let mut sockets = SOCKETS.lock();
    if sockets.len() >= SWEEP_ABOVE {
        sockets.retain(|fd, e| sys::inode(*fd) == Some(e.inode));
    }
    sockets.insert(fd, entry);
    COUNT.store(sockets.len(), Ordering::Relaxed);
}

/// The entry for `fd`, if it is still the socket recorded.
fn entry(fd: c_int) -> Option<Entry> {
    let mut sockets = SOCKETS.lock();
    let found = sockets.get(&fd).copied()?;
    if sys::inode(fd) == Some(found.inode) {
        return Some(found);
    }
    sockets.remove(&fd);
    COUNT.store(sockets.len(), Ordering::Relaxed);
    None
}

/// `bind(fd, asked)`: a callback port, or the gateway's callback address with port 0,
/// is opened at the gateway; anything else is the real bind's. `real_bind` is the
/// program's own bind.
pub fn bind(fd: c_int, asked: Option<SocketAddr>, real_bind: impl FnOnce() -> c_int) -> Detour<()> {
    let Some(state) = state().filter(|s| !s.callbacks.is_empty()) else {
        return Detour::Bypass(Bypass::NoRoutes);
    };
    let Some(asked) = asked else {
        return Detour::Bypass(Bypass::NotInternet);
    };
    catching(
        || bind_checked(state, fd, asked, real_bind),
        Detour::Bypass(Bypass::Panicked),
    )
}

fn bind_checked(
    state: &State,
    fd: c_int,
    asked: SocketAddr,
    real_bind: impl FnOnce() -> c_int,
) -> Detour<()> {
    let port = asked.port();
    let in_range = state.callbacks.iter().any(|r| r.contains(port));
    if !in_range && port != 0 {
        return Detour::Bypass(Bypass::NotRouted);
    }
    if sys::socket_type(fd) != Some(libc::SOCK_STREAM) {
        return Detour::Bypass(Bypass::NotStream);
    }
    if !in_range {
        // Port 0: only an address that is not this host's can be the gateway's.
        if real_bind() == 0 {
            return Detour::Handled(());
        }
        let errno = sys::errno();
        if errno != libc::EADDRNOTAVAIL {
            return Detour::Failed(Errno(errno));
        }
    }
    Detour::from(listen_at_gateway(state, fd, asked))
}

/// Asks the agent for the listener at the gateway, then binds the socket on loopback.
fn listen_at_gateway(state: &State, fd: c_int, asked: SocketAddr) -> Result<(), Errno> {
    let Some(inode) = sys::inode(fd) else {
        return Err(Errno(libc::EBADF));
    };
    let request = Request::Listen { address: asked };
    let public = match Exchange::start_passing(&state.agent, &request, Some(fd)) {
        Ok((_, Reply::Listening { public })) => public,
        Ok((_, Reply::Err { refusal, message })) => {
            state.trace(format_args!("bind {asked}: {refusal} {message}"));
            return Err(Errno(refusal.errno()));
        }
        Ok(_) => return Err(Errno(libc::EADDRNOTAVAIL)),
        Err(e) => {
            state.trace(format_args!(
                "bind {asked}: agent at {} unreachable ({e:?}): the callback port cannot be opened",
                state.agent.display()
            ));
            return Err(Errno(libc::EADDRNOTAVAIL));
        }
    };
    let Some(shown) = in_family(public, asked) else {
        // An IPv6 callback address for an IPv4 socket: nothing it could advertise.
        state.trace(format_args!(
            "bind {asked}: the gateway's callback address {public} is IPv6"
        ));
        return Err(Errno(libc::EADDRNOTAVAIL));
    };
    let loopback: &[IpAddr] = match asked {
        SocketAddr::V4(_) => &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        SocketAddr::V6(_) => &[
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
        ],
    };
    let mut last = libc::EADDRNOTAVAIL;
    for ip in loopback {
        match sys::bind(fd, SocketAddr::new(*ip, 0)) {
            Ok(()) => {
                record(
                    fd,
                    Entry {
                        inode,
                        public: shown,
                        far: None,
                    },
                );
                state.trace(format_args!(
                    "bind {asked}: listener at the gateway, {public}"
                ));
                return Ok(());
            }
            Err(e) => last = e,
        }
    }
    Err(Errno(last))
}

/// `addr` in the family of `like` (an IPv4 address in mapped form for an IPv6 socket,
/// a mapped one as plain IPv4 for an IPv4 socket); `None` for an IPv6 address an IPv4
/// socket cannot show.
pub fn in_family(addr: SocketAddr, like: SocketAddr) -> Option<SocketAddr> {
    match (addr, like) {
        (SocketAddr::V4(v4), SocketAddr::V6(_)) => Some(SocketAddr::new(
            IpAddr::V6(v4.ip().to_ipv6_mapped()),
            v4.port(),
        )),
        (SocketAddr::V6(v6), SocketAddr::V4(_)) => v6
            .ip()
            .to_ipv4_mapped()
            .map(|v4| SocketAddr::new(IpAddr::V4(v4), v6.port())),
        _ => Some(addr),
    }
}

/// After the real `accept` on `listener` gave `accepted`: the far peer, when the
/// listener is a callback listener and the connection came from the gateway.
pub fn accepted(listener: c_int, accepted: c_int) -> Option<SocketAddr> {
    let state = state()?;
    catching(|| accepted_checked(state, listener, accepted), None)
}

fn accepted_checked(state: &State, listener: c_int, accepted: c_int) -> Option<SocketAddr> {
    let Entry { far: None, .. } = entry(listener)? else {
        return None;
    };
    let inode = sys::inode(accepted)?;
    let (far, public) = match Exchange::start_passing(&state.agent, &Request::Peer, Some(accepted))
    {
        Ok((_, Reply::Peer { far, public })) => (far, public),
        // A connection made on loopback by a local program: its own peer is the truth.
        _ => return None,
    };
    let local = sys::local_addr(accepted).unwrap_or(public);
    // A peer the socket's family cannot show stays the kernel's (the agent's address).
    let far = in_family(far, local)?;
    record(
        accepted,
        Entry {
            inode,
            public: in_family(public, local).unwrap_or(public),
            far: Some(far),
        },
    );
    Some(far)
}

/// `getsockname`: the public address of a callback listener or of a socket accepted
/// from one; for any other socket, the kernel's answer (or a redirected socket's).
pub fn own_name(fd: c_int) -> Detour<SocketAddr> {
    if !any() {
        return Detour::Bypass(Bypass::NotRedirected);
    }
    catching(
        || match entry(fd) {
            Some(e) => Detour::Handled(e.public),
            None => Detour::Bypass(Bypass::NotRedirected),
        },
        Detour::Bypass(Bypass::Panicked),
    )
}

/// `getpeername` on a socket accepted from a callback listener: the far peer.
pub fn peer_name(fd: c_int) -> Detour<SocketAddr> {
    if !any() {
        return Detour::Bypass(Bypass::NotRedirected);
    }
    catching(
        || match entry(fd).and_then(|e| e.far) {
            Some(far) => Detour::Handled(far),
            None => Detour::Bypass(Bypass::NotRedirected),
        },
        Detour::Bypass(Bypass::Panicked),
    )
}
