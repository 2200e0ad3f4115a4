//! The database handle the store's readers and its writer share, and the storage fault
//! that may take it away.
//!
//! After a failed commit caused by an I/O error (a full disk, a failing device), redb
//! refuses every later write transaction until the database is opened again. So the
//! writer, on such a failure, takes the handle away (readers then get the fault as their
//! error), and opens the file again, now or at its next batch: once the cause is gone
//! (space freed), writes succeed again without a restart. While it lasts the fault is
//! what `/v1/health` reports, and what writes are answered with (507 when the disk is
//! full, else 503).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::Database;

use crate::error::StoreError;

/// Why the store cannot write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// What failed, for people.
    pub reason: String,
    /// The disk (or quota) is full.
    pub no_space: bool,
}

impl Fault {
    /// The fault as a store error.
    pub fn to_error(&self) -> StoreError {
        if self.no_space {
            StoreError::NoSpace(self.reason.clone())
        } else {
            StoreError::Unavailable(self.reason.clone())
        }
    }
}

/// Longest wait for readers to let go of a database being reopened.
const LET_GO: Duration = Duration::from_secs(2);

pub(crate) struct Db {
    slot: RwLock<Option<Arc<Database>>>,
    fault: Mutex<Option<Fault>>,
    path: PathBuf,
    cache_bytes: usize,
}

impl Db {
    pub fn new(db: Database, path: PathBuf, cache_bytes: usize) -> Self {
        Self {
            slot: RwLock::new(Some(Arc::new(db))),
            fault: Mutex::new(None),
            path,
            cache_bytes,
        }
    }

    /// The database, or the fault that took it away.
    pub fn get(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = self.slot.read().ok().and_then(|s| s.clone()) {
            return Ok(db);
        }
        Err(self.fault().map_or(StoreError::Closed, |f| f.to_error()))
    }

    pub fn fault(&self) -> Option<Fault> {
        self.fault.lock().ok().and_then(|f| f.clone())
    }

    /// After a failed commit. A full disk is a fault until a document is written again
    /// (the database itself may still be usable). If `db` refuses new write transactions
    /// (a latched I/O failure), that is a fault too: the handle is taken away and the file
    /// opened again. Returns whether it was opened again.
    pub fn after_failure(&self, db: Arc<Database>, cause: &StoreError) -> bool {
        let refused = db.begin_write().err().map(StoreError::from);
        let no_space = no_space(cause) || refused.as_ref().is_some_and(no_space);
        if refused.is_some() || no_space {
            self.set_fault(Fault {
                reason: format!("the last commit failed: {cause}"),
                no_space,
            });
        }
        if refused.is_none() {
            return false;
        }
        self.take_away(db);
        self.reopen().is_ok()
    }

    fn set_fault(&self, fault: Fault) {
        if let Ok(mut f) = self.fault.lock() {
            if f.is_none() {
                tracing::error!(reason = %fault.reason, no_space = fault.no_space, "storage fault: writes fail until it is over");
            }
            *f = Some(fault);
        }
    }

    /// The database file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// A commit that wrote documents succeeded: whatever fault there was is over.
    pub fn committed(&self) {
        if let Ok(mut f) = self.fault.lock() {
            if f.take().is_some() {
                tracing::warn!("storage fault over: a commit succeeded");
            }
        }
    }

    /// Drops the handle once readers have let go of it (they get the fault meanwhile).
    fn take_away(&self, db: Arc<Database>) {
        if let Ok(mut s) = self.slot.write() {
            *s = None;
        }
        let started = Instant::now();
        while Arc::strong_count(&db) > 1 && started.elapsed() < LET_GO {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(db);
    }

    /// Opens the file again (redb repairs what the failed commit left). On success the
    /// fault is cleared; on failure it stays, with the reason updated.
    pub fn reopen(&self) -> Result<Arc<Database>, StoreError> {
        let opened = redb::Builder::new()
            .set_cache_size(self.cache_bytes)
            .create(&self.path)
            .map_err(StoreError::from);
        match opened {
            Ok(db) => {
                let db = Arc::new(db);
                if let Ok(mut s) = self.slot.write() {
                    *s = Some(db.clone());
                }
                // A full disk is over only once a document is written again.
                if let Ok(mut f) = self.fault.lock() {
                    if f.as_ref().is_some_and(|f| !f.no_space) {
                        *f = None;
                        tracing::warn!("storage fault over: the database is open again");
                    }
                }
                Ok(db)
            }
            Err(e) => {
                if let Ok(mut f) = self.fault.lock() {
                    let no_space = no_space(&e) || f.as_ref().is_some_and(|f| f.no_space);
                    *f = Some(Fault {
                        reason: format!("the database cannot be opened again: {e}"),
                        no_space,
                    });
                }
                Err(e)
            }
        }
    }
}

/// Whether `e` says the disk is full.
pub(crate) fn no_space(e: &StoreError) -> bool {
    if let StoreError::Storage(redb::Error::Io(io)) = e {
        if io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28) {
            return true;
        }
    }
    let text = e.to_string();
    text.contains("No space left") || text.contains("os error 28")
}
