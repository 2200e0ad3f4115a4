//! The schema: redb table definitions, the encodings of their values, and the creation
//! and opening checks of a database.
//!
//! | table    | key                      | value                                   |
//! |----------|--------------------------|-----------------------------------------|
//! | `meta`   | `&str` name              | schema version, feed epoch (written once); the revocation list (a CRL, DER) |
//! | `docs`   | `(namespace, doc id)`    | postcard [`DocMeta`]                    |
//! | `chunks` | `(doc key, chunk no.)`   | Automerge bytes: a snapshot or changes  |
//! | `feed`   | feed seq                 | `(namespace, doc id)`, once per doc      |
//! | `peers`  | peer node id             | postcard [`Cursor`] (epoch, seq)        |
//! | `sync_state` | `(peer node id, doc key)` | peer feed epoch (16 bytes LE) + `automerge::sync::State::encode()` |
//!
//! The writer's counters are not stored: the next feed seq follows the feed's last key (the
//! latest write is always in the feed) and the next doc key follows the last chunk's doc key
//! (every document always has a chunk). A commit so touches only the tables it must.

use std::path::Path;

use automerge::ChangeHash;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::model::Cursor;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const DOCS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("docs");
pub(crate) const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("chunks");
pub(crate) const FEED: TableDefinition<u64, (&str, &str)> = TableDefinition::new("feed");
pub(crate) const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("peers");
/// When each peer was last seen (Unix seconds): peers unseen for long are forgotten.
/// Added to schema 1 without a version change: older builds never open it.
pub(crate) const PEER_SEEN: TableDefinition<&str, u64> = TableDefinition::new("peer_seen");
pub(crate) const SYNC_STATE: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("sync_state");

/// Version of the layout above; bumped (with a migration) whenever an encoding changes.
pub(crate) const SCHEMA_VERSION: u32 = 1;
pub(crate) const KEY_SCHEMA: &str = "schema_version";
pub(crate) const KEY_EPOCH: &str = "feed_epoch";
pub(crate) const KEY_REVOCATION_LIST: &str = "revocation_list";

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

/// A [`Cursor`] as the `peers` table keeps it (postcard, as on the wire in a hello).
pub(crate) fn decode_cursor(bytes: &[u8]) -> Result<Cursor, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("peer cursor: {e}")))
}

pub(crate) fn encode_cursor(cursor: &Cursor) -> Vec<u8> {
    // Serializing a plain struct into a Vec cannot fail.
    postcard::to_stdvec(cursor).unwrap_or_default()
}

pub(crate) fn encode_heads(heads: &[ChangeHash]) -> Vec<[u8; 32]> {
    heads.iter().map(|h| h.0).collect()
}

/// Creates a new database at `path` all at once: it is made and initialised under a
/// temporary name, and renamed into place only when complete. A process killed while
/// creating leaves no half-written file at `path` (redb would refuse to open one), only a
/// temporary file the next attempt replaces.
pub(crate) fn create(path: &Path) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Storage(e.into());
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".creating");
    let tmp = path.with_file_name(name);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    init_tables(&Database::create(&tmp)?)?;
    // Documents are the user's data: readable by the owner only, whatever the umask.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    // Make the rename itself durable.
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// Creates the tables on first open; returns the feed epoch and the writer's counters
/// (next feed seq, next doc key), derived from the feed and the chunks.
pub(crate) fn init_tables(db: &Database) -> Result<(u128, u64, u64), StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let counters = {
        let mut meta = txn.open_table(META)?;
        let chunks = txn.open_table(CHUNKS)?;
        let feed = txn.open_table(FEED)?;
        txn.open_table(DOCS)?;
        txn.open_table(PEERS)?;
        txn.open_table(SYNC_STATE)?;
        txn.open_table(PEER_SEEN)?;
        let schema = meta.get(KEY_SCHEMA)?.map(|v| v.value().to_vec());
        let epoch: [u8; 16] = match schema {
            None => {
                let mut epoch = [0u8; 16];
                getrandom::fill(&mut epoch).map_err(|e| {
                    StoreError::WriteFailed(format!("no randomness for the feed epoch: {e}"))
                })?;
                meta.insert(KEY_SCHEMA, SCHEMA_VERSION.to_le_bytes().as_slice())?;
                meta.insert(KEY_EPOCH, epoch.as_slice())?;
                epoch
            }
            Some(v) if v == SCHEMA_VERSION.to_le_bytes() => meta
                .get(KEY_EPOCH)?
                .ok_or_else(|| StoreError::Corrupt("feed epoch missing".into()))?
                .value()
                .try_into()
                .map_err(|_| StoreError::Corrupt("feed epoch: expected 16 bytes".into()))?,
            Some(v) => {
                return Err(StoreError::Corrupt(format!(
                    "unsupported schema version {v:?} (this build reads {SCHEMA_VERSION})"
                )))
            }
        };
        let next_seq = feed.last()?.map_or(1, |(k, _)| k.value() + 1);
        let next_doc = chunks.last()?.map_or(1, |(k, _)| k.value().0 + 1);
        (u128::from_le_bytes(epoch), next_seq, next_doc)
    };
    txn.commit()?;
    Ok(counters)
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
