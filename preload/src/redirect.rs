//! What happens to a `connect` (or a Fast Open send) that a route selects, and to the
//! socket afterwards: the redirect to the agent, the deferred answer of a non-blocking
//! connect, the peer it shows. Safe code: the hooks turned the raw pointers into Rust
//! values.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use std::sync::atomic::{AtomicUsize, Ordering};

use libc::c_int;
use parking_lot::Mutex;
use tunnel_proto::Target;
use tunnel_proto::local::{Reply, Request, VerdictDelivery};
use tunnel_proto::routes::{ConnectMode, TableRoute};

use crate::agent_client::{AgentError, Exchange, ask_for_verdict};
use crate::detour::{Bypass, Detour, Errno, catching};
use crate::ip_routes::{IpRoutes, Via};
use crate::names;
use crate::state::{State, state};
use crate::sys::{self, Peek};

/// `connect` to `destination`: a destination no route selects is the real connect's;
/// a routed one is redirected, out of line. `whole` reads the whole address, which
/// only a routed connect needs. The pass-through path stays a few instructions long:
/// what runs out of line answers with a `Result`, so the hook keeps none of the
/// program's arguments across it and saves no register for them.
#[inline(always)]
pub fn connect(
    routes: &IpRoutes,
    fd: c_int,
    destination: Peek,
    whole: impl FnOnce() -> Option<SocketAddr>,
) -> Detour<()> {
    let via = match destination {
        Peek::V4(address, port) => routes.lookup_v4(address, port),
        Peek::V6(address, port) => routes.lookup_v6(address, port),
        Peek::ShortV6 => return Detour::from(connect_short_v6(fd, whole, routes)),
        Peek::Other => return Detour::Bypass(Bypass::NotInternet),
    };
    match via {
        None => Detour::Bypass(Bypass::NotRouted),
        Some(via) => Detour::from(connect_whole(fd, whole, via)),
    }
}

/// A routed connect, once its whole address is read. (The arguments come in the
/// order connect's own are in, so that calling this moves no register.)
#[cold]
#[inline(never)]
fn connect_whole(
    fd: c_int,
    whole: impl FnOnce() -> Option<SocketAddr>,
    via: Via,
) -> Result<(), Errno> {
    let destination = whole().ok_or(Errno(libc::EINVAL))?;
    connect_routed(fd, destination, via)
}

/// An IPv6 address of the old 24-byte length, which Linux accepts: decided in its
/// whole form, so that it is routed like any other; not routed, it goes to the real
/// connect whole, as Linux reads it.
#[cold]
#[inline(never)]
fn connect_short_v6(
    fd: c_int,
    whole: impl FnOnce() -> Option<SocketAddr>,
    routes: &IpRoutes,
) -> Result<(), Errno> {
    let destination = whole().ok_or(Errno(libc::EINVAL))?;
    match routes.lookup(destination.ip(), destination.port()) {
        None => connect_outcome(sys::real_connect(fd, destination)),
        Some(via) => connect_routed(fd, destination, via),
    }
}

/// A send with `MSG_FASTOPEN` connects inside the send: a routed destination is
/// connected through the tunnel first, exactly as by `connect`, and the data then
/// sent on that connection. `destination` is the send's address, if it has one.
#[inline(always)]
pub fn fast_open(fd: c_int, flags: c_int, destination: Option<SocketAddr>) -> Detour<()> {
    if flags & libc::MSG_FASTOPEN == 0 {
        return Detour::Bypass(Bypass::NotFastOpen);
    }
    fast_open_connect(fd, destination)
}

#[cold]
#[inline(never)]
fn fast_open_connect(fd: c_int, destination: Option<SocketAddr>) -> Detour<()> {
    let Some(state) = state() else {
        return Detour::Bypass(Bypass::NoRoutes);
    };
    let Some(destination) = destination else {
        return Detour::Bypass(Bypass::NotInternet);
    };
    let Some(via) = state.ip_routes.lookup(destination.ip(), destination.port()) else {
        return Detour::Bypass(Bypass::NotRouted);
    };
    if sys::socket_type(fd) != Some(libc::SOCK_STREAM) {
        // A datagram socket ignores MSG_FASTOPEN; UDP is not carried.
        return Detour::Bypass(Bypass::NotStream);
    }
    Detour::from(connect_routed(fd, destination, via))
}

/// A connect that a route selected.
fn connect_routed(fd: c_int, destination: SocketAddr, via: Via) -> Result<(), Errno> {
    // Routes come from the state, so it is there; refuse rather than guess.
    let state = state().ok_or(Errno(libc::ECONNREFUSED))?;
    let routed = || redirect(state, fd, destination, route(state, via, destination)?);
    catching(routed, Err(Errno(libc::ECONNREFUSED)))
}

/// Where a routed connect goes and how it connects.
struct Route {
    /// The gateway; `None` for a synthetic address whose name this process did not
    /// look up (the agent knows the name and its gateway).
    via: Option<String>,
    connect: ConnectMode,
}

impl Route {
    fn through(route: Option<&TableRoute>) -> Route {
        Route {
            via: route.map(|r| r.via.clone()),
            connect: route.map(|r| r.connect).unwrap_or_default(),
        }
    }
}

fn route(state: &State, via: Via, destination: SocketAddr) -> Result<Route, Errno> {
    match via {
        // The route of the name this process looked up (which may come from
        // `tunnel-run --route`), else the agent's choice.
        Via::Synthetic => Ok(Route::through(names::route_for_synthetic(
            state,
            destination.ip(),
            destination.port(),
        ))),
        Via::Route(index) => match state.route(index) {
            Some(route) => Ok(Route::through(Some(route))),
            None => Err(Errno(libc::ECONNREFUSED)),
        },
        Via::Refuse => Err(Errno(libc::ECONNREFUSED)),
    }
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
    /// The gateway's callback address: what `getsockname` shows as the socket's own.
    callback: Option<IpAddr>,
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
    let mut last = libc::EADDRNOTAVAIL;
    for ip in tunnel_proto::local::loopback_sources(destination) {
        match sys::bind(fd, SocketAddr::new(*ip, 0)) {
            Ok(()) => return sys::local_addr(fd).ok_or(libc::EBADF),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Connects the program's socket to the agent instead of `destination`: what the
/// program's connect returns.
///
/// ```text
///              blocking                        non-blocking
/// checked      REGISTER wait: verdict → 0/errno REGISTER later: -1 EINPROGRESS; the
///                                               verdict when the program checks
///                                               (getsockopt SO_ERROR, connect again)
/// optimistic   REGISTER nowait: 0               REGISTER nowait: -1 EINPROGRESS
///              (a far failure arrives as a reset on first I/O)
/// ```
fn redirect(state: &State, fd: c_int, destination: SocketAddr, route: Route) -> Result<(), Errno> {
    let Route { via, connect } = route;
    match sys::socket_type(fd) {
        Some(libc::SOCK_STREAM) => {}
        // Not TCP (a UDP "connect" only sets a default peer): nothing to carry.
        _ => return connect_outcome(sys::real_connect(fd, destination)),
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
    let (listener, callback) = match reply {
        // Only ever a loopback listener: anything else is not an agent of ours.
        Reply::Ok { listener, callback } if listener.ip().to_canonical().is_loopback() => {
            (listener, callback)
        }
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
            callback,
            answer,
        },
    );
    if delivery != VerdictDelivery::Wait {
        drop(exchange);
        if wait {
            // Optimistic and blocking: connected to the agent, which is all it waits for.
            state.trace(format_args!("{destination}: redirected (optimistic)"));
            return Ok(());
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
            Ok(())
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

fn fail(errno: c_int) -> Result<(), Errno> {
    Err(Errno(errno))
}

/// What the real connect just did: 0, or -1 with its errno.
fn connect_outcome(rc: c_int) -> Result<(), Errno> {
    if rc == 0 { Ok(()) } else { fail(sys::errno()) }
}

/// `connect` called again on a socket already redirected: the state of the local
/// connect while it is under way, then, for a non-blocking checked connect, the
/// gateway's answer (waiting for it if need be), once.
fn connect_again(state: &State, fd: c_int, earlier: Redirected) -> Result<(), Errno> {
    let rc = sys::real_connect(fd, earlier.listener);
    let errno = sys::errno();
    let under_way = rc != 0 && (errno == libc::EALREADY || errno == libc::EINPROGRESS);
    if !earlier.answer.untold() || under_way {
        return connect_outcome(rc);
    }
    match verdict_of(state, fd, earlier) {
        0 => {
            sys::set_errno(errno);
            connect_outcome(rc)
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

/// `getsockopt(SO_ERROR)`: the result of a non-blocking connect through the tunnel
/// whose answer the program has not learnt yet; anything else is the kernel's to
/// answer. `fits_an_int` says whether the program's buffer can take the answer;
/// `local_error` is what the kernel says of the connect to the agent. Errno is kept.
#[inline(always)]
pub fn connect_result(
    fd: c_int,
    fits_an_int: bool,
    local_error: impl FnOnce() -> c_int,
) -> Detour<c_int> {
    if !any_pending() {
        return Detour::Bypass(Bypass::NothingPending);
    }
    let Some(state) = state() else {
        return Detour::Bypass(Bypass::NoRoutes);
    };
    if !fits_an_int {
        return Detour::Bypass(Bypass::Unusable);
    }
    let saved = sys::errno();
    let result = catching(
        || pending_result(state, fd, local_error),
        Detour::Handled(libc::ECONNREFUSED),
    );
    sys::set_errno(saved);
    result
}

fn pending_result(state: &State, fd: c_int, local_error: impl FnOnce() -> c_int) -> Detour<c_int> {
    let Some(entry) = REDIRECTED.lock().get(&fd).copied() else {
        return Detour::Bypass(Bypass::NotRedirected);
    };
    if !entry.answer.untold() {
        return Detour::Bypass(Bypass::NothingPending);
    }
    if !is_same(fd, &entry) {
        // The fd was closed and its number reused.
        forget(fd);
        return Detour::Bypass(Bypass::NotRedirected);
    }
    match local_error() {
        // The local leg is up, or was up and the agent has reset it because the far
        // side refused: the gateway's answer says which.
        local @ (0 | libc::ECONNRESET) => match verdict_of(state, fd, entry) {
            0 => Detour::Handled(local),
            refused => Detour::Handled(refused),
        },
        local => {
            settle(fd);
            Detour::Handled(local)
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
fn any_pending() -> bool {
    PENDING.load(Ordering::Relaxed) != 0
}

/// `getpeername`: the destination a redirected socket was meant for; any other
/// socket's peer is the kernel's to tell.
pub fn peer_name(fd: c_int) -> Detour<SocketAddr> {
    if state().is_none() {
        return Detour::Bypass(Bypass::NoRoutes);
    }
    catching(|| original_peer(fd), Detour::Bypass(Bypass::Panicked))
}

fn original_peer(fd: c_int) -> Detour<SocketAddr> {
    let Some(entry) = REDIRECTED.lock().get(&fd).copied() else {
        return Detour::Bypass(Bypass::NotRedirected);
    };
    let still_ours = is_same(fd, &entry) && sys::real_peer_addr(fd) == Some(entry.listener);
    if still_ours {
        Detour::Handled(entry.destination)
    } else {
        forget(fd);
        Detour::Bypass(Bypass::NotRedirected)
    }
}

/// `getsockname` on a redirected socket whose gateway has a callback address: that
/// address (with the socket's own port), so that a program that advertises its own
/// address (FTP's `PORT`) advertises one the far side reaches.
pub fn own_name(fd: c_int) -> Detour<SocketAddr> {
    if state().is_none_or(|s| s.callbacks.is_empty()) {
        return Detour::Bypass(Bypass::NoRoutes);
    }
    catching(
        || {
            let Some(entry) = REDIRECTED.lock().get(&fd).copied() else {
                return Detour::Bypass(Bypass::NotRedirected);
            };
            // In the socket's own family (an address it cannot show stays the kernel's).
            let shown = entry
                .callback
                .filter(|_| is_same(fd, &entry))
                .and_then(|ip| {
                    crate::callback::in_family(
                        SocketAddr::new(ip, entry.source.port()),
                        entry.source,
                    )
                });
            shown.map_or(Detour::Bypass(Bypass::NotRedirected), Detour::Handled)
        },
        Detour::Bypass(Bypass::Panicked),
    )
}

#[cfg(test)]
mod tests {
    use tunnel_proto::Pattern;
    use tunnel_proto::routes::RouteTable;

    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn routes() -> IpRoutes {
        let table = RouteTable::parse("b=10.20.0.0/16").unwrap();
        IpRoutes::compile(&[Pattern::parse("198.18.0.0/15").unwrap()], &table)
    }

    #[test]
    fn connects_no_route_selects_go_to_the_real_connect() {
        let unrouted = Peek::V4(u32::from(Ipv4Addr::new(10, 21, 0, 1)), 80);
        let never_read = || panic!("the whole address is read for a routed connect only");
        assert_eq!(
            connect(&routes(), -1, unrouted, never_read),
            Detour::Bypass(Bypass::NotRouted)
        );
        assert_eq!(
            connect(&routes(), -1, Peek::Other, never_read),
            Detour::Bypass(Bypass::NotInternet)
        );
        let v6 = Peek::V6(u128::from(Ipv6Addr::LOCALHOST), 80);
        assert_eq!(
            connect(&routes(), -1, v6, never_read),
            Detour::Bypass(Bypass::NotRouted)
        );
    }

    #[test]
    fn a_routed_connect_needs_its_whole_address() {
        let routed = Peek::V4(u32::from(Ipv4Addr::new(10, 20, 0, 1)), 80);
        assert_eq!(
            connect(&routes(), -1, routed, || None),
            Detour::Failed(Errno(libc::EINVAL))
        );
        assert_eq!(
            connect(&routes(), -1, Peek::ShortV6, || None),
            Detour::Failed(Errno(libc::EINVAL))
        );
    }

    #[test]
    fn only_a_fast_open_send_connects() {
        let destination = "10.20.0.1:80".parse().ok();
        assert_eq!(
            fast_open(-1, 0, destination),
            Detour::Bypass(Bypass::NotFastOpen)
        );
    }
}
