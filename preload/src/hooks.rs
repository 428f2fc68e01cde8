//! The exported symbols. Each converts its raw arguments, asks safe code what to do,
//! and calls the real function for everything that is not ours. A panic is caught
//! here and becomes an error return: it never unwinds into C and never lets a routed
//! connection go direct.

use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::mem::{align_of, size_of};
use std::net::IpAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::null_mut;

use libc::{
    addrinfo, c_char, c_int, c_uint, c_void, hostent, mmsghdr, msghdr, size_t, sockaddr, socklen_t,
    ssize_t,
};

use crate::guard::Guard;
use crate::ip_routes::Via;
use crate::names::{self, Failure, Lookup};
use crate::redirect::{self, Decision};
use crate::state::state;
use crate::sys::{self, Peek};

/// Calls the real function `$real` of type `$ty` with `$args`, or fails with ENOSYS.
macro_rules! call_real {
    ($real:expr, $ty:ty, $fail:expr, $($arg:expr),*) => {{
        match $real.address() {
            0 => {
                sys::set_errno(libc::ENOSYS);
                $fail
            }
            // SAFETY: the symbol found is libc's function of exactly this type.
            f => unsafe { std::mem::transmute::<usize, $ty>(f)($($arg),*) },
        }
    }};
}

/// # Safety
/// As for `connect(2)`.
///
/// The pass-through path (no `TUNNEL_ROUTES`, or a destination no route selects) reads
/// the address, asks [`redirect::decide`] and calls the real `connect`: no system call,
/// no allocation, errno untouched. No re-entrancy guard is needed here: the redirect
/// connects only a Unix socket (passed through by family) and the program's socket
/// through the real function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // Every call below is in tail position: the pass-through path needs no frame.
    match crate::fast_routes::get() {
        // SAFETY: forwarded as given.
        Some(routes) => unsafe { route_or_pass(routes, fd, addr, len) },
        // SAFETY: forwarded as given.
        None => unsafe { connect_without_routes(fd, addr, len) },
    }
}

/// Looks the destination up in the routes: a routed connect goes out of line, any
/// other straight to the real connect.
///
/// # Safety
/// As for `connect(2)`.
#[inline(always)]
unsafe fn route_or_pass(
    routes: &'static crate::ip_routes::IpRoutes,
    fd: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> c_int {
    // SAFETY: the program vouches for addr/len as connect(2) requires.
    let via = match unsafe { sys::peek(addr, len) } {
        Peek::V4(address, port) => routes.lookup_v4(address, port),
        Peek::V6(address, port) => routes.lookup_v6(address, port),
        // SAFETY: as above.
        Peek::ShortV6 => return unsafe { connect_short_v6(fd, addr, len) },
        Peek::Other => None,
    };
    match via {
        // SAFETY: as above.
        Some(via) => unsafe { routed_connect(fd, addr, len, via) },
        // SAFETY: forwarded as given.
        None => unsafe { sys::real_connect_raw(fd, addr, len) },
    }
}

/// An IPv6 address of the old 24-byte length, which Linux accepts: decided again in
/// its whole form, so that it is routed like any other.
///
/// # Safety
/// As for `connect(2)`, with `len` ≥ 24.
#[cold]
#[inline(never)]
unsafe fn connect_short_v6(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the caller checked len ≥ 24.
    let whole = unsafe { sys::whole_sockaddr_in6(addr, len) };
    let whole_len = std::mem::size_of::<libc::sockaddr_in6>() as socklen_t;
    // SAFETY: `whole` is a complete sockaddr_in6.
    unsafe { connect(fd, (&raw const whole).cast(), whole_len) }
}

/// A program without routes (a stray `LD_PRELOAD`), or a connect made before the
/// library's constructor read the state (from another library's constructor).
///
/// # Safety
/// As for `connect(2)`.
#[inline(never)]
unsafe fn connect_without_routes(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let state = match crate::state::state_if_read() {
        Some(state) => state.as_ref(),
        None => crate::state::first_state(),
    };
    match state {
        // SAFETY: forwarded as given.
        Some(state) => unsafe { route_or_pass(&state.ip_routes, fd, addr, len) },
        // SAFETY: forwarded as given.
        None => unsafe { sys::real_connect_raw(fd, addr, len) },
    }
}

/// A connect that a route selected: out of line, so the pass-through path stays short.
///
/// # Safety
/// As for `connect(2)`.
#[cold]
#[inline(never)]
unsafe fn routed_connect(fd: c_int, addr: *const sockaddr, len: socklen_t, via: Via) -> c_int {
    let Some(state) = state() else {
        // Routes come from the state, so it is there; refuse rather than guess.
        sys::set_errno(libc::ECONNREFUSED);
        return -1;
    };
    // SAFETY: forwarded from connect.
    let Some(destination) = (unsafe { sys::from_raw(addr, len) }) else {
        sys::set_errno(libc::EINVAL);
        return -1;
    };
    let decision = match via {
        Via::Synthetic => redirect::decide_synthetic(names::route_for_synthetic(
            state,
            destination.ip(),
            destination.port(),
        )),
        other => redirect::decide(state, other),
    };
    match decision {
        Decision::Refuse(errno) => {
            sys::set_errno(errno);
            -1
        }
        Decision::Redirect { via, connect } => catch_unwind(AssertUnwindSafe(|| {
            redirect::redirect(state, fd, destination, via, connect)
        }))
        .unwrap_or_else(|_| {
            sys::set_errno(libc::ECONNREFUSED);
            -1
        }),
    }
}

/// What a Fast Open send (MSG_FASTOPEN with an address) does about its destination.
enum FastOpen {
    /// Not routed, or not a TCP socket: the real call, as the program made it.
    Direct,
    /// Routed, and the socket is now connected to the agent: send on it, without
    /// MSG_FASTOPEN (TCP ignores the address then).
    Connected,
    /// Routed, and the connect failed or is under way: -1, errno set (EINPROGRESS for
    /// a non-blocking socket, as a Fast Open without a cookie gives).
    Failed,
}

/// TCP Fast Open connects inside the send itself, with no `connect` call: a routed
/// destination is connected through the tunnel first, exactly as `connect` would be,
/// so that it never goes direct.
///
/// # Safety
/// `addr` must point to `len` readable bytes, as for `sendto(2)`.
#[cold]
#[inline(never)]
unsafe fn fast_open(fd: c_int, addr: *const sockaddr, len: socklen_t) -> FastOpen {
    let Some(state) = state() else {
        return FastOpen::Direct;
    };
    let routes = &state.ip_routes;
    // SAFETY: the program vouches for addr/len.
    let via = match unsafe { sys::peek(addr, len) } {
        Peek::V4(address, port) => routes.lookup_v4(address, port),
        Peek::V6(address, port) => routes.lookup_v6(address, port),
        Peek::ShortV6 => {
            // SAFETY: peek checked len ≥ 24.
            let whole = unsafe { sys::whole_sockaddr_in6(addr, len) };
            let whole_len = size_of::<libc::sockaddr_in6>() as socklen_t;
            // SAFETY: `whole` is a complete sockaddr_in6.
            return unsafe { fast_open(fd, (&raw const whole).cast(), whole_len) };
        }
        Peek::Other => None,
    };
    let Some(via) = via else {
        return FastOpen::Direct;
    };
    if sys::socket_type(fd) != Some(libc::SOCK_STREAM) {
        // A datagram socket ignores MSG_FASTOPEN; UDP is not carried.
        return FastOpen::Direct;
    }
    // SAFETY: forwarded from the caller.
    match unsafe { routed_connect(fd, addr, len, via) } {
        0 => FastOpen::Connected,
        _ => FastOpen::Failed,
    }
}

type SendtoFn = unsafe extern "C" fn(
    c_int,
    *const c_void,
    size_t,
    c_int,
    *const sockaddr,
    socklen_t,
) -> ssize_t;

/// # Safety
/// As for `sendto(2)`.
///
/// Passes every call through except a Fast Open to a routed destination (see
/// [`fast_open`]); the pass-through path tests one flag.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    addr_len: socklen_t,
) -> ssize_t {
    let real = |flags, addr, addr_len| {
        call_real!(
            sys::REAL_SENDTO,
            SendtoFn,
            -1,
            fd,
            buf,
            n,
            flags,
            addr,
            addr_len
        )
    };
    if flags & libc::MSG_FASTOPEN == 0 || addr.is_null() {
        return real(flags, addr, addr_len);
    }
    // SAFETY: the program vouches for addr/addr_len as sendto(2) requires.
    match unsafe { fast_open(fd, addr, addr_len) } {
        FastOpen::Direct => real(flags, addr, addr_len),
        FastOpen::Connected => real(flags & !libc::MSG_FASTOPEN, std::ptr::null(), 0),
        FastOpen::Failed => -1,
    }
}

/// The flags to send a message with, once a Fast Open from its address is dealt with
/// (see [`fast_open`]); `None` when the routed connect failed (errno set).
///
/// # Safety
/// `msg` is null or valid, as for `sendmsg(2)`.
#[inline(always)]
unsafe fn fast_open_message(fd: c_int, msg: *const msghdr, flags: c_int) -> Option<c_int> {
    if flags & libc::MSG_FASTOPEN == 0 || msg.is_null() {
        return Some(flags);
    }
    // SAFETY: the program vouches for msg as sendmsg(2) requires.
    let (name, name_len) = unsafe { ((*msg).msg_name, (*msg).msg_namelen) };
    if name.is_null() {
        return Some(flags);
    }
    // SAFETY: as above, for msg_name/msg_namelen.
    match unsafe { fast_open(fd, name.cast(), name_len) } {
        FastOpen::Direct => Some(flags),
        FastOpen::Connected => Some(flags & !libc::MSG_FASTOPEN),
        FastOpen::Failed => None,
    }
}

type SendmsgFn = unsafe extern "C" fn(c_int, *const msghdr, c_int) -> ssize_t;

/// # Safety
/// As for `sendmsg(2)`. A Fast Open to a routed destination as for [`sendto`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    // SAFETY: forwarded as given.
    match unsafe { fast_open_message(fd, msg, flags) } {
        Some(flags) => call_real!(sys::REAL_SENDMSG, SendmsgFn, -1, fd, msg, flags),
        None => -1,
    }
}

type SendmmsgFn = unsafe extern "C" fn(c_int, *mut mmsghdr, c_uint, c_int) -> c_int;

/// # Safety
/// As for `sendmmsg(2)`. The first message's address decides a Fast Open, as the
/// kernel's connect does.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmmsg(
    fd: c_int,
    messages: *mut mmsghdr,
    count: c_uint,
    flags: c_int,
) -> c_int {
    let first = if messages.is_null() || count == 0 {
        std::ptr::null()
    } else {
        // SAFETY: the program vouches for `count` (≥ 1) messages.
        unsafe { &raw const (*messages).msg_hdr }
    };
    // SAFETY: `first` is null or the program's first message.
    match unsafe { fast_open_message(fd, first, flags) } {
        Some(flags) => call_real!(
            sys::REAL_SENDMMSG,
            SendmmsgFn,
            -1,
            fd,
            messages,
            count,
            flags
        ),
        None => -1,
    }
}

type GetpeernameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;

/// # Safety
/// As for `getpeername(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let real = |addr, len| call_real!(sys::REAL_GETPEERNAME, GetpeernameFn, -1, fd, addr, len);
    let Some(_guard) = Guard::enter() else {
        return real(addr, len);
    };
    if state().is_none() || addr.is_null() || len.is_null() {
        return real(addr, len);
    }
    let original = catch_unwind(|| redirect::original_peer(fd)).ok().flatten();
    match original {
        Some(destination) => {
            // SAFETY: the program vouches for addr/len as getpeername(2) requires.
            unsafe { sys::write_raw(destination, addr, len) };
            0
        }
        None => real(addr, len),
    }
}

type GetsockoptFn = unsafe extern "C" fn(c_int, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int;

/// # Safety
/// As for `getsockopt(2)`.
///
/// `SO_ERROR` on a socket whose non-blocking connect went through the tunnel on a
/// checked route reports the far side's answer: 0 once the gateway reached the
/// destination, else `ECONNREFUSED`, `EACCES`, `ETIMEDOUT`, … as a direct connect
/// would. The program asks once the socket is writable, that is once the local leg is
/// up; the call then waits for the gateway's answer if it has not come yet. Every
/// other call passes through after two comparisons and one atomic load.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    let real = |value, len| {
        call_real!(
            sys::REAL_GETSOCKOPT,
            GetsockoptFn,
            -1,
            fd,
            level,
            name,
            value,
            len
        )
    };
    if level != libc::SOL_SOCKET || name != libc::SO_ERROR || !redirect::any_pending() {
        return real(value, len);
    }
    // SAFETY: the program vouches for value/len as getsockopt(2) requires.
    let room = unsafe { len.as_ref() }.copied().unwrap_or(0) as usize;
    let Some(state) = state() else {
        return real(value, len);
    };
    if value.is_null() || room < size_of::<c_int>() || value.align_offset(align_of::<c_int>()) != 0
    {
        return real(value, len);
    }
    let local_error = || {
        let mut local: c_int = 0;
        let mut local_len = size_of::<c_int>() as socklen_t;
        let rc = real((&raw mut local).cast(), &raw mut local_len);
        if rc == 0 { local } else { sys::errno() }
    };
    let saved = sys::errno();
    let result = catch_unwind(AssertUnwindSafe(|| {
        redirect::connect_result(state, fd, local_error)
    }))
    .unwrap_or(Some(libc::ECONNREFUSED));
    sys::set_errno(saved);
    match result {
        Some(errno) => {
            // SAFETY: value is aligned and has room for a c_int; len is valid (checked).
            unsafe {
                *value.cast::<c_int>() = errno;
                *len = size_of::<c_int>() as socklen_t;
            }
            0
        }
        None => real(value, len),
    }
}

type GetaddrinfoFn = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const addrinfo,
    *mut *mut addrinfo,
) -> c_int;

/// # Safety
/// As for `getaddrinfo(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const addrinfo,
    res: *mut *mut addrinfo,
) -> c_int {
    let real = |node, hints| {
        call_real!(
            sys::REAL_GETADDRINFO,
            GetaddrinfoFn,
            libc::EAI_SYSTEM,
            node,
            service,
            hints,
            res
        )
    };
    let Some(_guard) = Guard::enter() else {
        return real(node, hints);
    };
    let Some(state) = state() else {
        return real(node, hints);
    };
    // SAFETY: hints is null or points to an addrinfo, as getaddrinfo(3) requires.
    let flags = unsafe { hints.as_ref() }.map_or(0, |h| h.ai_flags);
    // AI_NUMERICHOST: only an address literal may answer, so the real function decides
    // (a name fails with EAI_NONAME there, routed or not).
    if node.is_null() || res.is_null() || flags & libc::AI_NUMERICHOST != 0 {
        return real(node, hints);
    }
    // SAFETY: node is a NUL-terminated string, as getaddrinfo(3) requires.
    let Ok(name) = unsafe { CStr::from_ptr(node) }.to_str() else {
        return real(node, hints);
    };
    let lookup =
        catch_unwind(|| names::lookup(state, name)).unwrap_or(Lookup::Fail(Failure::NoRecovery));
    let (v4, v6) = match lookup {
        Lookup::Passthrough => return real(node, hints),
        Lookup::Fail(Failure::TryAgain) => return libc::EAI_AGAIN,
        Lookup::Fail(Failure::NotFound) => return libc::EAI_NONAME,
        Lookup::Fail(Failure::NoRecovery) => return libc::EAI_FAIL,
        Lookup::Synthetic(v4, v6) => (v4, v6),
    };
    // SAFETY: hints is null or points to an addrinfo, as getaddrinfo(3) requires.
    let mut numeric: addrinfo = match unsafe { hints.as_ref() } {
        Some(h) => *h,
        // SAFETY: all-zero is a valid addrinfo (AF_UNSPEC, no flags).
        None => unsafe { std::mem::zeroed() },
    };
    let family = numeric.ai_family;
    let want_canonical = numeric.ai_flags & libc::AI_CANONNAME != 0;
    // Let the real getaddrinfo build the list for the synthetic address, so services,
    // socket types and memory layout are exactly what freeaddrinfo expects.
    numeric.ai_flags = (numeric.ai_flags | libc::AI_NUMERICHOST) & !libc::AI_ADDRCONFIG;
    let addresses: Vec<IpAddr> = match family {
        libc::AF_INET => vec![v4.into()],
        libc::AF_INET6 => vec![v6.into()],
        _ => vec![v4.into(), v6.into()],
    };
    let mut head: *mut addrinfo = null_mut();
    let mut tail: *mut addrinfo = null_mut();
    for ip in addresses {
        numeric.ai_family = if ip.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let Ok(text) = CString::new(ip.to_string()) else {
            continue;
        };
        let mut part: *mut addrinfo = null_mut();
        let rc = call_real!(
            sys::REAL_GETADDRINFO,
            GetaddrinfoFn,
            libc::EAI_SYSTEM,
            text.as_ptr(),
            service,
            &numeric,
            &mut part
        );
        if rc != 0 {
            if !head.is_null() {
                // SAFETY: head is a list getaddrinfo made.
                unsafe { libc::freeaddrinfo(head) };
            }
            return rc;
        }
        if head.is_null() {
            head = part;
        } else {
            // SAFETY: tail is the last node of our list; part a fresh list.
            unsafe { (*tail).ai_next = part };
        }
        tail = part;
        // SAFETY: walking a list getaddrinfo made.
        while !unsafe { (*tail).ai_next }.is_null() {
            // SAFETY: as above; the node is not the last.
            tail = unsafe { (*tail).ai_next };
        }
    }
    if head.is_null() {
        return libc::EAI_NONAME;
    }
    if want_canonical {
        // SAFETY: head is a node getaddrinfo made; its canonname came from malloc.
        unsafe {
            libc::free((*head).ai_canonname.cast());
            (*head).ai_canonname = libc::strdup(node);
        }
    }
    // SAFETY: res is a valid out-pointer (checked non-null).
    unsafe { *res = head };
    0
}

type GetnameinfoFn = unsafe extern "C" fn(
    *const sockaddr,
    socklen_t,
    *mut c_char,
    socklen_t,
    *mut c_char,
    socklen_t,
    c_int,
) -> c_int;

/// # Safety
/// As for `getnameinfo(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getnameinfo(
    sa: *const sockaddr,
    salen: socklen_t,
    host: *mut c_char,
    hostlen: socklen_t,
    serv: *mut c_char,
    servlen: socklen_t,
    flags: c_int,
) -> c_int {
    let real = |host, hostlen| {
        call_real!(
            sys::REAL_GETNAMEINFO,
            GetnameinfoFn,
            libc::EAI_SYSTEM,
            sa,
            salen,
            host,
            hostlen,
            serv,
            servlen,
            flags
        )
    };
    let Some(_guard) = Guard::enter() else {
        return real(host, hostlen);
    };
    let Some(state) = state() else {
        return real(host, hostlen);
    };
    if host.is_null() || hostlen == 0 || flags & libc::NI_NUMERICHOST != 0 {
        return real(host, hostlen);
    }
    // SAFETY: sa/salen as getnameinfo(3) requires.
    let Some(address) = (unsafe { sys::from_raw(sa, salen) }) else {
        return real(host, hostlen);
    };
    let Some(name) = catch_unwind(|| names::name_of(state, address.ip()))
        .ok()
        .flatten()
    else {
        return real(host, hostlen);
    };
    if name.len() + 1 > hostlen as usize {
        return libc::EAI_OVERFLOW;
    }
    // SAFETY: host has hostlen bytes, more than the name and its NUL.
    unsafe {
        std::ptr::copy_nonoverlapping(name.as_ptr(), host.cast::<u8>(), name.len());
        *host.add(name.len()) = 0;
    }
    if serv.is_null() || servlen == 0 {
        0
    } else {
        real(null_mut(), 0)
    }
}

type GethostbynameFn = unsafe extern "C" fn(*const c_char) -> *mut hostent;
type Gethostbyname2Fn = unsafe extern "C" fn(*const c_char, c_int) -> *mut hostent;
type Gethostbyname2RFn = unsafe extern "C" fn(
    *const c_char,
    c_int,
    *mut hostent,
    *mut c_char,
    size_t,
    *mut *mut hostent,
    *mut c_int,
) -> c_int;

/// What the gethostbyname family should do with a name.
enum HostLookup {
    Real,
    Answer(IpAddr, String),
    /// No address: `h_errno` says why.
    Fail(c_int),
}

fn host_lookup(name: *const c_char, family: c_int) -> HostLookup {
    let Some(state) = state() else {
        return HostLookup::Real;
    };
    if name.is_null() || !(family == libc::AF_INET || family == libc::AF_INET6) {
        return HostLookup::Real;
    }
    // SAFETY: a NUL-terminated string, as gethostbyname(3) requires.
    let Ok(text) = unsafe { CStr::from_ptr(name) }.to_str() else {
        return HostLookup::Real;
    };
    match catch_unwind(|| names::lookup(state, text)).unwrap_or(Lookup::Fail(Failure::NoRecovery)) {
        Lookup::Passthrough => HostLookup::Real,
        Lookup::Fail(Failure::TryAgain) => HostLookup::Fail(TRY_AGAIN),
        Lookup::Fail(Failure::NotFound) => HostLookup::Fail(HOST_NOT_FOUND),
        Lookup::Fail(Failure::NoRecovery) => HostLookup::Fail(NO_RECOVERY),
        Lookup::Synthetic(v4, _) if family == libc::AF_INET => {
            HostLookup::Answer(v4.into(), text.to_string())
        }
        Lookup::Synthetic(_, v6) if family == libc::AF_INET6 => {
            HostLookup::Answer(v6.into(), text.to_string())
        }
        Lookup::Synthetic(..) => HostLookup::Fail(HOST_NOT_FOUND),
    }
}

/// Lays a hostent's data out in `buf`: aliases (none), the address list (one), the
/// address, the name. Returns false when `buf` is too small.
///
/// # Safety
/// `buf` must point to `buflen` writable bytes and `out` to a hostent.
unsafe fn fill_hostent(
    ip: IpAddr,
    name: &str,
    out: *mut hostent,
    buf: *mut c_char,
    buflen: usize,
) -> bool {
    let ptr = size_of::<*mut c_char>();
    let start = buf.align_offset(align_of::<*mut c_char>());
    let address: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let aliases_at = start;
    let list_at = aliases_at + ptr;
    let address_at = list_at + 2 * ptr;
    let name_at = address_at + address.len();
    if start == usize::MAX || name_at + name.len() + 1 > buflen {
        return false;
    }
    // SAFETY: every offset written below is inside buf (checked above) and the
    // pointer-sized ones are aligned (start is aligned, ptr-sized steps).
    unsafe {
        let aliases = buf.add(aliases_at).cast::<*mut c_char>();
        *aliases = null_mut();
        let list = buf.add(list_at).cast::<*mut c_char>();
        let address_ptr = buf.add(address_at);
        std::ptr::copy_nonoverlapping(address.as_ptr(), address_ptr.cast::<u8>(), address.len());
        *list = address_ptr;
        *list.add(1) = null_mut();
        let name_ptr = buf.add(name_at);
        std::ptr::copy_nonoverlapping(name.as_ptr(), name_ptr.cast::<u8>(), name.len());
        *name_ptr.add(name.len()) = 0;
        (*out).h_name = name_ptr;
        (*out).h_aliases = aliases;
        (*out).h_addrtype = if ip.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        (*out).h_length = address.len() as c_int;
        (*out).h_addr_list = list;
    }
    true
}

// <netdb.h>'s h_errno values, which the libc crate does not define.
const NETDB_INTERNAL: c_int = -1;
const HOST_NOT_FOUND: c_int = 1;
const TRY_AGAIN: c_int = 2;
const NO_RECOVERY: c_int = 3;

/// The reentrant form both `_r` hooks share.
///
/// # Safety
/// As for `gethostbyname2_r(3)`.
unsafe fn lookup_r(
    name: *const c_char,
    family: c_int,
    ret: *mut hostent,
    buf: *mut c_char,
    buflen: size_t,
    result: *mut *mut hostent,
    h_errnop: *mut c_int,
) -> Option<c_int> {
    let answer = host_lookup(name, family);
    let set = |value: c_int| {
        if !h_errnop.is_null() {
            // SAFETY: a valid out-pointer when not null.
            unsafe { *h_errnop = value };
        }
    };
    // SAFETY: result is a valid out-pointer, as gethostbyname_r(3) requires.
    let set_result = |value: *mut hostent| unsafe {
        if !result.is_null() {
            *result = value;
        }
    };
    // The return values are glibc's: 0 for a name that does not exist, EAGAIN for a
    // temporary failure, ERANGE (h_errno NETDB_INTERNAL) for a buffer too small.
    let rc = match answer {
        HostLookup::Real => return None,
        HostLookup::Fail(h_errno) => {
            set(h_errno);
            set_result(null_mut());
            match h_errno {
                HOST_NOT_FOUND => 0,
                TRY_AGAIN => libc::EAGAIN,
                _ => libc::ENOENT,
            }
        }
        HostLookup::Answer(ip, text) => {
            // SAFETY: buf/buflen/ret as the caller gave them.
            if unsafe { fill_hostent(ip, &text, ret, buf, buflen) } {
                set(0);
                set_result(ret);
                0
            } else {
                set(NETDB_INTERNAL);
                set_result(null_mut());
                libc::ERANGE
            }
        }
    };
    if rc != 0 {
        sys::set_errno(rc);
    }
    Some(rc)
}

/// # Safety
/// As for `gethostbyname_r(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname_r(
    name: *const c_char,
    ret: *mut hostent,
    buf: *mut c_char,
    buflen: size_t,
    result: *mut *mut hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // The IPv4 case of gethostbyname2_r, in glibc as here.
    // SAFETY: forwarded as given.
    unsafe { gethostbyname2_r(name, libc::AF_INET, ret, buf, buflen, result, h_errnop) }
}

/// # Safety
/// As for `gethostbyname2_r(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname2_r(
    name: *const c_char,
    family: c_int,
    ret: *mut hostent,
    buf: *mut c_char,
    buflen: size_t,
    result: *mut *mut hostent,
    h_errnop: *mut c_int,
) -> c_int {
    if let Some(_guard) = Guard::enter() {
        // SAFETY: forwarded as given.
        if let Some(rc) = unsafe { lookup_r(name, family, ret, buf, buflen, result, h_errnop) } {
            return rc;
        }
    }
    call_real!(
        sys::REAL_GETHOSTBYNAME2_R,
        Gethostbyname2RFn,
        libc::ENOSYS,
        name,
        family,
        ret,
        buf,
        buflen,
        result,
        h_errnop
    )
}

/// Per-thread storage for the non-reentrant forms (glibc keeps one per process).
struct HostStorage {
    entry: hostent,
    buffer: [c_char; 1024],
}

thread_local! {
    static HOST_STORAGE: RefCell<Option<Box<HostStorage>>> = const { RefCell::new(None) };
}

fn static_lookup(name: *const c_char, family: c_int) -> Option<*mut hostent> {
    let answer = host_lookup(name, family);
    match answer {
        HostLookup::Real => None,
        HostLookup::Fail(h_errno) => {
            sys::set_h_errno(h_errno);
            Some(null_mut())
        }
        HostLookup::Answer(ip, text) => HOST_STORAGE
            .try_with(|cell| {
                let mut slot = cell.borrow_mut();
                let storage = slot.get_or_insert_with(|| {
                    Box::new(HostStorage {
                        // SAFETY: all-zero is a valid hostent (null pointers).
                        entry: unsafe { std::mem::zeroed() },
                        buffer: [0; 1024],
                    })
                });
                let entry: *mut hostent = &mut storage.entry;
                let buffer = storage.buffer.as_mut_ptr();
                // SAFETY: buffer has 1024 bytes; entry is a valid hostent.
                let ok = unsafe { fill_hostent(ip, &text, entry, buffer, 1024) };
                if ok {
                    entry
                } else {
                    sys::set_h_errno(NO_RECOVERY);
                    null_mut()
                }
            })
            .ok(),
    }
}

/// # Safety
/// As for `gethostbyname(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname(name: *const c_char) -> *mut hostent {
    if let Some(answer) = Guard::enter().and_then(|_guard| static_lookup(name, libc::AF_INET)) {
        return answer;
    }
    call_real!(sys::REAL_GETHOSTBYNAME, GethostbynameFn, null_mut(), name)
}

/// # Safety
/// As for `gethostbyname2(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname2(name: *const c_char, family: c_int) -> *mut hostent {
    if let Some(answer) = Guard::enter().and_then(|_guard| static_lookup(name, family)) {
        return answer;
    }
    call_real!(
        sys::REAL_GETHOSTBYNAME2,
        Gethostbyname2Fn,
        null_mut(),
        name,
        family
    )
}
