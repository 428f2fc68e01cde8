//! Files replaced whole or not at all: credentials, tokens, revocation lists. A crash
//! (even `kill -9` or a power loss) mid-write leaves the old file, never half a new one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `contents` to `path` with permissions `mode`: a temporary file in the same
/// directory, written and flushed to disk, then renamed over `path`, and the directory
/// flushed so the rename itself survives a crash.
pub fn write(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let temp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        fastrand::u64(..)
    ));
    let written = (|| -> Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .with_context(|| format!("creating {}", temp.display()))?;
        // The umask filtered `mode` at creation; say it again exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", temp.display()))?;
        file.write_all(contents)
            .with_context(|| format!("writing {}", temp.display()))?;
        file.sync_all()
            .with_context(|| format!("flushing {}", temp.display()))?;
        fs::rename(&temp, path)
            .with_context(|| format!("moving {} to {}", temp.display(), path.display()))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_sets_the_mode() {
        let dir = std::env::temp_dir().join(format!("atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("credential.pem");
        write(&path, b"old", 0o600).unwrap();
        write(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_what_was_there_and_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("atomic-failed-{}", std::process::id()));
        let path = dir.join("credential.pem");
        // A non-empty directory in the way: the final rename fails, even for root.
        fs::create_dir_all(path.join("inside")).unwrap();
        let error = write(&path, b"new", 0o600).unwrap_err();
        assert!(format!("{error:#}").contains("credential.pem"), "{error:#}");
        assert!(path.join("inside").is_dir());
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "a temporary file was left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
