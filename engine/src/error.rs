//! Errors, one enum per area, all converting into [`Error`].

use automerge::ChangeHash;

/// Content or addressing that the data model refuses. Nothing is changed when one is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The namespace does not match `[a-z0-9][a-z0-9._-]{0,63}`.
    #[error("invalid namespace {0:?}: expected [a-z0-9][a-z0-9._-]{{0,63}}")]
    InvalidNamespace(String),
    /// The document id does not match `[A-Za-z0-9._~-]{1,128}`.
    #[error("invalid document id {0:?}: expected [A-Za-z0-9._~-]{{1,128}}")]
    InvalidDocId(String),
    /// A document's root must be a JSON object.
    #[error("document content must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// The root key is reserved for Tidesync's own bookkeeping.
    #[error("the root key {0:?} is reserved")]
    ReservedKey(String),
    /// The content is larger than the configured limit.
    #[error("content of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the rejected content in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The bytes are not valid Automerge data.
    #[error("invalid Automerge data: {0}")]
    InvalidAutomerge(String),
    /// The Automerge changes depend on changes this node does not have.
    #[error("Automerge changes depend on {0} change(s) this document does not have")]
    MissingDependencies(usize),
    /// A namespace pattern is neither a namespace nor a prefix followed by `*`.
    #[error("invalid namespace pattern {0:?}: expected a namespace or a prefix ending in *")]
    InvalidPattern(String),
    /// A grant is not `PATTERN=rw` or `PATTERN=ro`.
    #[error("invalid grant {0:?}: expected PATTERN=rw or PATTERN=ro")]
    InvalidGrant(String),
    /// A node id does not match `[A-Za-z0-9._-]{1,64}`.
    #[error("invalid node id {0:?}: expected [A-Za-z0-9._-]{{1,64}}")]
    InvalidNodeId(String),
    /// A heads value (as in `If-Match`) is not a list of hex change hashes.
    #[error("invalid heads {0:?}: expected comma-separated 64-digit hex change hashes")]
    InvalidHeads(String),
}

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

/// Any Tidesync error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// See [`ModelError`].
    #[error(transparent)]
    Model(#[from] ModelError),
    /// See [`StoreError`].
    #[error(transparent)]
    Store(#[from] StoreError),
}
