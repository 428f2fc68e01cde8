//! The exported symbols, one file per concern. Each hook converts its raw arguments
//! into Rust values, asks one safe function what to do (a [`Detour`]), and turns the
//! answer into what C expects: the real function for a bypass, the result or the
//! error in the function's own convention otherwise. The safe functions catch their
//! own panics, so none unwinds into C.
//!
//! - [`connect`]: `connect`, and the sends that connect (`sendto`, `sendmsg`,
//!   `sendmmsg` with `MSG_FASTOPEN`);
//! - [`socket_state`]: what a program asks of a redirected socket afterwards
//!   (`getpeername`, `getsockopt(SO_ERROR)`);
//! - [`listen`]: listeners that live at the gateway (`bind`, `accept`, `accept4`,
//!   `getsockname`);
//! - [`names`]: the resolver (`getaddrinfo`, `getnameinfo`, `gethostbyname*`).
//!
//! [`Detour`]: crate::detour::Detour

use libc::c_int;

use crate::detour::Errno;
use crate::sys;

/// Calls the real function `$real` of type `$ty` with `$args`, or fails with ENOSYS
/// and returns `$fail` when there is none.
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

mod connect;
mod listen;
mod names;
mod socket_state;

/// A socket call's failure: -1 with errno set.
fn fail(errno: Errno) -> c_int {
    sys::set_errno(errno.0);
    -1
}
