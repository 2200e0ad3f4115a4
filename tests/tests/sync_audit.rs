//! The consistency audit between two real nodes over QUIC: differences the feed walk
//! cannot see (each side's cursor says it has everything) are found exactly, repaired by
//! the normal per-document sync, and a second audit finds nothing in one round trip.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tidesync::model::NodeId;
use tidesync::net::audit::AuditError;
use tidesync::sync::Role;
use tidesync_tests::audit_pair::{differing, prepare};
use tidesync_tests::cluster::{start_at, wait_until, Deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_finds_exactly_the_hidden_differences_and_repairs_them() {
    let d = Deployment::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a_id, b_id) = (NodeId::new("hub-a").unwrap(), NodeId::new("hub-b").unwrap());
    let (pa, pb) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
    let hidden = prepare(&pa, &a_id, &pb, &b_id, 3000, 40).await.unwrap();
    assert_eq!(hidden.len(), 40);

    let b = start_at(pb, d.config("hub-b", Role::Hub, &[]).unwrap()).unwrap();
    let mut cfg = d.config("hub-a", Role::Hub, &[]).unwrap();
    cfg.dial = vec![b.addr()];
    let a = start_at(pa, cfg).unwrap();
    wait_until(Duration::from_secs(10), "the hubs connected", || {
        Ok(a.node.peers().iter().any(|p| p.connected))
    })
    .await
    .unwrap();
    // Connected and idle: the walk sent nothing, so the differences are still there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(differing(&a.store, &b.store).unwrap(), hidden);

    let timeout = Duration::from_secs(60);
    let report = a.node.audit(&b_id, Vec::new(), timeout).await.unwrap();
    println!("{report:?}");
    assert_eq!(report.compared, 3000, "a holds the 3000 shared documents");
    assert_eq!(report.differing, 40, "{report:?}");
    assert_eq!(report.repaired, 40, "{report:?}");
    assert!(differing(&a.store, &b.store).unwrap().is_empty());

    // Again, from the other side (at most one audit per second may be answered).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = b.node.audit(&a_id, Vec::new(), timeout).await;
    let again = again.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((again.differing, again.repaired), (0, 0), "{again:?}");
    assert_eq!(again.rounds, 1, "{again:?}");
    assert!(again.bytes < 1024, "{again:?}");

    // A namespace the two do not hold compares nothing; an unknown peer is refused.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let none = a
        .node
        .audit(&b_id, vec!["other".parse().unwrap()], timeout)
        .await
        .unwrap();
    assert_eq!((none.compared, none.differing), (0, 0));
    let unknown = a
        .node
        .audit(&NodeId::new("hub-z").unwrap(), Vec::new(), timeout)
        .await;
    assert!(
        matches!(unknown, Err(AuditError::NotConnected(_))),
        "{unknown:?}"
    );
}

/// A hub restored from an old copy moves to a new feed epoch, so its peers' cursors into
/// its feed name the old one. Before, it walked its whole feed to each of them (a load and
/// a sync exchange per document); now one audit finds what differs, and the walk goes on
/// from where the feed ended at the hello. Nothing is lost either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_hub_reconciles_instead_of_walking_its_whole_feed() {
    use tidesync::model::{DocId, Namespace};
    let d = Deployment::new().unwrap();
    let ns = Namespace::new("models").unwrap();
    let a = d.hub("hub-a", &[]).unwrap();
    let mut cfg = d.config("hub-b", Role::Hub, &[]).unwrap();
    cfg.dial = vec![a.addr()];
    let b = d.start("hub-b", cfg).unwrap();
    let docs = 1500;
    for i in 0..docs {
        let id = DocId::new(format!("m{i}")).unwrap();
        b.store
            .put(&ns, &id, serde_json::json!({ "i": i }), None)
            .await
            .unwrap();
    }
    wait_until(Duration::from_secs(60), "a has b's documents", || {
        Ok(a.store.list(&ns)?.len() == docs)
    })
    .await
    .unwrap();
    // A backup of b, taken now; then writes b makes and a receives.
    let (b_path, b_cfg) = b.stop().await;
    let backup = b_path.with_extension("backup");
    std::fs::copy(&b_path, &backup).unwrap();
    let b = start_at(b_path, b_cfg).unwrap();
    for i in 0..10 {
        let id = DocId::new(format!("late{i}")).unwrap();
        b.store
            .put(&ns, &id, serde_json::json!({ "late": i }), None)
            .await
            .unwrap();
    }
    wait_until(Duration::from_secs(30), "a has the late writes", || {
        Ok(a.store.list(&ns)?.len() == docs + 10)
    })
    .await
    .unwrap();
    // b is lost and restored from the backup, under a new feed epoch (as `restore` does).
    let (b_path, b_cfg) = b.stop().await;
    std::fs::copy(&backup, &b_path).unwrap();
    {
        let store = tidesync::store::Store::open(&b_path, Default::default()).unwrap();
        store.renew_feed_epoch().await.unwrap();
    }
    let b = start_at(b_path, b_cfg).unwrap();
    let audited = |b: &tidesync_tests::cluster::TestNode| {
        b.node
            .peers()
            .into_iter()
            .find(|p| p.node_id.as_str() == "hub-a")
            .filter(|p| p.counts.audits > 0)
    };
    wait_until(Duration::from_secs(60), "b has everything back", || {
        Ok(differing_in(&a.store, &b.store, &ns)?.is_empty()
            && b.store.list(&ns)?.len() == docs + 10
            && audited(&b).is_some())
    })
    .await
    .unwrap();
    let peer = audited(&b).unwrap();
    println!("{:?}", peer.counts);
    assert_eq!(peer.counts.audits, 1, "one audit stood in for the walk");
    assert!(
        peer.counts.docs_loaded < 100,
        "b loaded {} documents for a: it walked its feed",
        peer.counts.docs_loaded
    );
}

fn differing_in(
    a: &tidesync::store::Store,
    b: &tidesync::store::Store,
    ns: &tidesync::model::Namespace,
) -> anyhow::Result<Vec<String>> {
    let heads = |s: &tidesync::store::Store| -> anyhow::Result<Vec<(String, Vec<_>)>> {
        Ok(s.list(ns)?
            .into_iter()
            .map(|d| (d.id.to_string(), d.heads))
            .collect())
    };
    let (ha, hb) = (heads(a)?, heads(b)?);
    Ok(ha
        .iter()
        .filter(|x| !hb.contains(x))
        .map(|x| x.0.clone())
        .collect())
}
