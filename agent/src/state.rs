//! The files the agent writes itself: where they live (the state directory) and how
//! they are replaced (atomically, so that a crash leaves the old file or the new one,
//! never half of one).
//!
//! ```text
//!  $XDG_STATE_HOME/tunnel/ (else ~/.local/state/tunnel/)
//!    enrol-<token id>.key.pem      the key of an enrolment in flight (removed when done)
//!    <gateway>/credential.pem      private key + certificate, renewed in place
//!    <gateway>/ca.pem              the gateway's CA
//! ```

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};

/// The agent's state directory: `$XDG_STATE_HOME/tunnel`, else
/// `$HOME/.local/state/tunnel`.
pub fn state_dir(xdg_state_home: Option<PathBuf>, home: Option<PathBuf>) -> Result<PathBuf> {
    let base = xdg_state_home
        .filter(|p| p.is_absolute())
        .or_else(|| home.map(|h| h.join(".local/state")))
        .ok_or_else(|| {
            anyhow!("neither XDG_STATE_HOME nor HOME is set: set one, to say where the agent keeps its credentials")
        })?;
    Ok(base.join("tunnel"))
}

/// The state directory from this process's environment.
pub fn default_state_dir() -> Result<PathBuf> {
    let var = |name| std::env::var_os(name).map(PathBuf::from);
    state_dir(var("XDG_STATE_HOME"), var("HOME"))
}

/// Makes `dir` and its parents; a directory made here is readable by its owner only.
pub fn private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the directory {}", dir.display()))
}

/// Replaces `path` with `contents` so that a crash at any moment leaves either the old
/// file or the new one (see [`tunnel_transport::atomic_file`]).
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    tunnel_transport::atomic_file::write(path, contents, mode)
}

/// Writes `contents` to `path` only if no file is there yet (mode `mode`), flushed to
/// disk. Returns false when the file already existed.
pub fn create_new(path: &Path, contents: &[u8], mode: u32) -> Result<bool> {
    let opened = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path);
    let mut file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    };
    let written = (|| -> std::io::Result<()> {
        file.write_all(contents)?;
        file.sync_all()?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tunnel-agent-state-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        private_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn the_state_dir_follows_xdg_then_home() {
        assert_eq!(
            state_dir(Some("/x/state".into()), Some("/home/a".into())).unwrap(),
            PathBuf::from("/x/state/tunnel")
        );
        // A relative XDG_STATE_HOME is to be ignored (XDG base directory spec).
        assert_eq!(
            state_dir(Some("rel".into()), Some("/home/a".into())).unwrap(),
            PathBuf::from("/home/a/.local/state/tunnel")
        );
        assert!(state_dir(None, None).is_err());
    }

    #[test]
    fn create_new_never_overwrites() {
        let dir = scratch("create");
        let path = dir.join("enrol-abc.key.pem");
        assert!(create_new(&path, b"first", 0o600).unwrap());
        assert!(!create_new(&path, b"second", 0o600).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
