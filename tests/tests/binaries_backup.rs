//! `backup` and `restore` with the real binaries: a copy taken while eight writers write,
//! restored in place of the edge's database, rejoins under a new feed epoch and gets back
//! every acknowledged write; `restore` refuses a running node.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tidesync_tests::procs::{run, status, wait_for, Binaries, Proc};

const WRITERS: usize = 8;

/// The ids of namespace `app` at `p`.
fn ids(p: &Proc) -> BTreeSet<String> {
    let Ok(resp) = ureq::get(&p.url("/v1/docs/app")).call() else {
        return BTreeSet::new();
    };
    let v: Value = resp.into_json().unwrap_or(Value::Null);
    v["docs"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|d| d["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_backup_taken_during_writes_restores_and_loses_nothing_acknowledged() {
    let (d, hub, edge) = Binaries::hub_and_edge("edge-1").unwrap();
    let epoch_before = status(&edge)["feed_epoch"].clone();

    // Eight writers write while the copy is taken.
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (acked, stop, url) = (acked.clone(), stop.clone(), edge.url("/v1/docs/app"));
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("w{w}-{i}");
                    let ok = ureq::put(&format!("{url}/{id}"))
                        .send_json(json!({ "writer": w, "i": i }))
                        .is_ok_and(|r| r.status() == 200);
                    if ok {
                        acked.lock().unwrap().insert(id);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let copy = d.path("edge-1.backup");
    let (edge_dir, api) = (d.path("edge-1"), edge.api.to_string());
    let out = run(
        "tidesync-edge",
        &["backup", "--data", &edge_dir, "--out", &copy, "--api", &api],
    )
    .unwrap();
    println!("{out}");
    assert!(out.contains("from the running node"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "{} writes acknowledged", acked.len());
    wait_for(
        "every acknowledged write at the hub",
        Duration::from_secs(20),
        || acked.is_subset(&ids(&hub)),
    );

    // A running node's database is not replaced.
    let refused = run(
        "tidesync-edge",
        &["restore", "--from", &copy, "--data", &edge_dir],
    );
    let err = refused
        .expect_err("restore refused while the edge runs")
        .to_string();
    assert!(err.contains("stop the node"), "{err}");

    edge.kill();
    let out = run(
        "tidesync-edge",
        &["restore", "--from", &copy, "--data", &edge_dir],
    )
    .unwrap();
    println!("{out}");
    assert!(out.contains("new feed epoch"), "{out}");
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    let restored = ids(&edge);
    assert!(
        restored.len() < acked.len(),
        "the copy was taken during the writes: {} of {}",
        restored.len(),
        acked.len()
    );
    assert_ne!(
        status(&edge)["feed_epoch"],
        epoch_before,
        "a new feed epoch"
    );
    let waited = wait_for(
        "every acknowledged write back at the edge",
        Duration::from_secs(30),
        || acked.is_subset(&ids(&edge)),
    );
    println!(
        "{} writes acknowledged, {} in the copy, all back at the restored edge in {} ms",
        acked.len(),
        restored.len(),
        waited.as_millis()
    );
    // Its new writes reach the hub, though their feed positions were used before.
    ureq::put(&edge.url("/v1/docs/app/after-restore"))
        .send_json(json!({ "a": 1 }))
        .unwrap();
    wait_for("the new write at the hub", Duration::from_secs(10), || {
        ids(&hub).contains("after-restore")
    });
}
