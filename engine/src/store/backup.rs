//! Consistent copies of a running store, and restoring one.
//!
//! A copy is made from one read transaction (redb's snapshot), table by table, into a
//! new database: writes go on meanwhile, and the copy holds exactly the commits before
//! its snapshot. A restored copy is moved to a new feed epoch before the node runs from
//! it (see `Store::renew_feed_epoch`): peers hold cursors past its feed's end and sync
//! states that claim what the copy lacks, and a new epoch makes them start over.

use std::path::Path;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableError,
    WriteTransaction,
};

use super::schema::{CHUNKS, DOCS, FEED, META, PEERS, SYNC_STATE};
use crate::error::StoreError;

/// What a copy holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackupSummary {
    /// Documents.
    pub docs: u64,
    /// Rows of every table.
    pub rows: u64,
}

/// Writes every table of `snapshot` into a new database at `out` (which must not exist),
/// durably.
pub(crate) fn copy_snapshot(
    snapshot: &ReadTransaction,
    out: &Path,
) -> Result<BackupSummary, StoreError> {
    if out.exists() {
        return Err(StoreError::WriteFailed(format!(
            "{} exists already; a backup never overwrites a file",
            out.display()
        )));
    }
    let copy = Database::create(out)?;
    let txn = copy.begin_write()?;
    let mut rows = 0;
    rows += copy_table(snapshot, &txn, META)?;
    let docs = copy_table(snapshot, &txn, DOCS)?;
    rows += docs;
    rows += copy_table(snapshot, &txn, CHUNKS)?;
    rows += copy_table(snapshot, &txn, FEED)?;
    rows += copy_table(snapshot, &txn, PEERS)?;
    rows += copy_table(snapshot, &txn, SYNC_STATE)?;
    txn.commit()?;
    Ok(BackupSummary { docs, rows })
}

fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &ReadTransaction,
    to: &WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<u64, StoreError> {
    let src = match from.open_table(def) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut dst = to.open_table(def)?;
    let mut n = 0;
    for row in src.iter()? {
        let (k, v) = row?;
        dst.insert(k.value(), v.value())?;
        n += 1;
    }
    Ok(n)
}

/// A copy of the database file `db` of a stopped node.
pub(crate) fn copy_file(db: &Path, out: &Path) -> Result<BackupSummary, StoreError> {
    let db = Database::open(db)?;
    let snapshot = db.begin_read()?;
    copy_snapshot(&snapshot, out)
}

pub(crate) fn io_error(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::WriteFailed(format!("{what} {}: {e}", path.display()))
}
