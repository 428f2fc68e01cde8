//! What a hook's safe half decides, in one type for every hook: the call is handled
//! here, or it is not the library's business and goes to the real function (with the
//! reason, for the debug trace and the tests), or it is handled here and fails.
//!
//! ```text
//!  hook (unsafe, hooks/)            safe decision (redirect, names)
//!  raw arguments ── converted ──▶   Detour::Handled(value)  ─▶ the C result
//!                                   Detour::Bypass(reason)  ─▶ the real function
//!                                   Detour::Failed(error)   ─▶ -1 and errno, or the
//!                                                              function's own code
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};

use libc::c_int;

/// An `errno` value: how a socket call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub c_int);

/// The outcome of a hooked call. `E` is how the call reports failure: an errno for the
/// socket calls, a lookup failure for the resolver ones.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detour<T, E = Errno> {
    /// Done here: the hook returns this.
    Handled(T),
    /// Not the library's to handle: the real function runs with the program's
    /// arguments, as if the library were not there.
    Bypass(Bypass),
    /// Handled here, and failed: never passed to the real function.
    Failed(E),
}

/// Why a call went to the real function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// No `TUNNEL_ROUTES`: the library changes nothing.
    NoRoutes,
    /// A hook is at work on this thread already: this call is the library's own.
    Reentrant,
    /// No route selects the destination or the name.
    NotRouted,
    /// An address, not a name: nothing to look up.
    AddressLiteral,
    /// No name given (`getaddrinfo` for a service alone, a null name).
    NoName,
    /// A numeric-only request (`AI_NUMERICHOST`, `NI_NUMERICHOST`).
    NumericOnly,
    /// Not an Internet address, or an address family the call does not cover.
    NotInternet,
    /// Not a TCP socket: only TCP is carried.
    NotStream,
    /// A send without `MSG_FASTOPEN`: it connects nothing.
    NotFastOpen,
    /// A socket option other than `SO_ERROR`.
    OtherOption,
    /// No non-blocking connect through the tunnel waits for its answer on this socket.
    NothingPending,
    /// The socket was not redirected, or no longer is (its fd number was reused).
    NotRedirected,
    /// Not an address the agent handed out, or one it no longer names.
    NotSynthetic,
    /// An argument the library cannot use (a null pointer, no room for the answer, a
    /// name that is not UTF-8): the real function reports on it as it always does.
    Unusable,
    /// The library's code panicked where the real function is the safe answer.
    Panicked,
}

impl<T, E> Detour<T, E> {
    /// The handled value changed by `f`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Detour<U, E> {
        match self {
            Detour::Handled(value) => Detour::Handled(f(value)),
            Detour::Bypass(reason) => Detour::Bypass(reason),
            Detour::Failed(error) => Detour::Failed(error),
        }
    }
}

/// Runs `decide`; if it panics, the answer is `on_panic`. A panic never unwinds into
/// C, and never turns a routed call into a direct one unless `on_panic` says so.
pub fn catching<R>(decide: impl FnOnce() -> R, on_panic: R) -> R {
    catch_unwind(AssertUnwindSafe(decide)).unwrap_or(on_panic)
}

impl<T, E> From<Result<T, E>> for Detour<T, E> {
    fn from(result: Result<T, E>) -> Detour<T, E> {
        match result {
            Ok(value) => Detour::Handled(value),
            Err(error) => Detour::Failed(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_the_given_answer() {
        let refused: Detour<(), Errno> = Detour::Failed(Errno(libc::ECONNREFUSED));
        let decided = catching(|| panic!("a bug"), refused.clone());
        assert_eq!(decided, refused);
        let fine = catching(|| Detour::Handled(7), Detour::Bypass(Bypass::Panicked));
        assert_eq!(fine, Detour::<i32>::Handled(7));
    }

    #[test]
    fn map_changes_only_the_handled_value() {
        assert_eq!(Detour::<u8>::Handled(2).map(|v| v * 2), Detour::Handled(4));
        assert_eq!(
            Detour::<u8>::Bypass(Bypass::NotRouted).map(|v| v * 2),
            Detour::Bypass(Bypass::NotRouted)
        );
        assert_eq!(
            Detour::<u8>::Failed(Errno(1)).map(|v| v * 2),
            Detour::Failed(Errno(1))
        );
        assert_eq!(
            Detour::from(Err::<u8, _>(Errno(3))),
            Detour::Failed(Errno(3))
        );
    }
}
