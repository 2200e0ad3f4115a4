//! Catch-up survives connections cut after a random number of frames, again and again, and
//! restarts from the store: everything converges, nothing is lost or applied twice.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use automerge::ReadDoc;
use serde_json::json;
use tidesync::model::{DocId, Namespace};
use tidesync::store::Store;
use tidesync_tests::bench::sync::populate;
use tidesync_tests::cluster::{start_at, wait_until, Deployment};
use tidesync_tests::Rng;

fn frames_received(node: &tidesync::net::Node) -> u64 {
    node.peers()
        .iter()
        .filter(|p| p.connected)
        .map(|p| p.counts.messages_received)
        .sum()
}

fn summary(s: &Store, ns: &Namespace) -> Vec<(DocId, Vec<automerge::ChangeHash>, usize)> {
    s.list(ns)
        .unwrap()
        .into_iter()
        .map(|d| {
            let bytes = s.export(ns, &d.id).unwrap().unwrap().bytes;
            let changes = automerge::Automerge::load(&bytes)
                .unwrap()
                .get_changes(&[])
                .len();
            (d.id, d.heads, changes)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_and_restarts_during_catch_up_lose_nothing() {
    let mut rng = Rng::from_env_or_time();
    println!("seed {} (replay with TIDESYNC_SEED)", rng.seed());
    let d = Deployment::new().unwrap();
    let ns = Namespace::new("fleet").unwrap();
    let a = d.hub("hub-a", &[]).unwrap();
    populate(&a.store, &ns, 300, 1200).await.unwrap();
    let mut b = d.edge("edge-b", &["*=rw"], &[a.addr()]).unwrap();

    let mut acked = Vec::new();
    let mut cuts = 0;
    for round in 0..30 {
        // B writes too, so both directions are interrupted.
        let id = DocId::new(format!("edge-{round}")).unwrap();
        let w = b
            .store
            .put(&ns, &id, json!({ "round": round }), None)
            .await
            .unwrap();
        acked.push((id, w.heads));
        let target = frames_received(&b.node) + rng.range(1, 120);
        let _ = wait_until(Duration::from_millis(300), "frames", || {
            Ok(frames_received(&b.node) >= target)
        })
        .await;
        match rng.range(0, 4) {
            0 => {
                let (path, cfg) = b.stop().await;
                b = start_at(path, cfg).unwrap();
            }
            1 => a.node.drop_connections(),
            _ => b.node.drop_connections(),
        }
        cuts += 1;
    }
    wait_until(
        Duration::from_secs(60),
        "convergence after the cuts",
        || Ok(a.store.list(&ns)?.len() == 330 && summary(&a.store, &ns) == summary(&b.store, &ns)),
    )
    .await
    .unwrap();
    println!("{cuts} cuts, converged");
    for (id, heads) in acked {
        let at_hub = a.store.export(&ns, &id).unwrap().unwrap().bytes;
        let doc = automerge::Automerge::load(&at_hub).unwrap();
        for h in heads {
            assert!(doc.get_change_by_hash(&h).is_some(), "edge write {id} lost");
        }
    }
    b.stop().await;
    a.stop().await;
}
