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
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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
/// file or the new one: the text goes to a temporary file beside it (created with
/// `mode`), which is flushed to disk, renamed over `path`, and the directory flushed
/// so the rename itself survives a power cut.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let temporary = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temporary)?;
        // `mode` is filtered by the umask at creation; say it again exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        File::open(dir)?.sync_all()
    })();
    written.with_context(|| {
        let _ = std::fs::remove_file(&temporary);
        format!(
            "writing {} (through {})",
            path.display(),
            temporary.display()
        )
    })
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
    fn an_atomic_write_replaces_the_file_and_leaves_nothing_beside_it() {
        let dir = scratch("atomic");
        let path = dir.join("credential.pem");
        write_atomically(&path, b"old", 0o600).unwrap();
        write_atomically(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["credential.pem"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_atomic_write_keeps_the_old_file() {
        let dir = scratch("failed");
        let path = dir.join("credential.pem");
        write_atomically(&path, b"old", 0o600).unwrap();
        // A directory where the temporary file would go makes the write fail.
        let temporary = dir.join(format!(".credential.pem.{}.tmp", std::process::id()));
        std::fs::create_dir(&temporary).unwrap();
        let error = write_atomically(&path, b"new", 0o600).unwrap_err();
        assert!(format!("{error:#}").contains("credential.pem"), "{error:#}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        std::fs::remove_dir_all(&dir).unwrap();
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
