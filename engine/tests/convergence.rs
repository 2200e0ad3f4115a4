//! Two stores that edit one document concurrently and exchange changes end up equal, and
//! keep what a user expects of each kind of concurrent edit.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;
use tidesync::store::StoreConfig;

#[tokio::test]
async fn edits_to_different_fields_are_both_kept() {
    let ((a, _da), (b, _db)) = (
        temp_store(StoreConfig::default()),
        temp_store(StoreConfig::default()),
    );
    let (n, d) = (ns("flags"), id("checkout"));
    a.put(&n, &d, json!({"enabled": false, "rollout": 0}), None)
        .await
        .unwrap();
    send_doc(&a, &b, &n, &d).await;

    // A full-object PUT of a read-modify-write: only the changed field is written.
    a.put(&n, &d, json!({"enabled": true, "rollout": 0}), None)
        .await
        .unwrap();
    b.put(&n, &d, json!({"enabled": false, "rollout": 50}), None)
        .await
        .unwrap();
    send_doc(&a, &b, &n, &d).await;
    send_doc(&b, &a, &n, &d).await;

    let (ga, gb) = (
        a.get(&n, &d).unwrap().unwrap(),
        b.get(&n, &d).unwrap().unwrap(),
    );
    assert_eq!(
        ga.content,
        json!({"enabled": true, "rollout": 50})
            .as_object()
            .unwrap()
            .clone()
    );
    assert_eq!(ga.content, gb.content);
    assert_eq!(ga.heads, gb.heads);
    assert!(a.conflicts(&n, &d).unwrap().unwrap().is_empty());
}

#[tokio::test]
async fn same_field_has_one_winner_and_both_values_in_conflicts() {
    let ((a, _da), (b, _db)) = (
        temp_store(StoreConfig::default()),
        temp_store(StoreConfig::default()),
    );
    let (n, d) = (ns("models"), id("resnet"));
    a.put(&n, &d, json!({"version": 1, "meta": {"owner": "ml"}}), None)
        .await
        .unwrap();
    send_doc(&a, &b, &n, &d).await;
    a.patch(
        &n,
        &d,
        json!({"version": 2, "meta": {"stage": "canary"}}),
        None,
    )
    .await
    .unwrap();
    b.patch(
        &n,
        &d,
        json!({"version": 3, "meta": {"stage": "prod"}}),
        None,
    )
    .await
    .unwrap();
    send_doc(&a, &b, &n, &d).await;
    send_doc(&b, &a, &n, &d).await;

    let (ga, gb) = (
        a.get(&n, &d).unwrap().unwrap(),
        b.get(&n, &d).unwrap().unwrap(),
    );
    assert_eq!(ga.content, gb.content, "both stores show the same winner");
    assert_eq!(ga.heads, gb.heads);
    let (ca, cb) = (
        a.conflicts(&n, &d).unwrap().unwrap(),
        b.conflicts(&n, &d).unwrap().unwrap(),
    );
    assert_eq!(ca, cb);
    let paths: Vec<&str> = ca.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(paths, ["/meta/stage", "/version"]);
    let version = ca.iter().find(|c| c.path == "/version").unwrap();
    assert_eq!(version.values[0], ga.content["version"], "winner first");
    let mut values: Vec<i64> = version.values.iter().map(|v| v.as_i64().unwrap()).collect();
    values.sort();
    assert_eq!(values, [2, 3]);

    // Naming the field in a patch resolves the conflict, even with the winning value.
    let winner = ga.content["version"].clone();
    a.patch(&n, &d, json!({"version": winner}), None)
        .await
        .unwrap();
    let left = a.conflicts(&n, &d).unwrap().unwrap();
    assert_eq!(
        left.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
        ["/meta/stage"]
    );
}

#[tokio::test]
async fn delete_against_concurrent_update_converges() {
    let ((a, _da), (b, _db)) = (
        temp_store(StoreConfig::default()),
        temp_store(StoreConfig::default()),
    );
    let (n, d) = (ns("devices"), id("cam-7"));
    a.put(&n, &d, json!({"state": "on"}), None).await.unwrap();
    send_doc(&a, &b, &n, &d).await;
    a.delete(&n, &d, None).await.unwrap();
    b.patch(&n, &d, json!({"state": "off", "temp": 41}), None)
        .await
        .unwrap();
    send_doc(&a, &b, &n, &d).await;
    send_doc(&b, &a, &n, &d).await;

    let (la, lb) = (a.list(&n).unwrap(), b.list(&n).unwrap());
    assert_eq!(la.len(), 1);
    assert_eq!(la[0].heads, lb[0].heads);
    assert_eq!(la[0].deleted, lb[0].deleted);
    // The tombstone is a field: the delete wins over an update that did not see it.
    assert!(la[0].deleted);
    assert_eq!(a.get(&n, &d).unwrap(), None);
    assert_eq!(b.get(&n, &d).unwrap(), None);
    let (ea, eb) = (
        a.export(&n, &d).unwrap().unwrap(),
        b.export(&n, &d).unwrap().unwrap(),
    );
    assert_eq!(ea.heads, eb.heads);

    // Writing again recreates the document on both sides.
    b.put(&n, &d, json!({"state": "new"}), None).await.unwrap();
    send_doc(&b, &a, &n, &d).await;
    assert_eq!(a.get(&n, &d).unwrap().unwrap().content["state"], "new");
}

#[tokio::test]
async fn replacing_with_the_same_object_writes_nothing() {
    let (s, _d) = temp_store(StoreConfig::default());
    let (n, d) = (ns("cfg"), id("x"));
    let v = json!({"a": [1, 2, {"b": 1.5}], "c": "s"});
    let first = s.put(&n, &d, v.clone(), None).await.unwrap();
    let second = s.put(&n, &d, v, None).await.unwrap();
    assert!(first.changed);
    assert!(!second.changed);
    assert_eq!(first.heads, second.heads);
    assert_eq!(
        first.seq, second.seq,
        "an unchanged document keeps its feed position"
    );
}
