//! Catch-up after downtime costs little more than the changes themselves, and a reconnect
//! with nothing changed costs the same whatever the number of documents.
#![allow(clippy::unwrap_used)]

use tidesync_tests::bench::sync::{catchup, idle_reconnect};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_after_downtime_sends_little_more_than_the_changes() {
    let out = catchup(500, 2000).await.unwrap();
    println!("catch-up: {out}");
    let received = out["received_ratio"].as_f64().unwrap();
    let both = out["bytes_ratio"].as_f64().unwrap();
    println!("B received {received}x the change bytes it lacked ({both}x both ways on the wire)");
    assert!(
        received <= 2.0,
        "B received {received}x the raw change bytes"
    );
    assert!(both <= 2.0, "{both}x the raw change bytes crossed the wire");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reconnect_costs_the_same_for_1k_and_10k_documents() {
    let small = idle_reconnect(1000).await.unwrap();
    let large = idle_reconnect(10000).await.unwrap();
    println!("1000: {small}\n10000: {large}");
    assert_eq!(small["messages"], large["messages"]);
    let (bs, bl) = (
        small["bytes"].as_f64().unwrap(),
        large["bytes"].as_f64().unwrap(),
    );
    assert!((bs - bl).abs() <= 0.1 * bs.max(bl), "bytes {bs} vs {bl}");
    assert_eq!(small["docs_loaded"], 0);
    assert_eq!(large["docs_loaded"], 0);
}
