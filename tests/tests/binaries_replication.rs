//! Replication a client chooses per request, with the real binaries: a write that waits
//! for K replicas (200 once they hold it, 202 with the count reached after the timeout),
//! and a read that waits for another node's heads (or 504).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidesync_tests::chaos::proxy::{Impairment, Link};
use tidesync_tests::procs::{connected, wait_for, Binaries, Proc};

/// Status, ETag and JSON body of a request.
fn call(method: &str, url: &str, body: Option<Value>) -> (u16, String, Value) {
    let req = ureq::request(method, url);
    let resp = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match resp {
        Ok(r) => (
            r.status(),
            r.header("etag").unwrap_or_default().to_owned(),
            r.into_json().unwrap_or(Value::Null),
        ),
        Err(ureq::Error::Status(code, r)) => {
            (code, String::new(), r.into_json().unwrap_or(Value::Null))
        }
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

const PARTITION: Impairment = Impairment {
    block_up: true,
    block_down: true,
    ..Impairment::CLEAR
};

#[test]
fn a_write_with_replicas_1_is_at_the_hub_when_the_200_arrives_and_202_when_cut_off() {
    let rt = tidesync_tests::procs::side_runtime().unwrap();
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    let link = Link::start(rt.handle(), hub.quic, 1).unwrap();
    let edge = d.edge_at("edge-1", &[link.listen], &[]).unwrap();
    wait_for("the edge connected", Duration::from_secs(10), || {
        connected(&hub, "edge-1")
    });

    for i in 0..20 {
        let (code, etag, body) = call(
            "PATCH",
            &edge.url("/v1/docs/app/cfg?replicas=1"),
            Some(json!({ "i": i })),
        );
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["replicas"], 1, "{body}");
        // No polling: the hub holds that very version the moment the 200 arrives.
        let (code, hub_etag, content) = call("GET", &hub.url("/v1/docs/app/cfg"), None);
        assert_eq!(code, 200);
        assert_eq!(hub_etag, etag, "write {i}");
        assert_eq!(content["i"], i);
    }

    link.set(PARTITION);
    let started = Instant::now();
    let (code, _, body) = call(
        "PATCH",
        &edge.url("/v1/docs/app/cfg?replicas=1&timeout_ms=1000"),
        Some(json!({ "cut": true })),
    );
    let took = started.elapsed();
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["replicas"], 0, "{body}");
    assert!(
        took >= Duration::from_millis(1000),
        "answered after {took:?}"
    );
    // Durable here, and it reaches the hub once the link heals.
    assert_eq!(
        call("GET", &edge.url("/v1/docs/app/cfg"), None).2["cut"],
        true
    );
    link.set(Impairment::CLEAR);
    wait_for(
        "the write at the hub after the heal",
        Duration::from_secs(20),
        || call("GET", &hub.url("/v1/docs/app/cfg"), None).2["cut"] == true,
    );

    // Bad requests are refused before anything is written.
    let (code, _, body) = call(
        "PATCH",
        &edge.url("/v1/docs/app/cfg?replicas=1&timeout_ms=999999999"),
        Some(json!({ "never": true })),
    );
    assert_eq!(code, 400, "{body}");
    let (code, _, body) = call(
        "PUT",
        &edge.url("/v1/docs/app/other?replicas=65"),
        Some(json!({ "never": true })),
    );
    assert_eq!(code, 400, "{body}");
    // Neither was stored: a refused request is not half done.
    assert!(call("GET", &edge.url("/v1/docs/app/cfg"), None).2["never"].is_null());
    assert_eq!(call("GET", &edge.url("/v1/docs/app/other"), None).0, 404);
    let metrics = ureq::get(&edge.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains("tidesync_replication_timeouts_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tidesync_replication_seconds_count 20"),
        "{metrics}"
    );
    drop(edge);
}

#[test]
fn a_hub_write_with_replicas_2_waits_for_two_hubs_of_three() {
    let d = Binaries::init().unwrap();
    let h1 = d.hub(&[]).unwrap();
    let q1 = h1.quic.to_string();
    let start = |name: &str, peers: &[&str]| -> Proc {
        let bundle = d.enroll(name, "hub", &[]).unwrap();
        let mut args = vec!["--bundle", bundle.as_str()];
        for p in peers {
            args.extend(["--peer", p]);
        }
        d.hub_at(name, "127.0.0.1:0", &args).unwrap()
    };
    let h2 = start("hub-2", &[&q1]);
    let q2 = h2.quic.to_string();
    let h3 = start("hub-3", &[&q1, &q2]);
    wait_for("the mesh", Duration::from_secs(10), || {
        connected(&h1, "hub-2") && connected(&h1, "hub-3")
    });
    let (code, etag, body) = call(
        "PUT",
        &h1.url("/v1/docs/models/m?replicas=2"),
        Some(json!({ "v": 1 })),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["replicas"], 2, "{body}");
    for h in [&h2, &h3] {
        assert_eq!(call("GET", &h.url("/v1/docs/models/m"), None).1, etag);
    }

    h3.kill();
    let (code, _, body) = call(
        "PUT",
        &h1.url("/v1/docs/models/m?replicas=2&timeout_ms=800"),
        Some(json!({ "v": 2 })),
    );
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["replicas"], 1, "{body}");
}

#[test]
fn a_causal_read_waits_for_the_writers_heads_or_answers_504() {
    let rt = tidesync_tests::procs::side_runtime().unwrap();
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    for e in ["edge-a", "edge-b"] {
        d.enroll(e, "edge", &["*=rw"]).unwrap();
    }
    let a = d.edge("edge-a", &[&hub], &[]).unwrap();
    let link = Link::start(rt.handle(), hub.quic, 2).unwrap();
    let b = d.edge_at("edge-b", &[link.listen], &[]).unwrap();
    wait_for("both edges connected", Duration::from_secs(10), || {
        connected(&hub, "edge-a") && connected(&hub, "edge-b")
    });
    // Read-your-writes across nodes: B answers with A's write, however fast the client.
    for i in 0..10 {
        let (code, etag, _) = call(
            "PATCH",
            &a.url("/v1/docs/app/profile"),
            Some(json!({ "n": i })),
        );
        assert_eq!(code, 200);
        let heads = etag.trim_matches('"');
        let (code, _, content) = call(
            "GET",
            &b.url(&format!(
                "/v1/docs/app/profile?heads={heads}&timeout_ms=5000"
            )),
            None,
        );
        assert_eq!(code, 200, "{content}");
        assert_eq!(content["n"], i);
    }
    // B cut off: the read waits its timeout and says why.
    link.set(PARTITION);
    let (_, etag, _) = call(
        "PATCH",
        &a.url("/v1/docs/app/profile"),
        Some(json!({ "n": 99 })),
    );
    let started = Instant::now();
    let (code, _, body) = call(
        "GET",
        &b.url(&format!(
            "/v1/docs/app/profile?heads={}&timeout_ms=800",
            etag.trim_matches('"')
        )),
        None,
    );
    assert_eq!(code, 504, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("heads")),
        "{body}"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));
    link.set(Impairment::CLEAR);
    let (code, _, content) = call(
        "GET",
        &b.url(&format!(
            "/v1/docs/app/profile?heads={}&timeout_ms=20000",
            etag.trim_matches('"')
        )),
        None,
    );
    assert_eq!(code, 200);
    assert_eq!(content["n"], 99);
}
