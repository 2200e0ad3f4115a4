//! The real binaries across a poor link at the IP level: an edge in a network namespace of
//! its own reaches its hub only through [`Wire`], shaped as a satellite hop (300 ms RTT,
//! 1 Mbit/s, 10 % loss each way), with the timeouts the operations guide recommends for
//! such links. A backlog written offline arrives whole, writes flow both ways, and a
//! partition longer than the default idle timeout heals without losing anything.
//!
//! The same scenario runs across both shapers: this process's, on TUN devices, and the
//! kernel's own netem, in a small guest under qemu bridging two TAP devices.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{json, Value};
use tidesync_tests::chaos::proxy::Impairment;
use tidesync_tests::chaos::wire::{Shaping, Wire};
use tidesync_tests::procs::{connected, status, wait_for, Binaries, Proc};

fn put(node: &Proc, path: &str, body: Value) {
    let resp = ureq::put(&node.url(path)).send_json(body).unwrap();
    assert_eq!(resp.status(), 200, "PUT {path}");
}

fn get(node: &Proc, path: &str) -> Option<Value> {
    match ureq::get(&node.url(path)).call() {
        Ok(r) => r.into_json().ok(),
        Err(ureq::Error::Status(404, _)) => None,
        Err(e) => panic!("GET {path}: {e}"),
    }
}

const PARTITION: Impairment = Impairment {
    block_up: true,
    block_down: true,
    ..Impairment::CLEAR
};

#[test]
fn an_edge_across_a_long_lossy_thin_link_catches_up_and_heals_from_a_partition() {
    across_a_satellite_hop(Shaping::Here);
}

#[test]
fn the_same_across_the_kernels_netem() {
    across_a_satellite_hop(Shaping::Netem);
}

fn across_a_satellite_hop(shaping: Shaping) {
    let rt = tidesync_tests::procs::side_runtime().unwrap();
    let wire = Wire::start_with(shaping, rt.handle(), 17).unwrap();
    let d = Binaries::init().unwrap();
    // The hub listens on the wire's near address only: the namespace has no other way in.
    let hub = d.hub_at("hub", &format!("{}:0", wire.near), &[]).unwrap();
    d.enroll("sat-edge", "edge", &["*=rw"]).unwrap();
    let satellite = Impairment::thin(Duration::from_millis(300), 0.10, 1_000_000);
    wire.set(PARTITION).unwrap();
    let edge = d
        .edge_across(
            &wire,
            "sat-edge",
            &[hub.quic],
            &[
                "--congestion",
                "bbr",
                "--idle-timeout",
                "60s",
                "--keep-alive",
                "10s",
            ],
        )
        .unwrap();

    // A backlog written while the link is down.
    let backlog = 100;
    for i in 0..backlog {
        let notes =
            format!("reading {i}: the sensor drifted slightly during the night shift. ").repeat(12);
        put(
            &edge,
            &format!("/v1/docs/notes/n{i:03}"),
            json!({ "i": i, "notes": notes }),
        );
    }
    wire.set(satellite).unwrap();
    let took = wait_for(
        "the backlog at the hub across the link",
        Duration::from_secs(120),
        || status(&hub)["docs"].as_u64().unwrap_or(0) >= backlog,
    );
    println!("{backlog} documents across 300 ms RTT, 1 Mbit/s, 10 % loss ({shaping}) in {took:?}");
    for i in [0, backlog / 2, backlog - 1] {
        assert_eq!(
            get(&hub, &format!("/v1/docs/notes/n{i:03}")).unwrap()["i"],
            i
        );
    }
    let (up, down) = wire.carried().unwrap();
    assert!(
        up.dropped > 0 && down.dropped > 0,
        "the link lost packets both ways: {up:?} {down:?}"
    );

    // Both ways, through the same link.
    put(&hub, "/v1/docs/config/rollout", json!({ "stage": 2 }));
    wait_for(
        "the hub's write at the edge",
        Duration::from_secs(60),
        || get(&edge, "/v1/docs/config/rollout").is_some_and(|v| v["stage"] == 2),
    );

    // A partition longer than the default idle timeout (15 s), writes on both sides.
    wire.set(PARTITION).unwrap();
    put(&edge, "/v1/docs/notes/during", json!({ "from": "edge" }));
    put(&hub, "/v1/docs/config/during", json!({ "from": "hub" }));
    std::thread::sleep(Duration::from_secs(20));
    wire.set(satellite).unwrap();
    wait_for(
        "both partition writes on both sides",
        Duration::from_secs(120),
        || {
            get(&hub, "/v1/docs/notes/during").is_some()
                && get(&edge, "/v1/docs/config/during").is_some()
        },
    );
    wait_for("the edge connected", Duration::from_secs(60), || {
        connected(&hub, "sat-edge")
    });
    assert_eq!(
        status(&hub)["docs"].as_u64().unwrap(),
        status(&edge)["docs"].as_u64().unwrap(),
        "both hold the same documents"
    );
    drop(edge);
    drop(hub);
}
