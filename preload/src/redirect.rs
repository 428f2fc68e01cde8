//! The decision for one `connect`, and the redirect itself. Safe code: the raw
//! pointers were turned into Rust values by the hook.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use std::sync::atomic::{AtomicUsize, Ordering};

use libc::c_int;
use parking_lot::Mutex;
use tunnel_proto::Target;
use tunnel_proto::local::{Reply, Request, VerdictDelivery};
use tunnel_proto::routes::{ConnectMode, TableRoute};

use crate::agent_client::{AgentError, Exchange, ask_for_verdict};
use crate::ip_routes::Via;
use crate::state::State;
use crate::sys;

/// What to do with a connect that a route selected (see [`IpRoutes`](crate::ip_routes)).
pub enum Decision {
    /// Through the tunnel; `via` is `None` for synthetic addresses (the agent knows).
    Redirect {
        via: Option<String>,
        connect: ConnectMode,
    },
    /// Refused here, with this errno.
    Refuse(c_int),
}

impl Decision {
    fn through(route: Option<&TableRoute>) -> Decision {
        match route {
            Some(route) => Decision::Redirect {
                via: Some(route.via.clone()),
                connect: route.connect,
            },
            None => Decision::Redirect {
                via: None,
                connect: ConnectMode::default(),
            },
        }
    }
}

pub fn decide(state: &State, via: Via) -> Decision {
    match via {
        Via::Synthetic => Decision::through(None),
        Via::Route(index) => match state.route(index) {
            Some(route) => Decision::through(Some(route)),
            None => Decision::Refuse(libc::ECONNREFUSED),
        },
        Via::Refuse => Decision::Refuse(libc::ECONNREFUSED),
    }
}

/// A decision for a synthetic address: the route of the name this process looked up
/// (which may come from `tunnel-run --route`), else the agent's choice.
pub fn decide_synthetic(route: Option<&TableRoute>) -> Decision {
    Decision::through(route)
}

/// One socket connected to the agent instead of its destination.
#[derive(Debug, Clone, Copy)]
struct Redirected {
    /// Which socket: its inode, so a reused fd number is never taken for it.
    inode: u64,
    /// The socket's own address, which names its registration.
    source: SocketAddr,
    /// The agent's loopback listener it is connected to.
    listener: SocketAddr,
    /// Where the program wanted to go.
    destination: SocketAddr,
    /// Whether the program still has to learn the gateway's answer.
    answer: Answer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A non-blocking connect: the agent keeps the gateway's answer for
    /// `getsockopt(SO_ERROR)` (or a repeated `connect`) to ask for.
    Pending,
    /// Told already (a blocking connect), told once, or never to be told (optimistic).
    Settled,
}

/// Redirected sockets, for getpeername and the deferred answer of non-blocking connects.
/// An entry is trusted only while the socket still has that source (and peer), so a
/// reused fd number is never mistaken for a redirected one.
static REDIRECTED: Mutex<BTreeMap<c_int, Redirected>> = Mutex::new(BTreeMap::new());

/// How many entries of [`REDIRECTED`] are not yet told: `getsockopt` takes the lock
/// only when some are.
static PENDING: AtomicUsize = AtomicUsize::new(0);

impl Answer {
    fn untold(self) -> bool {
        self != Answer::Settled
    }
}

fn record(fd: c_int, entry: Redirected) {
    let old = REDIRECTED.lock().insert(fd, entry);
    if entry.answer.untold() {
        PENDING.fetch_add(1, Ordering::Relaxed);
    }
    if old.is_some_and(|o| o.answer.untold()) {
        PENDING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks `fd`'s answer as told.
fn settle(fd: c_int) {
    if let Some(entry) = REDIRECTED.lock().get_mut(&fd)
        && entry.answer.untold()
    {
        entry.answer = Answer::Settled;
        PENDING.fetch_sub(1, Ordering::Relaxed);
    }
}

fn forget(fd: c_int) {
    if REDIRECTED
        .lock()
        .remove(&fd)
        .is_some_and(|o| o.answer.untold())
    {
        PENDING.fetch_sub(1, Ordering::Relaxed);
    }
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
///
/// ```text
///              blocking                        non-blocking
/// checked      REGISTER wait: verdict → 0/errno REGISTER later: -1 EINPROGRESS; the
///                                               verdict when the program checks
///                                               (getsockopt SO_ERROR, connect again)
/// optimistic   REGISTER nowait: 0               REGISTER nowait: -1 EINPROGRESS
///              (a far failure arrives as a reset on first I/O)
/// ```
pub fn redirect(
    state: &State,
    fd: c_int,
    destination: SocketAddr,
    via: Option<String>,
    connect: ConnectMode,
) -> c_int {
    match sys::socket_type(fd) {
        Some(libc::SOCK_STREAM) => {}
        // Not TCP (a UDP "connect" only sets a default peer): nothing to carry.
        _ => return sys::real_connect(fd, destination),
    }
    // A program that polls a non-blocking connect by calling connect again (EALREADY,
    // then EISCONN) asks about the connection already made to the agent.
    let earlier = REDIRECTED.lock().get(&fd).copied();
    if let Some(earlier) = earlier.filter(|e| e.destination == destination && is_same(fd, e)) {
        return connect_again(state, fd, earlier);
    }
    let source = match source_address(fd, destination) {
        Ok(s) => s,
        Err(errno) => return fail(errno),
    };
    let wait = !sys::is_nonblocking(fd);
    let delivery = match (connect, wait) {
        (ConnectMode::Optimistic, _) => VerdictDelivery::Never,
        (ConnectMode::Checked, true) => VerdictDelivery::Wait,
        (ConnectMode::Checked, false) => VerdictDelivery::Later,
    };
    let Some(inode) = sys::inode(fd) else {
        return fail(libc::EBADF);
    };
    let target = Target::from(SocketAddr::new(
        destination.ip().to_canonical(),
        destination.port(),
    ));
    let request = Request::Register {
        source,
        target,
        via,
        verdict: delivery,
    };
    // The socket travels with its registration: the agent's proof that we hold it.
    let started = Exchange::start_passing(&state.agent, &request, Some(fd));
    let (exchange, reply) = match started {
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
        // Only ever a loopback listener: anything else is not an agent of ours.
        Reply::Ok { listener } if listener.ip().to_canonical().is_loopback() => listener,
        Reply::Err { refusal, message } => {
            state.trace(format_args!("{destination}: {refusal} {message}"));
            return fail(refusal.errno());
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
    let answer = match delivery {
        VerdictDelivery::Later => Answer::Pending,
        VerdictDelivery::Wait | VerdictDelivery::Never => Answer::Settled,
    };
    record(
        fd,
        Redirected {
            inode,
            source,
            listener,
            destination,
            answer,
        },
    );
    if delivery != VerdictDelivery::Wait {
        drop(exchange);
        if wait {
            // Optimistic and blocking: connected to the agent, which is all it waits for.
            state.trace(format_args!("{destination}: redirected (optimistic)"));
            return 0;
        }
        // Non-blocking: the program gets EINPROGRESS and normal readiness. A checked
        // route's answer comes when the program asks for the connect's result; an
        // optimistic one's failure arrives as a reset. Even a local connect that
        // finished at once is reported in progress, so the program does ask.
        state.trace(format_args!(
            "{destination}: redirected (non-blocking, {})",
            connect.as_str()
        ));
        return fail(libc::EINPROGRESS);
    }
    match exchange.verdict() {
        Ok(Reply::Verdict { error: None }) => {
            state.trace(format_args!("{destination}: redirected"));
            0
        }
        Ok(Reply::Verdict {
            error: Some(refusal),
        }) => {
            state.trace(format_args!("{destination}: {refusal}"));
            fail(refusal.errno())
        }
        _ => fail(libc::ECONNREFUSED),
    }
}

fn fail(errno: c_int) -> c_int {
    sys::set_errno(errno);
    -1
}

/// `connect` called again on a socket already redirected: the state of the local
/// connect while it is under way, then, for a non-blocking checked connect, the
/// gateway's answer (waiting for it if need be), once.
fn connect_again(state: &State, fd: c_int, earlier: Redirected) -> c_int {
    let rc = sys::real_connect(fd, earlier.listener);
    let errno = sys::errno();
    let under_way = rc != 0 && (errno == libc::EALREADY || errno == libc::EINPROGRESS);
    if !earlier.answer.untold() || under_way {
        return rc;
    }
    match verdict_of(state, fd, earlier) {
        0 => {
            sys::set_errno(errno);
            rc
        }
        refused => fail(refused),
    }
}

/// The gateway's answer for a non-blocking connect, as an errno (0: connected).
fn verdict_of(state: &State, fd: c_int, entry: Redirected) -> c_int {
    let destination = entry.destination;
    let errno = match ask_for_verdict(&state.agent, entry.source) {
        Ok(Reply::Verdict { error: None }) => 0,
        Ok(Reply::Verdict {
            error: Some(refusal),
        }) => {
            state.trace(format_args!("{destination}: {refusal}"));
            refusal.errno()
        }
        Ok(Reply::Err { refusal, message }) => {
            state.trace(format_args!("{destination}: {refusal} {message}"));
            libc::ECONNREFUSED
        }
        Ok(_) | Err(_) => {
            state.trace(format_args!(
                "{destination}: no answer from the agent: refused"
            ));
            libc::ECONNREFUSED
        }
    };
    settle(fd);
    errno
}

/// For `getsockopt(SO_ERROR)`: the result of a non-blocking connect through the tunnel
/// whose answer the program has not learnt yet, or `None` to ask the kernel.
/// `local_error` is what the kernel says of the connect to the agent.
pub fn connect_result(state: &State, fd: c_int, local_error: impl Fn() -> c_int) -> Option<c_int> {
    if PENDING.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let entry = REDIRECTED.lock().get(&fd).copied()?;
    if !entry.answer.untold() {
        return None;
    }
    if !is_same(fd, &entry) {
        // The fd was closed and its number reused.
        forget(fd);
        return None;
    }
    match local_error() {
        // The local leg is up, or was up and the agent has reset it because the far
        // side refused: the gateway's answer says which.
        local @ (0 | libc::ECONNRESET) => match verdict_of(state, fd, entry) {
            0 => Some(local),
            refused => Some(refused),
        },
        local => {
            settle(fd);
            Some(local)
        }
    }
}

/// True when `fd` is still the socket `entry` was recorded for.
fn is_same(fd: c_int, entry: &Redirected) -> bool {
    sys::inode(fd) == Some(entry.inode)
}

/// True when some non-blocking connect's answer is still to be told: `getsockopt`'s
/// one check before it does anything else.
#[inline(always)]
pub fn any_pending() -> bool {
    PENDING.load(Ordering::Relaxed) != 0
}

/// The destination a redirected socket was meant for, if `fd` is one.
pub fn original_peer(fd: c_int) -> Option<SocketAddr> {
    let entry = *REDIRECTED.lock().get(&fd)?;
    let still_ours = is_same(fd, &entry) && sys::real_peer_addr(fd) == Some(entry.listener);
    if still_ours {
        Some(entry.destination)
    } else {
        forget(fd);
        None
    }
}
