//! Files that hold secrets or a node's data: owner-only, written whole and durably.
//!
//! The data directory holds the database and, on a hub made by `init`, the CA key; key
//! files hold private keys. Under a usual umask of 022 they would be readable by every
//! local user, and a file that existed before keeps its old mode when rewritten, so the
//! modes are set explicitly every time, not only on creation.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// Mode of the data directory: the owner only.
pub const DIR_MODE: u32 = 0o700;
/// Mode of key files and the database: the owner may read and write.
pub const FILE_MODE: u32 = tidesync::files::FILE_MODE;

/// Creates `dir` (and its parents) if needed and makes it owner-only.
pub fn private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    set_mode(dir, DIR_MODE)
}

/// Makes an existing file owner-only (a no-op if it does not exist).
pub fn restrict(path: &Path) -> Result<()> {
    if path.exists() {
        set_mode(path, FILE_MODE)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` as a whole, durably and owner-only (see
/// [`tidesync::files::write_private`]).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    tidesync::files::write_private(path, bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Holds `dir`'s lock (see [`tidesync::files::lock_dir`]) until the returned file is
/// dropped.
pub fn lock(dir: &Path) -> Result<fs::File> {
    tidesync::files::lock_dir(dir).with_context(|| format!("cannot lock {}", dir.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    tidesync::files::set_mode(path, mode)
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn modes_are_set_also_on_files_that_existed_wider() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("data");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&dir).expect("private");
        assert_eq!(mode(&dir), 0o700);

        let key = dir.join("key.pem");
        fs::write(&key, "old").expect("write");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private(&key, b"new").expect("write");
        assert_eq!(mode(&key), 0o600);
        assert_eq!(fs::read(&key).expect("read"), b"new");
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let db = dir.join("node.redb");
        fs::write(&db, "").expect("write");
        fs::set_permissions(&db, fs::Permissions::from_mode(0o666)).expect("chmod");
        restrict(&db).expect("restrict");
        assert_eq!(mode(&db), 0o600);
    }
}
