//! The change feed and compaction, across reopen.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;
use tidesync::store::{FeedSeq, Store, StoreConfig};

#[tokio::test]
async fn feed_is_ordered_lists_each_doc_once_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let n = ns("models");
    let epoch;
    let before;
    {
        let s = Store::open(&path, StoreConfig::default()).unwrap();
        epoch = s.feed_epoch();
        let mut watch = s.subscribe();
        for (i, name) in ["d1", "d2", "d1", "d3", "d2"].into_iter().enumerate() {
            s.patch(&n, &id(name), json!({ "write": i }), None)
                .await
                .unwrap();
        }
        assert!(
            watch.has_changed().unwrap(),
            "subscribers see the feed move"
        );
        assert_eq!(*watch.borrow_and_update(), s.last_seq());
        let feed = s.changes_since(FeedSeq(0), 100).unwrap();
        let ids: Vec<&str> = feed.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            ["d1", "d3", "d2"],
            "each document once, at its latest write"
        );
        assert!(feed.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(feed.last().unwrap().seq, s.last_seq());
        let after_first = s.changes_since(feed[0].seq, 100).unwrap();
        assert_eq!(after_first, feed[1..].to_vec());
        assert_eq!(s.changes_since(FeedSeq(0), 1).unwrap(), feed[..1].to_vec());
        for e in &feed {
            assert_eq!(e.heads, s.get(&e.ns, &e.id).unwrap().unwrap().heads);
        }
        before = fingerprint(&s, &["models"]);
    }
    let s = Store::open(&path, StoreConfig::default()).unwrap();
    assert_eq!(s.feed_epoch(), epoch, "the epoch is stable across reopen");
    assert_eq!(fingerprint(&s, &["models"]), before);
    // New writes continue after the old positions.
    let last = s.last_seq();
    let w = s.patch(&n, &id("d4"), json!({"x": 1}), None).await.unwrap();
    assert!(w.seq > last);

    let (other, _d) = temp_store(StoreConfig::default());
    assert_ne!(
        other.feed_epoch(),
        epoch,
        "every database gets its own epoch"
    );
}

#[tokio::test]
async fn compaction_keeps_content_heads_and_feed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let cfg = StoreConfig {
        compact_min_bytes: 0,
        ..StoreConfig::default()
    };
    let (n, d) = (ns("telemetry"), id("pump-3"));
    let mut saw_snapshot_only = false;
    let before;
    let content;
    {
        let s = Store::open(&path, cfg.clone()).unwrap();
        for i in 0..200 {
            s.patch(
                &n,
                &d,
                json!({ "reading": i, format!("k{}", i % 7): i }),
                None,
            )
            .await
            .unwrap();
            // Another document keeps the feed interesting.
            s.put(&n, &id("other"), json!({ "i": i % 3 }), None)
                .await
                .unwrap();
            let layout = s.doc_storage(&n, &d).unwrap().unwrap();
            assert!(
                layout.incremental_bytes <= layout.snapshot_bytes,
                "{layout:?}"
            );
            saw_snapshot_only |= i > 0 && layout.chunks == 1;
        }
        content = s.get(&n, &d).unwrap().unwrap();
        before = fingerprint(&s, &["telemetry"]);
    }
    assert!(saw_snapshot_only, "changes were compacted into a snapshot");
    let s = Store::open(&path, cfg).unwrap();
    assert_eq!(s.get(&n, &d).unwrap().unwrap(), content);
    assert_eq!(fingerprint(&s, &["telemetry"]), before);
    // The compacted document still accepts writes and exports loadable bytes.
    s.patch(&n, &d, json!({"reading": -1}), None).await.unwrap();
    let exported = s.export(&n, &d).unwrap().unwrap();
    let loaded = automerge::Automerge::load(&exported.bytes).unwrap();
    assert_eq!(loaded.get_heads(), exported.heads);
}

#[tokio::test]
async fn a_small_cache_still_serves_many_documents() {
    let cfg = StoreConfig {
        doc_cache_bytes: 64 * 1024,
        ..StoreConfig::default()
    };
    let (s, _d) = temp_store(cfg);
    let n = ns("bulk");
    for i in 0..300 {
        s.put(
            &n,
            &id(&format!("doc-{i}")),
            json!({ "i": i, "pad": "x".repeat(200) }),
            None,
        )
        .await
        .unwrap();
    }
    for i in 0..300 {
        let got = s.get(&n, &id(&format!("doc-{i}"))).unwrap().unwrap();
        assert_eq!(got.content["i"], i);
    }
    let (docs, bytes) = s.cache_usage();
    assert!(bytes <= 64 * 1024, "cache holds {bytes} bytes");
    assert!(docs < 300, "the cache evicted documents ({docs} held)");
    assert_eq!(s.doc_count().unwrap(), 300);
}

#[tokio::test]
async fn a_creation_cut_short_leaves_nothing_that_blocks_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    // What a process killed while redb was laying out a new file leaves: bytes that are
    // not yet a database, under the temporary name creation uses.
    std::fs::write(dir.path().join("node.redb.creating"), vec![0u8; 4096]).unwrap();
    let s = Store::open(&path, StoreConfig::default()).unwrap();
    s.put(&ns("n"), &id("d"), json!({"v": 1}), None)
        .await
        .unwrap();
    let epoch = s.feed_epoch();
    drop(s);
    assert!(!dir.path().join("node.redb.creating").exists());
    let s = Store::open(&path, StoreConfig::default()).unwrap();
    assert_eq!(s.feed_epoch(), epoch);
    assert_eq!(s.get(&ns("n"), &id("d")).unwrap().unwrap().content["v"], 1);
}
