//! Blobs through the real binaries: a large blob put at one edge reaches another byte for
//! byte, `Range` reads, a corrupt source is caught and the blob comes from elsewhere, a
//! killed transfer resumes with only the missing bytes, and grants hold.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tidesync_tests::procs::{connected, run, status, wait_for, Binaries, Proc};

const MIB: u64 = 1024 * 1024;

fn noise_file(path: &Path, size: u64, seed: u64) {
    tidesync_tests::blob_files::noise_file(path, size, seed).unwrap();
}

fn same_files(a: &Path, b: &Path) -> bool {
    tidesync_tests::blob_files::same_files(a, b).unwrap()
}

/// `blob put` through the CLI: the hash and size it prints.
fn put_blob(node: &Proc, bin: &str, file: &Path) -> (String, u64) {
    let out = run(
        bin,
        &[
            "blob",
            "put",
            file.to_str().unwrap(),
            "--api",
            &node.api.to_string(),
            "--json",
        ],
    )
    .unwrap();
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    (
        v["hash"].as_str().unwrap().to_owned(),
        v["size"].as_u64().unwrap(),
    )
}

/// `blob get` through the CLI into `out`; whether it holds the same bytes as `original`.
fn get_blob_matches(node: &Proc, bin: &str, hash: &str, out: &Path, original: &Path) -> bool {
    run(
        bin,
        &[
            "blob",
            "get",
            hash,
            "--out",
            out.to_str().unwrap(),
            "--api",
            &node.api.to_string(),
        ],
    )
    .unwrap();
    same_files(original, out)
}

fn blobs_status(p: &Proc) -> Value {
    status(p)["blobs"].clone()
}

/// Whether `p` holds the whole blob (a HEAD says so without fetching anything).
fn holds(p: &Proc, hash: &str) -> bool {
    ureq::head(&p.url(&format!("/v1/blobs/{hash}")))
        .call()
        .is_ok_and(|r| r.header("x-tidesync-blob") == Some("held"))
}

fn reference(hash: &str, size: u64) -> Value {
    json!({"@blob": hash, "size": size, "type": "application/octet-stream", "name": "weights.bin"})
}

#[test]
fn a_blob_put_at_one_edge_reaches_another_byte_identical_and_reads_by_range() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    d.enroll("edge-a", "edge", &["models=rw"]).unwrap();
    d.enroll("edge-b", "edge", &["models=rw"]).unwrap();
    d.enroll("edge-c", "edge", &["other=rw"]).unwrap();
    let a = d.edge("edge-a", &[&hub], &[]).unwrap();
    let b = d.edge("edge-b", &[&hub], &[]).unwrap();
    let c = d.edge("edge-c", &[&hub], &[]).unwrap();
    wait_for("the edges connected", Duration::from_secs(10), || {
        connected(&hub, "edge-a") && connected(&hub, "edge-b") && connected(&hub, "edge-c")
    });
    let size = 256 * MIB;
    let file = Path::new(&d.path("weights.bin")).to_owned();
    noise_file(&file, size, 7);
    let (hash, put_size) = put_blob(&a, "tidesync-edge", &file);
    assert_eq!(put_size, size);
    // Putting the same bytes again stores nothing new.
    let (again, _) = put_blob(&a, "tidesync-edge", &file);
    assert_eq!(again, hash);

    ureq::put(&a.url("/v1/docs/models/resnet"))
        .send_json(json!({"name": "resnet", "weights": reference(&hash, size)}))
        .unwrap();
    wait_for("the blob at edge-b", Duration::from_secs(180), || {
        holds(&b, &hash)
    });

    let out = Path::new(&d.path("copy.bin")).to_owned();
    assert!(
        get_blob_matches(&b, "tidesync-edge", &hash, &out, &file),
        "the copy at edge-b differs"
    );

    // Range reads answer exactly the bytes asked for.
    let original = std::fs::read(&file).unwrap();
    for (range, start, end) in [
        ("bytes=0-0", 0, 1),
        ("bytes=1000-70000", 1000, 70_001),
        ("bytes=16383-16385", 16_383, 16_386),
        (&format!("bytes={}-", size - 5) as &str, size - 5, size),
        ("bytes=-3", size - 3, size),
    ] {
        let r = ureq::get(&b.url(&format!("/v1/blobs/{hash}")))
            .set("Range", range)
            .call()
            .unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            r.header("Content-Range").unwrap(),
            format!("bytes {start}-{}/{size}", end - 1)
        );
        let mut body = Vec::new();
        r.into_reader().read_to_end(&mut body).unwrap();
        assert_eq!(body, original[start as usize..end as usize], "{range}");
    }
    match ureq::get(&b.url(&format!("/v1/blobs/{hash}")))
        .set("Range", &format!("bytes={size}-"))
        .call()
    {
        Err(ureq::Error::Status(416, r)) => {
            assert_eq!(
                r.header("Content-Range").unwrap(),
                format!("bytes */{size}")
            )
        }
        other => panic!("{other:?}"),
    }
    let head = ureq::head(&b.url(&format!("/v1/blobs/{hash}")))
        .call()
        .unwrap();
    assert_eq!(head.header("ETag").unwrap(), format!("\"{hash}\""));
    assert_eq!(head.header("Content-Length").unwrap(), size.to_string());

    // The listing names the referencing document; status shows the space.
    let ls: Value = ureq::get(&b.url("/v1/blobs"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(ls["blobs"][0]["hash"], hash.as_str(), "{ls}");
    assert_eq!(ls["blobs"][0]["docs"][0], "models/resnet", "{ls}");
    assert!(blobs_status(&b)["bytes_used"].as_u64().unwrap() >= size);
    let text = run(
        "tidesync-edge",
        &["blob", "ls", "--api", &b.api.to_string()],
    )
    .unwrap();
    assert!(
        text.contains(&hash) && text.contains("models/resnet"),
        "{text}"
    );

    // An edge that may not read `models` gets nothing: not from its own API, and not
    // from the hub once it names the hash in a namespace it may write.
    let missing = ureq::get(&c.url(&format!("/v1/blobs/{hash}?timeout_ms=0"))).call();
    assert!(
        matches!(missing, Err(ureq::Error::Status(404, _))),
        "{missing:?}"
    );
    ureq::put(&c.url("/v1/docs/other/steal"))
        .send_json(json!({"w": reference(&hash, size)}))
        .unwrap();
    wait_for("the hub refused edge-c", Duration::from_secs(20), || {
        blobs_status(&hub)["refused"].as_u64().unwrap_or(0) >= 1
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!holds(&c, &hash), "edge-c got a blob it may not read");
    assert_eq!(blobs_status(&c)["received_bytes"], 0);
}

#[test]
fn a_corrupt_source_is_caught_at_once_and_the_blob_comes_from_another() {
    let d = Binaries::init().unwrap();
    let bad = d.hub(&["--fault-corrupt-blob-sends"]).unwrap();
    let good_bundle = d.enroll("hub-good", "hub", &[]).unwrap();
    let good = d
        .hub_at(
            "hub-good",
            "127.0.0.1:0",
            &["--bundle", &good_bundle, "--peer", &bad.quic.to_string()],
        )
        .unwrap();
    let size = 24 * MIB + 1234;
    let file = Path::new(&d.path("data.bin")).to_owned();
    noise_file(&file, size, 11);
    let (hash, _) = put_blob(&bad, "tidesync-hub", &file);
    let (same, _) = put_blob(&good, "tidesync-hub", &file);
    assert_eq!(same, hash);
    let fetcher_bundle = d.enroll("hub-fetch", "hub", &[]).unwrap();
    let fetcher = d
        .hub_at(
            "hub-fetch",
            "127.0.0.1:0",
            &[
                "--bundle",
                &fetcher_bundle,
                "--peer",
                &bad.quic.to_string(),
                "--peer",
                &good.quic.to_string(),
            ],
        )
        .unwrap();
    let bad_id = status(&bad)["node_id"].as_str().unwrap().to_owned();
    wait_for(
        "the fetcher connected to both",
        Duration::from_secs(10),
        || connected(&fetcher, &bad_id) && connected(&fetcher, "hub-good"),
    );
    ureq::put(&bad.url("/v1/docs/datasets/train"))
        .send_json(json!({"shard": reference(&hash, size)}))
        .unwrap();
    wait_for("the blob at the fetcher", Duration::from_secs(60), || {
        holds(&fetcher, &hash)
    });
    let out = Path::new(&d.path("fetched.bin")).to_owned();
    assert!(
        get_blob_matches(&fetcher, "tidesync-hub", &hash, &out, &file),
        "the copy at the fetcher differs"
    );
    let st = status(&fetcher);
    let peer = |id: &str| {
        st["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node_id"] == id)
            .unwrap()
            .clone()
    };
    assert!(peer(&bad_id)["blob_corrupt"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(peer("hub-good")["blob_corrupt"], 0, "{st}");
    // Caught at the first bad chunk group: the corrupt peer's stream was cut early.
    let from_bad = peer(&bad_id)["blob_received_bytes"].as_u64().unwrap();
    assert!(
        from_bad < 512 * 1024,
        "{from_bad} bytes taken from the corrupt peer"
    );
    let metrics = ureq::get(&fetcher.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let corrupt: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tidesync_blob_corrupt_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(corrupt >= 1, "{metrics}");
}

#[test]
fn an_edge_killed_mid_transfer_resumes_with_only_the_missing_bytes() {
    let d = Binaries::init().unwrap();
    // Paced, so the kill lands mid-transfer.
    let hub = d.hub(&["--blob-max-rate", "16000000"]).unwrap();
    d.enroll("edge-1", "edge", &["models=ro"]).unwrap();
    let size = 64 * MIB;
    let file = Path::new(&d.path("model.bin")).to_owned();
    noise_file(&file, size, 3);
    let (hash, _) = put_blob(&hub, "tidesync-hub", &file);
    ureq::put(&hub.url("/v1/docs/models/m"))
        .send_json(json!({"weights": reference(&hash, size)}))
        .unwrap();
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    let mut at_kill = 0;
    wait_for("half the blob at the edge", Duration::from_secs(60), || {
        at_kill = blobs_status(&edge)["transfers"][0]["done"]
            .as_u64()
            .unwrap_or(0);
        at_kill >= size / 2
    });
    edge.kill();
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    wait_for(
        "the blob at the restarted edge",
        Duration::from_secs(60),
        || holds(&edge, &hash),
    );
    let st = blobs_status(&edge);
    let resumed = st["resumed_bytes"].as_u64().unwrap();
    let received = st["received_bytes"].as_u64().unwrap();
    assert!(
        resumed >= at_kill,
        "resumed from {resumed}, {at_kill} were verified before the kill"
    );
    let remaining = size - resumed;
    assert!(
        received as f64 <= remaining as f64 * 1.05,
        "received {received} bytes for {remaining} missing"
    );
    let out = Path::new(&d.path("resumed.bin")).to_owned();
    assert!(
        get_blob_matches(&edge, "tidesync-edge", &hash, &out, &file),
        "the resumed copy differs"
    );
}

#[test]
fn lazy_blobs_come_on_first_read_and_unreferenced_ones_are_collected() {
    let d = Binaries::init().unwrap();
    // Paced, so a read can be seen streaming the blob while it still arrives.
    let hub = d
        .hub(&["--blob-gc-grace", "2s", "--blob-max-rate", "2000000"])
        .unwrap();
    d.enroll("edge-1", "edge", &["models=rw"]).unwrap();
    let edge = d
        .edge(
            "edge-1",
            &[&hub],
            &["--blob-policy", "lazy", "--blob-gc-grace", "2s"],
        )
        .unwrap();
    wait_for("the edge connected", Duration::from_secs(10), || {
        connected(&hub, "edge-1")
    });
    let size = 3 * MIB + 17;
    let file = Path::new(&d.path("small.bin")).to_owned();
    noise_file(&file, size, 5);
    let (hash, _) = put_blob(&hub, "tidesync-hub", &file);
    ureq::put(&hub.url("/v1/docs/models/m"))
        .send_json(json!({"weights": reference(&hash, size)}))
        .unwrap();
    wait_for("the document at the edge", Duration::from_secs(10), || {
        ureq::get(&edge.url("/v1/docs/models/m")).call().is_ok()
    });
    // Lazy: the reference alone fetches nothing (and a HEAD fetches nothing either).
    std::thread::sleep(Duration::from_secs(1));
    let head = ureq::head(&edge.url(&format!("/v1/blobs/{hash}")))
        .call()
        .unwrap();
    assert_eq!(head.header("x-tidesync-blob"), Some("referenced"));
    assert_eq!(head.header("Content-Length").unwrap(), size.to_string());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(blobs_status(&edge)["received_bytes"], 0);
    // The first read fetches it and streams it through as it arrives, verified.
    let r = ureq::get(&edge.url(&format!("/v1/blobs/{hash}")))
        .call()
        .unwrap();
    assert_eq!(r.header("Content-Length").unwrap(), size.to_string());
    let mut reader = r.into_reader();
    let mut body = vec![0u8; 64 * 1024];
    reader.read_exact(&mut body).unwrap();
    assert!(!holds(&edge, &hash), "the read waited for the whole blob");
    reader.read_to_end(&mut body).unwrap();
    assert_eq!(body, std::fs::read(&file).unwrap());
    wait_for("the blob held at the edge", Duration::from_secs(10), || {
        holds(&edge, &hash)
    });
    let text = run("tidesync-edge", &["status", "--api", &edge.api.to_string()]).unwrap();
    assert!(text.contains("BLOBS 1 held"), "{text}");

    // A blob put and never referenced goes after the grace period, and so does one whose
    // last reference went.
    let other = Path::new(&d.path("orphan.bin")).to_owned();
    noise_file(&other, 100_000, 9);
    let (orphan, _) = put_blob(&hub, "tidesync-hub", &other);
    ureq::put(&hub.url("/v1/docs/models/m"))
        .send_json(json!({"weights": null}))
        .unwrap();
    wait_for(
        "both blobs collected everywhere",
        Duration::from_secs(30),
        || {
            !holds(&hub, &hash)
                && !holds(&edge, &hash)
                && !holds(&hub, &orphan)
                && blobs_status(&hub)["collected"].as_u64().unwrap_or(0) >= 2
        },
    );
    assert!(blobs_status(&edge)["bytes_used"].as_u64().unwrap() < size);
    let missing = ureq::get(&hub.url(&format!("/v1/blobs/{hash}?timeout_ms=0"))).call();
    assert!(
        matches!(missing, Err(ureq::Error::Status(404, _))),
        "{missing:?}"
    );
}
