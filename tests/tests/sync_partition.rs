//! Two hubs that each hold far more than a stream window of changes for the other, after a
//! partition heals.
//!
//! Regression story (suspected in review, reproduced here): the connection driver did not
//! read while it waited to write. Each hub offered hundreds of documents at once, so both
//! filled the other's stream window and then waited for the other to read: the connection
//! stayed open on keep-alives and neither side moved again. The driver now writes and
//! reads in the same loop, and stops reading only for its own store, never for the peer.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::future::join_all;
use tidesync::model::{DocId, Namespace};
use tidesync_tests::cluster::{start_at, wait_until, Deployment, TestNode};

const DOCS: usize = 2000;
const DOC_BYTES: usize = 8 << 10;

/// `DOCS` documents of about `DOC_BYTES` each (text that does not compress), written in
/// concurrent batches.
async fn write_side(node: &TestNode, side: &str) {
    let ns = Namespace::new("bulk").unwrap();
    let mut x: u64 = side
        .bytes()
        .fold(0x9E37_79B9_7F4A_7C15, |a, b| a ^ u64::from(b))
        | 1;
    for chunk in (0..DOCS).collect::<Vec<_>>().chunks(250) {
        let writes = chunk.iter().map(|i| {
            let pad: String = (0..DOC_BYTES)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from(b'a' + (x % 26) as u8)
                })
                .collect();
            let id = DocId::new(format!("{side}-{i}")).unwrap();
            let store = node.store.clone();
            let ns = ns.clone();
            async move {
                store
                    .put(&ns, &id, serde_json::json!({ "pad": pad }), None)
                    .await
                    .unwrap()
            }
        });
        join_all(writes.collect::<Vec<_>>()).await;
    }
}

fn count(node: &TestNode) -> usize {
    node.store
        .list(&Namespace::new("bulk").unwrap())
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_partition_with_megabytes_each_way_converges() {
    let d = Deployment::new().unwrap();
    let a = d.hub("hub-a", &[]).unwrap();
    let b = d.hub("hub-b", &[]).unwrap();
    // Partitioned: neither knows the other yet.
    write_side(&a, "a").await;
    write_side(&b, "b").await;
    assert_eq!((count(&a), count(&b)), (DOCS, DOCS));

    // The partition heals: b dials a.
    let (path, mut cfg) = b.stop().await;
    cfg.dial = vec![a.addr()];
    let b = start_at(path, cfg).unwrap();
    let took = wait_until(
        Duration::from_secs(120),
        "both hubs hold every document",
        || Ok(count(&a) == 2 * DOCS && count(&b) == 2 * DOCS),
    )
    .await
    .unwrap();
    println!(
        "{} MiB each way converged in {took:?}",
        (DOCS * DOC_BYTES) >> 20
    );
    // Converged: the same heads for every document on both sides.
    let heads = |n: &TestNode| {
        let mut v: Vec<_> = n
            .store
            .list(&Namespace::new("bulk").unwrap())
            .unwrap()
            .into_iter()
            .map(|s| (s.id, s.heads))
            .collect();
        v.sort();
        v
    };
    wait_until(
        Duration::from_secs(10),
        "the same heads on both hubs",
        || Ok(heads(&a) == heads(&b)),
    )
    .await
    .unwrap();
    b.stop().await;
    a.stop().await;
}
