//! Nodes converge over real QUIC with mutual TLS.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use tidesync::model::{DocId, Namespace};
use tidesync::store::Store;
use tidesync_tests::cluster::{wait_until, Deployment};

fn same_docs(a: &Store, b: &Store, ns: &Namespace) -> anyhow::Result<bool> {
    let la: Vec<_> = a.list(ns)?.into_iter().map(|d| (d.id, d.heads)).collect();
    let lb: Vec<_> = b.list(ns)?.into_iter().map(|d| (d.id, d.heads)).collect();
    Ok(!la.is_empty() && la == lb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_writing_concurrently_converge() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub-1", &[]).unwrap();
    let other = d.hub("hub-2", &[hub.addr()]).unwrap();
    let ns = Namespace::new("models").unwrap();
    let mut tasks = Vec::new();
    for (side, store) in [(0, hub.store.clone()), (1, other.store.clone())] {
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..3 {
                for i in 0..100 {
                    let id = DocId::new(format!("doc-{i}")).unwrap();
                    let patch = json!({
                        "shared": format!("{side}-{round}"),   // same field on both sides
                        format!("only-{side}"): round,       // a field of its own
                    });
                    store.patch(&ns, &id, patch, None).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = wait_until(Duration::from_secs(30), "convergence", || {
        same_docs(&hub.store, &other.store, &ns)
    })
    .await
    .unwrap();
    println!("converged {took:?} after the last write");
    let docs = hub.store.list(&ns).unwrap();
    assert_eq!(docs.len(), 100);
    for doc in docs {
        let a = hub.store.get(&ns, &doc.id).unwrap().unwrap();
        let b = other.store.get(&ns, &doc.id).unwrap().unwrap();
        assert_eq!((&a.content, &a.heads), (&b.content, &b.heads));
        assert_eq!(a.content["only-0"], 2);
        assert_eq!(a.content["only-1"], 2);
    }
    other.stop().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_crosses_a_hub_between_two_edges_at_once() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let a = d.edge("edge-a", &["*=rw"], &[hub.addr()]).unwrap();
    let b = d.edge("edge-b", &["*=rw"], &[hub.addr()]).unwrap();
    let ns = Namespace::new("flags").unwrap();
    let id = DocId::new("checkout").unwrap();
    wait_until(Duration::from_secs(10), "both edges connected", || {
        Ok(hub.node.peers().iter().filter(|p| p.connected).count() == 2)
    })
    .await
    .unwrap();
    for i in 0..20 {
        let w = a
            .store
            .patch(&ns, &id, json!({ "rollout": i }), None)
            .await
            .unwrap();
        // Live push, not a timer: it arrives well within a second.
        let took = wait_until(Duration::from_secs(1), "the write at B", || {
            Ok(b.store
                .get(&ns, &id)?
                .is_some_and(|doc| doc.heads == w.heads))
        })
        .await
        .unwrap();
        if i == 19 {
            println!("A -> hub -> B in {took:?}");
        }
    }
    for n in [a, b, hub] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_that_dial_each_other_keep_one_connection() {
    let d = Deployment::new().unwrap();
    let h1 = d.hub("hub-1", &[]).unwrap();
    let mut cfg = d.config("hub-2", tidesync::sync::Role::Hub, &[]).unwrap();
    cfg.dial = vec![h1.addr()];
    let h2 = d.start("hub-2", cfg).unwrap();
    // hub-1 restarts dialing hub-2 as well: both sides now dial.
    let (path, mut cfg1) = h1.stop().await;
    cfg1.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg1.dial = vec![h2.addr()];
    let h1 = tidesync_tests::cluster::start_at(path, cfg1).unwrap();
    let ns = Namespace::new("mesh").unwrap();
    let id = DocId::new("x").unwrap();
    let w = h1
        .store
        .put(&ns, &id, json!({"from": "hub-1"}), None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the write at hub-2", || {
        Ok(h2
            .store
            .get(&ns, &id)?
            .is_some_and(|doc| doc.heads == w.heads))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for h in [&h1, &h2] {
        let up: Vec<_> = h.node.peers().into_iter().filter(|p| p.connected).collect();
        assert_eq!(up.len(), 1, "one connection per peer: {up:?}");
    }
    h2.stop().await;
    h1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_edge_gets_everything_again() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let ns = Namespace::new("models").unwrap();
    for i in 0..20 {
        let id = DocId::new(format!("m{i}")).unwrap();
        hub.store
            .put(&ns, &id, json!({ "i": i }), None)
            .await
            .unwrap();
    }
    let edge = d.edge("edge-1", &["*=rw"], &[hub.addr()]).unwrap();
    wait_until(Duration::from_secs(10), "first sync", || {
        same_docs(&hub.store, &edge.store, &ns)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The edge's database is lost: a new file, a new feed epoch, stale cursors at the hub.
    let (path, cfg) = edge.stop().await;
    std::fs::remove_file(&path).unwrap();
    let edge = tidesync_tests::cluster::start_at(path, cfg).unwrap();
    wait_until(Duration::from_secs(10), "everything again", || {
        same_docs(&hub.store, &edge.store, &ns)
    })
    .await
    .unwrap();
    assert_eq!(edge.store.list(&ns).unwrap().len(), 20);
    edge.stop().await;
    hub.stop().await;
}
