//! Errors of the core, one type per area: [`ModelError`] for content and names,
//! [`ProtocolError`] for what a peer sent.

use crate::sync::message::{ErrorCode, Message};

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
    /// The content is nested deeper than the model allows (`model::json::MAX_DEPTH`).
    #[error("content nested deeper than {limit} levels")]
    TooDeep {
        /// The limit in levels below the root.
        limit: usize,
    },
    /// Automerge data holding more ops than one write may add (`model::op_count::MAX_OPS`).
    #[error("Automerge data of {ops} ops exceeds the limit of {limit} ops per write")]
    TooManyOps {
        /// Ops the data holds (rows of its longest column).
        ops: u64,
        /// The limit.
        limit: u64,
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

/// A protocol violation: the driver sends it to the peer and closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[error("{code:?}: {reason}")]
pub struct ProtocolError {
    /// The code sent to the peer.
    pub code: ErrorCode,
    /// The reason sent to the peer and logged.
    pub reason: String,
}

impl ProtocolError {
    /// An error of any code.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }

    /// A malformed frame or unexpected message.
    pub fn protocol(reason: impl Into<String>) -> Self {
        Self::new(ErrorCode::Protocol, reason)
    }

    /// A failure of this node (its store could not keep what the peer sent).
    pub fn internal(reason: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, reason)
    }

    /// A peer speaking another protocol version.
    pub fn version(theirs: u16, ours: u16) -> Self {
        Self::new(
            ErrorCode::Version,
            format!("protocol version {theirs} is not {ours}"),
        )
    }

    /// A frame the codec refused (over the size limit, or a broken length prefix).
    pub fn from_frame_error(e: &std::io::Error) -> Self {
        Self::new(ErrorCode::Protocol, format!("bad frame: {e}"))
    }

    /// The message that tells the peer.
    pub fn to_message(&self) -> Message {
        Message::Error {
            code: self.code,
            reason: self.reason.clone(),
        }
    }
}
