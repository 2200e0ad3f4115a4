//! Where each write is durable: which peers hold a version of a document, for writes that
//! wait for K replicas (`?replicas=K`, synchronous replication).
//!
//! A peer answers a sync message only after its store committed what the message carried
//! (with fsync), and every message names the sender's heads. So a peer message that is
//! not a [`crate::sync::Message::SyncAhead`] (which comes from a version its sender has
//! not committed yet) and whose heads include a write says that peer holds the write
//! durably. The connection drivers report each applied peer message here; a waiting
//! write counts the distinct peers whose heads include its own. Acknowledgements that
//! arrive before the write's waiter (early push makes that common) are kept for the most
//! recent documents.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::{Automerge, ChangeHash};
use tokio::sync::watch;

use crate::model::automerge_bytes::holds_all;
use crate::model::{DocId, Namespace, NodeId};
use crate::store::CommitTimes;

/// Documents whose latest acknowledgements per peer are kept for late waiters.
const RECENT_DOCS: usize = 4096;
/// Most replicas a write may wait for.
pub const MAX_REPLICAS: usize = 64;
/// Peers remembered per recent document (the latest ones): no write waits for more.
const RECENT_PEERS: usize = MAX_REPLICAS;
/// Longest heads remembered: a peer that names more (a document with many concurrent
/// branches) is judged only by waiters that are already there.
const RECENT_HEADS: usize = 16;

type DocKey = (Namespace, DocId);

struct Waiter {
    id: u64,
    heads: Vec<ChangeHash>,
    confirmed: BTreeSet<NodeId>,
    tx: watch::Sender<usize>,
}

#[derive(Default)]
struct Inner {
    waiting: HashMap<DocKey, Vec<Waiter>>,
    /// Each peer's latest committed heads of recently acknowledged documents.
    recent: HashMap<DocKey, Vec<(NodeId, Vec<ChangeHash>)>>,
    order: VecDeque<DocKey>,
    next_id: u64,
}

impl Inner {
    /// Counts `peer` for each waiter of `key` whose heads it holds (`holds` judges them).
    fn confirm(&mut self, key: &DocKey, peer: &NodeId, holds: impl Fn(&[ChangeHash]) -> bool) {
        for w in self.waiting.get_mut(key).into_iter().flatten() {
            if !w.confirmed.contains(peer) && holds(&w.heads) {
                w.confirmed.insert(peer.clone());
                w.tx.send_replace(w.confirmed.len());
            }
        }
    }

    /// Keeps a peer's latest heads of a document for waiters that come later.
    fn remember(&mut self, key: DocKey, peer: &NodeId, theirs: &[ChangeHash]) {
        if theirs.len() > RECENT_HEADS {
            return;
        }
        let fresh = !self.recent.contains_key(&key);
        let acks = self.recent.entry(key.clone()).or_default();
        acks.retain(|(p, _)| p != peer);
        acks.push((peer.clone(), theirs.to_vec()));
        if acks.len() > RECENT_PEERS {
            acks.remove(0);
        }
        if fresh {
            self.order.push_back(key);
            while self.order.len() > RECENT_DOCS {
                if let Some(old) = self.order.pop_front() {
                    self.recent.remove(&old);
                }
            }
        }
    }
}

/// Removes a waiter when its request ends, however it ends.
struct Leave<'a> {
    inner: &'a Mutex<Inner>,
    key: DocKey,
    id: u64,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if let Some(waiters) = inner.waiting.get_mut(&self.key) {
            waiters.retain(|w| w.id != self.id);
            if waiters.is_empty() {
                inner.waiting.remove(&self.key);
            }
        }
    }
}

/// The peers known to hold each recent version, and the writes waiting for them.
#[derive(Default)]
pub struct Replicas {
    inner: Mutex<Inner>,
    /// Time from a write's commit here to its Kth replica.
    times: CommitTimes,
    /// Writes answered before K replicas confirmed (HTTP 202).
    timeouts: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas").finish_non_exhaustive()
    }
}

/// Whether `theirs` (a peer's heads) include every change of `mine`, judged in `doc`,
/// which holds both.
pub fn includes(doc: &Automerge, theirs: &[ChangeHash], mine: &[ChangeHash]) -> bool {
    if mine.iter().all(|h| theirs.contains(h)) {
        return true;
    }
    // Graph lookups only: hashes the document lacks.
    if !holds_all(doc, theirs) || !holds_all(doc, mine) {
        return false;
    }
    // The changes their heads do not reach: none of ours may be among them.
    let beyond = doc.get_changes_meta(theirs);
    !beyond.iter().any(|c| mine.contains(&c.hash))
}

impl Replicas {
    /// A peer's message for `ns/id` was applied: the peer durably holds `theirs`, judged
    /// in `doc` (this node's version right after the apply, which holds them).
    pub fn peer_committed(
        &self,
        peer: &NodeId,
        ns: &Namespace,
        id: &DocId,
        theirs: &[ChangeHash],
        doc: &Arc<Automerge>,
    ) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let key = (ns.clone(), id.clone());
        inner.confirm(&key, peer, |mine| includes(doc, theirs, mine));
        inner.remember(key, peer, theirs);
    }

    /// A peer's message for `ns/id` named `theirs`, the heads of a version it committed;
    /// nothing is applied yet. Confirms the writes whose heads are among them (an
    /// acknowledgement of the write itself, the common case), a round trip through this
    /// node's store earlier than [`Replicas::peer_committed`], which judges the rest.
    pub fn peer_holds(&self, peer: &NodeId, ns: &Namespace, id: &DocId, theirs: &[ChangeHash]) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let key = (ns.clone(), id.clone());
        inner.confirm(&key, peer, |mine| mine.iter().all(|h| theirs.contains(h)));
        inner.remember(key, peer, theirs);
    }

    /// Waits until `want` peers hold `heads` of `ns/id` (a version committed here), or
    /// `timeout`. `doc` is the document as stored now: acknowledgements that came before
    /// this call are judged in it. Returns how many peers hold the version.
    pub async fn wait(
        &self,
        ns: &Namespace,
        id: &DocId,
        heads: &[ChangeHash],
        want: usize,
        timeout: Duration,
        doc: &Automerge,
    ) -> usize {
        let started = Instant::now();
        let key = (ns.clone(), id.clone());
        let (waiter_id, mut rx) = {
            let Ok(mut inner) = self.inner.lock() else {
                return 0;
            };
            // Acknowledgements that came before this waiter.
            let mut confirmed = BTreeSet::new();
            if let Some(acks) = inner.recent.get(&key) {
                for (peer, theirs) in acks {
                    if includes(doc, theirs, heads) {
                        confirmed.insert(peer.clone());
                    }
                }
            }
            let (tx, rx) = watch::channel(confirmed.len());
            inner.next_id += 1;
            let waiter_id = inner.next_id;
            inner.waiting.entry(key.clone()).or_default().push(Waiter {
                id: waiter_id,
                heads: heads.to_vec(),
                confirmed,
                tx,
            });
            (waiter_id, rx)
        };
        // Leaves with the request, also when its client goes away mid-wait.
        let _leave = Leave {
            inner: &self.inner,
            key,
            id: waiter_id,
        };
        let reached = tokio::time::timeout(timeout, rx.wait_for(|n| *n >= want))
            .await
            .is_ok_and(|r| r.is_ok());
        let confirmed = *rx.borrow();
        if reached {
            self.times.observe(started.elapsed());
        } else {
            self.timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        confirmed
    }

    /// Times from commit to the Kth replica, of writes that reached K.
    pub fn times(&self) -> &CommitTimes {
        &self.times
    }

    /// Writes answered before K replicas confirmed.
    pub fn timeouts(&self) -> u64 {
        self.timeouts.load(std::sync::atomic::Ordering::Relaxed)
    }
}
