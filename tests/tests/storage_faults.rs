//! Storage faults with the real binaries: an edge whose disk fills up answers writes with
//! 507 and says why in `/v1/health`, and once space is freed the next write succeeds,
//! without a restart (the data directory is a small tmpfs this test mounts: root needed);
//! a document whose stored bytes are damaged is set aside, and nothing else stops.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
// Letters that do not compress: Automerge would store a repeated letter in a few bytes.
use tidesync::model::{DocId, Namespace};
use tidesync::store::Store;
use tidesync_tests::bench::hostile::noise;
use tidesync_tests::procs::{wait_for, Binaries};

/// A tmpfs of `mb` MiB mounted at `dir` until dropped.
struct Tmpfs(String);

impl Tmpfs {
    fn mount(dir: &str, mb: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mb}m"),
                "tidesync-test",
                dir,
            ])
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_owned())
    }

    /// Bytes free.
    fn avail(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1", &self.0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", &self.0]).status();
    }
}

fn put(url: &str, body: &Value) -> (u16, Value) {
    match ureq::put(url).send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("transport error: {e}"),
    }
}

fn health(url: &str) -> (u16, Value) {
    match ureq::get(url).call() {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("transport error: {e}"),
    }
}

#[test]
fn a_full_disk_answers_507_and_the_first_write_after_freeing_space_succeeds() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    let fs = Tmpfs::mount(&d.path("edge-1"), 24);
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    assert_eq!(
        put(
            &edge.url("/v1/docs/app/first"),
            &json!({"pad": noise(64 << 10, 0)})
        )
        .0,
        200
    );

    // Leave about 2 MiB free, then write until the disk is full.
    let filler = format!("{}/filler", d.path("edge-1"));
    let fill = fs.avail().saturating_sub(2 << 20);
    std::fs::write(&filler, vec![7u8; fill as usize]).unwrap();
    let mut full = None;
    for i in 0..400 {
        let pad = noise(64 << 10, i + 1);
        let (status, body) = put(
            &edge.url(&format!("/v1/docs/app/d{i}")),
            &json!({"pad": pad}),
        );
        if status != 200 {
            full = Some((i, status, body));
            break;
        }
    }
    let (written, status, body) = full.expect("the disk never filled up");
    println!("full after {written} writes: {status} {body}");
    assert_eq!(status, 507, "{body}");
    let (h, why) = health(&edge.url("/v1/health"));
    assert_eq!(h, 503, "{why}");
    assert_eq!(why["no_space"], true, "{why}");
    // Whatever room is left goes too: then no write fits, of any size.
    let filler2 = format!("{}/filler-2", d.path("edge-1"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler2).unwrap();
        while f.write_all(&[7u8; 4096]).is_ok() {}
        let _ = f.sync_all();
    }
    // Reads go on. (A write may still fit in pages redb frees inside its file; the
    // first one that needs the file to grow is refused like the one above.)
    assert!(ureq::get(&edge.url("/v1/docs/app/first")).call().is_ok());

    // Space comes back: the next write succeeds, no restart.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&filler2).unwrap();
    let (status, body) = put(&edge.url("/v1/docs/app/after"), &json!({"a": 2}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(health(&edge.url("/v1/health")).0, 200);
    // What was acknowledged before is all there, and syncs on.
    for i in 0..written {
        assert!(ureq::get(&edge.url(&format!("/v1/docs/app/d{i}")))
            .call()
            .is_ok());
    }
    wait_for(
        "the later write at the hub",
        Duration::from_secs(10),
        || ureq::get(&hub.url("/v1/docs/app/after")).call().is_ok(),
    );
    edge.kill();
    drop(fs);
}

fn get(url: &str) -> (u16, Value) {
    match ureq::get(url).call() {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("transport error: {e}"),
    }
}

fn patch(url: &str, body: &Value) -> u16 {
    match ureq::patch(url).send_json(body) {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("transport error: {e}"),
    }
}

/// One document whose stored bytes no longer load is set aside: reads and writes of it
/// answer 503 and name it, status and metrics list it, and nothing else is touched. Before,
/// it failed every batch it was in (unrelated writes too), and every sync connection that
/// reached it ended, after every reconnect.
#[test]
fn a_damaged_document_is_set_aside_and_everything_else_goes_on() {
    let (d, hub, edge) = Binaries::hub_and_edge("edge-1").unwrap();
    for id in ["a", "b"] {
        assert_eq!(
            put(&edge.url(&format!("/v1/docs/app/{id}")), &json!({"v": 1})).0,
            200
        );
    }
    wait_for("both documents at the hub", Duration::from_secs(10), || {
        get(&hub.url("/v1/docs/app/b")).0 == 200 && get(&hub.url("/v1/docs/app/a")).0 == 200
    });
    edge.kill();
    let db = std::path::Path::new(&d.path("edge-1")).join("node.redb");
    let (ns, id) = (Namespace::new("app").unwrap(), DocId::new("a").unwrap());
    let damaged = Store::damage_document(&db, &ns, &id).unwrap();
    assert!(damaged > 0);
    // While the edge is down the hub changes the damaged document and writes another:
    // the hub's feed walk offers the edge both.
    assert_eq!(patch(&hub.url("/v1/docs/app/a"), &json!({"hub": 1})), 200);
    assert_eq!(put(&hub.url("/v1/docs/app/c"), &json!({"v": 1})).0, 200);
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();

    wait_for(
        "the hub's later document at the edge",
        Duration::from_secs(10),
        || get(&edge.url("/v1/docs/app/c")).0 == 200,
    );
    let (code, body) = get(&edge.url("/v1/docs/app/a"));
    assert_eq!(code, 503, "{body}");
    assert!(body.to_string().contains("quarantined"), "{body}");
    let status = tidesync_tests::procs::status(&edge);
    let listed = status["quarantined"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{status}");
    assert_eq!(
        (listed[0]["ns"].as_str(), listed[0]["id"].as_str()),
        (Some("app"), Some("a"))
    );
    assert!(listed[0]["reason"].as_str().is_some_and(|r| !r.is_empty()));
    let metrics = ureq::get(&edge.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(metrics.contains("tidesync_docs_quarantined 1"), "{metrics}");

    // Writes to the damaged document and to another, at once: they share batches, and
    // only the damaged one's fail.
    let results: Vec<(String, u16)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let edge = &edge;
                s.spawn(move || {
                    let id = if t % 2 == 0 { "a" } else { "b" };
                    (0..10)
                        .map(|i| {
                            let url = edge.url(&format!("/v1/docs/app/{id}"));
                            (id.to_owned(), patch(&url, &json!({"t": t, "i": i})))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    for (id, code) in &results {
        assert_eq!(*code, if id == "a" { 503 } else { 200 }, "{id}: {code}");
    }
    wait_for(
        "the edge's writes at the hub",
        Duration::from_secs(10),
        || get(&hub.url("/v1/docs/app/b")).1.get("i") == Some(&json!(9)),
    );
    // The hub's cursor moved past the damaged document (the edge told it to stop waiting),
    // and neither side saw a protocol error.
    let hub_last = tidesync_tests::procs::status(&hub)["last_seq"]
        .as_u64()
        .unwrap();
    wait_for(
        "the edge's cursor at the hub's end",
        Duration::from_secs(10),
        || {
            let s = tidesync_tests::procs::status(&edge);
            s["peers"][0]["cursor"].as_u64() >= Some(hub_last)
        },
    );
    for p in [&hub, &edge] {
        let s = tidesync_tests::procs::status(p);
        assert_eq!(s["peers"][0]["protocol_errors"], 0, "{s}");
        assert_eq!(s["peers"][0]["connected"], true, "{s}");
    }

    // A hub that never saw this edge walks its whole feed, damaged document included:
    // everything else arrives.
    let b2 = d.enroll("hub-two", "hub", &[]).unwrap();
    let hub2 = d.hub_at("hub2", "127.0.0.1:0", &["--bundle", &b2]).unwrap();
    edge.kill();
    let edge = d.edge("edge-1", &[&hub2], &[]).unwrap();
    wait_for(
        "the edge's other documents at the new hub",
        Duration::from_secs(10),
        || {
            ["b", "c"]
                .iter()
                .all(|id| get(&hub2.url(&format!("/v1/docs/app/{id}"))).0 == 200)
        },
    );
    assert_eq!(get(&hub2.url("/v1/docs/app/a")).0, 404);
    let s = tidesync_tests::procs::status(&edge);
    assert_eq!(s["peers"][0]["protocol_errors"], 0, "{s}");
}
