//! The decision for one `connect`, and the redirect itself. Safe code: the raw
//! pointers were turned into Rust values by the hook.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libc::c_int;
use parking_lot::Mutex;
use tunnel_proto::local::{Reply, Request};
use tunnel_proto::{ConnectError, Target};

use crate::agent_client::{AgentError, Exchange};
use crate::ip_routes::Via;
use crate::state::State;
use crate::sys;

/// What to do with a connect that a route selected (see [`IpRoutes`](crate::ip_routes)).
pub enum Decision {
    /// Through the tunnel; `via` is `None` for synthetic addresses (the agent knows).
    Redirect { via: Option<String> },
    /// Refused here, with this errno.
    Refuse(c_int),
}

pub fn decide(state: &State, via: Via) -> Decision {
    match via {
        Via::Synthetic => Decision::Redirect { via: None },
        Via::Route(index) => match state.gateway_of(index) {
            Some(via) => Decision::Redirect {
                via: Some(via.to_string()),
            },
            None => Decision::Refuse(libc::ECONNREFUSED),
        },
        Via::Refuse => Decision::Refuse(libc::ECONNREFUSED),
    }
}

/// Redirected sockets, for getpeername: fd → (our source, the agent's listener, the
/// program's destination). An entry is trusted only while the socket still has that
/// source and peer, so a reused fd number is never mistaken for a redirected one.
static REDIRECTED: Mutex<BTreeMap<c_int, (SocketAddr, SocketAddr, SocketAddr)>> =
    Mutex::new(BTreeMap::new());

/// Errno for a failure class from the agent or the gateway.
fn errno_of(class: &str) -> c_int {
    ConnectError::parse(class).map_or(libc::ECONNREFUSED, ConnectError::errno)
}

/// Gives the socket a loopback source address if it has none yet.
fn source_address(fd: c_int, destination: SocketAddr) -> Result<SocketAddr, c_int> {
    if let Some(local) = sys::local_addr(fd).filter(|a| a.port() != 0) {
        return Ok(local);
    }
    let candidates: &[IpAddr] = match destination {
        SocketAddr::V4(_) => &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        // An IPv4 destination in mapped form (Java, dual-stack servers): the mapped
        // IPv4 loopback, so the socket's own address is IPv4-mapped as a direct
        // connection's would be, and protocols that send it (FTP's EPRT) stay IPv4.
        SocketAddr::V6(d) if d.ip().to_ipv4_mapped().is_some() => &[
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ],
        // ::1 where IPv6 is up; else the mapped IPv4 loopback (a dual-stack socket).
        SocketAddr::V6(_) => &[
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
        ],
    };
    let mut last = libc::EADDRNOTAVAIL;
    for ip in candidates {
        match sys::bind(fd, SocketAddr::new(*ip, 0)) {
            Ok(()) => return sys::local_addr(fd).ok_or(libc::EBADF),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Connects the program's socket to the agent instead of `destination`. Returns what
/// the program's connect returns, with errno set.
pub fn redirect(state: &State, fd: c_int, destination: SocketAddr, via: Option<String>) -> c_int {
    match sys::socket_type(fd) {
        Some(libc::SOCK_STREAM) => {}
        // Not TCP (a UDP "connect" only sets a default peer): nothing to carry.
        _ => return sys::real_connect(fd, destination),
    }
    // A program that polls a non-blocking connect by calling connect again (EALREADY,
    // then EISCONN) asks about the connection already made to the agent.
    let earlier = REDIRECTED.lock().get(&fd).copied();
    if let Some((_, listener, _)) =
        earlier.filter(|(source, _, to)| *to == destination && sys::local_addr(fd) == Some(*source))
    {
        return sys::real_connect(fd, listener);
    }
    let source = match source_address(fd, destination) {
        Ok(s) => s,
        Err(errno) => return fail(errno),
    };
    let wait = !sys::is_nonblocking(fd);
    let target = Target::from(SocketAddr::new(
        destination.ip().to_canonical(),
        destination.port(),
    ));
    let request = Request::Register {
        source,
        target,
        via,
        wait,
    };
    let (exchange, reply) = match Exchange::start(&state.agent, &request) {
        Ok(answer) => answer,
        Err(AgentError::Unreachable(e)) => {
            state.trace(format_args!(
                "{destination}: agent at {} unreachable ({e}): refused",
                state.agent.display()
            ));
            return fail(libc::ECONNREFUSED);
        }
        Err(AgentError::Garbled) => return fail(libc::ECONNREFUSED),
    };
    let listener = match reply {
        Reply::Ok { listener } => listener,
        Reply::Err { class, message } => {
            state.trace(format_args!("{destination}: {class} {message}"));
            return fail(errno_of(&class));
        }
        _ => return fail(libc::ECONNREFUSED),
    };
    let rc = sys::real_connect(fd, listener);
    let connect_errno = sys::errno();
    let in_progress = !wait && connect_errno == libc::EINPROGRESS;
    if rc != 0 && !in_progress {
        state.trace(format_args!("{destination}: connect to the agent failed"));
        return fail(if connect_errno == 0 {
            libc::ECONNREFUSED
        } else {
            connect_errno
        });
    }
    REDIRECTED
        .lock()
        .insert(fd, (source, listener, destination));
    if !wait {
        // Non-blocking: the program gets EINPROGRESS and normal readiness; a failure
        // at the far side arrives as a reset.
        drop(exchange);
        state.trace(format_args!("{destination}: redirected (non-blocking)"));
        sys::set_errno(connect_errno);
        return rc;
    }
    match exchange.verdict() {
        Ok(Reply::Verdict { error: None }) => {
            state.trace(format_args!("{destination}: redirected"));
            0
        }
        Ok(Reply::Verdict { error: Some(class) }) => {
            state.trace(format_args!("{destination}: {class}"));
            fail(errno_of(&class))
        }
        _ => fail(libc::ECONNREFUSED),
    }
}

fn fail(errno: c_int) -> c_int {
    sys::set_errno(errno);
    -1
}

/// The destination a redirected socket was meant for, if `fd` is one.
pub fn original_peer(fd: c_int) -> Option<SocketAddr> {
    let (source, listener, destination) = *REDIRECTED.lock().get(&fd)?;
    let still_ours =
        sys::real_peer_addr(fd) == Some(listener) && sys::local_addr(fd) == Some(source);
    if still_ours {
        Some(destination)
    } else {
        REDIRECTED.lock().remove(&fd);
        None
    }
}
