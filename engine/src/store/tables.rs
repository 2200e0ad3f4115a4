//! redb table definitions and the encodings of their values.
//!
//! | table    | key                      | value                                   |
//! |----------|--------------------------|-----------------------------------------|
//! | `meta`   | `&str` name              | schema version, feed epoch (written once) |
//! | `docs`   | `(namespace, doc id)`    | postcard [`DocMeta`]                    |
//! | `chunks` | `(doc key, chunk no.)`   | Automerge bytes: a snapshot or changes  |
//! | `feed`   | feed seq                 | `(namespace, doc id)`, once per doc      |
//! | `peers`  | peer node id             | postcard [`PeerRecord`]                 |
//! | `sync_state` | `(peer node id, doc key)` | peer feed epoch (16 bytes LE) + `automerge::sync::State::encode()` |
//!
//! The writer's counters are not stored: the next feed seq follows the feed's last key (the
//! latest write is always in the feed) and the next doc key follows the last chunk's doc key
//! (every document always has a chunk). A commit so touches only the tables it must.

use automerge::ChangeHash;
use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const DOCS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("docs");
pub(crate) const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("chunks");
pub(crate) const FEED: TableDefinition<u64, (&str, &str)> = TableDefinition::new("feed");
pub(crate) const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("peers");
pub(crate) const SYNC_STATE: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("sync_state");

/// Version of the layout above; bumped (with a migration) whenever an encoding changes.
pub(crate) const SCHEMA_VERSION: u32 = 1;
pub(crate) const KEY_SCHEMA: &str = "schema_version";
pub(crate) const KEY_EPOCH: &str = "feed_epoch";

/// What the store keeps per document besides its Automerge bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct DocMeta {
    /// Internal key of the document's chunks.
    pub key: u64,
    /// Heads after the last committed write.
    pub heads: Vec<[u8; 32]>,
    /// Whether the document carries a tombstone.
    pub deleted: bool,
    /// The document's current position in the feed.
    pub seq: u64,
    /// Chunk numbers in use: `first_chunk..next_chunk`.
    pub first_chunk: u64,
    pub next_chunk: u64,
    /// Bytes of the snapshot chunk (0 when the first chunk holds changes).
    pub snapshot_bytes: u64,
    /// Bytes of the change chunks after the snapshot.
    pub incremental_bytes: u64,
}

impl DocMeta {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("doc meta: {e}")))
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        // Serializing a plain struct into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub(crate) fn heads(&self) -> Vec<ChangeHash> {
        self.heads.iter().map(|h| ChangeHash(*h)).collect()
    }

    pub(crate) fn stored_bytes(&self) -> u64 {
        self.snapshot_bytes + self.incremental_bytes
    }
}

/// What this node durably knows about a peer's feed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The peer's feed epoch the cursor refers to.
    pub epoch: u128,
    /// Every document of the peer's feed up to this seq has been received and committed here.
    pub cursor: u64,
}

impl PeerRecord {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("peer record: {e}")))
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }
}

pub(crate) fn encode_heads(heads: &[ChangeHash]) -> Vec<[u8; 32]> {
    heads.iter().map(|h| h.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let m = DocMeta {
            key: 7,
            heads: vec![[3; 32]],
            deleted: true,
            seq: 42,
            first_chunk: 2,
            next_chunk: 5,
            snapshot_bytes: 100,
            incremental_bytes: 30,
        };
        assert_eq!(DocMeta::decode(&m.encode()).expect("decode"), m);
        assert!(DocMeta::decode(&[0xff]).is_err());
    }
}
