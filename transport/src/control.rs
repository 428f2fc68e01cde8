//! The control socket: a Unix socket where a daemon answers `status` (and
//! `status --json`) for the `status` subcommand.
//!
//! One request per connection: a command line (`status\n`), then the answer (JSON),
//! then close. The socket is made `0600`, in a directory of its own made `0700`: status
//! shows destinations, which are nobody else's business. A socket shared with a group
//! is `0660` and that group's, and so is a directory made for it (`0750`). A directory
//! that was there before is never changed: a shared `/tmp` stays as it is.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::plumbing::{Shutdown, accept_until};

/// Longest command accepted; a client that sends more is dropped.
const MAX_COMMAND: usize = 256;

/// Answers one command; `None` means an unknown command.
pub type Handler = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Binds the control socket at `path`, replacing a stale socket but refusing to take
/// over one that a running daemon still answers on.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    bind_shared(path, None).await
}

/// A group that shares a socket: its id, and its name for messages.
#[derive(Debug, Clone)]
pub struct SharedWith {
    pub gid: u32,
    pub name: String,
}

/// Like [`bind`], with the socket (and a directory made for it) usable by `group`.
pub async fn bind_shared(path: &Path, group: Option<&SharedWith>) -> Result<UnixListener> {
    let give_group = |p: &Path, group: &SharedWith| {
        std::os::unix::fs::chown(p, None, Some(group.gid)).with_context(|| {
            format!(
                "giving group `{}` {} (the daemon's user must be a member of that group)",
                group.name,
                p.display()
            )
        })
    };
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.exists() => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the control directory {}", dir.display()))?;
            let mode = if group.is_some() { 0o750 } else { 0o700 };
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("restricting {}", dir.display()))?;
            if let Some(group) = group {
                give_group(dir, group)?;
            }
        }
        Some(dir) => {
            refuse_if_others_control(dir)?;
            if let Some(group) = group {
                warn_if_closed_to(dir, group);
            }
        }
        None => {}
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
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", path.display()))?;
    if let Some(group) = group {
        give_group(path, group)?;
    }
    Ok(listener)
}

/// Refuses a directory that someone else could swap the socket out of: one owned by
/// another user, or writable by others without the sticky bit (a shared `/tmp` has it,
/// so nobody can rename or remove another's socket there). Another user who made
/// `/tmp/tunnel-UID` first would otherwise receive every routed connection.
fn refuse_if_others_control(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.mode();
    let sticky = mode & 0o1000 != 0;
    if meta.uid() != me && meta.uid() != 0 {
        bail!(
            "{} belongs to uid {}, not to this daemon's user (uid {me}): whoever owns it could replace the socket. Remove it, or set another control path",
            dir.display(),
            meta.uid()
        );
    }
    if mode & 0o022 != 0 && !sticky {
        bail!(
            "{} is writable by other users (mode {:o}) and has no sticky bit: they could replace the socket. Run `chmod go-w {}`, or set another control path",
            dir.display(),
            mode & 0o7777,
            dir.display()
        );
    }
    Ok(())
}

/// Says so when members of `group` cannot pass through `dir`, which this daemon did not
/// make and so leaves as it is.
fn warn_if_closed_to(dir: &Path, group: &SharedWith) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let mode = meta.mode();
    let passable = mode & 0o001 != 0 || (meta.gid() == group.gid && mode & 0o010 != 0);
    if !passable {
        tracing::warn!(
            "members of group `{}` cannot reach sockets in {} (mode {:o}, group {}): this daemon did not create it and leaves it as it is; run `chgrp {} {}; chmod g+x {}`, or remove it so that it is made for the group",
            group.name,
            dir.display(),
            mode & 0o7777,
            meta.gid(),
            group.name,
            dir.display(),
            dir.display()
        );
    }
}

/// The inode of the socket file at `path`, to tell later whether it is still ours.
pub fn socket_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Removes the socket file at `path` if it is still the one with `inode`: a daemon
/// started meanwhile in this one's place (during its drain) keeps its socket.
pub fn remove_if_ours(path: &Path, inode: Option<u64>) {
    if inode.is_some() && socket_inode(path) == inode {
        let _ = std::fs::remove_file(path);
    }
}

/// Serves commands until `shutdown` fires.
pub async fn serve(listener: UnixListener, handler: Handler, shutdown: Shutdown) {
    accept_until(
        "control socket",
        shutdown,
        || listener.accept(),
        |(stream, _)| {
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, handler)).await;
            });
        },
    )
    .await;
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
    let mut stream = match UnixStream::connect(path).await {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(e).with_context(|| {
                format!(
                    "{} is the daemon's control socket, which only its own user and root may use: run this as root (sudo) or as that user",
                    path.display()
                )
            });
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "no daemon answers on {} (is it running? is this its control socket?)",
                    path.display()
                )
            });
        }
    };
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply))
        .await
        .context("the daemon did not answer within 10 s")??;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_put_in_our_place_is_not_removed() {
        let dir = std::env::temp_dir().join(format!("control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("daemon.sock");
        let ours = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let inode = socket_inode(&path);
        // A daemon started during our drain binds the path anew.
        std::fs::remove_file(&path).unwrap();
        let theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        remove_if_ours(&path, inode);
        assert!(path.exists(), "the successor's socket was removed");
        let successor = socket_inode(&path);
        remove_if_ours(&path, successor);
        assert!(!path.exists());
        drop((ours, theirs));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
