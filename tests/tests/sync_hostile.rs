//! Hostile frames on an authenticated connection: the peer is dropped, nothing it sent is
//! stored, and other peers keep syncing meanwhile.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tidesync::model::{DocId, Namespace};
use tidesync::sync::{Message, Role};
use tidesync_tests::cluster::{self, Deployment, TestNode};
use tidesync_tests::rogue::{hello, hello_v1, Rogue};
use tidesync_tests::Rng;

fn ns() -> Namespace {
    Namespace::new("telemetry").unwrap()
}

/// An honest edge writes; the write must reach the hub while the rogue misbehaves.
async fn honest_write_arrives(edge: &TestNode, hub: &TestNode, i: u32) {
    cluster::honest_write_arrives(edge, hub, &ns(), i, Duration::from_secs(5))
        .await
        .unwrap();
}

/// A rogue `name` (one per attack: a peer that broke the protocol is refused for a while).
async fn rogue(d: &Deployment, hub: &TestNode, name: &str, say_hello: bool) -> Rogue {
    let bundle = d.bundle(name, Role::Edge, &["*=rw"]).unwrap();
    let mut r = Rogue::connect(&bundle, hub.addr()).await.unwrap();
    if say_hello {
        r.send(&hello(name, Role::Edge)).await.unwrap();
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_drop_only_the_hostile_peer() {
    let mut rng = Rng::from_env_or_time();
    println!("seed {}", rng.seed());
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let edge = d.edge("edge-honest", &["*=rw"], &[hub.addr()]).unwrap();
    honest_write_arrives(&edge, &hub, 0).await;
    let docs_before = hub.store.doc_count().unwrap();

    // 1. A frame of random bytes.
    let mut r = rogue(&d, &hub, "rogue-1", false).await;
    let junk: Vec<u8> = (0..rng.range(1, 4096))
        .map(|_| rng.next_u64() as u8)
        .collect();
    r.send_frame(&junk).await.unwrap();
    assert!(
        r.closed_within(Duration::from_secs(2)).await,
        "random bytes: not dropped"
    );
    honest_write_arrives(&edge, &hub, 1).await;

    // 2. A length prefix far over the 16 MiB limit, after a proper hello.
    let mut r = rogue(&d, &hub, "rogue-2", true).await;
    r.send_raw(&0x7fff_fff0u32.to_be_bytes()).await.unwrap();
    r.send_raw(&[0u8; 1024]).await.unwrap();
    assert!(
        r.closed_within(Duration::from_secs(2)).await,
        "oversized frame: not dropped"
    );
    honest_write_arrives(&edge, &hub, 2).await;

    // 3. A well-formed sync message whose change bytes are not Automerge.
    let mut r = rogue(&d, &hub, "rogue-3", true).await;
    let mut msg = automerge::sync::Message {
        heads: vec![automerge::ChangeHash([7; 32])],
        need: vec![],
        have: vec![],
        changes: vec![b"definitely not a change".to_vec()].into(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    };
    r.send(&Message::Sync {
        ns: "telemetry".into(),
        id: "poisoned".into(),
        data: msg.clone().encode(),
    })
    .await
    .unwrap();
    assert!(
        r.closed_within(Duration::from_secs(2)).await,
        "invalid changes: not dropped"
    );
    honest_write_arrives(&edge, &hub, 3).await;

    // 4. Sync bytes that are not a sync message at all.
    let mut r = rogue(&d, &hub, "rogue-4", true).await;
    msg.heads.clear();
    let mut data = msg.encode();
    data[0] = 0x99;
    r.send(&Message::Sync {
        ns: "telemetry".into(),
        id: "poisoned".into(),
        data,
    })
    .await
    .unwrap();
    assert!(
        r.closed_within(Duration::from_secs(2)).await,
        "bad sync bytes: not dropped"
    );

    // 5. A second hello, and a message before any hello.
    let mut r = rogue(&d, &hub, "rogue-5", true).await;
    r.send(&Message::Synced { seq: 1 }).await.unwrap();
    r.send(&hello("rogue-5", Role::Edge)).await.unwrap();
    assert!(
        r.closed_within(Duration::from_secs(2)).await,
        "second hello: not dropped"
    );
    let mut r = rogue(&d, &hub, "rogue-6", false).await;
    r.send(&Message::Synced { seq: 1 }).await.unwrap();
    assert!(
        r.closed_within(Duration::from_secs(2)).await,
        "no hello: not dropped"
    );

    // 6. A hello that lies about who it is.
    let mut r = rogue(&d, &hub, "rogue-7", false).await;
    r.send(&hello("edge-honest", Role::Hub)).await.unwrap();
    assert!(
        r.closed_within(Duration::from_secs(2)).await,
        "lying hello: not dropped"
    );

    // 7. A hello of an older protocol version: told so as the connection closes.
    let mut r = rogue(&d, &hub, "rogue-8", false).await;
    r.send_frame(&hello_v1("rogue-8", Role::Edge))
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(2), r.conn.closed())
        .await
        .expect("old version: not dropped");
    assert!(
        matches!(
            &closed,
            quinn::ConnectionError::ApplicationClosed(c)
                if String::from_utf8_lossy(&c.reason).contains("protocol version 1 is not")
        ),
        "{closed:?}"
    );

    honest_write_arrives(&edge, &hub, 4).await;
    assert!(hub
        .store
        .get(&ns(), &DocId::new("poisoned").unwrap())
        .unwrap()
        .is_none());
    assert_eq!(
        hub.store.doc_count().unwrap(),
        docs_before + 4,
        "only the honest writes"
    );
    edge.stop().await;
    hub.stop().await;
}
