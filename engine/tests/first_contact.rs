//! The first message for a document the peer has no sync state for. On an edge's link,
//! when this node holds all of the peer's feed, the peer lacks such a document, and a
//! small one goes out whole: one frame each way instead of two round trips. Everywhere
//! else Automerge starts by announcing heads, and a wrong guess only costs bytes.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;

use common::link::{exchange_traffic, End, Traffic};
use common::{id, ns};
use serde_json::json;
use tidesync::sync::Role;

fn edge_and_hub() -> (End, End) {
    (
        End::with_roles(("edge", Role::Edge), ("hub", Role::Hub)),
        End::with_roles(("hub", Role::Hub), ("edge", Role::Edge)),
    )
}

async fn put(end: &End, doc: &str, value: serde_json::Value) {
    end.store
        .put(&ns("cfg"), &id(doc), value, None)
        .await
        .unwrap();
}

fn content(end: &End, doc: &str) -> serde_json::Value {
    serde_json::Value::Object(
        end.store
            .get(&ns("cfg"), &id(doc))
            .unwrap()
            .unwrap()
            .content,
    )
}

/// Runs the link from `a`'s hello until both sides are quiet and caught up.
async fn sync(a: &mut End, b: &mut End) -> Traffic {
    let t = exchange_traffic(a, b, VecDeque::new()).await;
    assert!(a.session.is_caught_up() && b.session.is_caught_up());
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_edge_gets_each_small_document_in_one_frame() {
    let (mut edge, mut hub) = edge_and_hub();
    for d in ["a", "b", "c"] {
        put(&hub, d, json!({ "name": d })).await;
    }
    hub.reconnect(|_| {});
    let t = sync(&mut hub, &mut edge).await;
    for d in ["a", "b", "c"] {
        let to_edge = Traffic::for_doc(&t.from_a, d);
        assert_eq!(to_edge.len(), 1, "{d}: {to_edge:?}");
        assert!(
            to_edge[0].changes,
            "{d}: the one frame carries the document"
        );
        let to_hub = Traffic::for_doc(&t.from_b, d);
        assert_eq!(to_hub.len(), 1, "{d}: one acknowledgement, {to_hub:?}");
        assert!(!to_hub[0].changes);
        assert_eq!(content(&edge, d), json!({ "name": d }));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn between_hubs_a_new_document_starts_with_an_announcement() {
    let (mut a, mut b) = (End::new("a", "b"), End::new("b", "a"));
    put(&a, "x", json!({ "v": 1 })).await;
    a.reconnect(|_| {});
    let t = sync(&mut a, &mut b).await;
    let to_b = Traffic::for_doc(&t.from_a, "x");
    assert!(!to_b[0].changes, "a hub may have it through another hub");
    assert!(to_b.iter().any(|f| f.changes));
    assert_eq!(content(&b, "x"), json!({ "v": 1 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_with_documents_the_hub_never_received_gets_announcements() {
    let (mut edge, mut hub) = edge_and_hub();
    put(&hub, "theirs", json!({ "v": 1 })).await;
    // Written at the edge and not yet at the hub: the edge may also hold documents the
    // hub does not know of, so the hub cannot assume what the edge lacks.
    put(&edge, "mine", json!({ "v": 2 })).await;
    hub.reconnect(|_| {});
    edge.reconnect(|_| {});
    let t = sync(&mut hub, &mut edge).await;
    assert!(!Traffic::for_doc(&t.from_a, "theirs")[0].changes);
    assert_eq!(content(&edge, "theirs"), json!({ "v": 1 }));
    assert_eq!(content(&hub, "mine"), json!({ "v": 2 }));

    // Now the hub holds all of the edge's feed: after a reconnect, a new document at the
    // hub goes whole.
    put(&hub, "later", json!({ "v": 3 })).await;
    hub.reconnect(|_| {});
    edge.reconnect(|_| {});
    let t = sync(&mut hub, &mut edge).await;
    let later = Traffic::for_doc(&t.from_a, "later");
    assert_eq!(later.len(), 1);
    assert!(later[0].changes);
    assert_eq!(content(&edge, "later"), json!({ "v": 3 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_over_the_limit_starts_with_an_announcement() {
    let (mut edge, mut hub) = edge_and_hub();
    put(&hub, "big", json!({ "blob": "x".repeat(2000) })).await;
    hub.reconnect(|c| c.whole_doc_max_bytes = 1000);
    let t = sync(&mut hub, &mut edge).await;
    let to_edge = Traffic::for_doc(&t.from_a, "big");
    assert!(!to_edge[0].changes, "{to_edge:?}");
    assert!(to_edge.iter().any(|f| f.changes));
    assert_eq!(
        content(&edge, "big")["blob"].as_str().map(str::len),
        Some(2000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_guess_still_converges() {
    // Both sides create the same document while linked: each presumes the other lacks it
    // and sends its own whole; the two histories merge.
    let (mut edge, mut hub) = edge_and_hub();
    sync(&mut hub, &mut edge).await;
    put(&hub, "shared", json!({ "from_hub": 1 })).await;
    put(&edge, "shared", json!({ "from_edge": 2 })).await;
    hub.feed_moved();
    edge.feed_moved();
    let from_edge: VecDeque<_> = edge.drive().await.into();
    let t = exchange_traffic(&mut edge, &mut hub, from_edge).await;
    assert!(Traffic::for_doc(&t.from_a, "shared")[0].changes);
    // The hub answers the edge's document with its own change. Not always in its first
    // frame: that answer leaves out the changes the edge's Bloom filter says it has, and
    // the filter (10 bits a change) wrongly says so about 1 % of the time; the edge's
    // next message names its heads and the change follows.
    assert!(
        Traffic::for_doc(&t.from_b, "shared")
            .iter()
            .any(|f| f.changes),
        "{t:?}"
    );
    let merged = json!({ "from_hub": 1, "from_edge": 2 });
    assert_eq!(content(&hub, "shared"), merged);
    assert_eq!(content(&edge, "shared"), merged);
    assert!(hub.session.is_caught_up() && edge.session.is_caught_up());
}
