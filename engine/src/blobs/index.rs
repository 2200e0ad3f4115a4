//! Which documents reference which blobs: a small redb file beside the blobs, kept by
//! following the store's change feed.
//!
//! The index is derived data. It is rebuilt from the feed whenever its cursor does not
//! name the store's current feed epoch (a restored or new store), so it is never made
//! durable on its own account: a crash costs at most a re-read of the feed's tail.

use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::model::{blob_refs, BlobRef, DocId, Grants, Namespace};
use crate::store::{FeedEntry, FeedSeq, Store};

/// Blob hash → "ns/id" of each document referencing it.
/// Keyed by both, so the documents of one blob, or of one blob in one namespace, are one
/// range read however many there are.
const BLOB_DOCS: TableDefinition<(&[u8; 32], &str), ()> = TableDefinition::new("blob_refs");
/// "ns/id" → the references of the document (40 bytes each: hash, size LE).
const DOC_BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("doc_blobs");
/// Blob hash → its size as referenced, for every blob some document references now or
/// did before its grace period ran out.
const BLOB_SIZE: TableDefinition<&[u8; 32], u64> = TableDefinition::new("blob_size");
/// Blob hash → when (unix seconds) the last document referencing it stopped doing so.
const UNREFERENCED: TableDefinition<&[u8; 32], u64> = TableDefinition::new("unreferenced");
/// Blob hash → the namespace of the first reference this node indexed for it (since it
/// last had none): the namespace whose readers may fetch it from this node.
const BLOB_HOME: TableDefinition<&[u8; 32], &str> = TableDefinition::new("blob_home");
/// "cursor" → feed epoch (16 bytes LE) and seq (8 bytes LE) indexed up to.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Documents read per index transaction.
const BATCH: usize = 256;

/// Most documents listed as referencing one blob (the API, the grant check).
pub const MAX_LISTED_DOCS: usize = 1024;

/// The reference index.
#[derive(Debug)]
pub struct BlobIndex {
    db: Database,
}

/// Failures of the index.
#[derive(Debug, thiserror::Error)]
#[error("blob index: {0}")]
pub struct IndexError(String);

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for IndexError {
            fn from(e: $t) -> Self {
                Self(e.to_string())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
    crate::error::StoreError
);

fn doc_key(ns: &Namespace, id: &DocId) -> String {
    format!("{ns}/{id}")
}

/// The namespace and id of a `doc_key` (namespaces hold no `/`).
pub fn split_doc_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
}

fn encode_refs(refs: &[BlobRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(refs.len() * 40);
    for r in refs {
        out.extend_from_slice(&r.hash);
        out.extend_from_slice(&r.size.to_le_bytes());
    }
    out
}

fn decode_refs(bytes: &[u8]) -> Vec<BlobRef> {
    bytes
        .chunks_exact(40)
        .map(|c| {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&c[..32]);
            let mut size = [0u8; 8];
            size.copy_from_slice(&c[32..]);
            BlobRef {
                hash,
                size: u64::from_le_bytes(size),
            }
        })
        .collect()
}

/// Whether a document whose `ns/id` starts with `prefix` references `hash`: one range
/// read, whatever the number of references.
fn any_doc(
    t: &impl ReadableTable<(&'static [u8; 32], &'static str), ()>,
    hash: &[u8; 32],
    prefix: &str,
) -> Result<bool, IndexError> {
    let first = t.range((hash, prefix)..)?.next().transpose()?;
    Ok(first.is_some_and(|(k, _)| {
        let (h, doc) = k.value();
        h == hash && doc.starts_with(prefix)
    }))
}

/// What one pass over the feed changed.
#[derive(Debug, Default)]
pub struct IndexPass {
    /// Documents read.
    pub docs: usize,
    /// Blobs that gained their first reference.
    pub added: Vec<BlobRef>,
    /// Whether any reference went away.
    pub removed: bool,
}

impl BlobIndex {
    /// Opens (creating) the index file.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(BLOB_DOCS)?;
        txn.open_table(DOC_BLOBS)?;
        txn.open_table(BLOB_SIZE)?;
        txn.open_table(UNREFERENCED)?;
        txn.open_table(BLOB_HOME)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(Self { db })
    }

    fn cursor(&self) -> Result<Option<(u128, u64)>, IndexError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get("cursor")?.and_then(|v| {
            let v = v.value();
            (v.len() == 24).then(|| {
                let mut e = [0u8; 16];
                e.copy_from_slice(&v[..16]);
                let mut s = [0u8; 8];
                s.copy_from_slice(&v[16..]);
                (u128::from_le_bytes(e), u64::from_le_bytes(s))
            })
        }))
    }

    /// Reads the store's feed past the index's cursor, at most `max_docs` documents, and
    /// updates the references of each document read. A cursor of another feed epoch
    /// starts over from the feed's beginning (every reference is re-read; references of
    /// documents the store no longer has go).
    pub fn follow(
        &self,
        store: &Store,
        max_docs: usize,
        now_s: u64,
    ) -> Result<IndexPass, IndexError> {
        let epoch = store.feed_epoch();
        let mut since = match self.cursor()? {
            Some((e, seq)) if e == epoch => seq,
            Some(_) => {
                self.clear(now_s)?;
                0
            }
            None => 0,
        };
        let mut pass = IndexPass::default();
        while pass.docs < max_docs {
            let entries = store.changes_since(FeedSeq(since), BATCH.min(max_docs - pass.docs))?;
            let Some(last) = entries.last().map(|e| e.seq.0) else {
                break;
            };
            self.index_batch(store, &entries, epoch, last, now_s, &mut pass)?;
            pass.docs += entries.len();
            since = last;
        }
        Ok(pass)
    }

    fn clear(&self, now_s: u64) -> Result<(), IndexError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        // Every blob becomes unreferenced until the re-read finds its references again;
        // its grace period runs from now.
        let sizes: Vec<[u8; 32]> = {
            let t = txn.open_table(BLOB_SIZE)?;
            t.iter()?
                .filter_map(Result::ok)
                .map(|(k, _)| *k.value())
                .collect()
        };
        txn.delete_table(BLOB_DOCS)?;
        txn.delete_table(DOC_BLOBS)?;
        txn.delete_table(BLOB_HOME)?;
        txn.delete_table(META)?;
        {
            let mut unref = txn.open_table(UNREFERENCED)?;
            for h in &sizes {
                if unref.get(h)?.is_none() {
                    unref.insert(h, now_s)?;
                }
            }
        }
        txn.open_table(BLOB_DOCS)?;
        txn.open_table(DOC_BLOBS)?;
        txn.open_table(BLOB_HOME)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(())
    }

    fn index_batch(
        &self,
        store: &Store,
        entries: &[FeedEntry],
        epoch: u128,
        last: u64,
        now_s: u64,
        pass: &mut IndexPass,
    ) -> Result<(), IndexError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        {
            let mut blob_docs = txn.open_table(BLOB_DOCS)?;
            let mut doc_blobs = txn.open_table(DOC_BLOBS)?;
            let mut sizes = txn.open_table(BLOB_SIZE)?;
            let mut unref = txn.open_table(UNREFERENCED)?;
            let mut home = txn.open_table(BLOB_HOME)?;
            for e in entries {
                let refs = if e.deleted {
                    Vec::new()
                } else {
                    // A document that fails to load keeps its old references: it is set
                    // aside, not emptied.
                    match store.get(&e.ns, &e.id) {
                        Ok(Some(snap)) => blob_refs(&snap.content),
                        Ok(None) => Vec::new(),
                        Err(_) => continue,
                    }
                };
                let key = doc_key(&e.ns, &e.id);
                let old = doc_blobs
                    .get(key.as_str())?
                    .map(|v| decode_refs(v.value()))
                    .unwrap_or_default();
                if old == refs {
                    continue;
                }
                for r in old
                    .iter()
                    .filter(|r| !refs.iter().any(|n| n.hash == r.hash))
                {
                    blob_docs.remove((&r.hash, key.as_str()))?;
                    if !any_doc(&blob_docs, &r.hash, "")? {
                        unref.insert(&r.hash, now_s)?;
                        pass.removed = true;
                    }
                }
                for r in refs
                    .iter()
                    .filter(|r| !old.iter().any(|o| o.hash == r.hash))
                {
                    let first = !any_doc(&blob_docs, &r.hash, "")?;
                    if first {
                        home.insert(&r.hash, e.ns.as_str())?;
                    }
                    blob_docs.insert((&r.hash, key.as_str()), ())?;
                    unref.remove(&r.hash)?;
                    if sizes.get(&r.hash)?.is_none() || first {
                        sizes.insert(&r.hash, r.size)?;
                        pass.added.push(*r);
                    }
                }
                if refs.is_empty() {
                    doc_blobs.remove(key.as_str())?;
                } else {
                    doc_blobs.insert(key.as_str(), encode_refs(&refs).as_slice())?;
                }
            }
            let mut meta = txn.open_table(META)?;
            let mut cursor = epoch.to_le_bytes().to_vec();
            cursor.extend_from_slice(&last.to_le_bytes());
            meta.insert("cursor", cursor.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Up to [`MAX_LISTED_DOCS`] documents referencing `hash`, as `ns/id`.
    pub fn docs_referencing(&self, hash: &[u8; 32]) -> Result<Vec<String>, IndexError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(BLOB_DOCS)?;
        let mut out = Vec::new();
        for entry in t.range((hash, "")..)?.take(MAX_LISTED_DOCS) {
            let (k, _) = entry?;
            let (h, doc) = k.value();
            if h != hash {
                break;
            }
            out.push(doc.to_owned());
        }
        Ok(out)
    }

    /// Whether a peer with `grants` may fetch `hash` from this node: the only way a peer
    /// gets a blob. It must be able to read the blob's home namespace (the namespace of
    /// the first reference this node saw), and a document there must still reference it.
    /// Only the home counts: a peer that learned a hash and may write some namespace could
    /// otherwise reference the hash there and so read any blob.
    pub fn readable_by(&self, hash: &[u8; 32], grants: &Grants) -> Result<bool, IndexError> {
        let txn = self.db.begin_read()?;
        let home = txn.open_table(BLOB_HOME)?;
        let Some(home) = home.get(hash)? else {
            return Ok(false);
        };
        let home = home.value().to_owned();
        let readable = Namespace::new(home.as_str()).is_ok_and(|ns| grants.can_read(&ns));
        if !readable {
            return Ok(false);
        }
        let t = txn.open_table(BLOB_DOCS)?;
        any_doc(&t, hash, &format!("{home}/"))
    }

    /// The blob's home namespace (see [`Self::readable_by`]).
    pub fn home(&self, hash: &[u8; 32]) -> Result<Option<String>, IndexError> {
        let txn = self.db.begin_read()?;
        let home = txn.open_table(BLOB_HOME)?;
        Ok(home.get(hash)?.map(|v| v.value().to_owned()))
    }

    /// The namespaces of the documents referencing `hash` (at most [`MAX_LISTED_DOCS`]
    /// documents looked at).
    pub fn namespaces_referencing(&self, hash: &[u8; 32]) -> Result<Vec<Namespace>, IndexError> {
        let mut out: Vec<Namespace> = self
            .docs_referencing(hash)?
            .iter()
            .filter_map(|k| split_doc_key(k).and_then(|(ns, _)| Namespace::new(ns).ok()))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Every blob referenced now, with its size.
    pub fn referenced(&self) -> Result<Vec<BlobRef>, IndexError> {
        let txn = self.db.begin_read()?;
        let sizes = txn.open_table(BLOB_SIZE)?;
        let unref = txn.open_table(UNREFERENCED)?;
        let mut out = Vec::new();
        for e in sizes.iter()? {
            let (k, v) = e?;
            if unref.get(k.value())?.is_none() {
                out.push(BlobRef {
                    hash: *k.value(),
                    size: v.value(),
                });
            }
        }
        Ok(out)
    }

    /// The size `hash` is referenced with, if any document references it now.
    pub fn referenced_size(&self, hash: &[u8; 32]) -> Result<Option<u64>, IndexError> {
        let txn = self.db.begin_read()?;
        let sizes = txn.open_table(BLOB_SIZE)?;
        let unref = txn.open_table(UNREFERENCED)?;
        if unref.get(hash)?.is_some() {
            return Ok(None);
        }
        Ok(sizes.get(hash)?.map(|v| v.value()))
    }

    /// Whether `hash` is referenced now.
    pub fn is_referenced(&self, hash: &[u8; 32]) -> Result<bool, IndexError> {
        Ok(self.referenced_size(hash)?.is_some())
    }

    /// When `hash` lost its last reference, if it had one and has none now.
    pub fn unreferenced_since(&self, hash: &[u8; 32]) -> Result<Option<u64>, IndexError> {
        let txn = self.db.begin_read()?;
        let unref = txn.open_table(UNREFERENCED)?;
        Ok(unref.get(hash)?.map(|v| v.value()))
    }

    /// Forgets a blob that was deleted.
    pub fn forget(&self, hash: &[u8; 32]) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        {
            let mut sizes = txn.open_table(BLOB_SIZE)?;
            let mut unref = txn.open_table(UNREFERENCED)?;
            let mut home = txn.open_table(BLOB_HOME)?;
            sizes.remove(hash)?;
            unref.remove(hash)?;
            home.remove(hash)?;
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::format_blob_hash;
    use crate::store::StoreConfig;
    use serde_json::json;

    fn ns(s: &str) -> Namespace {
        Namespace::new(s).expect("ns")
    }

    fn grants(g: &str) -> Grants {
        Grants::new(vec![g.parse().expect("grant")])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_readers_of_the_home_namespace_may_fetch_and_references_come_and_go() {
        let dir = tempfile::tempdir().expect("dir");
        let store =
            Store::open(dir.path().join("node.redb"), StoreConfig::default()).expect("store");
        let index = BlobIndex::open(&dir.path().join("index.redb")).expect("index");
        let h = [9u8; 32];
        let r = json!({"@blob": format_blob_hash(&h), "size": 5});
        let put = |n: &str, id: &str, v: serde_json::Value| {
            let store = store.clone();
            let (n, id) = (ns(n), DocId::new(id).expect("id"));
            async move { store.put(&n, &id, v, None).await.expect("put") }
        };
        put("models", "m", json!({"w": r})).await;
        // Someone who knows the hash references it from namespaces sorting before and
        // after the home, many times.
        for i in 0..300 {
            put("aaa", &format!("x{i}"), json!({"w": r})).await;
        }
        put("zzz", "x", json!({"w": r})).await;
        index.follow(&store, usize::MAX, 100).expect("follow");
        assert_eq!(index.home(&h).expect("home").as_deref(), Some("models"));
        assert!(index.readable_by(&h, &grants("models=ro")).expect("check"));
        assert!(!index.readable_by(&h, &grants("aaa=rw")).expect("check"));
        assert!(!index.readable_by(&h, &grants("zzz=rw")).expect("check"));
        assert_eq!(index.referenced_size(&h).expect("size"), Some(5));
        assert_eq!(index.docs_referencing(&h).expect("docs").len(), 302);

        // The home's reference goes: nobody may fetch it through another namespace.
        put("models", "m", json!({"w": null})).await;
        index.follow(&store, usize::MAX, 200).expect("follow");
        assert!(!index.readable_by(&h, &grants("models=ro")).expect("check"));
        assert!(!index.readable_by(&h, &grants("aaa=rw")).expect("check"));
        assert!(index.is_referenced(&h).expect("referenced"));
        // Every reference goes: unreferenced since then.
        for i in 0..300 {
            put("aaa", &format!("x{i}"), json!({})).await;
        }
        put("zzz", "x", json!({})).await;
        index.follow(&store, usize::MAX, 300).expect("follow");
        assert!(!index.is_referenced(&h).expect("referenced"));
        assert_eq!(index.unreferenced_since(&h).expect("since"), Some(300));
    }
}
