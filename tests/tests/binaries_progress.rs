//! A catch-up's progress, as an operator watches it: an edge that joins a hub holding
//! 10,000 documents, over a capped link, shows documents done rising and documents left
//! falling in `/v1/status`, in `/metrics`, and in `status --watch`, until it has caught up.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tidesync_tests::procs::{binary, metrics, status, wait_for, Binaries, Proc};

const DOCS: usize = 10_000;

/// The hub's view of `edge`'s catch-up.
fn progress(hub: &Proc, edge: &str) -> Option<Value> {
    status(hub)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node_id"] == edge)
        .map(|p| p["progress"].clone())
}

#[test]
fn a_catch_up_of_ten_thousand_documents_shows_its_progress() {
    let d = Binaries::init().unwrap();
    // About 1.6 MB of catch-up at 200 KB/s: several seconds to watch.
    let hub = d.hub(&["--max-rate", "200000"]).unwrap();
    std::thread::scope(|s| {
        for t in 0..16 {
            let hub = &hub;
            s.spawn(move || {
                for i in (t..DOCS).step_by(16) {
                    ureq::put(&hub.url(&format!("/v1/docs/fleet/d{i}")))
                        .send_string(&format!(r#"{{"n":{i},"site":"plant-{}"}}"#, i % 40))
                        .unwrap();
                }
            });
        }
    });
    d.enroll("edge", "edge", &["fleet=rw"]).unwrap();
    let edge = d.edge("edge", &[&hub], &[]).unwrap();

    // `status --watch` on the hub, read as a pipe: plain lines, one block a second.
    let mut watch = Command::new(binary("tidesync-hub").unwrap())
        .args(["status", "--watch", "--api", &hub.api.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if l.starts_with("CATCHUP edge ") && tx.send(l).is_err() {
                break;
            }
        }
    });

    let mut readings: Vec<(u64, u64)> = Vec::new();
    let started = std::time::Instant::now();
    wait_for("the catch-up's end", Duration::from_secs(120), || {
        let Some(p) = progress(&hub, "edge") else {
            return false;
        };
        assert!(
            started.elapsed() < Duration::from_secs(100),
            "still under way: {p}"
        );
        if p["active"] == true {
            let done = p["documents_done"].as_u64().unwrap();
            let left = p["documents_remaining"].as_u64().unwrap();
            assert!(left <= DOCS as u64, "{p}");
            if readings.last() != Some(&(done, left)) {
                readings.push((done, left));
            }
            std::thread::sleep(Duration::from_millis(300));
            return false;
        }
        !readings.is_empty()
    });
    let watched: Vec<String> = rx.try_iter().collect();
    let _ = watch.kill();
    let _ = watch.wait();

    let moved = readings
        .windows(2)
        .any(|w| w[1].0 > w[0].0 && w[1].1 < w[0].1);
    assert!(moved, "documents done and left did not move: {readings:?}");
    assert!(
        readings.first().unwrap().1 > 1000,
        "the first reading came late: {readings:?}"
    );
    let distinct: std::collections::BTreeSet<&String> = watched.iter().collect();
    assert!(
        distinct.len() >= 2,
        "status --watch did not show the catch-up moving: {watched:?}"
    );
    assert!(
        watched.iter().any(|l| l.contains("documents")),
        "{watched:?}"
    );

    // Caught up: nothing left, everything there.
    let p = progress(&hub, "edge").unwrap();
    assert_eq!(p["documents_remaining"], 0, "{p}");
    let metrics = metrics(&hub);
    assert!(
        metrics.contains("tidesync_peer_catchup_done_documents{"),
        "{metrics}"
    );
    let docs = ureq::get(&edge.url("/v1/docs/fleet"))
        .call()
        .unwrap()
        .into_json::<Value>()
        .unwrap();
    assert_eq!(docs["docs"].as_array().unwrap().len(), DOCS);
}
