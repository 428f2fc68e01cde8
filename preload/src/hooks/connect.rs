//! `connect`, and the sends that connect: `sendto`, `sendmsg` and `sendmmsg` with
//! `MSG_FASTOPEN` and an address (TCP Fast Open connects inside the send itself, with
//! no `connect` call, so a routed destination is connected through the tunnel first,
//! exactly as `connect` would be, and never goes direct).

use std::net::SocketAddr;

use libc::{c_int, c_uint, c_void, mmsghdr, msghdr, size_t, sockaddr, socklen_t, ssize_t};

use super::fail;
use crate::detour::Detour;
use crate::ip_routes::IpRoutes;
use crate::redirect;
use crate::sys;

/// # Safety
/// As for `connect(2)`.
///
/// The pass-through path (no `TUNNEL_ROUTES`, or a destination no route selects) reads
/// the address, asks [`redirect::connect`] and calls the real `connect`: no system
/// call, no allocation, errno untouched. No re-entrancy guard is needed here: the
/// redirect connects only a Unix socket (passed through by family) and the program's
/// socket through the real function.
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

/// Reads the destination and asks [`redirect::connect`]: a routed connect is done out
/// of line, any other goes straight to the real connect.
///
/// # Safety
/// As for `connect(2)`.
#[inline(always)]
unsafe fn route_or_pass(
    routes: &'static IpRoutes,
    fd: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> c_int {
    // SAFETY: the program vouches for addr/len as connect(2) requires.
    let destination = unsafe { sys::peek(addr, len) };
    // SAFETY: as above.
    let whole = move || unsafe { sys::from_raw(addr, len) };
    match redirect::connect(routes, fd, destination, whole) {
        // SAFETY: forwarded as given.
        Detour::Bypass(_) => unsafe { sys::real_connect_raw(fd, addr, len) },
        Detour::Handled(()) => 0,
        Detour::Failed(errno) => fail(errno),
    }
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

/// The destination of a send, read only when the send may connect (`MSG_FASTOPEN`).
///
/// # Safety
/// `addr` is null or points to `len` readable bytes, as for `sendto(2)`.
#[inline(always)]
unsafe fn fast_open_destination(
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> Option<SocketAddr> {
    if flags & libc::MSG_FASTOPEN == 0 {
        return None;
    }
    // SAFETY: as the caller vouches.
    unsafe { sys::from_raw(addr, len) }
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
/// [`redirect::fast_open`]), which is sent, without `MSG_FASTOPEN`, on the socket
/// once it is connected through the tunnel (TCP ignores the address then). The
/// pass-through path tests one flag.
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
    // SAFETY: the program vouches for addr/addr_len as sendto(2) requires.
    let destination = unsafe { fast_open_destination(flags, addr, addr_len) };
    match redirect::fast_open(fd, flags, destination) {
        Detour::Bypass(_) => real(flags, addr, addr_len),
        Detour::Handled(()) => real(flags & !libc::MSG_FASTOPEN, std::ptr::null(), 0),
        Detour::Failed(errno) => fail(errno) as ssize_t,
    }
}

/// The flags to send a message with, once a Fast Open from its address is dealt with
/// (see [`redirect::fast_open`]); `None` when the routed connect failed (errno set,
/// EINPROGRESS for a non-blocking socket, as a Fast Open without a cookie gives).
///
/// # Safety
/// `msg` is null or valid, as for `sendmsg(2)`.
#[inline(always)]
unsafe fn fast_open_message(fd: c_int, msg: *const msghdr, flags: c_int) -> Option<c_int> {
    // The message is read only when the send may connect.
    let destination = if flags & libc::MSG_FASTOPEN == 0 || msg.is_null() {
        None
    } else {
        // SAFETY: the program vouches for msg as sendmsg(2) requires.
        let (name, name_len) = unsafe { ((*msg).msg_name, (*msg).msg_namelen) };
        // SAFETY: as above, for msg_name/msg_namelen.
        unsafe { fast_open_destination(flags, name.cast(), name_len) }
    };
    match redirect::fast_open(fd, flags, destination) {
        Detour::Bypass(_) => Some(flags),
        Detour::Handled(()) => Some(flags & !libc::MSG_FASTOPEN),
        Detour::Failed(errno) => {
            fail(errno);
            None
        }
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
