//! Peer inputs that cost the receiver far more than their bytes: each is refused before
//! the work it would cause, the peer is dropped, and an honest edge keeps syncing.
//!
//! Regression story: a peer that may only *read* one document could send an Automerge sync
//! message whose Bloom filter has zero bits per entry (Automerge then divides by zero while
//! generating its reply, a panic in the hub's connection task) or 2^30 probes (gigabytes
//! allocated per change checked), and a hello with millions of subscriptions, each matched
//! against every feed entry. The core's `sync::validate` now checks all of these first.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use automerge::sync::{BloomFilter, Have, State, SyncDoc};
use automerge::transaction::Transactable;
use tidesync::model::{DocId, Namespace, NsPattern};
use tidesync::net::driver::{CLOSE_PENALIZED, CLOSE_PROTOCOL};
use tidesync::sync::{Hello, Message, Role, PROTOCOL_VERSION};
use tidesync_tests::bench::hostile;
use tidesync_tests::cluster::{self, Deployment, TestNode};
use tidesync_tests::rogue::{hello, Rogue};

fn ns() -> Namespace {
    Namespace::new("telemetry").unwrap()
}

/// An honest edge writes; the write must reach the hub within 2 s.
async fn honest_write_arrives(edge: &TestNode, hub: &TestNode, i: u32) {
    cluster::honest_write_arrives(edge, hub, &ns(), i, Duration::from_secs(2))
        .await
        .unwrap();
}

/// A hub, and an honest edge writing through it.
fn hub_with_honest_edge() -> (Deployment, TestNode, TestNode) {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let edge = d.edge("edge-honest", &["*=rw"], &[hub.addr()]).unwrap();
    (d, hub, edge)
}

/// An edge `name` holding `grant`, connected to `hub` by hand and past its hello.
async fn rogue(d: &Deployment, hub: &TestNode, name: &str, grant: &str) -> Rogue {
    let bundle = d.bundle(name, Role::Edge, &[grant]).unwrap();
    let mut r = Rogue::connect(&bundle, hub.addr()).await.unwrap();
    r.send(&hello(name, Role::Edge)).await.unwrap();
    r
}

/// Whether the hub dropped the rogue with a protocol error that names `what`.
async fn refused(r: &Rogue, what: &str) -> bool {
    let Ok(closed) = tokio::time::timeout(Duration::from_secs(2), r.conn.closed()).await else {
        return false;
    };
    match &closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            println!("closed: {reason}");
            c.error_code == CLOSE_PROTOCOL.into() && reason.contains(what)
        }
        other => {
            println!("closed otherwise: {other:?}");
            false
        }
    }
}

/// A sync message for a document, as Automerge's first message, with `bloom` as its have.
fn sync_with_bloom(id: &str, bloom: BloomFilter) -> Message {
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    tx.put(automerge::ROOT, "x", 1).unwrap();
    tx.commit();
    let mut msg = doc.generate_sync_message(&mut State::new()).unwrap();
    msg.have = vec![Have {
        last_sync: Vec::new(),
        bloom,
    }];
    Message::Sync {
        ns: ns().to_string(),
        id: id.into(),
        data: msg.encode(),
    }
}

fn bloom(bytes: &[u8]) -> BloomFilter {
    BloomFilter::try_from(bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_bloom_filter_is_refused_before_automerge_reads_it() {
    let (d, hub, edge) = hub_with_honest_edge();
    honest_write_arrives(&edge, &hub, 0).await;
    let attacks: [(&str, Vec<u8>); 2] = [
        // 1 entry, 0 bits per entry, 7 probes, no bits.
        ("zero bits per entry", vec![1, 0, 7]),
        // 1 entry, 10 bits per entry, 2^30 probes, 2 bytes of bits.
        (
            "2^30 probes",
            vec![1, 10, 0x80, 0x80, 0x80, 0x80, 0x04, 0xff, 0xff],
        ),
    ];
    for (i, (attack, bytes)) in attacks.into_iter().enumerate() {
        // Read access to one document is all it takes. (Another name each time: the first
        // one is refused for a while after its attack.)
        let mut r = rogue(&d, &hub, &format!("reader-{i}"), "telemetry=ro").await;
        r.send(&sync_with_bloom("honest-0", bloom(&bytes)))
            .await
            .unwrap();
        assert!(refused(&r, "Bloom filter").await, "{attack}: not refused");
        honest_write_arrives(&edge, &hub, i as u32 + 1).await;
    }
}

/// Whether a connection of `bundle`'s peer is closed at once for its penalty (the close
/// may come before or after the stream opens).
async fn penalized(bundle: &tidesync::net::Bundle, hub: &TestNode) -> bool {
    let closed = match Rogue::connect(bundle, hub.addr()).await {
        Ok(r) => match tokio::time::timeout(Duration::from_secs(2), r.conn.closed()).await {
            Ok(closed) => closed,
            Err(_) => return false,
        },
        Err(e) => match e.downcast::<quinn::ConnectionError>() {
            Ok(closed) => closed,
            Err(e) => panic!("connecting: {e}"),
        },
    };
    println!("closed: {closed:?}");
    matches!(closed, quinn::ConnectionError::ApplicationClosed(c)
        if c.error_code == CLOSE_PENALIZED.into()
            && String::from_utf8_lossy(&c.reason).contains("after a protocol error"))
}

/// A peer dropped for a protocol error is refused at its next connections for a while
/// (doubling with each error), so it cannot repeat an attack as fast as it can reconnect;
/// other peers, and the same peer once its time is served, connect as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_broke_the_protocol_is_refused_for_a_while() {
    let (d, hub, edge) = hub_with_honest_edge();
    let mut r = rogue(&d, &hub, "repeat-offender", "telemetry=ro").await;
    r.send(&sync_with_bloom("x", bloom(&[1, 0, 7])))
        .await
        .unwrap();
    assert!(refused(&r, "Bloom filter").await, "the attack is refused");
    let bundle = d
        .bundle("repeat-offender", Role::Edge, &["telemetry=ro"])
        .unwrap();
    assert!(
        penalized(&bundle, &hub).await,
        "refused while serving its penalty"
    );
    assert!(hub.node.penalty_refusals() >= 1);
    honest_write_arrives(&edge, &hub, 0).await;
    // Others are not affected.
    let mut other = rogue(&d, &hub, "bystander", "telemetry=ro").await;
    assert!(other.recv(Duration::from_millis(500)).await.is_ok());
    assert!(!other.closed_within(Duration::from_millis(200)).await);
    // After the first second, the offender may try again; a second error doubles the time.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut r = rogue(&d, &hub, "repeat-offender", "telemetry=ro").await;
    r.send(&sync_with_bloom("x", bloom(&[1, 0, 7])))
        .await
        .unwrap();
    assert!(
        refused(&r, "Bloom filter").await,
        "served: its frames are read again"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(
        penalized(&bundle, &hub).await,
        "two seconds after the second error"
    );
    honest_write_arrives(&edge, &hub, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_with_too_many_subscriptions_is_refused() {
    let (d, hub, edge) = hub_with_honest_edge();
    let flood = |n: usize, name: &str| {
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            node_id: name.into(),
            role: Role::Edge,
            feed_epoch: 7,
            feed_last: 0,
            resume: None,
            subscriptions: (0..n)
                .map(|i| format!("never-{i}").parse::<NsPattern>().unwrap())
                .collect(),
        })
    };
    // Over the count (small frame), then over the hello size (checked before decoding).
    for (i, n) in [2_000, 20_000].into_iter().enumerate() {
        let name = format!("flooder-{i}");
        let bundle = d.bundle(&name, Role::Edge, &["*=rw"]).unwrap();
        let mut r = Rogue::connect(&bundle, hub.addr()).await.unwrap();
        r.send(&flood(n, &name)).await.unwrap();
        let what = if n < 10_000 {
            "subscriptions"
        } else {
            "a hello of"
        };
        assert!(refused(&r, what).await, "{n} subscriptions: not refused");
        honest_write_arrives(&edge, &hub, i as u32).await;
    }
}

/// Regression: quinn's defaults let a peer open 100 bidirectional and 100 unidirectional
/// streams that the protocol never reads, each buffering up to its window. Only the sync
/// stream, two class streams and [`MAX_STREAMS_PER_PEER`] blob streams may be open at once
/// now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_may_open_only_the_sync_stream_and_a_few_blob_streams() {
    use tidesync::blobs::serve::MAX_STREAMS_PER_PEER;
    let (d, hub, edge) = hub_with_honest_edge();
    let r = rogue(&d, &hub, "streamer", "*=rw").await;
    let wait = Duration::from_secs(1);
    let mut open = Vec::new();
    let mut open_uni = Vec::new();
    for _ in 0..MAX_STREAMS_PER_PEER {
        let (mut send, recv) = tokio::time::timeout(wait, r.conn.open_bi())
            .await
            .expect("a blob stream within the limit")
            .unwrap();
        send.write_all(&[0]).await.unwrap();
        open.push((send, recv));
    }
    assert!(
        tokio::time::timeout(wait, r.conn.open_bi()).await.is_err(),
        "a bidirectional stream past the limit was allowed"
    );
    // The two class streams (critical, bulk) of protocol 7, and not a third.
    for _ in 0..2 {
        let mut uni = tokio::time::timeout(wait, r.conn.open_uni())
            .await
            .expect("a class stream")
            .unwrap();
        uni.write_all(&[0]).await.unwrap();
        open_uni.push(uni);
    }
    assert!(
        tokio::time::timeout(wait, r.conn.open_uni()).await.is_err(),
        "a third unidirectional stream was allowed"
    );
    honest_write_arrives(&edge, &hub, 0).await;
}

/// Regression: a peer granted `rw` could sync a document nested 100,000 levels deep (a few
/// kilobytes); every node that stored it then overflowed its stack reading it (a GET, the
/// conflicts view). The hub now refuses the message and stores nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_document_is_refused_and_never_stored() {
    let (d, hub, edge) = hub_with_honest_edge();
    let mut deep = automerge::Automerge::new();
    let mut tx = deep.transaction();
    let mut obj = automerge::ROOT;
    for _ in 0..100_000 {
        obj = tx.put_object(&obj, "a", automerge::ObjType::Map).unwrap();
    }
    tx.commit();
    // "The peer has nothing": the first message carries the whole document.
    let mut state = tidesync::sync::warm_sync_state(State::new());
    let msg = deep.generate_sync_message(&mut state).unwrap();
    let mut r = rogue(&d, &hub, "nester", "telemetry=rw").await;
    r.send(&Message::Sync {
        ns: ns().to_string(),
        id: "deep".into(),
        data: msg.encode(),
    })
    .await
    .unwrap();
    assert!(refused(&r, "nested deeper").await, "not refused");
    let deep_id = DocId::new("deep").unwrap();
    assert!(hub.store.export(&ns(), &deep_id).unwrap().is_none());
    honest_write_arrives(&edge, &hub, 0).await;
}

/// Regression, found by the `import` fuzz target: 97 bytes that make Automerge's column
/// decoder panic. Checked as a change chunk on the store's single writer thread, they
/// stopped every write of the hub. The parse is contained now: the peer is dropped, and
/// the hub keeps storing everyone else's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_panic_automerge_do_not_stop_the_store() {
    let poison = include_bytes!("../../engine/fuzz/corpus/import/regression-panics-automerge");
    chunk_is_refused("poisoner", poison, "invalid Automerge data").await;
}

fn sync_with_change(id: &str, bytes: usize, seed: u64) -> Message {
    hostile::sync_with_change(ns().as_str(), id, bytes, seed).unwrap()
}

/// A sync message whose only change is `chunk`, as sent by a `rw` peer `name`: the hub
/// must refuse it, naming `why`, and keep serving the honest edge.
async fn chunk_is_refused(name: &str, chunk: &[u8], why: &str) {
    let (d, hub, edge) = hub_with_honest_edge();
    let mut msg = automerge::Automerge::new()
        .generate_sync_message(&mut State::new())
        .unwrap();
    msg.changes = vec![chunk.to_vec()].into();
    let mut r = rogue(&d, &hub, name, "telemetry=rw").await;
    r.send(&Message::Sync {
        ns: ns().to_string(),
        id: name.into(),
        data: msg.encode(),
    })
    .await
    .unwrap();
    assert!(refused(&r, why).await, "not refused");
    let doc = DocId::new(name).unwrap();
    assert!(hub.store.export(&ns(), &doc).unwrap().is_none(), "stored");
    honest_write_arrives(&edge, &hub, 0).await;
}

fn docs_stored(hub: &TestNode, prefix: &str) -> usize {
    hub.store
        .list(&ns())
        .unwrap()
        .iter()
        .filter(|d| d.id.as_str().starts_with(prefix))
        .count()
}

/// Regression: the hub read a peer's frames as fast as they came and queued each one in
/// memory (a document's inbox, or a spawned apply) however far the store was behind, so
/// one peer could grow a hub's memory at network speed. Now the hub holds at most its
/// inbound budget of a peer's uncommitted messages and stops reading beyond it: QUIC flow
/// control holds the sender. Measured from the flooder's side: when its last frame is
/// accepted by the transport, what the hub has read but not committed is within the budget
/// (plus a stream window and one frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_is_held_by_flow_control_within_the_inbound_budget() {
    const BUDGET_MIB: usize = 2;
    const FRAME_KIB: usize = 128;
    const FRAMES: usize = 64; // 8 MiB, all to one document, so they queue
    let d = Deployment::new().unwrap();
    let mut cfg = d.config("hub", Role::Hub, &[]).unwrap();
    cfg.max_inbound_bytes = BUDGET_MIB << 20;
    let hub = d.start("hub", cfg).unwrap();
    // An edge that writes telemetry but does not receive the flooder's.
    let mut edge_cfg = d.config("edge-honest", Role::Edge, &["*=rw"]).unwrap();
    edge_cfg.dial = vec![hub.addr()];
    edge_cfg.subscriptions = vec![NsPattern::new("config.*").unwrap()];
    let edge = d.start("edge-honest", edge_cfg).unwrap();
    honest_write_arrives(&edge, &hub, 0).await;

    let frames: Vec<Message> = (0..FRAMES)
        .map(|i| sync_with_change("flood", FRAME_KIB << 10, i as u64))
        .collect();
    let mut r = rogue(&d, &hub, "flooder", "telemetry=rw").await;
    let flood = tokio::spawn(async move {
        for f in &frames {
            r.send(f).await.unwrap();
        }
        r
    });
    // The honest edge keeps getting through while the flood is held.
    let mut i = 1;
    while !flood.is_finished() && i < 6 {
        honest_write_arrives(&edge, &hub, i).await;
        i += 1;
    }
    let r = flood.await.unwrap();
    let flood_id = DocId::new("flood").unwrap();
    // Each change is a root change of its own actor: the heads count them.
    let heads = || -> anyhow::Result<usize> {
        let list = hub.store.list(&ns())?;
        Ok(list
            .iter()
            .find(|d| d.id == flood_id)
            .map_or(0, |d| d.heads.len()))
    };
    let committed = heads().unwrap();
    let backlog_kib = (FRAMES - committed) * FRAME_KIB;
    println!("sent {FRAMES} frames; the hub had committed {committed}: {backlog_kib} KiB read but not committed");
    // Budget + a 1.25 MiB stream window + one frame past the budget + slack.
    assert!(
        backlog_kib <= (BUDGET_MIB << 10) + 1280 + FRAME_KIB + 512,
        "the hub read {backlog_kib} KiB ahead of its store"
    );
    // Nothing legitimate is lost: every change of the flood commits.
    cluster::wait_until(Duration::from_secs(30), "the whole flood committed", || {
        Ok(heads()? == FRAMES)
    })
    .await
    .unwrap();
    honest_write_arrives(&edge, &hub, 100).await;
    drop(r);
}

/// Regression: a peer dropped for a protocol error (or revoked) left its applies queued at
/// the store's writer, which committed them after the connection was gone (and relayed them
/// to other peers). Now its writes still queued are abandoned and the store is waited for
/// before the connection closes: what is not committed when the peer sees the close never
/// is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_peer_s_queued_writes_never_commit_after_the_cut() {
    let (d, hub, edge) = hub_with_honest_edge();
    let mut r = rogue(&d, &hub, "cutoff", "telemetry=rw").await;
    const DOCS: usize = 64;
    for i in 0..DOCS {
        r.send(&sync_with_change(&format!("cut-{i}"), 256 << 10, i as u64))
            .await
            .unwrap();
    }
    r.send_frame(&[0xff; 8]).await.unwrap();
    assert!(refused(&r, "undecodable frame").await, "not refused");
    let at_cut = docs_stored(&hub, "cut-");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = docs_stored(&hub, "cut-");
    println!(
        "{at_cut} of {DOCS} documents committed when the peer was cut; {later} a second later"
    );
    assert_eq!(
        at_cut, later,
        "writes of a dropped peer committed after the cut"
    );
    honest_write_arrives(&edge, &hub, 0).await;
}

/// Regression, found by the `import` fuzz target: a bundle chunk of about a hundred bytes
/// that kept Automerge's decoder busy for seconds (and a gigabyte) on the store's single
/// writer thread before it was found invalid, so every write of the hub waited. Bundles
/// are refused from their chunk header now, on the peer's own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_chunk_is_refused_from_its_header() {
    let bomb = include_bytes!("../../engine/fuzz/corpus/import/regression-bundle-23s");
    chunk_is_refused("bundler", bomb, "bundle chunks are not accepted").await;
}

/// Regression: a 101-byte change (a list of nulls, made with Automerge's own API, its
/// run lengths raised) claiming ten million ops. The hub parsed every op on the peer's
/// connection, expanded each into memory for the depth check, then applied them on the
/// store's single writer thread: seconds per million ops while every other write waited,
/// and about 50 bytes of memory per op kept. It is refused from its column headers now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_count_bomb_is_refused_from_its_columns() {
    let bomb = include_bytes!("../../engine/fuzz/corpus/import/regression-rle-10m-ops");
    chunk_is_refused("bomber", bomb, "ops per write").await;
}

/// Log lines the process wrote, kept for the tests to read (installed once per binary).
fn captured_log() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOG: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static std::sync::Mutex<Vec<u8>> =
            Box::leak(Box::new(std::sync::Mutex::new(Vec::new())));
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || CaptureWriter(log))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        log
    })
}

struct CaptureWriter(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A peer that misbehaves on every frame gets a burst of warning lines and then one a
/// second, not one per frame: 2,000 refused writes and 2,000 error frames from a
/// read-only peer, sent as fast as QUIC takes them, while the hub keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_flood_the_log() {
    let log = captured_log();
    let (d, hub, edge) = hub_with_honest_edge();
    let started = std::time::Instant::now();
    let mut r = rogue(&d, &hub, "log-flooder", "telemetry=ro").await;
    for i in 0..2_000u64 {
        r.send(&sync_with_change(&format!("w{i}"), 64, i))
            .await
            .unwrap();
        r.send(&Message::Error {
            code: tidesync::sync::ErrorCode::Forbidden,
            reason: format!("line {i}\nforged log line"),
        })
        .await
        .unwrap();
    }
    honest_write_arrives(&edge, &hub, 0).await;
    // A second later the peer has earned one line, which says what was left out.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    r.send(&Message::Error {
        code: tidesync::sync::ErrorCode::Forbidden,
        reason: "after the flood".into(),
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let elapsed = started.elapsed().as_secs();
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("log-flooder")).collect();
    println!(
        "{} lines in {elapsed} s; last: {:?}",
        lines.len(),
        lines.last()
    );
    assert!(lines.len() >= 10, "the burst is logged");
    assert!(
        lines.len() as u64 <= 10 + elapsed + 1,
        "{} lines from one peer in {elapsed} s",
        lines.len()
    );
    assert!(
        lines.iter().any(|l| !l.contains("suppressed=0")),
        "a line says how many were suppressed"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("forged log line")),
        "a peer's newline starts no line of its own"
    );
    assert_eq!(docs_stored(&hub, "w"), 0, "a read-only peer stores nothing");
}

/// Any peer can claim a node's feed went back (a cursor past its end in the hello, or a
/// `FeedBehind` error), and each renewal of the feed epoch makes every peer walk the
/// whole feed again: a node renews at most once per `MIN_EPOCH_RENEWAL_GAP`, however
/// often it is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_that_the_feed_went_back_renew_the_epoch_at_most_once() {
    let (d, hub, edge) = hub_with_honest_edge();
    honest_write_arrives(&edge, &hub, 0).await;
    let mut epochs = vec![hub.store.feed_epoch()];
    for i in 0..4u64 {
        let name = format!("liar-{i}");
        let bundle = d.bundle(&name, Role::Edge, &["telemetry=ro"]).unwrap();
        let mut r = Rogue::connect(&bundle, hub.addr()).await.unwrap();
        r.send(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            node_id: name.clone(),
            role: Role::Edge,
            feed_epoch: 7,
            feed_last: 0,
            resume: Some(tidesync::model::Cursor {
                epoch: hub.store.feed_epoch(),
                seq: 1_000_000 + i,
            }),
            subscriptions: vec![NsPattern::all()],
        }))
        .await
        .unwrap();
        if i % 2 == 1 {
            r.send(&Message::Error {
                code: tidesync::sync::ErrorCode::FeedBehind,
                reason: "your feed went back".into(),
            })
            .await
            .unwrap();
        }
        assert!(r.closed_within(Duration::from_secs(3)).await, "closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
        epochs.push(hub.store.feed_epoch());
        honest_write_arrives(&edge, &hub, i as u32 + 1).await;
    }
    epochs.dedup();
    assert_eq!(epochs.len(), 2, "one renewal, not four: {epochs:x?}");
}
