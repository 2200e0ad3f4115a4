//! The consistency audit through the real binaries: the `audit` command and `POST
//! /v1/audit` on an edge and its hub, its errors, its metrics and `status` line, and the
//! periodic audit of `--audit-every`. (Finding and repairing hidden differences is
//! `sync_audit`'s and the `audit` benchmark's.)
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{json, Value};
use tidesync_tests::procs::{connected, run, status, wait_for, Binaries};

fn post(url: &str, body: Value) -> (u16, Value) {
    match ureq::post(url).send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn audit_from_the_cli_and_the_api_and_on_a_schedule() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    let hub_id = status(&hub)["node_id"].as_str().unwrap().to_owned();
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    d.enroll("edge-2", "edge", &["*=rw"]).unwrap();
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    let periodic = d.edge("edge-2", &[&hub], &["--audit-every", "1s"]).unwrap();
    wait_for("the edges connected", Duration::from_secs(10), || {
        connected(&hub, "edge-1") && connected(&hub, "edge-2")
    });
    for i in 0..20 {
        ureq::put(&edge.url(&format!("/v1/docs/app/d{i}")))
            .send_json(json!({ "i": i }))
            .unwrap();
    }

    // The periodic audit runs, again and again, and is counted.
    wait_for("periodic audits", Duration::from_secs(20), || {
        status(&periodic)["peers"][0]["audits"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    });
    drop(periodic);

    // The command, as people read it and as JSON.
    let api = edge.api.to_string();
    let out = run(
        "tidesync-edge",
        &["audit", "--peer", &hub_id, "--ns", "app", "--api", &api],
    )
    .unwrap();
    assert!(
        out.contains("20 documents compared, 0 differing, 0 repaired"),
        "{out}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let out = run(
        "tidesync-edge",
        &["audit", "--peer", &hub_id, "--api", &api, "--json"],
    )
    .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["peer"], hub_id.as_str());
    assert_eq!(
        (v["differing"].as_u64(), v["rounds"].as_u64()),
        (Some(0), Some(1)),
        "{v}"
    );
    assert!(v["bytes"].as_u64().unwrap() < 1024, "{v}");

    // Errors a caller can act on.
    let (code, body) = post(&edge.url("/v1/audit"), json!({ "peer": "hub-nope" }));
    assert_eq!(code, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not connected"),
        "{body}"
    );
    let (code, body) = post(&edge.url("/v1/audit"), json!({ "node": "x" }));
    assert_eq!(code, 400, "{body}");
    let (code, body) = post(
        &edge.url("/v1/audit"),
        json!({ "peer": hub_id, "namespaces": ["bad pattern!"] }),
    );
    assert_eq!(code, 400, "{body}");

    // Seen by operators.
    let text = run("tidesync-edge", &["status", "--api", &api]).unwrap();
    assert!(text.contains(&format!("AUDIT {hub_id}")), "{text}");
    let metrics = ureq::get(&edge.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for m in [
        "tidesync_peer_audits_total",
        "tidesync_peer_audit_differing_total",
        "tidesync_peer_audit_repaired_total",
        "tidesync_peer_audit_last_timestamp_seconds",
    ] {
        assert!(metrics.contains(m), "{m} missing");
    }
}
