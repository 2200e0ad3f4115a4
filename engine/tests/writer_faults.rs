//! Faults inside the store's writer thread: a batch that panics and a document whose
//! stored bytes do not load each cost their own requests, never the store.
#![allow(clippy::unwrap_used)]

use serde_json::json;
use tidesync::error::StoreError;
use tidesync::model::{DocId, Namespace};
use tidesync::store::{Store, StoreConfig};

fn names(id: &str) -> (Namespace, DocId) {
    (Namespace::new("app").unwrap(), DocId::new(id).unwrap())
}

/// Before, the panic ended the writer thread and every later write failed `Closed` until
/// the process restarted.
#[tokio::test]
async fn a_batch_that_panics_fails_alone_and_the_store_writes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb"), StoreConfig::default()).unwrap();
    let (ns, a) = names("a");
    store.put(&ns, &a, json!({"v": 1}), None).await.unwrap();
    // Early notices go out only while someone listens; the hook runs right after one.
    let _early = store.subscribe_early();
    store.at_next_early_notice(|| panic!("injected fault in the writer"));
    let failed = store.put(&ns, &a, json!({"v": 2}), None).await;
    match failed {
        Err(StoreError::WriteFailed(reason)) => {
            assert!(reason.contains("injected fault"), "{reason}")
        }
        other => panic!("the panicking batch's write must fail with its reason: {other:?}"),
    }
    assert_eq!(store.writer_panics(), 1);
    // Nothing of the failed batch is there; the next writes go through.
    assert_eq!(store.get(&ns, &a).unwrap().unwrap().content["v"], 1);
    let (_, b) = names("b");
    store.put(&ns, &b, json!({"v": 1}), None).await.unwrap();
    store.patch(&ns, &a, json!({"v": 3}), None).await.unwrap();
    assert_eq!(store.get(&ns, &a).unwrap().unwrap().content["v"], 3);
    // And they are durable: reopened, the store has them.
    let path = store.path().to_owned();
    drop(store);
    let store = Store::open(&path, StoreConfig::default()).unwrap();
    assert_eq!(store.get(&ns, &a).unwrap().unwrap().content["v"], 3);
    assert!(store.get(&ns, &b).unwrap().is_some());
}

/// A panic applying one document's write (a defect reached by what one peer sent, say)
/// fails that document's requests only: writes to other documents in the same batch
/// commit. Before, the whole batch failed, so one peer resending a bad message kept
/// failing everybody's writes.
#[tokio::test]
async fn a_panic_applying_one_document_fails_only_its_requests() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb"), StoreConfig::default()).unwrap();
    let (ns, a) = names("a");
    store.put(&ns, &a, json!({"v": 1}), None).await.unwrap();
    let ids: Vec<DocId> = (0..8)
        .map(|i| DocId::new(format!("b{i}")).unwrap())
        .collect();
    for _ in 0..20 {
        store.panic_when_writing(&ns, &a);
        // Queued together, so they share batches with the write that panics.
        let writes = std::iter::once(a.clone())
            .chain(ids.iter().cloned())
            .map(|id| {
                let store = store.clone();
                let ns = ns.clone();
                async move {
                    let r = store.patch(&ns, &id, json!({"v": 2}), None).await;
                    (id, r)
                }
            });
        let results = futures_util::future::join_all(writes).await;
        for (id, r) in results {
            if id == a {
                match r {
                    Err(StoreError::WriteFailed(reason)) => {
                        assert!(reason.contains("injected fault"), "{reason}")
                    }
                    other => panic!("the write that panicked must fail: {other:?}"),
                }
            } else {
                r.unwrap_or_else(|e| panic!("{id} shared a batch with the panic: {e}"));
            }
        }
        assert_eq!(store.get(&ns, &a).unwrap().unwrap().content["v"], 1);
    }
    assert_eq!(store.writer_panics(), 20);
    store.patch(&ns, &a, json!({"v": 3}), None).await.unwrap();
    let path = store.path().to_owned();
    drop(store);
    let store = Store::open(&path, StoreConfig::default()).unwrap();
    assert_eq!(store.get(&ns, &a).unwrap().unwrap().content["v"], 3);
    for id in &ids {
        assert_eq!(store.get(&ns, id).unwrap().unwrap().content["v"], 2);
    }
}

#[tokio::test]
async fn a_damaged_document_fails_its_own_requests_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let (ns, a) = names("a");
    let (_, b) = names("b");
    {
        let store = Store::open(&path, StoreConfig::default()).unwrap();
        store.put(&ns, &a, json!({"v": 1}), None).await.unwrap();
        store.put(&ns, &b, json!({"v": 1}), None).await.unwrap();
    }
    Store::damage_document(&path, &ns, &a).unwrap();
    let store = Store::open(&path, StoreConfig::default()).unwrap();
    // Writes to both at once share batches; only the damaged one's fail.
    let writes = (0..20).map(|i| {
        let store = store.clone();
        let (ns, id) = (ns.clone(), if i % 2 == 0 { a.clone() } else { b.clone() });
        async move {
            let r = store.patch(&ns, &id, json!({"i": i}), None).await;
            (id, r)
        }
    });
    for (id, r) in futures_util::future::join_all(writes).await {
        if id == a {
            assert!(matches!(r, Err(StoreError::Quarantined { .. })), "{r:?}");
        } else {
            r.unwrap();
        }
    }
    assert!(matches!(
        store.get(&ns, &a),
        Err(StoreError::Quarantined { .. })
    ));
    let listed = store.quarantined();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].ns.as_str(), listed[0].id.as_str()), ("app", "a"));
    // The feed and the listing go on past it.
    let feed = store.changes_since(Default::default(), 100).unwrap();
    assert!(feed.iter().any(|e| e.id == b));
    assert!(store.list(&ns).unwrap().iter().any(|d| d.id == b));
}
