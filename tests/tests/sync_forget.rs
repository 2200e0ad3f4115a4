//! A hub forgets peers it has not seen for long: their cursors and sync states go, so a
//! hub met by thousands of short-lived devices does not keep their rows for ever. A
//! forgotten peer that comes back syncs from scratch and loses nothing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use tidesync::model::{DocId, Namespace, NodeId, SyncPeer};
use tidesync_tests::cluster::{start_at, wait_until, Deployment};

fn ns() -> Namespace {
    Namespace::new("cfg").unwrap()
}

fn id(s: &str) -> DocId {
    DocId::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_unseen_for_long_is_forgotten_and_syncs_from_scratch_when_back() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let edge = d.edge("edge", &["*=rw"], &[hub.addr()]).unwrap();
    let other = d.edge("other", &["*=rw"], &[hub.addr()]).unwrap();
    let edge_id = NodeId::new("edge").unwrap();
    let has =
        |store: &tidesync::store::Store, doc: &str| store.get(&ns(), &id(doc)).unwrap().is_some();
    for doc in ["a", "b"] {
        edge.store
            .put(&ns(), &id(doc), json!({"v": 1}), None)
            .await
            .unwrap();
    }
    wait_until(Duration::from_secs(5), "a and b at the hub", || {
        Ok(has(&hub.store, "a") && has(&hub.store, "b"))
    })
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(5),
        "the hub's cursor into the edge's feed",
        || Ok(hub.store.peer_cursor(&edge_id)?.is_some_and(|c| c.seq >= 2)),
    )
    .await
    .unwrap();
    let as_peer = SyncPeer {
        id: edge_id.clone(),
        epoch: edge.store.feed_epoch(),
    };
    // The edge acknowledges a document the hub sends it: the hub keeps that sync state.
    hub.store
        .put(&ns(), &id("h"), json!({"v": 1}), None)
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(5),
        "a sync state kept for the edge",
        || Ok(hub.store.sync_state(&as_peer, &ns(), &id("h"))?.is_some()),
    )
    .await
    .unwrap();

    // Connected peers are never forgotten, however old the bound.
    assert!(hub
        .node
        .forget_unseen_peers(Duration::ZERO)
        .await
        .is_empty());

    let (path, cfg) = edge.stop().await;
    // Unseen for more than a second (the record's resolution): forgotten.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let forgotten = hub.node.forget_unseen_peers(Duration::from_secs(1)).await;
    assert_eq!(
        forgotten,
        vec![edge_id.clone()],
        "only the edge that went away"
    );
    assert_eq!(hub.node.peers_forgotten(), 1);
    assert!(hub.store.peer_cursor(&edge_id).unwrap().is_none());
    assert!(hub
        .store
        .sync_state(&as_peer, &ns(), &id("h"))
        .unwrap()
        .is_none());
    assert!(hub.node.peers().iter().all(|p| p.node_id != edge_id));
    let metrics = tidesync::metrics::render(&hub.store, Some(&hub.node), &[]);
    assert!(
        metrics.contains("tidesync_peers_forgotten_total 1"),
        "{metrics}"
    );

    // Meanwhile the other edge writes; the forgotten edge comes back and writes too.
    other
        .store
        .patch(&ns(), &id("a"), json!({"other": 1}), None)
        .await
        .unwrap();
    let edge = start_at(path, cfg).unwrap();
    edge.store
        .put(&ns(), &id("c"), json!({"v": 1}), None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "everything everywhere", || {
        let a_at_edge = edge.store.get(&ns(), &id("a"))?;
        Ok(has(&hub.store, "c") && a_at_edge.is_some_and(|a| a.content.get("other").is_some()))
    })
    .await
    .unwrap();
    // The edge's whole feed was walked again: the hub's cursor is at its end.
    let last = edge.store.last_seq().0;
    wait_until(Duration::from_secs(5), "the hub's new cursor", || {
        Ok(hub
            .store
            .peer_cursor(&edge_id)?
            .is_some_and(|c| c.seq >= last))
    })
    .await
    .unwrap();
}
