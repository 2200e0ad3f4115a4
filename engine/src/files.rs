//! Files a node writes beside its database: owner-only, written whole and durably.
//!
//! Under a usual umask of 022 a new file would be readable by every local user, and a file
//! that existed before keeps its old mode when rewritten, so the mode is set every time.

use std::fs;
use std::io::Write;
use std::path::Path;

/// Mode of key files, the database and the revocation list: the owner may read and write.
pub const FILE_MODE: u32 = 0o600;

/// Writes `bytes` to `path` as a whole, owner-only: a temporary file beside it, synced,
/// renamed over `path`, and the directory synced, so a crash leaves the old file or the
/// new one and a reader never sees half of it.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // A name of this writer's own: two processes writing the same file (a running hub and
    // `revoke`) never write into one temporary file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}.{n}", std::process::id()));
    let tmp = path.with_file_name(name);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(FILE_MODE);
    }
    let mut f = opts.open(&tmp)?;
    // A temporary file left by a crash keeps its mode when opened again.
    set_mode(&tmp, FILE_MODE)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Holds `dir`'s lock file (`.lock`, created if missing) exclusively until the returned
/// file is dropped: the read-modify-write of a directory's shared files (the revocation
/// list, the registry of issued certificates) by a running node and by `tidesync-hub`
/// commands never interleave.
pub fn lock_dir(dir: &Path) -> std::io::Result<fs::File> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(FILE_MODE);
    }
    let file = opts.open(dir.join(".lock"))?;
    file.lock()?;
    Ok(file)
}

/// Sets the permission bits of `path` (a no-op off Unix).
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}
