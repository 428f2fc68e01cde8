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

/// The runtime a daemon runs on: one thread, so no hand-offs between worker threads on
/// the latency path. The agent carries one user's connections on it (measured on
/// loopback, it cut the round trip by a fifth against a multi-threaded runtime); the
/// gateway runs one per core, each owning whole connections (`tunnel-gateway`'s
/// `workers.rs`).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
