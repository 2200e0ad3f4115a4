//! The quick path with the real binaries: init, enroll two edges, start a hub and both
//! edges on OS-picked ports, write at one edge, read the same JSON and ETag at the other.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidesync_tests::procs::Binaries;

#[test]
fn a_write_at_one_edge_is_read_at_the_other() {
    let d = Binaries::init().unwrap();
    for e in ["edge-1", "edge-2"] {
        d.enroll(e, "edge", &["*=rw"]).unwrap();
    }
    let hub = d.hub(&[]).unwrap();
    let edge = |name: &str| d.edge(name, &[&hub], &[]).unwrap();
    let (e1, e2) = (edge("edge-1"), edge("edge-2"));

    let health: Value = ureq::get(&e2.url("/v1/health"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(
        health,
        json!({"status": "ok", "node_id": "edge-2", "role": "edge"})
    );

    let put = ureq::put(&e1.url("/v1/docs/flags/checkout"))
        .send_json(json!({"enabled": true, "rollout": 0.25}))
        .unwrap();
    let etag = put.header("etag").unwrap().to_owned();
    let started = Instant::now();
    loop {
        match ureq::get(&e2.url("/v1/docs/flags/checkout")).call() {
            Ok(resp) => {
                assert_eq!(resp.header("etag"), Some(etag.as_str()));
                let body: Value = resp.into_json().unwrap();
                assert_eq!(body, json!({"enabled": true, "rollout": 0.25}));
                break;
            }
            Err(ureq::Error::Status(404, _)) => {}
            Err(e) => panic!("reading at edge-2: {e}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not at edge-2 within a second"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "edge-1 -> hub -> edge-2 visible after {:?}",
        started.elapsed()
    );
    drop((e1, e2, hub));
}
