//! What the driver hands a session besides the peer's frames: documents it loaded, the
//! results of applies, and the store's early notices. Plain values the store produces and
//! the session consumes; neither side sees the other's types.

use std::sync::Arc;

use automerge::sync::State;
use automerge::Automerge;

use crate::model::{DocId, Namespace};

/// A document loaded for sync with one peer: the answer to `Output::Load`.
#[derive(Debug)]
pub struct LoadedDoc {
    /// The document as committed.
    pub doc: Arc<Automerge>,
    /// The persisted sync state for the peer, warm-started; `None` if there is none.
    pub state: Option<State>,
    /// The document's size in the store (snapshot and appended changes), in bytes.
    pub stored_bytes: u64,
}

/// The result of applying a peer's sync message, committed: the answer to `Output::Apply`.
/// The reply is generated from it, so the peer hears "I have it" only once it is durable.
#[derive(Debug)]
pub struct Applied {
    /// The sync state after the message, as persisted.
    pub state: State,
    /// The document as committed.
    pub doc: Arc<Automerge>,
    /// How many of the message's changes were new to this node and stored.
    pub changes_applied: u64,
}

/// A document a local write batch changed, handed out just before the batch commits (the
/// store's early notice). Not yet durable: a hint, never a fact.
#[derive(Clone, Debug)]
pub struct EarlyDoc {
    /// Namespace.
    pub ns: Namespace,
    /// Document id.
    pub id: DocId,
    /// The document with the batch's changes.
    pub doc: Arc<Automerge>,
    /// The document's size in the store before this batch, in bytes (0 for a new one).
    pub stored_bytes: u64,
}
