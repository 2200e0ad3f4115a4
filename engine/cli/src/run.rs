//! The `run` wiring both binaries share: settings resolved from flags, the config file and
//! defaults (in that order), and the node process started on a runtime of its own.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tidesync::daemon::{Daemon, DaemonConfig};
use tidesync::net::Bundle;

use crate::config::{CommonRun, CommonRunFlags, RunFile};

/// What both `run` commands resolve the same way.
#[derive(Debug)]
pub struct RunBase {
    /// The config file's settings (every key unset without `--config`).
    pub file: RunFile,
    /// The settings both binaries share.
    pub common: CommonRun,
    /// The data directory.
    pub data: PathBuf,
}

impl RunBase {
    /// Reads `--config` if given, and resolves `--data` and the common flags against it.
    pub fn resolve(
        config: Option<&Path>,
        data: Option<PathBuf>,
        common: CommonRunFlags,
    ) -> Result<Self> {
        let file = RunFile::load(config)?;
        let common = common.resolve(&file)?;
        let data = data
            .or_else(|| file.data.clone())
            .context("--data is required (or `data` in the config file)")?;
        Ok(Self { file, common, data })
    }

    /// The certificate bundle at `--bundle`, else the file's `bundle`, else `default`, and
    /// its path (the running node takes up a renewed bundle written there).
    pub fn bundle(
        &self,
        flag: Option<PathBuf>,
        default: Option<PathBuf>,
    ) -> Result<(Bundle, PathBuf)> {
        let path = flag
            .or_else(|| self.file.bundle.clone())
            .or(default)
            .context("--bundle is required (or `bundle` in the config file)")?;
        Ok((Bundle::read(&path)?, path))
    }
}

/// Creates the data directory, starts the node on a multi-threaded runtime
/// (`worker_threads`, or one per core) and runs it until SIGINT or SIGTERM.
pub fn serve(cfg: DaemonConfig, data: &Path, worker_threads: Option<usize>) -> Result<()> {
    crate::files::private_dir(data)?;
    // A database the store creates is owner-only; one made before with a wider mode is
    // narrowed here.
    crate::files::restrict(&cfg.db_path)?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        rt.worker_threads(n);
    }
    let rt = rt
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(Daemon::run_until_signal(cfg))?;
    Ok(())
}
