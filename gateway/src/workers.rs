//! One single-threaded runtime per core, each owning whole agent connections.
//!
//! An agent connection is one TLS stream and one HTTP/2 connection; every CONNECT
//! stream on it is spliced by tasks that talk to that connection's task. On a
//! work-stealing runtime those tasks land on different threads, and each hand-off
//! between them is a futex wake-up of another thread — on the round-trip and
//! new-connection paths, several per stream. Here a connection and all its streams
//! stay on the worker that accepted them: the hand-offs are function calls, and the
//! cores still share the load, a connection at a time (measured with tunnel-bench:
//! ~20% less gateway CPU per new stream, and a shorter round trip).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use anyhow::{Context, Result};
use tokio::runtime::Handle;
use tunnel_transport::counted::Counted;

struct Worker {
    handle: Handle,
    /// Connections this worker carries now: a new one goes to the least busy.
    load: Arc<AtomicUsize>,
}

pub struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// Starts `count` worker threads (at least one), each driving its own runtime
    /// until the process exits.
    pub fn start(count: usize) -> Result<Workers> {
        let workers = (0..count.max(1))
            .map(|i| {
                let runtime = tunnel_transport::daemon::runtime()?;
                let handle = runtime.handle().clone();
                thread::Builder::new()
                    .name(format!("gateway-worker-{i}"))
                    .spawn(move || runtime.block_on(std::future::pending::<()>()))
                    .context("starting a gateway worker thread")?;
                Ok(Worker {
                    handle,
                    load: Arc::default(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Workers { workers })
    }

    /// One worker per core the process may use.
    pub fn per_core() -> Result<Workers> {
        Workers::start(thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Runs the future that `connection` makes on the least busy worker. Sockets it
    /// creates belong to that worker's runtime, so they must be made inside the future
    /// (see [`tokio::net::TcpStream::from_std`]).
    ///
    /// The future is made on the worker rather than passed in made: a future moved into
    /// the task's own `async` block would be stored twice in the task (once as the
    /// block's capture, once where it is awaited), and every idle connection would pay
    /// for both.
    pub fn spawn<C, F>(&self, connection: C)
    where
        C: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self
            .workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
        else {
            return;
        };
        // Counted off its worker however its task ends.
        let counted = Counted::enter(&worker.load);
        worker.handle.spawn(async move {
            let _counted = counted;
            connection().await;
        });
    }
}
