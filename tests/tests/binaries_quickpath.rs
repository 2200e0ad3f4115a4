//! The quick path with the real binaries: init, enroll two edges, start a hub and both
//! edges on OS-picked ports, write at one edge, read the same JSON and ETag at the other.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidesync_tests::procs::{run, Proc};

#[test]
fn a_write_at_one_edge_is_read_at_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    run(
        "tidesync-hub",
        &["init", "--data", &d("hub"), "--name", "hub-1"],
    )
    .unwrap();
    for e in ["edge-1", "edge-2"] {
        run(
            "tidesync-hub",
            &[
                "enroll",
                "--data",
                &d("hub"),
                "--name",
                e,
                "--role",
                "edge",
                "--grant",
                "*=rw",
                "--out",
                &d(&format!("{e}.pem")),
            ],
        )
        .unwrap();
    }
    let hub = Proc::start(
        "tidesync-hub",
        &[
            "run",
            "--data",
            &d("hub"),
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ],
    )
    .unwrap();
    let quic = hub.quic.to_string();
    let edge = |name: &str| {
        Proc::start(
            "tidesync-edge",
            &[
                "run",
                "--data",
                &d(name),
                "--bundle",
                &d(&format!("{name}.pem")),
                "--hub",
                &quic,
                "--api",
                "127.0.0.1:0",
            ],
        )
        .unwrap()
    };
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
