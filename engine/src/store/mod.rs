//! The document store: Automerge documents in one redb file, with a local change feed.
//!
//! [`Store`] owns the database, a byte-bounded cache of loaded documents and the single
//! writer thread (see `writer`) that group-commits every write. Reads run on the caller's
//! thread from a redb read snapshot. This module never touches the network and knows
//! nothing of the protocol: it deals in the core's plain types (feed entries, cursors,
//! loaded documents, applied messages), and `net::exec` carries a session's reads and
//! writes to it.
//!
//! Durability: a write future resolves only after the redb transaction holding it has
//! committed with `Durability::Immediate`. A process killed at any moment loses nothing
//! that was acknowledged.

mod backup;
mod cache;
mod commit_times;
mod compact;
mod db;
mod quarantine;
mod schema;
mod sync_state;
mod writer;

pub use crate::model::{FeedEntry, FeedSeq};
pub use backup::BackupSummary;
pub use commit_times::{CommitTimes, CommitTimesSnapshot};
pub use db::Fault;
pub use quarantine::Quarantined;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use automerge::{ActorId, Automerge, ChangeHash};
use redb::{ReadableDatabase, ReadableTableMetadata};
use serde_json::{Map, Value as Json};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::error::{ModelError, StoreError};
use crate::model::{self, json, Conflict, Cursor, DocId, Namespace, NodeId, SyncPeer};
use crate::sync::{Applied, Apply, EarlyDoc, LoadedDoc};
use cache::{CachedDoc, DocCache};
use schema::{DocMeta, CHUNKS, DOCS, FEED, KEY_REVOCATION_LIST, META, PEERS, SYNC_STATE};
use writer::{load_chunks, Answer, WriteOp, WriteRequest, Writer};

/// Longest key of a [`Store::set_records`] record, in bytes.
pub const MAX_RECORD_KEY: usize = 512;

/// What sets records apart from the store's own keys in its `meta` table.
const RECORD_PREFIX: &str = "record/";

/// Settings of a [`Store`]. The defaults suit an edge device; hubs raise the caches.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Largest accepted write: JSON content (serialized) or Automerge bytes to import.
    pub max_content_bytes: usize,
    /// Memory for loaded documents (estimated bytes); least recently used ones are dropped.
    pub doc_cache_bytes: u64,
    /// Memory for redb's page cache.
    pub redb_cache_bytes: usize,
    /// Most writes committed in one transaction.
    pub max_batch: usize,
    /// Change chunks below this many bytes are never compacted into a snapshot.
    pub compact_min_bytes: u64,
    /// Longest a run of bookkeeping-only commits (cursors, sync states; not fsynced) goes
    /// before one is made durable: until then redb keeps what they freed in memory.
    pub flush_bookkeeping_every: std::time::Duration,
    /// Most bookkeeping-only commits in a row before one is made durable.
    pub flush_bookkeeping_after: u32,
    /// How strings written through JSON are stored, per namespace pattern (the first that
    /// matches); [`json::Strings::Auto`] elsewhere.
    pub strings: Vec<(model::NsPattern, json::Strings)>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_content_bytes: 16 * 1024 * 1024,
            doc_cache_bytes: 64 * 1024 * 1024,
            redb_cache_bytes: 32 * 1024 * 1024,
            max_batch: 1024,
            compact_min_bytes: 4096,
            flush_bookkeeping_every: std::time::Duration::from_secs(5),
            flush_bookkeeping_after: 1024,
            strings: Vec::new(),
        }
    }
}

impl StoreConfig {
    /// The defaults with both caches sized from one memory budget: three quarters for
    /// loaded documents, one quarter for redb's pages. What the binaries' `--cache-mb`
    /// sets.
    pub fn with_cache_budget(bytes: u64) -> Self {
        Self {
            doc_cache_bytes: bytes / 4 * 3,
            redb_cache_bytes: usize::try_from(bytes / 4).unwrap_or(usize::MAX),
            ..Self::default()
        }
    }

    /// How strings written through JSON into `ns` are stored.
    pub fn strings_for(&self, ns: &Namespace) -> json::Strings {
        self.strings
            .iter()
            .find(|(p, _)| p.matches(ns))
            .map_or(json::Strings::Auto, |(_, s)| *s)
    }
}

/// The answer to a write, given once it is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The document's heads right after this write.
    pub heads: Vec<ChangeHash>,
    /// The document's feed position after the commit that carried this write.
    pub seq: FeedSeq,
    /// False when the write changed nothing (no ops were emitted).
    pub changed: bool,
}

fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How many batches an early subscriber may fall behind before it misses some. Small:
/// a notice is only worth something while it is fresh.
const EARLY_CAPACITY: usize = 8;

/// A document's content as of one commit.
#[derive(Clone, Debug, PartialEq)]
pub struct DocSnapshot {
    /// The user content.
    pub content: Map<String, Json>,
    /// The heads the content reflects (the ETag of the HTTP API).
    pub heads: Vec<ChangeHash>,
    /// The document's feed position.
    pub seq: FeedSeq,
}

/// A document's Automerge bytes, as `save()` writes them.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedDoc {
    /// A complete, compressed Automerge document.
    pub bytes: Vec<u8>,
    /// Its heads.
    pub heads: Vec<ChangeHash>,
    /// Whether it carries a tombstone.
    pub deleted: bool,
}

/// One line of a namespace listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocSummary {
    /// The document id.
    pub id: DocId,
    /// Its heads.
    pub heads: Vec<ChangeHash>,
    /// Whether it carries a tombstone.
    pub deleted: bool,
    /// Its feed position.
    pub seq: FeedSeq,
}

/// How a document is laid out on disk, for operators and compaction checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocStorage {
    /// Chunks stored (a snapshot and the change chunks after it).
    pub chunks: u64,
    /// Bytes of the snapshot chunk.
    pub snapshot_bytes: u64,
    /// Bytes of the change chunks after the snapshot.
    pub incremental_bytes: u64,
}

/// A node's document store. Cheap to clone; all clones share one database and writer.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    commit_times: Arc<CommitTimes>,
    db: Arc<db::Db>,
    cache: Arc<DocCache>,
    requests: Option<mpsc::UnboundedSender<WriteRequest>>,
    feed: watch::Receiver<FeedSeq>,
    early: broadcast::Sender<Arc<[EarlyDoc]>>,
    /// Changes only by [`Store::renew_feed_epoch`].
    feed_epoch: std::sync::RwLock<u128>,
    writer: Option<JoinHandle<()>>,
    hooks: Arc<writer::FaultHooks>,
    quarantine: Arc<quarantine::Quarantine>,
    writer_panics: Arc<std::sync::atomic::AtomicU64>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field(
                "feed_epoch",
                &format_args!("{:032x}", self.feed_epoch.read().map_or(0, |e| *e)),
            )
            .field("last_seq", &*self.feed.borrow())
            .field("cache", &self.cache)
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue lets the writer commit what is queued and exit.
        self.requests.take();
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
    }
}

impl Store {
    /// Opens the store at `path`, creating it (with a fresh random feed epoch) if absent.
    pub fn open(path: impl AsRef<Path>, cfg: StoreConfig) -> Result<Self, StoreError> {
        if !path.as_ref().exists() {
            schema::create(path.as_ref())?;
        }
        let db = redb::Builder::new()
            .set_cache_size(cfg.redb_cache_bytes)
            .create(path.as_ref())?;
        let (feed_epoch, next_seq, next_doc_key) = schema::init_tables(&db)?;
        let db = Arc::new(db::Db::new(
            db,
            path.as_ref().to_path_buf(),
            cfg.redb_cache_bytes,
        ));
        let cache = Arc::new(DocCache::new(cfg.doc_cache_bytes));
        let (feed_tx, feed) = watch::channel(FeedSeq(next_seq - 1));
        let (requests, rx) = mpsc::unbounded_channel();
        let (early, _) = broadcast::channel(EARLY_CAPACITY);
        let commit_times = Arc::new(CommitTimes::new());
        let hooks = Arc::new(writer::FaultHooks::default());
        let quarantine = Arc::new(quarantine::Quarantine::default());
        let writer_panics = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = Writer {
            quarantine: quarantine.clone(),
            panics: writer_panics.clone(),
            unflushed: 0,
            last_durable: std::time::Instant::now(),
            hooks: hooks.clone(),
            killed: false,
            commit_times: commit_times.clone(),
            db: db.clone(),
            cache: cache.clone(),
            cfg,
            // A fresh actor per open: a node restored from an old backup can never reuse
            // sequence numbers that peers have already seen with other content.
            actor: ActorId::random(),
            next_seq,
            next_doc_key,
            feed_tx,
            early_tx: early.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("tidesync-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::WriteFailed(format!("cannot start the writer: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                commit_times,
                db,
                cache,
                requests: Some(requests),
                feed,
                early,
                feed_epoch: std::sync::RwLock::new(feed_epoch),
                writer: Some(handle),
                hooks,
                quarantine,
                writer_panics,
            }),
        })
    }

    /// The random id this database was created with. It changes only when the database is
    /// recreated, which tells peers to start their cursors into this feed over.
    pub fn feed_epoch(&self) -> u128 {
        self.inner.feed_epoch.read().map_or(0, |e| *e)
    }

    /// The storage fault that stops writes, while it lasts (see [`Fault`]).
    pub fn fault(&self) -> Option<Fault> {
        self.inner.db.fault()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        self.inner.db.path()
    }

    /// A consistent copy of this store, written to the new file `out` while writes go on:
    /// it holds exactly the commits before the call.
    pub fn backup_to(&self, out: &Path) -> Result<BackupSummary, StoreError> {
        let snapshot = self.inner.db.get()?.begin_read()?;
        backup::copy_snapshot(&snapshot, out)
    }

    /// A copy of the store file `db` of a stopped node, written to the new file `out`.
    pub fn backup_file(db: &Path, out: &Path) -> Result<BackupSummary, StoreError> {
        backup::copy_file(db, out)
    }

    /// Fault injection for tests: overwrites the stored bytes of document `ns/id` in the
    /// store file `db` of a stopped node with bytes that do not load (same lengths), as
    /// bit rot that the file's own checks do not catch would. Returns the bytes damaged.
    #[doc(hidden)]
    pub fn damage_document(db: &Path, ns: &Namespace, id: &DocId) -> Result<u64, StoreError> {
        use redb::ReadableTable;
        let db = redb::Database::open(db)?;
        let txn = db.begin_write()?;
        let mut damaged = 0u64;
        {
            let docs = txn.open_table(DOCS)?;
            let meta = match docs.get((ns.as_str(), id.as_str()))? {
                Some(raw) => DocMeta::decode(raw.value())?,
                None => return Err(StoreError::NotFound),
            };
            let mut chunks = txn.open_table(CHUNKS)?;
            for n in meta.first_chunk..meta.next_chunk {
                let len = match chunks.get((meta.key, n))? {
                    Some(v) => v.value().len(),
                    None => continue,
                };
                let garbage: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(37) ^ 0x5a)
                    .collect();
                chunks.insert((meta.key, n), garbage.as_slice())?;
                damaged += len as u64;
            }
        }
        txn.commit()?;
        Ok(damaged)
    }

    /// Puts the copy `from` (made by [`Store::backup_to`] or [`Store::backup_file`]) in
    /// place of the store file `db` of a stopped node, and moves it to a new feed epoch, so
    /// that peers walk its feed again and set aside what they stored against the old one:
    /// it then gets back everything another node holds. The file it replaces is kept as
    /// `db.before-restore`. Returns the new epoch.
    pub async fn restore(from: &Path, db: &Path) -> Result<u128, StoreError> {
        if db.exists() {
            // Fails while the node runs: redb holds its file locked.
            drop(redb::Database::open(db).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::WriteFailed(format!(
                    "{} is in use: stop the node before restoring",
                    db.display()
                )),
                e => e.into(),
            })?);
        }
        let staged = db.with_extension("restoring");
        let _ = std::fs::remove_file(&staged);
        std::fs::copy(from, &staged).map_err(|e| backup::io_error("copying to", &staged, e))?;
        let epoch = {
            let store = Store::open(&staged, StoreConfig::default())?;
            store.renew_feed_epoch().await?
        };
        if db.exists() {
            let kept = db.with_extension("redb.before-restore");
            std::fs::rename(db, &kept).map_err(|e| backup::io_error("keeping", &kept, e))?;
        }
        std::fs::rename(&staged, db).map_err(|e| backup::io_error("moving into place", db, e))?;
        if let Some(dir) = db.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(epoch)
    }

    /// Moves the feed to a new random epoch, durably. Peers then start their cursors into
    /// this feed over, and set aside the sync states they stored for the old epoch: what
    /// a node restored from an old copy needs, since their cursors may skip the writes it
    /// makes under reused feed positions, and their states may claim changes it lost.
    /// Connections opened before must be closed: their hellos named the old epoch.
    pub async fn renew_feed_epoch(&self) -> Result<u128, StoreError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| {
            StoreError::WriteFailed(format!("no randomness for the feed epoch: {e}"))
        })?;
        let op = WriteOp::SetMeta {
            entries: vec![(schema::KEY_EPOCH.into(), bytes.to_vec())],
        };
        self.submit(None, op, None).await?;
        let epoch = u128::from_le_bytes(bytes);
        if let Ok(mut e) = self.inner.feed_epoch.write() {
            *e = epoch;
        }
        Ok(epoch)
    }

    /// Replaces the content of a document (creating it), emitting ops only for what changed.
    /// `if_match` makes the write conditional on the document's current heads.
    pub async fn put(
        &self,
        ns: &Namespace,
        id: &DocId,
        content: Json,
        if_match: Option<Vec<ChangeHash>>,
    ) -> Result<WriteOutcome, StoreError> {
        let content = into_object(content)?;
        self.write(ns, id, WriteOp::Replace(content), if_match)
            .await
    }

    /// Applies an RFC 7386 merge patch (a missing or deleted document counts as `{}`).
    pub async fn patch(
        &self,
        ns: &Namespace,
        id: &DocId,
        patch: Json,
        if_match: Option<Vec<ChangeHash>>,
    ) -> Result<WriteOutcome, StoreError> {
        let patch = into_object(patch)?;
        self.write(ns, id, WriteOp::Patch(patch), if_match).await
    }

    /// Deletes a document by writing a tombstone, which syncs like any other write.
    /// [`StoreError::NotFound`] if it is absent or already deleted.
    pub async fn delete(
        &self,
        ns: &Namespace,
        id: &DocId,
        if_match: Option<Vec<ChangeHash>>,
    ) -> Result<WriteOutcome, StoreError> {
        self.write(ns, id, WriteOp::Delete, if_match).await
    }

    /// Merges Automerge bytes (a saved document, changes, or both, from upstream Automerge)
    /// into a document, creating it if needed. Invalid bytes change nothing.
    pub async fn import(
        &self,
        ns: &Namespace,
        id: &DocId,
        bytes: Vec<u8>,
    ) -> Result<WriteOutcome, StoreError> {
        self.write(ns, id, WriteOp::Import(bytes), None).await
    }

    async fn write(
        &self,
        ns: &Namespace,
        id: &DocId,
        op: WriteOp,
        if_match: Option<Vec<ChangeHash>>,
    ) -> Result<WriteOutcome, StoreError> {
        let doc = Some((ns.clone(), id.clone()));
        Ok(self.submit(doc, op, if_match).await?.outcome)
    }

    async fn submit(
        &self,
        doc: Option<(Namespace, DocId)>,
        op: WriteOp,
        if_match: Option<Vec<ChangeHash>>,
    ) -> Result<Answer, StoreError> {
        let (reply, answer) = oneshot::channel();
        let req = WriteRequest {
            doc,
            op,
            if_match,
            reply,
        };
        let requests = self.inner.requests.as_ref().ok_or(StoreError::Closed)?;
        requests.send(req).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Receives `peer`'s Automerge sync message for a document and persists the document and
    /// the sync state in one commit; the reply is generated from what this returns, so a
    /// peer's changes are acknowledged only once durable. `apply.state` is the session's
    /// in-memory state (`None` loads the persisted one). With `apply.read_only`, changes in
    /// the message are ignored. Invalid changes are refused and change nothing.
    pub async fn apply_sync(&self, peer: &SyncPeer, apply: Apply) -> Result<Applied, StoreError> {
        let doc = Some((apply.ns.clone(), apply.id.clone()));
        let op = WriteOp::ApplySync {
            peer: peer.clone(),
            apply: Box::new(apply),
        };
        self.submit(doc, op, None)
            .await?
            .sync
            .ok_or_else(|| StoreError::WriteFailed("sync message was not applied".into()))
    }

    /// Records that every document of `peer`'s feed up to `cursor.seq` is here. Within one
    /// epoch a cursor only moves forward: an older one saved late changes nothing.
    pub async fn set_peer_cursor(&self, peer: &NodeId, cursor: Cursor) -> Result<(), StoreError> {
        let op = WriteOp::SetCursor {
            peer: peer.clone(),
            cursor,
        };
        self.submit(None, op, None).await.map(|_| ())
    }

    /// Records that `peer` was seen (connected, or just disconnected) now.
    pub async fn peer_seen(&self, peer: &NodeId) -> Result<(), StoreError> {
        let op = WriteOp::PeerSeen {
            peer: peer.clone(),
            unix_s: unix_now_s(),
        };
        self.submit(None, op, None).await.map(|_| ())
    }

    /// Drops everything kept for peers last seen more than `unseen_for` ago, except
    /// `keep` (the connected ones): their cursors and sync states, so a node that
    /// met thousands of short-lived peers does not keep their rows for ever. A forgotten
    /// peer that comes back syncs from scratch. A peer with rows but no record of when it
    /// was seen (kept by an older version) is recorded as seen now. Returns the peers
    /// forgotten.
    pub async fn forget_peers_unseen_for(
        &self,
        unseen_for: std::time::Duration,
        keep: &[NodeId],
    ) -> Result<Vec<NodeId>, StoreError> {
        let now = unix_now_s();
        let unseen_before = now.saturating_sub(unseen_for.as_secs());
        use redb::ReadableTable;
        let mut known: std::collections::BTreeMap<String, Option<u64>> = Default::default();
        {
            let txn = self.inner.db.get()?.begin_read()?;
            for entry in txn.open_table(PEERS)?.iter()? {
                known.insert(entry?.0.value().to_owned(), None);
            }
            for entry in txn.open_table(schema::PEER_SEEN)?.iter()? {
                let (k, v) = entry?;
                known.insert(k.value().to_owned(), Some(v.value()));
            }
        }
        // Submitted together, so they share commits: one fsync for many peers.
        let mut ops = Vec::new();
        for (name, seen) in known {
            let Ok(peer) = NodeId::new(&name) else {
                continue;
            };
            if keep.contains(&peer) {
                continue;
            }
            match seen {
                None => ops.push((None, WriteOp::PeerSeen { peer, unix_s: now })),
                Some(s) if s < unseen_before => {
                    let op = WriteOp::ForgetPeer {
                        peer: peer.clone(),
                        unseen_before,
                    };
                    ops.push((Some(peer), op));
                }
                Some(_) => {}
            }
        }
        let answers = futures_util::future::join_all(
            ops.into_iter()
                .map(|(peer, op)| async move { (peer, self.submit(None, op, None).await) }),
        )
        .await;
        let mut forgotten = Vec::new();
        for (peer, answer) in answers {
            if answer?.outcome.changed {
                forgotten.extend(peer);
            }
        }
        Ok(forgotten)
    }

    /// Keeps the deployment's revocation list (a CRL, DER) with the data, so a node that
    /// lost its `crl.pem` still starts with it.
    pub async fn set_revocation_list(&self, der: Vec<u8>) -> Result<(), StoreError> {
        let op = WriteOp::SetMeta {
            entries: vec![(KEY_REVOCATION_LIST.into(), der)],
        };
        self.submit(None, op, None).await.map(|_| ())
    }

    /// Keeps small records of a part of the node outside the store (a bus export's
    /// position), durably, in one commit. Keys are at most [`MAX_RECORD_KEY`] bytes and
    /// live apart from the store's own.
    pub async fn set_records(&self, records: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        let mut entries = Vec::with_capacity(records.len());
        for (key, value) in records {
            if key.len() > MAX_RECORD_KEY {
                return Err(StoreError::WriteFailed(format!(
                    "a record key of {} bytes; at most {MAX_RECORD_KEY}",
                    key.len()
                )));
            }
            entries.push((format!("{RECORD_PREFIX}{key}").into(), value));
        }
        self.submit(None, WriteOp::SetMeta { entries }, None)
            .await
            .map(|_| ())
    }

    /// A record kept by [`Store::set_records`].
    pub fn record(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.inner.db.get()?.begin_read()?;
        let meta = txn.open_table(META)?;
        let key = format!("{RECORD_PREFIX}{key}");
        Ok(meta.get(key.as_str())?.map(|v| v.value().to_vec()))
    }

    /// The revocation list kept by [`Store::set_revocation_list`], unchecked.
    pub fn revocation_list(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.inner.db.get()?.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(KEY_REVOCATION_LIST)?.map(|v| v.value().to_vec()))
    }

    /// Waits until every write queued before this call was committed (or dropped, for a
    /// peer's message whose session has ended).
    pub async fn barrier(&self) -> Result<(), StoreError> {
        self.submit(None, WriteOp::Barrier, None).await.map(|_| ())
    }

    /// How far this node has durably received `peer`'s feed.
    pub fn peer_cursor(&self, peer: &NodeId) -> Result<Option<Cursor>, StoreError> {
        let txn = self.inner.db.get()?.begin_read()?;
        let peers = txn.open_table(PEERS)?;
        peers
            .get(peer.as_str())?
            .map(|v| schema::decode_cursor(v.value()))
            .transpose()
    }

    /// A document as committed, with the sync state persisted for `peer` (warm-started; `None`
    /// if none, or if it belongs to another of the peer's feed epochs). `None` if absent.
    pub fn load_for_sync(
        &self,
        ns: &Namespace,
        id: &DocId,
        peer: &SyncPeer,
    ) -> Result<Option<LoadedDoc>, StoreError> {
        let mut found = None;
        let doc = self.with_doc_arc(ns, id, |meta, doc| {
            found = Some((meta.key, meta.stored_bytes()));
            doc
        })?;
        let (Some(doc), Some((key, stored_bytes))) = (doc, found) else {
            return Ok(None);
        };
        let state = read_sync_state(&self.inner.db.get()?.begin_read()?, peer, key)?;
        Ok(Some(LoadedDoc {
            doc,
            state,
            stored_bytes,
        }))
    }

    /// The document as committed (deleted ones too), or `None` if absent.
    pub fn doc(&self, ns: &Namespace, id: &DocId) -> Result<Option<Arc<Automerge>>, StoreError> {
        self.with_doc_arc(ns, id, |_, doc| doc)
    }

    /// Whether the committed document holds every change of `heads` (false if absent).
    pub fn holds_heads(
        &self,
        ns: &Namespace,
        id: &DocId,
        heads: &[ChangeHash],
    ) -> Result<bool, StoreError> {
        Ok(self
            .with_doc(ns, id, |_, doc| {
                model::automerge_bytes::holds_all(doc, heads)
            })?
            .unwrap_or(false))
    }

    /// The document's content, or `None` if it is absent or deleted.
    pub fn get(&self, ns: &Namespace, id: &DocId) -> Result<Option<DocSnapshot>, StoreError> {
        let read = self.with_doc(ns, id, |meta, doc| {
            (!meta.deleted)
                .then(|| {
                    Ok(DocSnapshot {
                        content: json::read_root(doc)?,
                        heads: meta.heads(),
                        seq: FeedSeq(meta.seq),
                    })
                })
                .transpose()
        })?;
        Ok(read.transpose().map_err(StoreError::Model)?.flatten())
    }

    /// The document as Automerge bytes (deleted documents too: the tombstone is content).
    pub fn export(&self, ns: &Namespace, id: &DocId) -> Result<Option<ExportedDoc>, StoreError> {
        self.with_doc(ns, id, |meta, doc| ExportedDoc {
            bytes: doc.save(),
            heads: meta.heads(),
            deleted: meta.deleted,
        })
    }

    /// The fields of a document with concurrent values; `None` if absent or deleted.
    pub fn conflicts(
        &self,
        ns: &Namespace,
        id: &DocId,
    ) -> Result<Option<Vec<Conflict>>, StoreError> {
        let read = self.with_doc(ns, id, |meta, doc| {
            (!meta.deleted).then(|| model::conflicts(doc)).transpose()
        })?;
        Ok(read.transpose().map_err(StoreError::Model)?.flatten())
    }

    /// Runs `f` on the committed state of a document, loading it if it is not cached.
    fn with_doc<T>(
        &self,
        ns: &Namespace,
        id: &DocId,
        f: impl FnOnce(&DocMeta, &Automerge) -> T,
    ) -> Result<Option<T>, StoreError> {
        self.with_doc_arc(ns, id, |meta, doc| f(meta, &doc))
    }

    fn with_doc_arc<T>(
        &self,
        ns: &Namespace,
        id: &DocId,
        f: impl FnOnce(&DocMeta, Arc<Automerge>) -> T,
    ) -> Result<Option<T>, StoreError> {
        let quarantine = &self.inner.quarantine;
        quarantine.check(ns, id)?;
        let txn = self.inner.db.get()?.begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let Some(raw) = docs.get((ns.as_str(), id.as_str()))? else {
            return Ok(None);
        };
        let meta = DocMeta::decode(raw.value()).map_err(|e| quarantine.on_load_error(ns, id, e))?;
        let doc = match self.inner.cache.get(meta.key, meta.seq) {
            Some(doc) => doc,
            None => {
                let chunks = txn.open_table(CHUNKS)?;
                let doc =
                    load_chunks(&chunks, &meta).map_err(|e| quarantine.on_load_error(ns, id, e))?;
                let doc = Arc::new(doc);
                self.inner.cache.insert(
                    meta.key,
                    CachedDoc {
                        seq: meta.seq,
                        doc: doc.clone(),
                        weight: CachedDoc::weigh(&doc, meta.stored_bytes()),
                    },
                );
                doc
            }
        };
        Ok(Some(f(&meta, doc)))
    }

    /// The on-disk layout of a document, or `None` if absent.
    pub fn doc_storage(
        &self,
        ns: &Namespace,
        id: &DocId,
    ) -> Result<Option<DocStorage>, StoreError> {
        let txn = self.inner.db.get()?.begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let Some(raw) = docs.get((ns.as_str(), id.as_str()))? else {
            return Ok(None);
        };
        let meta = DocMeta::decode(raw.value())?;
        Ok(Some(DocStorage {
            chunks: meta.next_chunk - meta.first_chunk,
            snapshot_bytes: meta.snapshot_bytes,
            incremental_bytes: meta.incremental_bytes,
        }))
    }

    /// Every document in a namespace `include` accepts, deleted ones included, with its
    /// heads: what an audit compares. One read transaction, a scan of the documents'
    /// records only (never their bytes).
    pub fn audit_items(
        &self,
        include: impl Fn(&Namespace) -> bool,
    ) -> Result<Vec<(Namespace, DocId, Vec<ChangeHash>)>, StoreError> {
        use redb::ReadableTable;
        let txn = self.inner.db.get()?.begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let mut out = Vec::new();
        let mut current: Option<(String, Option<Namespace>)> = None;
        for entry in docs.iter()? {
            let (k, v) = entry?;
            let (ns_text, id) = k.value();
            // Namespaces come in order: each is judged once.
            if current.as_ref().is_none_or(|(text, _)| text != ns_text) {
                let ns = Namespace::new(ns_text).ok().filter(|ns| include(ns));
                current = Some((ns_text.to_owned(), ns));
            }
            let Some((_, Some(ns))) = &current else {
                continue;
            };
            let Ok(meta) = DocMeta::decode(v.value()) else {
                continue;
            };
            out.push((ns.clone(), stored_id(id)?, meta.heads()));
        }
        Ok(out)
    }

    /// Every document of a namespace, deleted ones included, in id order.
    pub fn list(&self, ns: &Namespace) -> Result<Vec<DocSummary>, StoreError> {
        let txn = self.inner.db.get()?.begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let mut out = Vec::new();
        for entry in docs.range((ns.as_str(), "")..)? {
            let (k, v) = entry?;
            let (entry_ns, id) = k.value();
            if entry_ns != ns.as_str() {
                break;
            }
            let id = stored_id(id)?;
            let meta = match DocMeta::decode(v.value()) {
                Ok(meta) => meta,
                Err(e) => {
                    self.inner.quarantine.on_load_error(ns, &id, e);
                    continue;
                }
            };
            out.push(DocSummary {
                id,
                heads: meta.heads(),
                deleted: meta.deleted,
                seq: FeedSeq(meta.seq),
            });
        }
        Ok(out)
    }

    /// How many documents the feed holds after position `after`, counted up to `cap` (the
    /// feed keeps one entry per document, at its last write).
    pub fn feed_entries_after(&self, after: FeedSeq, cap: u64) -> Result<u64, StoreError> {
        let txn = self.inner.db.get()?.begin_read()?;
        let feed = txn.open_table(FEED)?;
        let mut n = 0u64;
        for entry in feed.range(after.0.saturating_add(1)..)? {
            entry?;
            n += 1;
            if n >= cap {
                break;
            }
        }
        Ok(n)
    }

    /// Up to `limit` feed entries after `since`, oldest first. Each document appears once,
    /// at its latest position, so a reader that stores the last seq it saw never misses a
    /// change and never sees a stale one.
    pub fn changes_since(
        &self,
        since: FeedSeq,
        limit: usize,
    ) -> Result<Vec<FeedEntry>, StoreError> {
        let txn = self.inner.db.get()?.begin_read()?;
        let feed = txn.open_table(FEED)?;
        let docs = txn.open_table(DOCS)?;
        let mut out = Vec::new();
        for entry in feed.range(since.0.saturating_add(1)..)? {
            if out.len() >= limit {
                break;
            }
            let (seq, name) = entry?;
            let (ns, id) = name.value();
            let raw = docs
                .get((ns, id))?
                .ok_or_else(|| StoreError::Corrupt(format!("feed names missing doc {ns}/{id}")))?;
            let (ns, id) = (Namespace::new(ns).map_err(corrupt_name)?, stored_id(id)?);
            // A document whose record is damaged is set aside, not a reason to stop the
            // walk: every reader after it would stop at the same place.
            let meta = match DocMeta::decode(raw.value()) {
                Ok(meta) => meta,
                Err(e) => {
                    self.inner.quarantine.on_load_error(&ns, &id, e);
                    continue;
                }
            };
            out.push(FeedEntry {
                seq: FeedSeq(seq.value()),
                ns,
                id,
                heads: meta.heads(),
                deleted: meta.deleted,
            });
        }
        Ok(out)
    }

    /// The documents set aside because their stored bytes do not load.
    pub fn quarantined(&self) -> Vec<Quarantined> {
        self.inner.quarantine.list()
    }

    /// How many documents are set aside.
    pub fn quarantined_count(&self) -> usize {
        self.inner.quarantine.len()
    }

    /// Times the writer thread panicked and recovered (a defect; each is logged).
    pub fn writer_panics(&self) -> u64 {
        self.inner
            .writer_panics
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The feed position of the latest committed write.
    pub fn last_seq(&self) -> FeedSeq {
        *self.inner.feed.borrow()
    }

    /// A receiver that sees [`Store::last_seq`] move after every commit, for live push
    /// and watchers.
    pub fn subscribe(&self) -> watch::Receiver<FeedSeq> {
        self.inner.feed.clone()
    }

    /// Fault injection for tests: runs `hook` on the writer thread once, right after the
    /// next early notice is sent and before its batch is written. A copy of the database
    /// file taken there is what a `kill -9` in that window leaves behind; if `hook`
    /// returns true the writer stops there, as if killed (later writes fail `Closed`).
    #[doc(hidden)]
    pub fn at_next_early_notice(&self, hook: impl FnOnce() -> bool + Send + 'static) {
        if let Ok(mut h) = self.inner.hooks.after_notice.lock() {
            *h = Some(Box::new(hook));
        }
    }

    /// Fault injection for tests: the writer panics while applying the next write of
    /// `ns/id`, as a defect in the apply code would.
    #[doc(hidden)]
    pub fn panic_when_writing(&self, ns: &Namespace, id: &DocId) {
        if let Ok(mut p) = self.inner.hooks.panic_on.lock() {
            *p = Some((ns.clone(), id.clone()));
        }
    }

    /// The documents of each write batch, sent while the batch's fsync runs, before it is
    /// durable and before [`Store::subscribe`] moves. Sync uses it to overlap sending a
    /// change with committing it; the commit may still fail, so a receiver must treat it
    /// as a hint and nothing more. Only small batches (live traffic) give notices, and a
    /// receiver that falls behind misses some.
    pub fn subscribe_early(&self) -> broadcast::Receiver<Arc<[EarlyDoc]>> {
        self.inner.early.subscribe()
    }

    /// The persisted sync state with `peer` of a document, warm-started; `None` if there is
    /// none (a document not committed yet has none).
    pub fn sync_state(
        &self,
        peer: &SyncPeer,
        ns: &Namespace,
        id: &DocId,
    ) -> Result<Option<automerge::sync::State>, StoreError> {
        let txn = self.inner.db.get()?.begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let Some(raw) = docs.get((ns.as_str(), id.as_str()))? else {
            return Ok(None);
        };
        read_sync_state(&txn, peer, DocMeta::decode(raw.value())?.key)
    }

    /// How many documents the store holds, deleted ones included.
    pub fn doc_count(&self) -> Result<u64, StoreError> {
        let txn = self.inner.db.get()?.begin_read()?;
        Ok(txn.open_table(DOCS)?.len()?)
    }

    /// How long durable commits took so far.
    pub fn commit_times(&self) -> &CommitTimes {
        &self.inner.commit_times
    }

    /// Documents in the cache and their estimated bytes.
    pub fn cache_usage(&self) -> (usize, u64) {
        self.inner.cache.usage()
    }
}

fn into_object(v: Json) -> Result<Map<String, Json>, ModelError> {
    match v {
        Json::Object(m) => Ok(m),
        Json::Array(_) => Err(ModelError::NotAnObject("an array")),
        Json::String(_) => Err(ModelError::NotAnObject("a string")),
        Json::Number(_) => Err(ModelError::NotAnObject("a number")),
        Json::Bool(_) => Err(ModelError::NotAnObject("a boolean")),
        Json::Null => Err(ModelError::NotAnObject("null")),
    }
}

/// The sync state with `peer` of the document with internal key `key`, warm-started.
fn read_sync_state(
    txn: &redb::ReadTransaction,
    peer: &SyncPeer,
    key: u64,
) -> Result<Option<automerge::sync::State>, StoreError> {
    let states = txn.open_table(SYNC_STATE)?;
    Ok(states
        .get((peer.id.as_str(), key))?
        .and_then(|v| sync_state::decode(v.value(), peer.epoch)))
}

fn corrupt_name(e: ModelError) -> StoreError {
    StoreError::Corrupt(format!("stored name is invalid: {e}"))
}

fn stored_id(id: &str) -> Result<DocId, StoreError> {
    DocId::new(id).map_err(corrupt_name)
}
