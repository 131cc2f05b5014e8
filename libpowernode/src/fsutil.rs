//! Crash-safe file writes: every file that must survive a crash is written to a temporary file in
//! the same directory (created with its final mode, never chmod-ed afterwards), fsync-ed, renamed
//! over the target, and the directory is fsync-ed so the rename itself is durable.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::{Error, Result};

/// Atomically replace `path` with `contents`, created with `mode`.
pub fn atomic_write(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Config(format!("{} has no parent directory", path.display())))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Config(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:08x}",
        name.to_string_lossy(),
        std::process::id(),
        fastrand::u32(..)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        // The process umask (UMask=0077 in our units) narrows the creation mode; the file is
        // still invisible under its temp name, so fix the mode before it is renamed into place.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("chmod", &tmp, e))?;
        f.write_all(contents)
            .map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        // Best effort: the temp file is ours and useless now; the original error is what matters.
        if let Err(e) = fs::remove_file(&tmp)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %tmp.display(), error = %e, "could not remove temp file");
        }
    }
    result
}

/// fsync a directory so renames and creations inside it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// Create `dir` (and parents) with `mode` for the leaf if it does not exist.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<()> {
    match fs::DirBuilder::new().recursive(true).mode(mode).create(dir) {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::io("create directory", dir, e)),
    }
}

/// Read a file, refusing anything larger than `limit` bytes (untrusted inputs, /sys, /proc).
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("read", path, e))?;
    if buf.len() as u64 > limit {
        return Err(Error::TooLarge {
            what: "file",
            limit,
        });
    }
    Ok(buf)
}

/// Like [`read_capped`] but `Ok(None)` when the file does not exist.
pub fn read_optional(path: &Path, limit: u64) -> Result<Option<Vec<u8>>> {
    match read_capped(path, limit) {
        Ok(b) => Ok(Some(b)),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_at_creation_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        atomic_write(&p, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        atomic_write(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        // No temp files left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn atomic_write_into_missing_dir_fails_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nope/file");
        assert!(matches!(
            atomic_write(&p, b"x", 0o600),
            Err(Error::Io { .. })
        ));
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn read_capped_refuses_oversized() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big");
        fs::write(&p, vec![b'a'; 100]).unwrap();
        assert!(read_capped(&p, 100).is_ok());
        assert!(matches!(read_capped(&p, 99), Err(Error::TooLarge { .. })));
        assert!(
            read_optional(&d.path().join("missing"), 10)
                .unwrap()
                .is_none()
        );
    }
}
