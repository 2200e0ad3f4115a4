//! Errors of the node, one enum per area. The core's [`ModelError`] and
//! [`ProtocolError`](crate::sync::ProtocolError) are its own; the network's are in `net`
//! (`NetError`, `TlsError`, `DriverError`).

use automerge::ChangeHash;

pub use tidesync_core::ModelError;

/// Failures of the document store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The request was refused by the data model; nothing changed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An `If-Match` precondition did not hold; nothing changed.
    #[error("document heads do not match the precondition")]
    PreconditionFailed {
        /// The document's heads at the time of the check.
        current: Vec<ChangeHash>,
    },
    /// The document does not exist or is deleted.
    #[error("document not found")]
    NotFound,
    /// The transaction carrying this write failed to commit; nothing of it was stored.
    #[error("write not stored: {0}")]
    WriteFailed(String),
    /// redb failed; the write was not acknowledged.
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    /// Stored bytes could not be decoded: the file is damaged or from an unknown version.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The store's writer has stopped (the store is shutting down or failed).
    #[error("the store is closed")]
    Closed,
    /// The disk is full: nothing is written until space is freed (the store then goes on
    /// by itself).
    #[error("no space left for the store: {0}")]
    NoSpace(String),
    /// A storage fault (an I/O error) stops writes until the database could be opened
    /// again, which the store retries at each write.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The document's stored bytes do not load; it is set aside (see `/v1/status`) and
    /// nothing else is affected.
    #[error("document {ns}/{id} is quarantined: its stored bytes do not load ({reason})")]
    Quarantined {
        /// Its namespace.
        ns: String,
        /// Its id.
        id: String,
        /// Why it did not load.
        reason: String,
    },
}

impl StoreError {
    /// Whether the database is open in another process (a running node holds it).
    pub fn is_in_use(&self) -> bool {
        matches!(self, Self::Storage(redb::Error::DatabaseAlreadyOpen))
    }
}

macro_rules! redb_errors_into_store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Storage(e.into())
            }
        }
    )*};
}
redb_errors_into_store_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);
