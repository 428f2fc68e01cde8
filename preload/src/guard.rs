//! A thread-local re-entrancy guard: while a hook runs, the libc calls it makes (the
//! agent's Unix socket connect, name lookups) go straight to the real functions.

use std::cell::Cell;

thread_local! {
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Held while a hook is at work on this thread.
pub struct Guard(());

impl Guard {
    /// `None` when a hook is already at work on this thread (or the thread is being
    /// torn down), so the caller must pass straight through.
    pub fn enter() -> Option<Guard> {
        BUSY.try_with(|busy| {
            if busy.get() {
                None
            } else {
                busy.set(true);
                Some(Guard(()))
            }
        })
        .ok()
        .flatten()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = BUSY.try_with(|busy| busy.set(false));
    }
}
