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
