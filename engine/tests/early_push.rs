//! Early push: a session sends a local change while its batch is still committing, using
//! the store's early notice. It must save the commit's worth of latency without costing
//! bandwidth twice, and a late (stale) notice must never let the session believe the peer
//! has a version it lacks.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;

use common::link::{connected, exchange};
use common::{id, ns};
use serde_json::json;
use tidesync::sync::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_push_arrives_once_and_the_feed_walk_adds_no_bytes() {
    let (mut a, mut b) = connected().await;
    let (n, d) = (ns("cfg"), id("site"));
    a.store.put(&n, &d, json!({"v": 1}), None).await.unwrap();
    // Let it settle so the document is shared, then write again: the live case.
    a.feed_moved();
    exchange(&mut a, &mut b, VecDeque::new()).await;
    a.early_notices();
    assert_eq!(b.store.get(&n, &d).unwrap().unwrap().content["v"], 1);

    a.store.patch(&n, &d, json!({"v": 2}), None).await.unwrap();
    let notices = a.early_notices();
    assert_eq!(notices.len(), 1);
    assert_eq!(
        a.push_early(&notices[0]).await,
        1,
        "the live document goes out early"
    );
    // The early frame is delivered before A's session even hears of the commit.
    let early_frames: VecDeque<Message> = a.drive().await.into();
    assert!(
        matches!(early_frames.front(), Some(Message::SyncAhead { .. })),
        "sent as a version not committed yet: {early_frames:?}"
    );
    a.feed_moved();
    let (from_a, _) = exchange(&mut a, &mut b, early_frames).await;
    assert_eq!(
        from_a, 1,
        "the change crossed once: the feed walk did not resend it"
    );
    assert_eq!(b.store.get(&n, &d).unwrap().unwrap().content["v"], 2);
    assert!(a.session.is_caught_up(), "lag {}", a.session.lag());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_early_notice_never_marks_a_newer_version_as_delivered() {
    let (mut a, mut b) = connected().await;
    let (n, d) = (ns("cfg"), id("site"));
    a.store.put(&n, &d, json!({"v": 1}), None).await.unwrap();
    let v1 = a.early_notices();
    a.feed_moved();
    exchange(&mut a, &mut b, VecDeque::new()).await;

    // v2 is offered by the feed walk, and its frame is lost on the way.
    a.store.patch(&n, &d, json!({"v": 2}), None).await.unwrap();
    a.early_notices();
    a.feed_moved();
    let lost = a.drive().await;
    assert!(!lost.is_empty());
    assert!(!a.session.is_caught_up());

    // A late notice of v1 must not replace v2 as what the peer has to acknowledge.
    assert_eq!(a.push_early(&v1[0]).await, 0);
    let (_, _) = exchange(&mut a, &mut b, VecDeque::new()).await;
    assert!(
        !a.session.is_caught_up(),
        "the session claims B has v2, which B never received"
    );
    assert_eq!(b.store.get(&n, &d).unwrap().unwrap().content["v"], 1);
}
