//! What both daemons' `main` does the same way: logging and the async runtime.

use anyhow::{Context, Result};

/// Logs to stderr through `tracing`; `RUST_LOG` sets the filter (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// How a daemon runs its tasks.
#[derive(Debug, Clone, Copy)]
pub enum Threads {
    /// One thread: no hand-offs between worker threads on the latency path. The agent
    /// carries one user's connections; measured on loopback it cut the round trip by a
    /// fifth against a multi-threaded runtime (tunnel-bench).
    One,
    /// A worker per core: the gateway serves many agents at once.
    PerCore,
}

/// The runtime a daemon runs on.
pub fn runtime(threads: Threads) -> Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::PerCore => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}
