//! Documents made with plain upstream Automerge go in and come out byte-compatible.
#![allow(clippy::unwrap_used)]

mod common;

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ObjType, ReadDoc, ScalarValue, ROOT};
use common::*;
use serde_json::json;
use tidesync::store::StoreConfig;

fn app_document() -> Automerge {
    let mut doc = Automerge::new().with_actor(ActorId::from([7u8; 16]));
    let mut tx = doc.transaction();
    tx.put(ROOT, "name", "resnet-50").unwrap();
    tx.put(ROOT, "replicas", 3).unwrap();
    tx.put(ROOT, "score", 0.91).unwrap();
    let notes = tx.put_object(ROOT, "notes", ObjType::Text).unwrap();
    tx.splice_text(&notes, 0, 0, "ok").unwrap();
    tx.put(ROOT, "deploys", ScalarValue::counter(1)).unwrap();
    let tags = tx.put_object(ROOT, "tags", ObjType::List).unwrap();
    tx.insert(&tags, 0, "vision").unwrap();
    let owner = tx.put_object(ROOT, "owner", ObjType::Map).unwrap();
    tx.put(&owner, "team", "ml").unwrap();
    tx.commit();
    doc
}

#[tokio::test]
async fn plain_automerge_documents_round_trip() {
    let (s, _d) = temp_store(StoreConfig::default());
    let (n, d) = (ns("models"), id("resnet"));
    let mut doc = app_document();

    let w = s.import(&n, &d, doc.save()).await.unwrap();
    assert_eq!(w.heads, doc.get_heads());
    let expected = json!({
        "name": "resnet-50", "replicas": 3, "score": 0.91, "notes": "ok",
        "deploys": 1, "tags": ["vision"], "owner": {"team": "ml"}
    });
    assert_eq!(
        serde_json::Value::Object(s.get(&n, &d).unwrap().unwrap().content),
        expected
    );

    // More edits upstream, sent as changes only (save_after), as automerge-repo does.
    let base = doc.get_heads();
    let mut tx = doc.transaction();
    let notes = tx.get(ROOT, "notes").unwrap().unwrap().1;
    tx.splice_text(&notes, 2, 0, " in prod").unwrap();
    tx.increment(ROOT, "deploys", 2).unwrap();
    tx.commit();
    s.import(&n, &d, doc.save_after(&base)).await.unwrap();
    let got = s.get(&n, &d).unwrap().unwrap();
    assert_eq!(got.content["notes"], "ok in prod");
    assert_eq!(got.content["deploys"], 3);
    assert_eq!(got.heads, doc.get_heads());

    // Edits through the JSON API keep the Automerge types and load upstream.
    s.patch(&n, &d, json!({"deploys": 4, "notes": "ok in prod!"}), None)
        .await
        .unwrap();
    let exported = s.export(&n, &d).unwrap().unwrap();
    let mut upstream = Automerge::load(&exported.bytes).unwrap();
    assert_eq!(upstream.get_heads(), exported.heads);
    assert_eq!(upstream.get_heads(), s.get(&n, &d).unwrap().unwrap().heads);
    let (_, notes_id) = upstream.get(ROOT, "notes").unwrap().unwrap();
    assert_eq!(upstream.object_type(&notes_id).unwrap(), ObjType::Text);
    assert_eq!(upstream.text(&notes_id).unwrap(), "ok in prod!");
    match upstream.get(ROOT, "deploys").unwrap().unwrap().0 {
        automerge::Value::Scalar(v) => assert_eq!(v.as_ref(), &ScalarValue::counter(4)),
        other => panic!("deploys is {other:?}"),
    }

    // And the upstream copy merges back into its origin without conflict.
    doc.merge(&mut upstream).unwrap();
    assert_eq!(doc.get_heads(), exported.heads);
}
