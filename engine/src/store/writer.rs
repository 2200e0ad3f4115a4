//! The single writer: batches concurrent writes into one durable redb transaction.
//!
//! Requests queue on a channel. The writer takes the first, then everything else already
//! queued (up to `max_batch`), applies them all to their documents, appends the new Automerge
//! changes as chunks, moves each touched document to the end of the feed, and commits once
//! with `Durability::Immediate`. Only then does any request of the batch get its answer: one
//! fsync is shared by the whole batch, and an idle store commits a lone write at once. A
//! batch that changed no document (only sync bookkeeping) commits without fsync: losing it
//! in a crash only makes the next sync exchange a little longer.
//!
//! If the commit fails, every request of the batch gets an error and the cached copies of
//! the touched documents are dropped, so memory never runs ahead of the disk.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use automerge::sync::{State, SyncDoc};
use automerge::{ActorId, Automerge, ChangeHash};
use redb::{Database, Durability, ReadableTable, Table};
use serde_json::{Map, Value as Json};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::cache::{CachedDoc, DocCache};
use super::commit_times::CommitTimes;
use super::schema::{
    decode_cursor, encode_cursor, encode_heads, DocMeta, CHUNKS, DOCS, FEED, META, PEERS,
    PEER_SEEN, SYNC_STATE,
};
use super::{sync_state, FeedSeq, StoreConfig, WriteOutcome};
use crate::error::{ModelError, StoreError};
use crate::model::automerge_bytes::{check_new_depth, import};
use crate::model::{json, op_count, same_heads, Cursor, DocId, Namespace, NodeId, SyncPeer};
use crate::sync::{Applied, Apply, EarlyDoc};

/// What a write request does.
#[derive(Debug)]
pub(crate) enum WriteOp {
    /// Replace the user content.
    Replace(Map<String, Json>),
    /// Apply an RFC 7386 merge patch.
    Patch(Map<String, Json>),
    /// Set the tombstone.
    Delete,
    /// Merge Automerge bytes (a saved document and/or changes).
    Import(Vec<u8>),
    /// Receive a peer's Automerge sync message and persist the resulting sync state.
    ApplySync { peer: SyncPeer, apply: Box<Apply> },
    /// Record how far this node has durably received a peer's feed. Targets no document.
    SetCursor { peer: NodeId, cursor: Cursor },
    /// Keep a small node-level record (the revocation list) in the `meta` table. Targets
    /// no document.
    SetMeta {
        entries: Vec<(std::borrow::Cow<'static, str>, Vec<u8>)>,
    },
    /// Record that a peer was seen now (connected or disconnected). Targets no document.
    PeerSeen { peer: NodeId, unix_s: u64 },
    /// Drop every row kept for a peer (its cursor, its sync states, when it was seen) if
    /// it was last seen before `unseen_before` (Unix seconds) and saved no cursor in this
    /// batch. Targets no document; answered `changed` if it was dropped.
    ForgetPeer { peer: NodeId, unseen_before: u64 },
    /// Nothing: answered once every request queued before it was committed or dropped.
    Barrier,
}

#[derive(Debug)]
pub(crate) struct WriteRequest {
    /// The document written; `None` for requests that touch no document.
    pub doc: Option<(Namespace, DocId)>,
    pub op: WriteOp,
    pub if_match: Option<Vec<ChangeHash>>,
    pub reply: oneshot::Sender<Result<Answer, StoreError>>,
}

/// The answer to one request.
#[derive(Debug)]
pub(crate) struct Answer {
    pub outcome: WriteOutcome,
    /// For a sync message: what the session replies from.
    pub sync: Option<Applied>,
}

/// A document being changed by the current batch.
struct Working {
    ns: Namespace,
    id: DocId,
    /// `None` for a document this batch creates.
    meta: Option<DocMeta>,
    doc: Automerge,
    heads_before: Vec<ChangeHash>,
    /// The document, frozen once persisted when it was published before the commit.
    shared: Option<Arc<Automerge>>,
}

impl Working {
    fn changed(&self) -> bool {
        !same_heads(&self.doc.get_heads(), &self.heads_before)
    }
}

/// One request's result before the batch commits.
struct Pending {
    slot: Option<usize>,
    heads: Vec<ChangeHash>,
    sync_state: Option<(SyncPeer, State)>,
    /// Whether `sync_state` is persisted: not for a peer's uncommitted version (see
    /// `Apply::provisional`), where the stored state stays as it was.
    persist_state: bool,
    /// Changes a sync message added to the document.
    new_changes: u64,
    /// A [`WriteOp::ForgetPeer`] dropped the peer's rows.
    forgot: bool,
}

impl Pending {
    /// The result of a request that targets no document.
    fn bookkeeping() -> Self {
        Self {
            slot: None,
            heads: Vec::new(),
            sync_state: None,
            persist_state: false,
            new_changes: 0,
            forgot: false,
        }
    }
}

/// Most documents a batch may change and still give an early notice.
const EARLY_MAX_DOCS: usize = 32;

pub(crate) struct Writer {
    pub db: Arc<super::db::Db>,
    pub cache: Arc<DocCache>,
    pub cfg: StoreConfig,
    pub actor: ActorId,
    pub next_seq: u64,
    pub next_doc_key: u64,
    pub feed_tx: watch::Sender<FeedSeq>,
    /// Changed documents of a batch, sent just before its commit.
    pub early_tx: broadcast::Sender<Arc<[EarlyDoc]>>,
    /// Durations of durable commits, for metrics.
    pub commit_times: Arc<CommitTimes>,
    /// Faults tests inject.
    pub hooks: Arc<FaultHooks>,
    /// Set when a hook chose to die: the writer stops where it is, like a killed process.
    pub killed: bool,
    /// Documents whose stored bytes do not load.
    pub quarantine: Arc<super::quarantine::Quarantine>,
    /// Batches that panicked (see [`Writer::run`]).
    pub panics: Arc<AtomicU64>,
    /// Bookkeeping-only commits since the last durable one.
    pub unflushed: u32,
    /// When the last durable commit was made.
    pub last_durable: std::time::Instant,
}

/// Faults tests inject into the writer.
#[derive(Default)]
pub struct FaultHooks {
    /// Runs once right after the next early notice, before its batch is written (see
    /// [`super::Store::at_next_early_notice`]).
    pub after_notice: std::sync::Mutex<Option<AfterNotice>>,
    /// The next write of this document panics (see [`super::Store::panic_when_writing`]).
    pub panic_on: std::sync::Mutex<Option<(Namespace, DocId)>>,
}

/// A fault-injection hook: what runs in the window between an early notice and its commit.
/// Returning true kills the writer there: the batch is not written, nothing queued after
/// it is either, and there is no final flush.
pub type AfterNotice = Box<dyn FnOnce() -> bool + Send>;

impl Writer {
    /// Runs until every sender is gone; then the remaining queue is drained and committed.
    pub fn run(mut self, mut rx: mpsc::UnboundedReceiver<WriteRequest>) {
        let mut batch = Vec::with_capacity(self.cfg.max_batch);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.cfg.max_batch {
                match rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            // Panics in the batch's work are caught closer in (see `commit_batch`); one
            // here, after the commit, would otherwise end the store: every later write
            // would fail `Closed` until a restart.
            let outcome = catch_unwind(AssertUnwindSafe(|| self.commit_batch(&mut batch)));
            if let Err(panic) = outcome {
                self.recover_from_panic(&mut batch, panic.as_ref());
            }
            if self.killed {
                return;
            }
        }
        // Bookkeeping batches commit without fsync; a clean close makes them durable.
        let flushed = || -> Result<(), StoreError> {
            let mut txn = self.db.get()?.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            txn.commit()?;
            Ok(())
        };
        if let Err(e) = flushed() {
            tracing::warn!(error = %e, "final flush of the store failed");
        }
    }

    fn commit_batch(&mut self, batch: &mut Vec<WriteRequest>) {
        let db = match self.db.get() {
            Ok(db) => db,
            // A storage fault took the database away: try again now.
            Err(_) => match self.reopened() {
                Ok(db) => db,
                Err(e) => {
                    for req in batch.drain(..) {
                        let _ = req.reply.send(Err(self.failure(&e)));
                    }
                    return;
                }
            },
        };
        let (next_seq, next_doc_key) = (self.next_seq, self.next_doc_key);
        let mut working: Vec<Working> = Vec::new();
        let mut pending: Vec<Result<Pending, StoreError>> = Vec::with_capacity(batch.len());
        // A panic is a defect, but it must not end the store. Inside the transaction it is
        // dropped uncommitted, so nothing of the batch is stored: it fails like a batch
        // whose commit failed, and the writer goes on from what is committed.
        let result = catch_unwind(AssertUnwindSafe(|| {
            self.apply_and_commit(&db, batch, &mut working, &mut pending)
        }))
        .unwrap_or_else(|panic| {
            self.cache.clear();
            Err(StoreError::WriteFailed(
                self.panicked(panic.as_ref(), batch.len()),
            ))
        });
        let replies = batch.drain(..).map(|r| r.reply);
        match result {
            Ok(seqs) => {
                // Bookkeeping commits may fit on a full disk; only a document written
                // shows the space is back.
                if seqs.iter().any(|(_, changed)| *changed) {
                    self.db.committed();
                }
                let docs: Vec<Option<Arc<Automerge>>> = working
                    .into_iter()
                    .map(|w| {
                        let meta = w.meta?;
                        let doc = w.shared.unwrap_or_else(|| Arc::new(w.doc));
                        let weight = CachedDoc::weigh(&doc, meta.stored_bytes());
                        self.cache.insert(
                            meta.key,
                            CachedDoc {
                                seq: meta.seq,
                                doc: doc.clone(),
                                weight,
                            },
                        );
                        Some(doc)
                    })
                    .collect();
                // Publish the new feed position before answering, so a caller that sees
                // its write acknowledged also sees it in `last_seq`.
                self.feed_tx.send_replace(FeedSeq(self.next_seq - 1));
                for (reply, p) in replies.zip(pending) {
                    let _ = reply.send(p.map(|p| {
                        let (seq, changed) = p.slot.map_or((0, p.forgot), |s| seqs[s]);
                        let doc = p.slot.and_then(|s| docs[s].clone());
                        Answer {
                            outcome: WriteOutcome {
                                heads: p.heads,
                                seq: FeedSeq(seq),
                                changed,
                            },
                            sync: p.sync_state.map(|(_, state)| Applied {
                                state,
                                doc: doc.unwrap_or_default(),
                                changes_applied: p.new_changes,
                            }),
                        }
                    }));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store write batch failed; nothing of it was stored");
                self.next_seq = next_seq;
                self.next_doc_key = next_doc_key;
                // The batch's changes may have been sent to peers before the commit, and
                // the same (actor, seq) must never name two different changes: continue
                // under a new actor.
                self.actor = ActorId::random();
                for w in &working {
                    if let Some(meta) = &w.meta {
                        self.cache.remove(meta.key);
                    }
                }
                // redb refuses every later write after an I/O failure: open it again.
                if self.db.after_failure(db, &e) {
                    if let Err(e) = self.reinit() {
                        tracing::error!(error = %e, "reading the reopened database failed");
                    }
                }
                for reply in replies {
                    let _ = reply.send(Err(self.failure(&e)));
                }
            }
        }
    }

    /// Counts and logs a caught panic that cost `requests` writes; returns the reason
    /// they are answered.
    fn panicked(&self, panic: &(dyn std::any::Any + Send), requests: usize) -> String {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        self.panics.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            panic = %what,
            requests,
            "the store writer panicked; those writes were not stored, and the writer goes \
             on from the committed state (this is a defect: please report it)"
        );
        format!("internal error while writing ({what}); the write is not acknowledged")
    }

    /// The fault a test asked for with [`super::Store::panic_when_writing`].
    fn panic_if_asked(&self, key: &(Namespace, DocId)) {
        let asked = self
            .hooks
            .panic_on
            .lock()
            .ok()
            .and_then(|mut p| p.take_if(|k| k == key));
        if asked.is_some() {
            panic!("injected fault while writing {}/{}", key.0, key.1);
        }
    }

    /// After a panic past the commit (a defect in answering): the requests not yet answered
    /// are told so, and the writer starts again from the committed state under a new actor
    /// (an (actor, seq) must never name two different changes).
    fn recover_from_panic(
        &mut self,
        batch: &mut Vec<WriteRequest>,
        panic: &(dyn std::any::Any + Send),
    ) {
        let failed = self.panicked(panic, batch.len());
        self.actor = ActorId::random();
        if let Err(e) = self.reinit() {
            tracing::error!(error = %e, "reading the committed state after the panic failed");
        }
        for req in batch.drain(..) {
            let _ = req.reply.send(Err(StoreError::WriteFailed(failed.clone())));
        }
    }

    /// What a failed batch's writes are answered: the storage fault while there is one
    /// (507 for a full disk, else 503), else the failure itself.
    fn failure(&self, e: &StoreError) -> StoreError {
        match self.db.fault() {
            Some(f) => f.to_error(),
            None => StoreError::WriteFailed(e.to_string()),
        }
    }

    /// Opens the database again after a storage fault, and reads the counters back.
    fn reopened(&mut self) -> Result<Arc<Database>, StoreError> {
        let db = self.db.reopen()?;
        self.reinit()?;
        Ok(db)
    }

    /// After the database was opened again: the counters follow what is committed, and
    /// the cache forgets what it held.
    fn reinit(&mut self) -> Result<(), StoreError> {
        let db = self.db.get()?;
        let (_, next_seq, next_doc_key) = super::schema::init_tables(&db)?;
        self.next_seq = next_seq;
        self.next_doc_key = next_doc_key;
        self.cache.clear();
        Ok(())
    }

    /// Applies the batch inside one write transaction and commits it. Returns, per working
    /// document, its feed seq and whether the batch changed it.
    fn apply_and_commit(
        &mut self,
        db: &Database,
        batch: &mut [WriteRequest],
        working: &mut Vec<Working>,
        pending: &mut Vec<Result<Pending, StoreError>>,
    ) -> Result<Vec<(u64, bool)>, StoreError> {
        let mut txn = db.begin_write()?;
        let mut seqs = Vec::new();
        let mut any_changed = false;
        // Cursors alone ride the next durable commit; node records do not wait for one.
        let mut any_durable = false;
        {
            let mut docs = txn.open_table(DOCS)?;
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut feed = txn.open_table(FEED)?;
            let mut index: HashMap<(Namespace, DocId), usize> = HashMap::new();
            let mut cursors: Vec<(NodeId, Cursor)> = Vec::new();
            let mut metas: Vec<(std::borrow::Cow<'static, str>, Vec<u8>)> = Vec::new();
            let mut seen: Vec<(NodeId, u64)> = Vec::new();
            let mut forgets: Vec<(NodeId, u64, usize)> = Vec::new();
            for req in batch.iter_mut() {
                let op = std::mem::replace(&mut req.op, WriteOp::Delete);
                // A peer's message whose session is gone (the peer was cut off) is dropped
                // unapplied: nothing a dropped peer queued commits after it was dropped.
                if matches!(op, WriteOp::ApplySync { .. }) && req.reply.is_closed() {
                    pending.push(Err(StoreError::WriteFailed(
                        "the peer's session ended first".into(),
                    )));
                    continue;
                }
                let Some(key) = req.doc.clone() else {
                    match op {
                        WriteOp::SetCursor { peer, cursor } => cursors.push((peer, cursor)),
                        WriteOp::SetMeta { entries } => metas.extend(entries),
                        WriteOp::PeerSeen { peer, unix_s } => seen.push((peer, unix_s)),
                        WriteOp::ForgetPeer {
                            peer,
                            unseen_before,
                        } => forgets.push((peer, unseen_before, pending.len())),
                        _ => {}
                    }
                    pending.push(Ok(Pending::bookkeeping()));
                    continue;
                };
                let slot = match index.get(&key) {
                    Some(&slot) => slot,
                    None => match self.load_working(&docs, &chunks, &key.0, &key.1) {
                        Ok(w) => {
                            working.push(w);
                            index.insert(key.clone(), working.len() - 1);
                            working.len() - 1
                        }
                        // A damaged document fails its own requests, not the batch.
                        Err(e @ StoreError::Quarantined { .. }) => {
                            pending.push(Err(e));
                            continue;
                        }
                        Err(e) => return Err(e),
                    },
                };
                let if_match = req.if_match.take();
                // A panic here is a defect in the apply code, often reached by what one
                // peer sent: it costs this document's requests in the batch, not the
                // batch. The document goes back to its stored version.
                let applied = catch_unwind(AssertUnwindSafe(|| {
                    self.panic_if_asked(&key);
                    let w = &mut working[slot];
                    match op {
                        WriteOp::ApplySync { peer, apply } => {
                            self.apply_sync(&txn, w, peer, *apply)
                        }
                        op => apply_op(w, op, if_match, &self.cfg).map(|heads| Pending {
                            heads,
                            ..Pending::bookkeeping()
                        }),
                    }
                }));
                let result = match applied {
                    Ok(result) => result,
                    Err(panic) => {
                        let failed = self.panicked(panic.as_ref(), 1);
                        working[slot] = self.load_working(&docs, &chunks, &key.0, &key.1)?;
                        for p in pending.iter_mut() {
                            if matches!(p, Ok(p) if p.slot == Some(slot)) {
                                *p = Err(StoreError::WriteFailed(failed.clone()));
                            }
                        }
                        Err(StoreError::WriteFailed(failed))
                    }
                };
                pending.push(result.map(|p| Pending {
                    slot: Some(slot),
                    ..p
                }));
            }
            // Early notices are for live traffic; a large batch is catch-up or a burst,
            // which sessions walk from the feed anyway, and a notice a slow receiver holds
            // keeps its documents in memory.
            let changed: Vec<bool> = working.iter().map(Working::changed).collect();
            let count = changed.iter().filter(|c| **c).count();
            if count > 0 && count <= EARLY_MAX_DOCS && self.early_tx.receiver_count() > 0 {
                // Sent before the redb writes and the fsync: peers get the changes while
                // this node stores them (see `Store::subscribe_early`).
                let early: Vec<EarlyDoc> = working
                    .iter_mut()
                    .zip(&changed)
                    .filter(|(_, c)| **c)
                    .map(|(w, _)| {
                        let meta = w.meta.get_or_insert_with(|| self.new_meta());
                        let stored_bytes = meta.stored_bytes();
                        let doc = Arc::new(std::mem::take(&mut w.doc));
                        w.shared = Some(doc.clone());
                        EarlyDoc {
                            ns: w.ns.clone(),
                            id: w.id.clone(),
                            doc,
                            stored_bytes,
                        }
                    })
                    .collect();
                let _ = self.early_tx.send(early.into());
                let hook = self
                    .hooks
                    .after_notice
                    .lock()
                    .ok()
                    .and_then(|mut h| h.take());
                if hook.is_some_and(|hook| hook()) {
                    self.killed = true;
                    return Err(StoreError::Closed);
                }
            }
            for (w, changed) in working.iter_mut().zip(changed) {
                if changed {
                    any_changed = true;
                    self.persist(w, &mut docs, &mut chunks, &mut feed)?;
                }
                seqs.push((w.meta.as_ref().map_or(0, |m| m.seq), changed));
            }
            // Open the bookkeeping tables only when there is something to write: an opened
            // table costs pages at commit.
            let states_to_write: Vec<(&SyncPeer, &State, u64)> = pending
                .iter()
                .flatten()
                .filter_map(|p| {
                    let (peer, state) = p.sync_state.as_ref().filter(|_| p.persist_state)?;
                    let meta = working[p.slot?].meta.as_ref()?;
                    Some((peer, state, meta.key))
                })
                .collect();
            if !states_to_write.is_empty() {
                let mut states = txn.open_table(SYNC_STATE)?;
                for (peer, state, key) in states_to_write {
                    let bytes = sync_state::encode(peer.epoch, state);
                    states.insert((peer.id.as_str(), key), bytes.as_slice())?;
                }
            }
            if !metas.is_empty() {
                // A record of the node (the revocation list) is kept durably at once.
                any_durable = true;
                let mut meta = txn.open_table(META)?;
                for (key, value) in &metas {
                    meta.insert(key.as_ref(), value.as_slice())?;
                }
            }
            if !cursors.is_empty() {
                let mut peers = txn.open_table(PEERS)?;
                for (peer, cursor) in &cursors {
                    let (peer, cursor) = (peer, *cursor);
                    // Saves may arrive out of order; within one epoch a cursor only moves
                    // forward.
                    let old = match peers.get(peer.as_str())? {
                        Some(v) => Some(decode_cursor(v.value())?),
                        None => None,
                    };
                    let stale = old.is_some_and(|o| o.epoch == cursor.epoch && o.seq >= cursor.seq);
                    if !stale {
                        peers.insert(peer.as_str(), encode_cursor(&cursor).as_slice())?;
                    }
                    // The peer's feed moved to another epoch (it was restored, or recreated):
                    // every sync state kept for it may claim changes it no longer has, even
                    // one kept under the epoch it moved back to. Start over.
                    if old.is_some_and(|o| o.epoch != cursor.epoch) {
                        let mut states = txn.open_table(SYNC_STATE)?;
                        states
                            .retain_in((peer.as_str(), 0)..=(peer.as_str(), u64::MAX), |_, _| {
                                false
                            })?;
                    }
                }
            }
            if !seen.is_empty() {
                let mut table = txn.open_table(PEER_SEEN)?;
                for (peer, unix_s) in &seen {
                    let before = table.get(peer.as_str())?.map_or(0, |v| v.value());
                    table.insert(peer.as_str(), before.max(*unix_s))?;
                }
            }
            for (peer, unseen_before, at) in forgets {
                // A peer active in this very batch is not forgotten.
                let active =
                    cursors.iter().any(|(p, _)| *p == peer) || seen.iter().any(|(p, _)| *p == peer);
                let last_seen = txn
                    .open_table(PEER_SEEN)?
                    .get(peer.as_str())?
                    .map(|v| v.value());
                if active || last_seen.is_none_or(|s| s >= unseen_before) {
                    continue;
                }
                any_durable = true;
                txn.open_table(PEERS)?.remove(peer.as_str())?;
                txn.open_table(PEER_SEEN)?.remove(peer.as_str())?;
                txn.open_table(SYNC_STATE)?
                    .retain_in((peer.as_str(), 0)..=(peer.as_str(), u64::MAX), |_, _| false)?;
                if let Some(Ok(p)) = pending.get_mut(at) {
                    p.forgot = true;
                }
            }
        }
        // redb holds what non-durable commits free in memory until a durable one: a node
        // that only exchanges acknowledgements for hours would grow without this.
        let flush = self.unflushed >= self.cfg.flush_bookkeeping_after
            || self.last_durable.elapsed() >= self.cfg.flush_bookkeeping_every;
        let durable = any_changed || any_durable || flush;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let started = std::time::Instant::now();
        txn.commit()?;
        if any_changed {
            self.commit_times.observe(started.elapsed());
        }
        if durable {
            self.unflushed = 0;
            self.last_durable = started;
        } else {
            self.unflushed += 1;
        }
        Ok(seqs)
    }

    /// Receives a peer's sync message into the working document. Invalid changes leave the
    /// document as it was: they are applied to a copy first.
    fn apply_sync(
        &self,
        txn: &redb::WriteTransaction,
        w: &mut Working,
        peer: SyncPeer,
        apply: Apply,
    ) -> Result<Pending, StoreError> {
        let mut state = match apply.state {
            Some(state) => state,
            None => match &w.meta {
                Some(meta) => {
                    let states = txn.open_table(SYNC_STATE)?;
                    let stored = states.get((peer.id.as_str(), meta.key))?;
                    stored
                        .and_then(|v| sync_state::decode(v.value(), peer.epoch))
                        .unwrap_or_default()
                }
                None => State::new(),
            },
        };
        state.read_only = apply.read_only;
        let invalid = |e: automerge::AutomergeError| ModelError::InvalidAutomerge(e.to_string());
        if !apply.read_only {
            // The session parsed each chunk on the peer's connection (`check_peer_chunk`);
            // the header and column walk here (which refuses the chunk kinds and inflated
            // sizes `check_chunk_kinds` does) keeps this function safe for any caller.
            let mut ops = 0u64;
            for chunk in apply.message.changes.iter() {
                ops = ops.saturating_add(op_count::count_ops(chunk)?);
            }
            if ops > op_count::MAX_OPS {
                return Err(ModelError::TooManyOps {
                    ops,
                    limit: op_count::MAX_OPS,
                }
                .into());
            }
        }
        let before = w.doc.get_heads();
        let persist_state = !apply.provisional;
        if apply.message.changes.is_empty() || apply.read_only {
            w.doc
                .receive_sync_message(&mut state, apply.message)
                .map_err(invalid)?;
        } else {
            let mut copy = w.doc.clone();
            copy.receive_sync_message(&mut state, apply.message)
                .map_err(invalid)?;
            check_new_depth(&copy, &before)?;
            w.doc = copy;
        }
        let new_changes = w.doc.get_changes(&before).len() as u64;
        Ok(Pending {
            heads: w.doc.get_heads(),
            sync_state: Some((peer, state)),
            persist_state,
            new_changes,
            ..Pending::bookkeeping()
        })
    }

    fn load_working(
        &self,
        docs: &Table<(&str, &str), &[u8]>,
        chunks: &Table<(u64, u64), &[u8]>,
        ns: &Namespace,
        id: &DocId,
    ) -> Result<Working, StoreError> {
        self.quarantine.check(ns, id)?;
        let set_aside = |e| self.quarantine.on_load_error(ns, id, e);
        let meta = match docs.get((ns.as_str(), id.as_str()))? {
            Some(v) => Some(DocMeta::decode(v.value()).map_err(set_aside)?),
            None => None,
        };
        let mut doc = match &meta {
            None => Automerge::new(),
            Some(m) => match self.cache.take(m.key, m.seq) {
                Some(arc) => Arc::try_unwrap(arc).unwrap_or_else(|shared| (*shared).clone()),
                None => load_chunks(chunks, m).map_err(set_aside)?,
            },
        };
        doc.set_actor(self.actor.clone());
        let heads_before = doc.get_heads();
        Ok(Working {
            ns: ns.clone(),
            id: id.clone(),
            meta,
            doc,
            heads_before,
            shared: None,
        })
    }

    /// The bookkeeping of a document this batch creates, under a fresh key.
    fn new_meta(&mut self) -> DocMeta {
        let key = self.next_doc_key;
        self.next_doc_key += 1;
        DocMeta {
            key,
            heads: Vec::new(),
            deleted: false,
            seq: 0,
            first_chunk: 0,
            next_chunk: 0,
            snapshot_bytes: 0,
            incremental_bytes: 0,
        }
    }

    /// Appends the batch's changes of `w` (or a fresh snapshot, when the changes would
    /// outweigh the last one) and moves the document to the end of the feed.
    fn persist(
        &mut self,
        w: &mut Working,
        docs: &mut Table<(&str, &str), &[u8]>,
        chunks: &mut Table<(u64, u64), &[u8]>,
        feed: &mut Table<u64, (&str, &str)>,
    ) -> Result<(), StoreError> {
        let meta = w.meta.get_or_insert_with(|| self.new_meta());
        let doc = w.shared.as_deref().unwrap_or(&w.doc);
        let changes = doc.save_after(&w.heads_before);
        let incremental = meta.incremental_bytes + changes.len() as u64;
        if incremental > meta.snapshot_bytes.max(self.cfg.compact_min_bytes) {
            super::compact::replace_with_snapshot(chunks, meta, &doc.save())?;
        } else {
            chunks.insert((meta.key, meta.next_chunk), changes.as_slice())?;
            meta.next_chunk += 1;
            meta.incremental_bytes = incremental;
        }
        if meta.seq != 0 {
            feed.remove(meta.seq)?;
        }
        meta.seq = self.next_seq;
        self.next_seq += 1;
        feed.insert(meta.seq, (w.ns.as_str(), w.id.as_str()))?;
        meta.heads = encode_heads(&doc.get_heads());
        meta.deleted = json::is_deleted(doc);
        docs.insert((w.ns.as_str(), w.id.as_str()), meta.encode().as_slice())?;
        Ok(())
    }
}

/// Loads a document from its chunks (a snapshot, then changes, in order).
pub(crate) fn load_chunks(
    chunks: &impl ReadableTable<(u64, u64), &'static [u8]>,
    meta: &DocMeta,
) -> Result<Automerge, StoreError> {
    let mut bytes = Vec::with_capacity(meta.stored_bytes() as usize);
    for entry in chunks.range((meta.key, meta.first_chunk)..(meta.key, meta.next_chunk))? {
        let (_, v) = entry?;
        bytes.extend_from_slice(v.value());
    }
    Automerge::load(&bytes)
        .map_err(|e| StoreError::Corrupt(format!("document {} does not load: {e}", meta.key)))
}

/// Applies one local write to its working document. On error the document is as before.
fn apply_op(
    w: &mut Working,
    op: WriteOp,
    if_match: Option<Vec<ChangeHash>>,
    cfg: &StoreConfig,
) -> Result<Vec<ChangeHash>, StoreError> {
    let exists = w.meta.is_some() || !w.doc.get_heads().is_empty();
    if let Some(expected) = if_match {
        let current = w.doc.get_heads();
        if !same_heads(&expected, &current) {
            return Err(StoreError::PreconditionFailed { current });
        }
    }
    match op {
        WriteOp::Replace(content) => {
            check_size(&content, cfg)?;
            json::check_root_keys(&content)?;
            json::check_depth(&content)?;
            let strings = cfg.strings_for(&w.ns);
            transact(&mut w.doc, |tx| json::write_replace(tx, &content, strings))?;
        }
        WriteOp::Patch(patch) => {
            check_size(&patch, cfg)?;
            json::check_root_keys(&patch)?;
            json::check_depth(&patch)?;
            let strings = cfg.strings_for(&w.ns);
            transact(&mut w.doc, |tx| {
                json::write_merge_patch(tx, &patch, strings)
            })?;
        }
        WriteOp::Delete => {
            if !exists || json::is_deleted(&w.doc) {
                return Err(StoreError::NotFound);
            }
            transact(&mut w.doc, |tx| json::write_delete(tx))?;
        }
        WriteOp::Import(bytes) => {
            if bytes.len() > cfg.max_content_bytes {
                return Err(ModelError::TooLarge {
                    size: bytes.len(),
                    limit: cfg.max_content_bytes,
                }
                .into());
            }
            w.doc = import(&w.doc, &bytes)?;
        }
        WriteOp::ApplySync { .. }
        | WriteOp::SetCursor { .. }
        | WriteOp::SetMeta { .. }
        | WriteOp::PeerSeen { .. }
        | WriteOp::ForgetPeer { .. }
        | WriteOp::Barrier => {}
    }
    Ok(w.doc.get_heads())
}

fn check_size(content: &Map<String, Json>, cfg: &StoreConfig) -> Result<(), ModelError> {
    let size = serde_json::to_vec(content).map_or(usize::MAX, |v| v.len());
    if size > cfg.max_content_bytes {
        return Err(ModelError::TooLarge {
            size,
            limit: cfg.max_content_bytes,
        });
    }
    Ok(())
}

/// Runs `f` in an Automerge transaction, rolling back on error.
fn transact(
    doc: &mut Automerge,
    f: impl FnOnce(
        &mut automerge::transaction::Transaction<'_>,
    ) -> Result<(), automerge::AutomergeError>,
) -> Result<(), StoreError> {
    let mut tx = doc.transaction();
    match f(&mut tx) {
        Ok(()) => {
            tx.commit();
            Ok(())
        }
        Err(e) => {
            tx.rollback();
            Err(StoreError::Corrupt(format!(
                "applying a write to the document: {e}"
            )))
        }
    }
}
