//! Links that know what matters: compression that pays or steps aside, nodes of the
//! previous protocol, critical documents ahead of a backlog, batch classes on their
//! schedule and inside their window, blob streams compressed where it pays.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tidesync::blobs::wire::{BLOB_PROTOCOL, PLAIN_BLOB_PROTOCOL};
use tidesync::blobs::{BlobConfig, Blobs};
use tidesync::model::format_blob_hash;
use tidesync::model::{Class, Classes, DocId, Mode, Namespace, NsPattern, Priority, Window};
use tidesync::net::batch::LocalClock;
use tidesync::net::{Node, NodeConfig};
use tidesync::store::{Store, StoreConfig};
use tidesync::sync::{Role, CLASSES_PROTOCOL_VERSION, LEGACY_PROTOCOL_VERSION, PROTOCOL_VERSION};
use tidesync_tests::blob_files::{noise_file, telemetry_csv};
use tidesync_tests::cluster::{wait_until, Deployment, TestNode};
use tidesync_tests::traffic::{catch_up, link, noise_doc, Backlog};
use tidesync_tests::Rng;

/// Compression halves a catch-up of text and pays on small changes, and steps aside where
/// nothing shrinks: documents of random bytes cost at most 2 % more than with compression
/// off. Documents go in batches, without Automerge's per-column deflate, so what they share
/// is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_saves_where_it_can_and_never_costs_more_than_two_percent() {
    let text_z = catch_up(500, Backlog::Text, true).await.unwrap();
    let text = catch_up(500, Backlog::Text, false).await.unwrap();
    let ratio = text_z.edge.bytes_sent as f64 / text.edge.bytes_sent as f64;
    // The same messages in frames of their own, neither zstd nor Automerge compressing.
    let uncompressed = text_z.edge.bytes_sent + text_z.edge.compression_saved_bytes;
    let of_uncompressed = text_z.edge.bytes_sent as f64 / uncompressed as f64;
    println!(
        "text: {} bytes compressed, {} with compression off (Automerge's deflate): {ratio:.3}; \
         {uncompressed} uncompressed: {of_uncompressed:.3}; {} messages compressed",
        text_z.edge.bytes_sent, text.edge.bytes_sent, text_z.edge.compressed_messages,
    );
    assert!(
        of_uncompressed <= 0.5,
        "compressed text catch-up sent {of_uncompressed:.3} of its uncompressed size"
    );
    assert!(
        ratio <= 0.8,
        "compressed text catch-up sent {ratio:.3} of what it sends with compression off"
    );
    assert_eq!(text.edge.compressed_messages, 0, "off means off");
    let edits_z = catch_up(500, Backlog::Edits, true).await.unwrap();
    let edits = catch_up(500, Backlog::Edits, false).await.unwrap();
    let ratio = edits_z.edge.bytes_sent as f64 / edits.edge.bytes_sent as f64;
    println!(
        "edits: {} bytes compressed, {} plain: {ratio:.3}; {} messages compressed",
        edits_z.edge.bytes_sent, edits.edge.bytes_sent, edits_z.edge.compressed_messages
    );
    assert!(
        ratio < 0.7,
        "compressing small changes saved too little: {ratio:.3}"
    );
    assert!(edits_z.edge.compressed_messages > 0);
    let noise_z = catch_up(500, Backlog::Noise, true).await.unwrap();
    let noise = catch_up(500, Backlog::Noise, false).await.unwrap();
    let ratio = noise_z.edge.bytes_sent as f64 / noise.edge.bytes_sent as f64;
    println!(
        "noise: {} bytes compressed, {} plain: {ratio:.4}; {} messages compressed",
        noise_z.edge.bytes_sent, noise.edge.bytes_sent, noise_z.edge.compressed_messages
    );
    assert!(ratio <= 1.02, "noise cost {ratio:.4} of plain");
}

fn classes(list: &[(&str, &str, Priority, Mode)]) -> Arc<Classes> {
    Arc::new(
        Classes::new(
            list.iter()
                .map(|(name, pattern, priority, mode)| Class {
                    name: (*name).into(),
                    namespaces: vec![NsPattern::new(*pattern).unwrap()],
                    priority: *priority,
                    mode: mode.clone(),
                    max_rate: None,
                })
                .collect(),
        )
        .unwrap(),
    )
}

/// The config of an edge dialing `hub` with one batch class over `pattern`.
fn batch_edge(
    d: &Deployment,
    hub: &TestNode,
    (name, pattern): (&str, &str),
    every: Duration,
    window: Option<Window>,
) -> NodeConfig {
    let mut cfg = d.config("edge", Role::Edge, &["*=rw"]).unwrap();
    cfg.dial = vec![hub.addr()];
    let mode = Mode::Batch { every, window };
    cfg.traffic.classes = classes(&[(name, pattern, Priority::Bulk, mode)]);
    cfg
}

fn ns(s: &str) -> Namespace {
    Namespace::new(s).unwrap()
}

fn id(s: &str) -> DocId {
    DocId::new(s).unwrap()
}

/// Nodes held back to protocol 6 (no class streams, no compression: a node from before
/// them) and 7 (compression message by message, no batches) and a current hub settle on
/// their versions in the handshake and sync every way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_previous_protocols_still_sync_both_ways() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let held_back = |name: &str, version: u16| {
        let mut cfg = d.config(name, Role::Edge, &["*=rw"]).unwrap();
        cfg.dial = vec![hub.addr()];
        cfg.traffic.max_protocol = version;
        d.start(name, cfg).unwrap()
    };
    let old = held_back("old-edge", LEGACY_PROTOCOL_VERSION);
    let mid = held_back("mid-edge", CLASSES_PROTOCOL_VERSION);
    let new = d.edge("new-edge", &["*=rw"], &[hub.addr()]).unwrap();
    let edges = [(&old, "from-old"), (&mid, "from-mid"), (&new, "from-new")];
    for (node, doc) in edges {
        // Several documents each, so that batches form on the newest links.
        for k in 0..20 {
            let text =
                json!({ "notes": format!("{k} the same words again and again ").repeat(40) });
            node.store
                .put(&ns("app"), &id(&format!("{doc}-{k}")), text, None)
                .await
                .unwrap();
        }
    }
    for node in [&hub, &old, &mid, &new] {
        for (_, doc) in edges {
            for k in 0..20 {
                let doc = format!("{doc}-{k}");
                wait_until(Duration::from_secs(20), &doc, || {
                    Ok(node.store.get(&ns("app"), &id(&doc))?.is_some())
                })
                .await
                .unwrap();
            }
        }
    }
    let mid_link = link(&mid).unwrap();
    assert_eq!(mid_link.protocol, u64::from(CLASSES_PROTOCOL_VERSION));
    assert!(mid_link.compressed_messages > 0, "protocol 7 compresses");
    let old_link = link(&old).unwrap();
    assert_eq!(old_link.protocol, u64::from(LEGACY_PROTOCOL_VERSION));
    assert_eq!(
        old_link.compressed_messages, 0,
        "protocol 6 has no compression"
    );
    let new_link = link(&new).unwrap();
    assert_eq!(new_link.protocol, u64::from(PROTOCOL_VERSION));
    assert!(new_link.compressed_messages > 0, "repeated text compresses");
}

/// An edge whose capped link is busy with a bulk backlog sends a critical document ahead
/// of all of it: the hub holds the alert while most of the backlog is still to come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_document_overtakes_a_bulk_backlog_on_a_capped_link() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let mut cfg = d.config("edge", Role::Edge, &["*=rw"]).unwrap();
    cfg.traffic.classes = classes(&[
        ("alerts", "alerts", Priority::Critical, Mode::Live),
        ("telemetry", "telemetry", Priority::Bulk, Mode::Live),
    ]);
    cfg.traffic.max_rate = Some(256 * 1024);
    let path = d.dir().join("edge.redb");
    let store = Store::open(&path, StoreConfig::default()).unwrap();
    let mut rng = Rng::new(7);
    let backlog = 400;
    for i in 0..backlog {
        let doc = noise_doc(&mut rng, 8192).unwrap();
        store
            .import(&ns("telemetry"), &id(&format!("t{i:04}")), doc)
            .await
            .unwrap();
    }
    cfg.dial = vec![hub.addr()];
    let node = Node::start(store.clone(), cfg.clone()).unwrap();
    let edge = TestNode {
        node,
        store,
        path,
        cfg,
    };
    wait_until(Duration::from_secs(20), "the backlog flowing", || {
        Ok(hub.store.list(&ns("telemetry"))?.len() >= 20)
    })
    .await
    .unwrap();
    let written = Instant::now();
    edge.store
        .put(
            &ns("alerts"),
            &id("overheat"),
            json!({ "level": "critical" }),
            None,
        )
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "the alert at the hub", || {
        Ok(hub.store.get(&ns("alerts"), &id("overheat"))?.is_some())
    })
    .await
    .unwrap();
    let took = written.elapsed();
    let arrived = hub.store.list(&ns("telemetry")).unwrap().len();
    println!("the alert took {took:?}; {arrived} of {backlog} bulk documents had arrived");
    assert!(
        arrived < backlog / 2,
        "the alert waited for the backlog: {arrived} of {backlog} bulk documents came first"
    );
    let classes = link(&edge).unwrap().classes;
    assert_eq!(classes["alerts"].priority, "critical");
    assert!(classes["alerts"].sent_messages >= 1);
    wait_until(Duration::from_secs(5), "the bulk backlog in status", || {
        Ok(link(&edge)?
            .classes
            .get("telemetry")
            .is_some_and(|c| c.backlog > 0 && c.priority == "bulk"))
    })
    .await
    .unwrap();
}

/// A batch class with `every = 5s` sends at most once per 5 s while its document changes
/// every 100 ms, and the last write arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_class_sends_once_per_period_and_loses_nothing() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let every = Duration::from_secs(5);
    let cfg = batch_edge(&d, &hub, ("telemetry", "telemetry"), every, None);
    let edge = d.start("edge", cfg).unwrap();
    wait_until(Duration::from_secs(10), "connected", || {
        Ok(link(&edge).is_ok())
    })
    .await
    .unwrap();
    let sent = |edge: &TestNode| {
        link(edge)
            .ok()
            .and_then(|c| c.classes.get("telemetry").map(|c| c.sent_messages))
            .unwrap_or(0)
    };
    // When each message of the class went out, as sampled every 20 ms.
    let mut sends: Vec<(Instant, u64)> = Vec::new();
    let start = Instant::now();
    let mut last = 0;
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(16) {
        n += 1;
        edge.store
            .put(&ns("telemetry"), &id("cpu"), json!({ "n": n }), None)
            .await
            .unwrap();
        for _ in 0..5 {
            let now = sent(&edge);
            if now > last {
                sends.push((Instant::now(), now - last));
                last = now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let value = json!({ "n": n });
    wait_until(Duration::from_secs(15), "the last write at the hub", || {
        Ok(hub
            .store
            .get(&ns("telemetry"), &id("cpu"))?
            .is_some_and(|d| d.content.get("n") == value.get("n")))
    })
    .await
    .unwrap();
    println!(
        "{n} writes; sends at {:?}",
        sends
            .iter()
            .map(|(t, k)| (t.duration_since(start).as_millis(), *k))
            .collect::<Vec<_>>()
    );
    assert!(n >= 120, "writes every 100 ms or so: {n}");
    for pair in sends.windows(2) {
        let gap = pair[1].0.duration_since(pair[0].0);
        assert!(
            gap + Duration::from_millis(100) >= every,
            "two sends {gap:?} apart: {sends:?}"
        );
    }
    assert!(
        sends.iter().all(|(_, k)| *k == 1),
        "one message per send: {sends:?}"
    );
}

/// A batch class whose window is closed sends nothing, and status shows what waits; once
/// the (injected) local clock enters the window, everything goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_window_holds_a_batch_class_until_it_opens() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let window = Window::parse("01:00-05:00").unwrap();
    let every = Duration::from_secs(1);
    let mut cfg = batch_edge(&d, &hub, ("nightly", "datasets"), every, Some(window));
    let minute = Arc::new(AtomicU16::new(12 * 60));
    let m = minute.clone();
    cfg.clock = LocalClock(Arc::new(move || m.load(Ordering::Relaxed)));
    let edge = d.start("edge", cfg).unwrap();
    for i in 0..5 {
        edge.store
            .put(
                &ns("datasets"),
                &id(&format!("d{i}")),
                json!({ "i": i }),
                None,
            )
            .await
            .unwrap();
    }
    edge.store
        .put(&ns("app"), &id("live"), json!({ "ok": true }), None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "a live document", || {
        Ok(hub.store.get(&ns("app"), &id("live"))?.is_some())
    })
    .await
    .unwrap();
    wait_until(Duration::from_secs(10), "the backlog in status", || {
        Ok(link(&edge)?
            .classes
            .get("nightly")
            .is_some_and(|c| c.backlog == 5))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        hub.store.list(&ns("datasets")).unwrap().is_empty(),
        "sent outside the window"
    );
    minute.store(2 * 60, Ordering::Relaxed);
    wait_until(
        Duration::from_secs(10),
        "the batch once the window opened",
        || Ok(hub.store.list(&ns("datasets"))?.len() == 5),
    )
    .await
    .unwrap();
}

/// A capped bulk class on a link of protocol 6 (one stream for everything) holds back its
/// own documents only: a normal document written behind a backlog of it arrives at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_class_holds_back_only_itself_even_on_one_stream() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let mut cfg = d.config("edge", Role::Edge, &["*=rw"]).unwrap();
    cfg.traffic.max_protocol = LEGACY_PROTOCOL_VERSION;
    let capped = Class {
        name: "logs".into(),
        namespaces: vec![NsPattern::new("logs").unwrap()],
        priority: Priority::Bulk,
        mode: Mode::Live,
        max_rate: Some(32 * 1024),
    };
    cfg.traffic.classes = Arc::new(Classes::new(vec![capped]).unwrap());
    cfg.dial = vec![hub.addr()];
    let edge = d.start("edge", cfg).unwrap();
    wait_until(Duration::from_secs(10), "connected", || {
        Ok(link(&edge).is_ok())
    })
    .await
    .unwrap();
    let mut rng = Rng::new(3);
    for i in 0..64 {
        let doc = noise_doc(&mut rng, 16 * 1024).unwrap();
        edge.store
            .import(&ns("logs"), &id(&format!("l{i:02}")), doc)
            .await
            .unwrap();
    }
    // 1 MiB at 32 KiB/s: half a minute of backlog.
    edge.store
        .put(&ns("app"), &id("config"), json!({ "v": 1 }), None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "the normal document", || {
        Ok(hub.store.get(&ns("app"), &id("config"))?.is_some())
    })
    .await
    .unwrap();
    let logs = hub.store.list(&ns("logs")).unwrap().len();
    assert!(
        logs < 32,
        "the normal document waited for the capped class: {logs} of 64 first"
    );
    assert_eq!(
        link(&edge).unwrap().protocol,
        u64::from(LEGACY_PROTOCOL_VERSION)
    );
}

/// A batch document is held for its flush, but a peer that changes it is answered at
/// once, with what was held: a hub can pull on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_changes_a_batch_document_is_answered_at_once() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let every = Duration::from_secs(600);
    let cfg = batch_edge(&d, &hub, ("telemetry", "telemetry"), every, None);
    let edge = d.start("edge", cfg).unwrap();
    edge.store
        .put(&ns("telemetry"), &id("x"), json!({ "first": 1 }), None)
        .await
        .unwrap();
    // The first flush of the connection takes it; the next would be in ten minutes.
    wait_until(Duration::from_secs(10), "the first flush", || {
        Ok(hub.store.get(&ns("telemetry"), &id("x"))?.is_some())
    })
    .await
    .unwrap();
    edge.store
        .patch(&ns("telemetry"), &id("x"), json!({ "edge": 2 }), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = |hub: &TestNode| {
        hub.store
            .get(&ns("telemetry"), &id("x"))
            .unwrap()
            .is_some_and(|d| d.content.contains_key("edge"))
    };
    assert!(!held(&hub), "a batch change went out before its flush");
    hub.store
        .patch(&ns("telemetry"), &id("x"), json!({ "hub": 3 }), None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the held change, pulled", || {
        Ok(held(&hub))
    })
    .await
    .unwrap();
}

/// What one blob fetch cost: an edge fetching a blob from the hub that holds it.
struct BlobFetch {
    /// Bytes the edge received in blob streams.
    received: u64,
    /// Bytes the hub's compression saved.
    saved: u64,
    /// The blob protocol the hub answered the edge in.
    answered_in: u64,
}

/// A node of `d` with blobs in a directory of its own, speaking blob protocol `protocol`
/// and compressing if `compress`.
fn with_blobs(
    d: &Deployment,
    name: &str,
    mut cfg: NodeConfig,
    compress: bool,
    protocol: u8,
) -> TestNode {
    let blob_cfg = BlobConfig {
        protocol,
        ..BlobConfig::default()
    };
    cfg.blobs = Some(Blobs::open(&d.dir().join(name), blob_cfg).unwrap());
    cfg.traffic.compress = compress;
    d.start(name, cfg).unwrap()
}

/// Puts `data` as a blob at `hub` and references it from a document: its hash and size.
async fn offer_blob(hub: &TestNode, data: &[u8]) -> ([u8; 32], u64) {
    let mut put = hub.node.blobs().unwrap().files().begin_put().unwrap();
    put.write(data).unwrap();
    let (hash, size) = put.finish().unwrap();
    let reference = json!({ "file": { "@blob": format_blob_hash(&hash), "size": size } });
    hub.store
        .put(&ns("datasets"), &id("d"), reference, None)
        .await
        .unwrap();
    (hash, size)
}

/// The hub holds `data` as a blob a document references; an edge fetches it (eagerly)
/// and must hold the same bytes. `hub` and `edge` are (compress, blob protocol).
async fn fetch_blob(data: &[u8], hub: (bool, u8), edge: (bool, u8)) -> BlobFetch {
    let d = Deployment::new().unwrap();
    let hub_cfg = d.config("hub", Role::Hub, &[]).unwrap();
    let hub = with_blobs(&d, "hub", hub_cfg, hub.0, hub.1);
    let mut edge_cfg = d.config("edge", Role::Edge, &["*=rw"]).unwrap();
    edge_cfg.dial = vec![hub.addr()];
    let edge = with_blobs(&d, "edge", edge_cfg, edge.0, edge.1);
    let hub_blobs = hub.node.blobs().unwrap().clone();
    let (hash, size) = offer_blob(&hub, data).await;
    let edge_blobs = edge.node.blobs().unwrap().clone();
    wait_until(Duration::from_secs(60), "the blob at the edge", || {
        Ok(edge_blobs.files().held(&hash)? == Some(size))
    })
    .await
    .unwrap();
    let mut held = Vec::new();
    let reader = edge_blobs.files().reader(&hash).unwrap().unwrap();
    std::io::Read::read_to_end(&mut &reader.data, &mut held).unwrap();
    assert!(held == data, "the edge holds other bytes than the hub's");
    let fetch = BlobFetch {
        received: edge_blobs.stats().received_bytes.load(Ordering::Relaxed),
        saved: hub_blobs
            .stats()
            .compression_saved_bytes
            .load(Ordering::Relaxed),
        answered_in: link(&edge).unwrap().blob_protocol,
    };
    edge.stop().await;
    hub.stop().await;
    fetch
}

/// Blob streams are compressed where that pays: a CSV dataset arrives in well under half
/// the bytes it takes with compression off, noise costs at most 2 % more, and nodes of
/// blob protocol 1 (the plain encoding) still fetch from and serve current ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_streams_compress_where_it_pays_and_old_nodes_still_fetch() {
    const NEW: u8 = BLOB_PROTOCOL;
    const OLD: u8 = PLAIN_BLOB_PROTOCOL;
    let csv = telemetry_csv(8 << 20, 5);
    let csv_z = fetch_blob(&csv, (true, NEW), (true, NEW)).await;
    let csv_off = fetch_blob(&csv, (false, NEW), (true, NEW)).await;
    let ratio = csv_z.received as f64 / csv_off.received as f64;
    println!(
        "csv of {} bytes: {} received compressed, {} with compression off: {ratio:.3}",
        csv.len(),
        csv_z.received,
        csv_off.received
    );
    assert!(
        ratio <= 0.5,
        "a CSV blob went at {ratio:.3} of its plain size"
    );
    assert_eq!(csv_z.saved, csv_off.received - csv_z.received);
    assert_eq!(csv_off.saved, 0, "off means off");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise");
    noise_file(&path, 8 << 20, 9).unwrap();
    let noise = std::fs::read(&path).unwrap();
    let noise_z = fetch_blob(&noise, (true, NEW), (true, NEW)).await;
    let noise_off = fetch_blob(&noise, (false, NEW), (true, NEW)).await;
    let ratio = noise_z.received as f64 / noise_off.received as f64;
    println!(
        "noise: {} received compressed, {} with compression off: {ratio:.5}",
        noise_z.received, noise_off.received
    );
    assert!(ratio <= 1.02, "noise cost {ratio:.5} of plain");

    // A current edge asks an old hub in protocol 2, is refused, asks again in 1; an old
    // edge asks a current hub in 1. Both get the plain encoding: the size of the blob and
    // its tree, as protocol 1 always sent.
    let old_hub = fetch_blob(&csv, (true, OLD), (true, NEW)).await;
    let old_edge = fetch_blob(&csv, (true, NEW), (true, OLD)).await;
    assert_eq!(csv_z.answered_in, u64::from(NEW));
    for (who, f) in [("an old hub", old_hub), ("an old edge", old_edge)] {
        assert_eq!(f.answered_in, u64::from(OLD), "{who}");
        assert_eq!(f.saved, 0, "{who} got compressed blocks");
        assert!(
            f.received > csv.len() as u64 && f.received < csv_off.received,
            "{who}: {} bytes received, the blob is {} and its blocks {}",
            f.received,
            csv.len(),
            csv_off.received
        );
    }
}

/// A source that sends a compressed dataset with a flipped byte is caught as corrupt (the
/// chunk group fails verification after decompressing) and nothing of it is kept as good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_compressed_blob_stream_is_caught() {
    let d = Deployment::new().unwrap();
    let mut hub_cfg = d.config("hub", Role::Hub, &[]).unwrap();
    hub_cfg.blobs = Some(
        Blobs::open(
            &d.dir().join("hub"),
            BlobConfig {
                fault_corrupt_sends: true,
                ..BlobConfig::default()
            },
        )
        .unwrap(),
    );
    let hub = d.start("hub", hub_cfg).unwrap();
    let mut edge_cfg = d.config("edge", Role::Edge, &["*=rw"]).unwrap();
    edge_cfg.dial = vec![hub.addr()];
    let edge = with_blobs(&d, "edge", edge_cfg, true, BLOB_PROTOCOL);
    let (hash, _) = offer_blob(&hub, &telemetry_csv(4 << 20, 6)).await;
    let edge_blobs = edge.node.blobs().unwrap().clone();
    wait_until(Duration::from_secs(30), "the corrupt stream caught", || {
        Ok(edge_blobs.stats().corrupt.load(Ordering::Relaxed) > 0)
    })
    .await
    .unwrap();
    let hub_blobs = hub.node.blobs().unwrap();
    assert!(
        hub_blobs
            .stats()
            .compression_saved_bytes
            .load(Ordering::Relaxed)
            > 0,
        "the stream was compressed"
    );
    assert_eq!(edge_blobs.files().held(&hash).unwrap(), None);
    assert!(link(&edge).unwrap().blob_corrupt > 0);
    edge.stop().await;
    hub.stop().await;
}
