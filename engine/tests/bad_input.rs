//! Every refused write returns its typed error and leaves the store exactly as it was:
//! same listings, same heads, same feed.
#![allow(clippy::unwrap_used)]

mod common;

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use common::*;
use serde_json::json;
use tidesync::model::{DocId, Namespace};
use tidesync::store::{Store, StoreConfig};
use tidesync::{ModelError, StoreError};

async fn seeded() -> (Store, tempfile::TempDir) {
    let (s, dir) = temp_store(StoreConfig {
        max_content_bytes: 1024,
        ..StoreConfig::default()
    });
    s.put(
        &ns("app"),
        &id("doc"),
        json!({"a": 1, "list": [1, 2]}),
        None,
    )
    .await
    .unwrap();
    s.put(&ns("app"), &id("gone"), json!({"b": 1}), None)
        .await
        .unwrap();
    s.delete(&ns("app"), &id("gone"), None).await.unwrap();
    (s, dir)
}

fn assert_model_err(r: Result<impl std::fmt::Debug, StoreError>, want: fn(&ModelError) -> bool) {
    match r {
        Err(StoreError::Model(e)) if want(&e) => {}
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[test]
fn names_are_validated_before_anything_is_touched() {
    assert!(matches!(
        Namespace::new("Bad NS"),
        Err(ModelError::InvalidNamespace(_))
    ));
    assert!(matches!(
        DocId::new("a/b"),
        Err(ModelError::InvalidDocId(_))
    ));
    assert!(matches!(DocId::new(""), Err(ModelError::InvalidDocId(_))));
}

#[tokio::test]
async fn refused_writes_change_nothing() {
    let (s, _d) = seeded().await;
    let (n, d) = (ns("app"), id("doc"));
    let before = fingerprint(&s, &["app", "other"]);
    let heads = s.get(&n, &d).unwrap().unwrap().heads;

    assert_model_err(s.put(&n, &d, json!([1, 2]), None).await, |e| {
        matches!(e, ModelError::NotAnObject("an array"))
    });
    assert_model_err(s.put(&n, &id("new"), json!("text"), None).await, |e| {
        matches!(e, ModelError::NotAnObject(_))
    });
    assert_model_err(s.patch(&n, &d, json!(null), None).await, |e| {
        matches!(e, ModelError::NotAnObject("null"))
    });
    assert_model_err(
        s.put(&n, &d, json!({"big": "x".repeat(2000)}), None).await,
        |e| matches!(e, ModelError::TooLarge { limit: 1024, .. }),
    );
    assert_model_err(
        s.patch(&n, &d, json!({"@deleted": true}), None).await,
        |e| matches!(e, ModelError::ReservedKey(_)),
    );

    // Automerge bytes: garbage, a truncated document, changes missing their history,
    // and more bytes than the limit.
    assert_model_err(
        s.import(&n, &d, b"not automerge at all".to_vec()).await,
        |e| matches!(e, ModelError::InvalidAutomerge(_)),
    );
    assert_model_err(s.import(&n, &d, Vec::new()).await, |e| {
        matches!(e, ModelError::InvalidAutomerge(_))
    });
    let mut other = Automerge::new();
    let mut tx = other.transaction();
    tx.put(ROOT, "x", 1).unwrap();
    tx.commit();
    let base = other.get_heads();
    let mut tx = other.transaction();
    tx.put(ROOT, "x", 2).unwrap();
    tx.commit();
    let saved = other.save();
    assert_model_err(
        s.import(&n, &d, saved[..saved.len() - 3].to_vec()).await,
        |e| matches!(e, ModelError::InvalidAutomerge(_)),
    );
    assert_model_err(s.import(&n, &d, other.save_after(&base)).await, |e| {
        matches!(e, ModelError::MissingDependencies(1))
    });
    assert_model_err(s.import(&n, &d, vec![0u8; 2048]).await, |e| {
        matches!(e, ModelError::TooLarge { .. })
    });

    // Preconditions and deletes of what is not there.
    let stale = vec![automerge::ChangeHash([9; 32])];
    match s.put(&n, &d, json!({"a": 2}), Some(stale)).await {
        Err(StoreError::PreconditionFailed { current }) => assert_eq!(current, heads),
        other => panic!("unexpected outcome {other:?}"),
    }
    assert!(matches!(
        s.delete(&n, &id("absent"), None).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.delete(&n, &id("gone"), None).await,
        Err(StoreError::NotFound)
    ));

    assert_eq!(fingerprint(&s, &["app", "other"]), before);
    assert_eq!(
        s.get(&n, &d).unwrap().unwrap().content,
        json!({"a": 1, "list": [1, 2]}).as_object().unwrap().clone()
    );
    assert_eq!(s.get(&n, &id("new")).unwrap(), None);

    // A matching precondition goes through.
    s.put(&n, &d, json!({"a": 2}), Some(heads)).await.unwrap();
    assert_ne!(fingerprint(&s, &["app", "other"]), before);
}

#[tokio::test]
async fn a_refused_write_in_a_busy_batch_leaves_its_neighbours_alone() {
    let (s, _d) = seeded().await;
    let n = ns("app");
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = s.clone();
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            let d = id(&format!("busy-{}", i % 8));
            if i % 4 == 0 {
                s.import(&n, &d, b"garbage".to_vec()).await.map(|_| ())
            } else {
                s.patch(&n, &d, json!({ format!("f{i}"): i }), None)
                    .await
                    .map(|_| ())
            }
        }));
    }
    let mut refused = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(()) => assert_ne!(i % 4, 0),
            Err(StoreError::Model(ModelError::InvalidAutomerge(_))) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(refused, 16);
    for i in 0..64 {
        let doc = s.get(&n, &id(&format!("busy-{}", i % 8))).unwrap();
        let has = doc.is_some_and(|d| d.content.contains_key(&format!("f{i}")));
        assert_eq!(has, i % 4 != 0, "write {i}");
    }
}

/// A chain of `levels` nested maps under the root key "a".
fn nested_doc(levels: usize) -> Automerge {
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    let mut obj = ROOT;
    for _ in 0..levels {
        obj = tx.put_object(&obj, "a", automerge::ObjType::Map).unwrap();
    }
    tx.commit();
    doc
}

/// JSON nested `levels` deep: {"a": {"a": … {}}}.
fn nested_json(levels: usize) -> serde_json::Value {
    let mut v = json!({});
    for _ in 1..levels {
        v = json!({ "a": v });
    }
    json!({ "a": v })
}

/// Regression: readers recurse once per level, so a document nested 100,000 levels deep
/// (a few kilobytes of Automerge) overflowed the stack of every node that read it. Every
/// way in now refuses content past the depth limit, and the store keeps nothing of it.
#[tokio::test]
async fn content_nested_past_the_limit_is_refused_at_every_entry() {
    use tidesync::model::json::MAX_DEPTH;
    let (s, _dir) = temp_store(StoreConfig::default());
    let before = fingerprint(&s, &["app"]);
    let n = ns("app");
    assert_model_err(
        s.put(&n, &id("deep"), nested_json(MAX_DEPTH + 1), None)
            .await,
        |e| matches!(e, ModelError::TooDeep { .. }),
    );
    assert_model_err(
        s.patch(&n, &id("deep"), nested_json(MAX_DEPTH + 1), None)
            .await,
        |e| matches!(e, ModelError::TooDeep { .. }),
    );
    assert_model_err(
        s.import(&n, &id("deep"), nested_doc(100_000).save()).await,
        |e| matches!(e, ModelError::TooDeep { .. }),
    );
    assert_eq!(fingerprint(&s, &["app"]), before, "nothing stored");
    // At the limit is fine, and reads back.
    s.put(&n, &id("ok"), nested_json(MAX_DEPTH), None)
        .await
        .unwrap();
    let back = s.get(&n, &id("ok")).unwrap().unwrap().content;
    assert_eq!(serde_json::Value::Object(back), nested_json(MAX_DEPTH));
    s.import(&n, &id("ok-am"), nested_doc(MAX_DEPTH).save())
        .await
        .unwrap();
    assert!(s.get(&n, &id("ok-am")).unwrap().is_some());
    assert!(s.conflicts(&n, &id("ok-am")).unwrap().unwrap().is_empty());
}

/// Regression: a 101-byte change whose run-length columns claim ten million ops. The
/// import parsed and applied all of them on the store's single writer thread (seconds per
/// million, 50 bytes of memory each). It is refused from its column headers now, as is a
/// saved document holding it, and nothing is stored.
#[tokio::test]
async fn an_op_count_bomb_is_refused_before_automerge_decodes_it() {
    let bomb = include_bytes!("../fuzz/corpus/import/regression-rle-10m-ops");
    let (s, _dir) = temp_store(StoreConfig::default());
    let before = fingerprint(&s, &["app"]);
    let started = std::time::Instant::now();
    assert_model_err(
        s.import(&ns("app"), &id("bomb"), bomb.to_vec()).await,
        |e| matches!(e, ModelError::TooManyOps { ops, .. } if *ops > 10_000_000),
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "refused after {:?}",
        started.elapsed()
    );
    assert_eq!(fingerprint(&s, &["app"]), before, "nothing stored");
}
