//! The real binaries take classes and caps from their config file and flags, show them in
//! `status`, and a hub at `--max-peers` sends the next edge to another hub.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use tidesync_tests::procs::{connected, run, status, wait_for, Binaries};

#[test]
fn classes_caps_and_max_peers_work_from_the_command_line() {
    let d = Binaries::init().unwrap();
    let full = d.hub(&["--max-peers", "1"]).unwrap();
    // A second hub of the same deployment, for the edge that finds the first one full.
    d.enroll("hub-b", "hub", &[]).unwrap();
    let bundle_b = d.path("hub-b.pem");
    let other = d
        .hub_at("hub-b", "127.0.0.1:0", &["--bundle", &bundle_b])
        .unwrap();
    let config = d.path("edge.toml");
    std::fs::write(
        &config,
        "max_rate = 5000000\ncongestion = \"bbr\"\n\
         [[class]]\nname = \"alerts\"\nnamespaces = [\"alerts.*\"]\npriority = \"critical\"\n\
         [[class]]\nnamespaces = [\"telemetry\"]\npriority = \"bulk\"\nmode = \"batch\"\nevery = \"2s\"\n",
    )
    .unwrap();
    // Both edges list the full hub first and the other second; whichever comes second is
    // turned away from the full one, whatever its own ranking says.
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    d.enroll("edge-2", "edge", &["*=rw"]).unwrap();
    let e1 = d.edge("edge-1", &[&full], &["--config", &config]).unwrap();
    wait_for("edge-1 on the full hub", Duration::from_secs(10), || {
        connected(&full, "edge-1")
    });
    let e2 = d.edge("edge-2", &[&full, &other], &[]).unwrap();
    wait_for("edge-2 on the other hub", Duration::from_secs(10), || {
        connected(&other, "edge-2")
    });
    assert!(!connected(&full, "edge-2"));
    let s = status(&full);
    assert_eq!(
        (s["edges_connected"].as_u64(), s["max_peers"].as_u64()),
        (Some(1), Some(1))
    );
    let api = full.api.to_string();
    let text = run("tidesync-hub", &["status", "--api", &api]).unwrap();
    assert!(text.contains("EDGES 1 of 1"), "{text}");
    let metrics = ureq::get(&full.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains("tidesync_peers_refused_full_total"),
        "{metrics}"
    );

    ureq::put(&e1.url("/v1/docs/alerts.fire/a1"))
        .send_json(json!({ "level": "critical" }))
        .unwrap();
    ureq::put(&e1.url("/v1/docs/telemetry/t1"))
        .send_json(json!({ "cpu": 93 }))
        .unwrap();
    wait_for("both at the hub", Duration::from_secs(10), || {
        status(&full)["docs"].as_u64() == Some(2)
    });
    let classes = status(&e1)["peers"][0]["classes"].clone();
    assert_eq!(classes["alerts"]["priority"], "critical", "{classes}");
    assert_eq!(classes["telemetry"]["priority"], "bulk", "{classes}");
    let api = e1.api.to_string();
    let text = run("tidesync-edge", &["status", "--api", &api]).unwrap();
    assert!(text.contains("CLASS hub alerts (critical)"), "{text}");
    drop(e2);
}

#[test]
fn a_class_that_cannot_work_stops_the_node_with_the_reason() {
    let d = Binaries::init().unwrap();
    let config = d.path("bad.toml");
    std::fs::write(
        &config,
        "[[class]]\nnamespaces = [\"alerts\"]\npriority = \"critical\"\nmax_rate = 1000\n",
    )
    .unwrap();
    let data = d.path("hub");
    let err = run(
        "tidesync-hub",
        &[
            "run",
            "--data",
            &data,
            "--api",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--config",
            &config,
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("critical") && err.contains("max_rate"),
        "{err}"
    );
}
