//! What every listener of both daemons shares: one shutdown handle, and one accept loop
//! that stops when it fires and backs off when the process runs out of descriptors.
//!
//! ```text
//!  Shutdown::new() ──▶ (ShutdownTrigger, Shutdown) ── clone per task
//!  accept_until(listener, shutdown): accept ─ok─▶ handle(conn)
//!                                      │ EMFILE/ENFILE/ENOBUFS/ENOMEM: pause 10 ms … 1 s,
//!                                      │   one warning per episode (never a busy loop)
//!                                      │ other errors (the peer gave up): next accept
//!                                      └ shutdown fired: return (the listener is dropped)
//! ```

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Pauses after an accept failed for want of resources: doubling from the first to
/// the last.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// Fires the daemon's shutdown, once, for every [`Shutdown`] cloned from its pair.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Tells a task that the daemon is stopping.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Returns once the shutdown has fired (at once if it has).
    pub async fn fired(&mut self) {
        // An error means the trigger is gone, which only happens as the daemon ends.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    pub fn has_fired(&self) -> bool {
        *self.0.borrow()
    }
}

impl ShutdownTrigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

/// True for accept failures that say the process or the system is out of something
/// (descriptors, buffers): accepting again at once would fail again at once.
fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

/// Linux errno values (this crate has no libc dependency).
mod libc_errno {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOBUFS: i32 = 105;
}

/// Accepts with `accept` and hands each connection to `handle` until `shutdown` fires.
/// `what` names the listener in logs (e.g. "forward 127.0.0.1:15432").
pub async fn accept_until<C, F>(
    what: &str,
    mut shutdown: Shutdown,
    mut accept: impl FnMut() -> F,
    mut handle: impl FnMut(C),
) where
    F: Future<Output = io::Result<C>>,
{
    let mut pause = FIRST_PAUSE;
    let mut starved = false;
    loop {
        let accepted = tokio::select! {
            accepted = accept() => accepted,
            () = shutdown.fired() => return,
        };
        match accepted {
            Ok(connection) => {
                if starved {
                    info!("{what}: accepting again");
                    starved = false;
                    pause = FIRST_PAUSE;
                }
                handle(connection);
            }
            Err(e) if out_of_resources(&e) => {
                if !starved {
                    warn!("{what}: cannot accept ({e}); pausing until descriptors are free");
                    starved = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.fired() => return,
                }
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
            // The peer reset before we took it, and the like: only that one is lost.
            Err(e) => debug!("{what}: accept failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn out_of_descriptors_pauses_instead_of_spinning_and_shutdown_ends_it() {
        let (trigger, shutdown) = Shutdown::new();
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = attempts.clone();
        let task = tokio::spawn(accept_until(
            "test",
            shutdown,
            move || {
                counted.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Err::<(), _>(io::Error::from_raw_os_error(
                    libc_errno::EMFILE,
                )))
            },
            |()| {},
        ));
        tokio::time::sleep(Duration::from_secs(10)).await;
        // 10 ms, 20, 40 … up to 1 s each: a dozen or so tries in 10 s, not millions.
        let tried = attempts.load(Ordering::Relaxed);
        assert!((5..=20).contains(&tried), "{tried} accepts in 10 s");
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the loop ends on shutdown")
            .expect("no panic");
    }

    #[tokio::test]
    async fn connections_are_handed_over_until_shutdown() {
        let (trigger, shutdown) = Shutdown::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut next = 0;
        let task = tokio::spawn(accept_until(
            "test",
            shutdown,
            move || {
                next += 1;
                let n = next;
                async move {
                    tokio::task::yield_now().await;
                    Ok(n)
                }
            },
            move |n: i32| {
                let _ = tx.send(n);
            },
        ));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        trigger.fire();
        task.await.expect("ends");
    }
}
