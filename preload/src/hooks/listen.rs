//! Listeners that live at the gateway: `bind` on a callback port opens the listener
//! there; `accept`, `accept4` and `getsockname` then show the far side's view (see
//! `callback.rs`). With no `TUNNEL_CALLBACKS`, `bind` costs one load and a comparison,
//! and the others one load each after the real call.

use libc::{c_int, sockaddr, socklen_t};

use super::fail;
use crate::callback;
use crate::detour::{Bypass, Detour};
use crate::guard::Guard;
use crate::redirect;
use crate::sys;

type BindFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type AcceptFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
type Accept4Fn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int;
type GetsocknameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;

/// # Safety
/// As for `bind(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let real = || call_real!(sys::REAL_BIND, BindFn, -1, fd, addr, len);
    // Held through the real call too: nothing it does is the program's own.
    let Some(_guard) = Guard::enter() else {
        return real();
    };
    let asked = if addr.is_null() {
        None
    } else {
        // SAFETY: the program vouches for addr/len as bind(2) requires.
        unsafe { sys::from_raw(addr, len) }
    };
    match callback::bind(fd, asked, real) {
        Detour::Handled(()) => 0,
        Detour::Bypass(_) => real(),
        Detour::Failed(errno) => fail(errno),
    }
}

/// After the real accept: the far peer of a connection to a callback listener.
///
/// # Safety
/// `addr`/`len` as the program passed them to accept(2).
unsafe fn after_accept(
    listener: c_int,
    accepted: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> c_int {
    if accepted < 0 || !callback::any() {
        return accepted;
    }
    let Some(_guard) = Guard::enter() else {
        return accepted;
    };
    let saved = sys::errno();
    if let Some(far) = callback::accepted(listener, accepted)
        && !addr.is_null()
        && !len.is_null()
    {
        // SAFETY: the program vouches for addr/len as accept(2) requires.
        unsafe { sys::write_raw(far, addr, len) };
    }
    sys::set_errno(saved);
    accepted
}

/// # Safety
/// As for `accept(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let accepted = call_real!(sys::REAL_ACCEPT, AcceptFn, -1, fd, addr, len);
    // SAFETY: addr/len are the program's, as accept(2) took them.
    unsafe { after_accept(fd, accepted, addr, len) }
}

/// # Safety
/// As for `accept4(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    let accepted = call_real!(sys::REAL_ACCEPT4, Accept4Fn, -1, fd, addr, len, flags);
    // SAFETY: addr/len are the program's, as accept4(2) took them.
    unsafe { after_accept(fd, accepted, addr, len) }
}

/// # Safety
/// As for `getsockname(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let real = |addr, len| call_real!(sys::REAL_GETSOCKNAME, GetsocknameFn, -1, fd, addr, len);
    let guard = Guard::enter();
    let detour = match guard {
        None => Detour::Bypass(Bypass::Reentrant),
        Some(_) if addr.is_null() || len.is_null() => Detour::Bypass(Bypass::Unusable),
        Some(_) => match callback::own_name(fd) {
            Detour::Bypass(_) => redirect::own_name(fd),
            listener => listener,
        },
    };
    match detour {
        Detour::Bypass(_) => real(addr, len),
        Detour::Handled(own) => {
            // SAFETY: the program vouches for addr/len as getsockname(2) requires.
            unsafe { sys::write_raw(own, addr, len) };
            0
        }
        Detour::Failed(errno) => fail(errno),
    }
}
