//! Bookkeeping that is written often and never fsynced on its own (cursors, sync states)
//! must not grow the node's memory without bound: redb keeps what non-durable commits
//! free in memory until a durable commit, so the writer makes one at least every 5 s or
//! 1,024 bookkeeping commits.
#![allow(clippy::unwrap_used)]

use tidesync::model::{Cursor, NodeId};
use tidesync::store::{Store, StoreConfig};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Before the periodic durable commit, 80,000 cursor saves grew the process by about
/// 3.4 MB (about 42 bytes each, for ever); now by a few hundred KB, whatever the count.
#[tokio::test]
async fn bookkeeping_commits_alone_do_not_grow_memory_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path, StoreConfig::default()).unwrap();
    let peers: Vec<NodeId> = (0..50)
        .map(|i| NodeId::new(format!("peer-{i}")).unwrap())
        .collect();
    let save = |seq: u64| {
        let store = store.clone();
        let peer = peers[(seq % 50) as usize].clone();
        async move { store.set_peer_cursor(&peer, Cursor { epoch: 1, seq }).await }
    };
    // Warm up the allocator and redb's cache.
    for seq in 1..=2_000u64 {
        save(seq).await.unwrap();
    }
    let (rss0, file0) = (rss_bytes(), std::fs::metadata(&path).unwrap().len());
    for seq in 2_001..=82_000u64 {
        save(seq).await.unwrap();
    }
    let (rss1, file1) = (rss_bytes(), std::fs::metadata(&path).unwrap().len());
    println!("80,000 cursor saves: rss {rss0} -> {rss1} bytes, file {file0} -> {file1} bytes");
    assert!(
        rss1.saturating_sub(rss0) < 1_500_000,
        "memory grew by {} bytes",
        rss1 - rss0
    );
    assert!(
        file1 <= file0.max(2 << 20),
        "the file grew to {file1} bytes"
    );
    // Every save is there, and survives a reopen.
    drop(store);
    let store = Store::open(&path, StoreConfig::default()).unwrap();
    let last = store.peer_cursor(&peers[(82_000 % 50) as usize]).unwrap();
    assert_eq!(last.map(|c| c.seq), Some(82_000));
}
