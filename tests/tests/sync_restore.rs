//! A node restored from an old copy of its data, under the same node id and feed epoch:
//! its peers hold cursors past its feed's end, and sync states that claim changes it lost.
//! The first peer that connects finds the feed gone back; the node moves to a new feed
//! epoch and reconnects, and then loses nothing another node holds, and nothing it writes
//! afterwards is skipped.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use tidesync::model::{DocId, Namespace};
use tidesync_tests::cluster::{start_at, wait_until, Deployment};

fn ns() -> Namespace {
    Namespace::new("cfg").unwrap()
}

fn id(s: &str) -> DocId {
    DocId::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_restored_from_an_old_copy_moves_to_a_new_epoch_and_loses_nothing() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let edge = d.edge("edge", &["*=rw"], &[hub.addr()]).unwrap();
    let has =
        |store: &tidesync::store::Store, doc: &str| store.get(&ns(), &id(doc)).unwrap().is_some();

    edge.store
        .put(&ns(), &id("a"), json!({"v": 1}), None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "a at the hub", || {
        Ok(has(&hub.store, "a"))
    })
    .await
    .unwrap();
    // The old copy, taken while the edge is stopped.
    let (path, cfg) = edge.stop().await;
    let copy = path.with_extension("old");
    std::fs::copy(&path, &copy).unwrap();

    // Life goes on: two more writes reach the hub, whose cursor passes the copy's end.
    let edge = start_at(path.clone(), cfg).unwrap();
    let epoch = edge.store.feed_epoch();
    for doc in ["b", "c"] {
        edge.store
            .put(&ns(), &id(doc), json!({"v": 2}), None)
            .await
            .unwrap();
    }
    wait_until(Duration::from_secs(5), "b and c at the hub", || {
        Ok(has(&hub.store, "b") && has(&hub.store, "c"))
    })
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(5),
        "the hub's cursor past the copy",
        || {
            Ok(hub
                .store
                .peer_cursor(&tidesync::model::NodeId::new("edge").unwrap())
                .unwrap()
                .is_some_and(|c| c.seq >= 3))
        },
    )
    .await
    .unwrap();
    let (path, cfg) = edge.stop().await;

    // Restored from the copy: b and c are gone here, and the feed ends at 1.
    std::fs::copy(&copy, &path).unwrap();
    let edge = start_at(path, cfg).unwrap();
    assert_eq!(edge.store.feed_epoch(), epoch, "restored as it was");
    wait_until(Duration::from_secs(10), "a new feed epoch", || {
        Ok(edge.store.feed_epoch() != epoch)
    })
    .await
    .unwrap();
    // What the hub holds comes back, though the hub's stored states said the edge had it.
    wait_until(Duration::from_secs(10), "b and c back at the edge", || {
        Ok(has(&edge.store, "b") && has(&edge.store, "c"))
    })
    .await
    .unwrap();
    // New writes reuse feed positions the hub had seen in the old epoch: not skipped.
    edge.store
        .put(&ns(), &id("d"), json!({"v": 3}), None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "d at the hub", || {
        Ok(has(&hub.store, "d"))
    })
    .await
    .unwrap();
    edge.stop().await;
    hub.stop().await;
}
