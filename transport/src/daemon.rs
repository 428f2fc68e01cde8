//! What both daemons' `main` does the same way: logging, the async runtime, and telling
//! systemd they are ready.

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

/// Tells systemd (or whoever set NOTIFY_SOCKET) that the daemon is ready, with a
/// one-line `status` (`Type=notify` units start their dependents then).
pub fn notify_ready(status: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let address = match path.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
        }
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    let sent = address.and_then(|address| {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        socket.send_to_addr(format!("READY=1\nSTATUS={status}").as_bytes(), &address)
    });
    if let Err(e) = sent {
        tracing::warn!("could not notify {path}: {e}");
    }
}

/// Writes a command's output to stdout. A reader that went away (`| head`) ends the
/// output quietly instead of with a panic, as the standard library's `print!` would.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => written.map_err(|e| anyhow::anyhow!("writing to stdout: {e}")),
    }
}
