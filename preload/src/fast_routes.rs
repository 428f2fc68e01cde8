//! The one pointer `connect` reads on every call: the compiled routes, published once
//! the environment is read. A plain atomic pointer rather than a `OnceLock`, so that
//! the pass-through path is one load and one test.

use std::sync::atomic::{AtomicPtr, Ordering};

use crate::ip_routes::IpRoutes;

/// Null before the environment is read, and for a program without `TUNNEL_ROUTES`.
static FAST_ROUTES: AtomicPtr<IpRoutes> = AtomicPtr::new(std::ptr::null_mut());

/// Makes `routes` the ones `connect` checks.
pub fn publish(routes: &'static IpRoutes) {
    FAST_ROUTES.store(std::ptr::from_ref(routes).cast_mut(), Ordering::Release);
}

/// The routes `connect` checks, once published.
#[inline(always)]
pub fn get() -> Option<&'static IpRoutes> {
    // SAFETY: the pointer is null or was stored by `publish` from a `&'static
    // IpRoutes`, so it points to routes that live, unchanged, as long as the process;
    // nothing writes through it (`cast_mut` only fits AtomicPtr's type).
    unsafe { FAST_ROUTES.load(Ordering::Acquire).as_ref() }
}
