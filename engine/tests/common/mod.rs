//! Helpers shared by the store tests.
#![allow(dead_code, clippy::unwrap_used)]

pub mod link;

use tempfile::TempDir;
use tidesync::model::{DocId, Namespace};
use tidesync::store::{FeedSeq, Store, StoreConfig};

/// A store in its own temporary directory (kept alive by the returned guard).
pub fn temp_store(cfg: StoreConfig) -> (Store, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("node.redb"), cfg).unwrap();
    (store, dir)
}

pub fn ns(s: &str) -> Namespace {
    Namespace::new(s).unwrap()
}

pub fn id(s: &str) -> DocId {
    DocId::new(s).unwrap()
}

/// Sends every change of `from`'s copy of the document to `to`, as a peer would.
pub async fn send_doc(from: &Store, to: &Store, n: &Namespace, d: &DocId) {
    let bytes = from.export(n, d).unwrap().unwrap().bytes;
    to.import(n, d, bytes).await.unwrap();
}

/// Everything observable about a store's content: every listing and the whole feed.
pub fn fingerprint(store: &Store, namespaces: &[&str]) -> String {
    let mut out = String::new();
    for n in namespaces {
        for doc in store.list(&ns(n)).unwrap() {
            out.push_str(&format!(
                "{n}/{} {:?} {} {}\n",
                doc.id, doc.heads, doc.deleted, doc.seq
            ));
        }
    }
    for e in store.changes_since(FeedSeq(0), usize::MAX).unwrap() {
        out.push_str(&format!("feed {} {}/{} {:?}\n", e.seq, e.ns, e.id, e.heads));
    }
    out.push_str(&format!("last {}\n", store.last_seq()));
    out
}
