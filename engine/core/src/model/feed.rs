//! Positions in a node's change feed, and how far one node has received another's.

use std::fmt;

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

use super::{DocId, Namespace};

/// A position in a store's local change feed. Starts at 1; 0 means "before everything".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct FeedSeq(pub u64);

impl fmt::Display for FeedSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One entry of the change feed: a document at its latest position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEntry {
    /// The feed position.
    pub seq: FeedSeq,
    /// The document's namespace.
    pub ns: Namespace,
    /// The document's id.
    pub id: DocId,
    /// Its heads at that position.
    pub heads: Vec<ChangeHash>,
    /// Whether it carries a tombstone.
    pub deleted: bool,
}

/// A position in one database's feed, valid only while that database's epoch holds: how
/// far a node has durably received a peer's feed. The peer hears it in the hello
/// (`Hello::resume`) and the node stores it (the `peers` table); both encode it the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The feed epoch of the database the position refers to.
    pub epoch: u128,
    /// Every document of that feed up to this seq has been received and committed.
    pub seq: u64,
}
