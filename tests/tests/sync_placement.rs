//! Edges spread over their hubs by rendezvous hashing, move when a hub goes and come back
//! when it returns, and a full hub sends the next edge elsewhere.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tidesync::model::NodeId;
use tidesync::net::placement::rendezvous_order;
use tidesync::sync::Role;
use tidesync_tests::cluster::{start_at, wait_until, Deployment, TestNode};

fn counts(hubs: &[&TestNode]) -> Vec<usize> {
    hubs.iter().map(|h| h.node.edges_connected()).collect()
}

/// 300 edges (in this one process) over 3 hubs: 100 ± 15 each; one hub stopped, its edges
/// spread over the other two; back, the spread returns within a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_edges_spread_over_three_hubs_and_follow_them() {
    let d = Deployment::new().unwrap();
    let hubs: Vec<TestNode> = (0..3)
        .map(|i| d.hub(&format!("hub-{i}"), &[]).unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = hubs.iter().map(TestNode::addr).collect();
    let mut edges = Vec::new();
    for i in 0..300 {
        edges.push(d.edge(&format!("edge-{i:03}"), &["*=rw"], &addrs).unwrap());
    }
    let all = |hubs: &[&TestNode]| counts(hubs).iter().sum::<usize>() == 300;
    let [h0, h1, h2] = [&hubs[0], &hubs[1], &hubs[2]];
    let took = wait_until(Duration::from_secs(60), "300 edges connected", || {
        Ok(all(&[h0, h1, h2]))
    })
    .await
    .unwrap();
    let spread = counts(&[h0, h1, h2]);
    println!("spread {spread:?} after {took:?}");
    for n in &spread {
        assert!((85..=115).contains(n), "{spread:?}");
    }
    // Each edge is where its own ranking puts it.
    let preferred = |name: &str| rendezvous_order(&NodeId::new(name).unwrap(), &addrs)[0];
    let on_first = (0..300)
        .filter(|i| preferred(&format!("edge-{i:03}")) == addrs[0])
        .count();
    assert_eq!(on_first, spread[0]);

    let mut hubs = hubs;
    let gone = hubs.remove(0);
    let addr = gone.addr();
    let (path, mut cfg) = gone.stop().await;
    let [h1, h2] = [&hubs[0], &hubs[1]];
    let took = wait_until(
        Duration::from_secs(60),
        "the edges of the stopped hub moved",
        || Ok(all(&[h1, h2])),
    )
    .await
    .unwrap();
    let moved = counts(&[h1, h2]);
    println!("hub-0 stopped: {moved:?} after {took:?}");
    assert!(
        moved[0] > spread[1] && moved[1] > spread[2],
        "its edges went to both others: {spread:?} then {moved:?}"
    );

    cfg.listen = Some(addr);
    let back = start_at(path, cfg).unwrap();
    let started = Instant::now();
    wait_until(Duration::from_secs(60), "the spread restored", || {
        Ok(counts(&[&back, &hubs[0], &hubs[1]]) == spread)
    })
    .await
    .unwrap();
    println!("hub-0 back: {spread:?} again after {:?}", started.elapsed());
}

/// A hub at `--max-peers` turns the next edge away, and that edge connects to its next
/// hub at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hub_sends_the_next_edge_to_another() {
    let d = Deployment::new().unwrap();
    let mut cfg = d.config("hub-a", Role::Hub, &[]).unwrap();
    cfg.traffic.max_peers = Some(1);
    let a = d.start("hub-a", cfg).unwrap();
    let b = d.hub("hub-b", &[]).unwrap();
    let addrs = [a.addr(), b.addr()];
    // Two edges that both rank hub-a first.
    let names: Vec<String> = (0..100)
        .map(|i| format!("edge-{i:03}"))
        .filter(|n| rendezvous_order(&NodeId::new(n.as_str()).unwrap(), &addrs)[0] == a.addr())
        .take(2)
        .collect();
    let first = d.edge(&names[0], &["*=rw"], &addrs).unwrap();
    wait_until(Duration::from_secs(10), "the first edge on hub-a", || {
        Ok(a.node.edges_connected() == 1)
    })
    .await
    .unwrap();
    let second = d.edge(&names[1], &["*=rw"], &addrs).unwrap();
    let took = wait_until(Duration::from_secs(10), "the second edge on hub-b", || {
        Ok(b.node.edges_connected() == 1)
    })
    .await
    .unwrap();
    println!("turned away and connected elsewhere in {took:?}");
    assert!(a.node.refused_full() >= 1);
    assert_eq!(a.node.edges_connected(), 1, "hub-a holds its one edge");
    let on = |e: &TestNode| {
        e.node
            .peers()
            .into_iter()
            .find(|p| p.connected)
            .map(|p| p.node_id)
    };
    assert_eq!(on(&first).unwrap().as_str(), "hub-a");
    assert_eq!(on(&second).unwrap().as_str(), "hub-b");
}
