//! The control socket: a Unix socket where a daemon answers `status` (and
//! `status --json`) for the `status` subcommand.
//!
//! One request per connection: a command line (`status\n`), then the answer (JSON),
//! then close. The socket is made `0600`, in a directory of its own made `0700`: status
//! shows destinations, which are nobody else's business.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest command accepted; a client that sends more is dropped.
const MAX_COMMAND: usize = 256;

/// Answers one command; `None` means an unknown command.
pub type Handler = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Binds the control socket at `path`, replacing a stale socket but refusing to take
/// over one that a running daemon still answers on.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the control directory {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "{} is answered by a running daemon: stop it first, or give this one another control socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// Serves commands until the listener fails.
pub async fn serve(listener: UnixListener, handler: Handler) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, handler)).await;
        });
    }
}

async fn answer(stream: UnixStream, handler: Handler) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_COMMAND as u64))
        .read_line(&mut line)
        .await?;
    let reply = handler(line.trim())
        .unwrap_or_else(|| format!("{{\"error\":\"unknown command {:?}\"}}", line.trim()));
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await?;
    Ok(())
}

/// Sends `command` to the daemon at `path` and returns its answer.
pub async fn query(path: &Path, command: &str) -> Result<String> {
    let mut stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "no daemon answers on {} (is it running? is this its control socket?)",
            path.display()
        )
    })?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply))
        .await
        .context("the daemon did not answer within 10 s")??;
    Ok(reply)
}
