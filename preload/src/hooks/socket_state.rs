//! What a program asks of a socket once it is redirected: its peer (`getpeername`
//! shows the destination the program chose, not the agent) and the result of its
//! non-blocking connect (`getsockopt(SO_ERROR)` reports the far side's answer).

use std::mem::{align_of, size_of};

use libc::{c_int, c_void, sockaddr, socklen_t};

use super::fail;
use crate::detour::{Bypass, Detour};
use crate::guard::Guard;
use crate::redirect;
use crate::sys;

type GetpeernameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;

/// # Safety
/// As for `getpeername(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let real = |addr, len| call_real!(sys::REAL_GETPEERNAME, GetpeernameFn, -1, fd, addr, len);
    // Held through the real call too: nothing it does is the program's own.
    let guard = Guard::enter();
    let detour = match guard {
        None => Detour::Bypass(Bypass::Reentrant),
        Some(_) if addr.is_null() || len.is_null() => Detour::Bypass(Bypass::Unusable),
        Some(_) => match redirect::peer_name(fd) {
            Detour::Bypass(_) => crate::callback::peer_name(fd),
            redirected => redirected,
        },
    };
    match detour {
        Detour::Bypass(_) => real(addr, len),
        Detour::Handled(destination) => {
            // SAFETY: the program vouches for addr/len as getpeername(2) requires.
            unsafe { sys::write_raw(destination, addr, len) };
            0
        }
        Detour::Failed(errno) => fail(errno),
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
    let detour = if level == libc::SOL_SOCKET && name == libc::SO_ERROR {
        // SAFETY: the program vouches for value/len as getsockopt(2) requires.
        let room = unsafe { len.as_ref() }.copied().unwrap_or(0) as usize;
        let fits_an_int = !value.is_null()
            && room >= size_of::<c_int>()
            && value.align_offset(align_of::<c_int>()) == 0;
        // What the kernel says of the connect to the agent.
        let local_error = || {
            let mut local: c_int = 0;
            let mut local_len = size_of::<c_int>() as socklen_t;
            let rc = real((&raw mut local).cast(), &raw mut local_len);
            if rc == 0 { local } else { sys::errno() }
        };
        redirect::connect_result(fd, fits_an_int, local_error)
    } else {
        Detour::Bypass(Bypass::OtherOption)
    };
    match detour {
        Detour::Bypass(_) => real(value, len),
        Detour::Handled(error) => {
            // SAFETY: value is aligned and has room for a c_int, len is valid (both
            // checked for `fits_an_int`).
            unsafe {
                *value.cast::<c_int>() = error;
                *len = size_of::<c_int>() as socklen_t;
            }
            0
        }
        Detour::Failed(errno) => fail(errno),
    }
}
