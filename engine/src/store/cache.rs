//! A byte-bounded cache of loaded Automerge documents, shared by readers and the writer.
//!
//! Entries are immutable snapshots tagged with the feed seq they reflect; whoever takes one
//! compares that seq with the `docs` table in its own transaction, so a stale entry costs a
//! reload and never a wrong answer.

use std::sync::Arc;

use automerge::{Automerge, ReadDoc};
use quick_cache::sync::Cache;
use quick_cache::Weighter;

/// One cached document: the state committed at feed position `seq`.
#[derive(Clone, Debug)]
pub(crate) struct CachedDoc {
    pub seq: u64,
    pub doc: Arc<Automerge>,
    /// Estimated bytes of memory the document takes.
    pub weight: u64,
}

impl CachedDoc {
    /// Memory a document takes, estimated from what it holds. Automerge keeps its ops in a
    /// columnar form: a document of small values takes a few times its stored size, plus
    /// indexes of a fixed size (calibrated on a hub reading one-KB documents: about 20 KB of
    /// resident memory each). But run-length encoding lets a tiny stored document hold
    /// millions of ops (two million list elements saved in 184 bytes take 100 MB once
    /// loaded), so the op count weighs too: about 50 bytes per op measured, counted as 64.
    pub fn weigh(doc: &Automerge, stored_bytes: u64) -> u64 {
        let by_bytes = stored_bytes.saturating_mul(4);
        let by_ops = doc.stats().num_ops.saturating_mul(64);
        by_bytes.max(by_ops).saturating_add(16 * 1024)
    }
}

#[derive(Clone, Debug)]
struct ByWeight;

impl Weighter<u64, CachedDoc> for ByWeight {
    fn weight(&self, _key: &u64, val: &CachedDoc) -> u64 {
        val.weight.max(1)
    }
}

/// Documents by internal doc key.
pub(crate) struct DocCache {
    inner: Cache<u64, CachedDoc, ByWeight>,
}

impl std::fmt::Debug for DocCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocCache")
            .field("docs", &self.inner.len())
            .field("weight", &self.inner.weight())
            .finish()
    }
}

impl DocCache {
    pub fn new(capacity_bytes: u64) -> Self {
        let estimated_items = (capacity_bytes / 8192).clamp(16, 1 << 20) as usize;
        Self {
            inner: Cache::with_weighter(estimated_items, capacity_bytes.max(1), ByWeight),
        }
    }

    /// The cached document for `key` if it reflects feed position `seq`.
    pub fn get(&self, key: u64, seq: u64) -> Option<Arc<Automerge>> {
        self.inner.get(&key).filter(|c| c.seq == seq).map(|c| c.doc)
    }

    /// Takes the entry out so the writer can mutate it without copying when no reader holds it.
    pub fn take(&self, key: u64, seq: u64) -> Option<Arc<Automerge>> {
        self.inner
            .remove(&key)
            .map(|(_, c)| c)
            .filter(|c| c.seq == seq)
            .map(|c| c.doc)
    }

    pub fn insert(&self, key: u64, entry: CachedDoc) {
        self.inner.insert(key, entry);
    }

    pub fn remove(&self, key: u64) {
        self.inner.remove(&key);
    }

    /// Forgets everything (after the database was opened again).
    pub fn clear(&self) {
        self.inner.clear();
    }

    /// Documents and estimated bytes held.
    pub fn usage(&self) -> (usize, u64) {
        (self.inner.len(), self.inner.weight())
    }
}
