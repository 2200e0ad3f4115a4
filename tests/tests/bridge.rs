//! The hub's bridge to the message bus, with a real `nats-server` and a real
//! `rabbitmq-server` (`scripts/test` installs both).
//!
//! Export: writes at two edges reach JetStream and RabbitMQ consumers, every change once
//! after deduplication by message id and in order per document, while the hub is killed
//! with SIGKILL three times and both brokers are restarted once. Import: patches from
//! both buses land once in effect, through a SIGKILL of the consuming hub, and reach an
//! edge; malformed ones are dead letters with reasons.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};
use tidesync_tests::brokers::{Nats, Rabbit};
use tidesync_tests::procs::{metrics, run, status, wait_for, Binaries, Proc};

/// Documents the edges write, and writes per edge.
const DOCS: usize = 100;
const WRITES_PER_EDGE: usize = 5_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One exported message as a consumer sees it.
#[derive(Debug)]
struct Got {
    msg_id: String,
    ns: String,
    id: String,
    seq: u64,
    payload: Vec<u8>,
    /// The subject (NATS) or routing key (AMQP).
    dest: String,
}

async fn create_stream(url: &str, name: &str, subjects: &[&str]) {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Every message of stream `name`, in stream order.
async fn read_stream(url: &str, name: &str) -> Vec<(String, async_nats::HeaderMap, Vec<u8>)> {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    let mut stream = js.get_stream(name).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for n in 1..=last {
        let Ok(m) = stream.get_raw_message(n).await else {
            continue;
        };
        out.push((m.subject.to_string(), m.headers, m.payload.to_vec()));
    }
    out
}

async fn read_jetstream_exports(url: &str) -> Vec<Got> {
    read_stream(url, "TIDESYNC")
        .await
        .into_iter()
        .map(|(dest, h, payload)| {
            let header = |k: &str| h.get(k).map(|v| v.as_str().to_owned()).unwrap_or_default();
            Got {
                msg_id: header("Nats-Msg-Id"),
                ns: header("Tidesync-Ns"),
                id: header("Tidesync-Id"),
                seq: header("Tidesync-Seq").parse().unwrap(),
                payload,
                dest,
            }
        })
        .collect()
}

async fn amqp(url: &str) -> (Connection, lapin::Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

async fn declare_queue(ch: &lapin::Channel, queue: &str) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// The exchange the exports publish to, and a durable queue per format bound to it.
async fn bind_export_queues(url: &str) {
    let (_conn, ch) = amqp(url).await;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        "tidesync".into(),
        lapin::ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await
    .unwrap();
    for (queue, key) in [("json", "tidesync.#"), ("changes", "changes.#")] {
        declare_queue(&ch, queue).await;
        ch.queue_bind(
            queue.into(),
            "tidesync".into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
}

fn amqp_header(p: &BasicProperties, k: &str) -> String {
    match p.headers().as_ref().and_then(|h| h.inner().get(k)) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        _ => String::new(),
    }
}

/// Every message waiting in `queue`, in queue order (taken and acknowledged).
async fn drain_queue(url: &str, queue: &str) -> Vec<(String, BasicProperties, Vec<u8>)> {
    let (_conn, ch) = amqp(url).await;
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let m = m.delivery;
        out.push((m.routing_key.to_string(), m.properties, m.data));
    }
    out
}

async fn read_rabbit_exports(url: &str, queue: &str) -> Vec<Got> {
    drain_queue(url, queue)
        .await
        .into_iter()
        .map(|(dest, p, payload)| Got {
            msg_id: p
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default(),
            ns: amqp_header(&p, "Tidesync-Ns"),
            id: amqp_header(&p, "Tidesync-Id"),
            seq: amqp_header(&p, "Tidesync-Seq").parse().unwrap(),
            payload,
            dest,
        })
        .collect()
}

/// A consumer's deduplication: the first message of each id.
fn dedupe(msgs: Vec<Got>) -> (Vec<Got>, usize) {
    let mut seen = HashSet::new();
    let before = msgs.len();
    let kept: Vec<Got> = msgs
        .into_iter()
        .filter(|g| seen.insert(g.msg_id.clone()))
        .collect();
    let dropped = before - kept.len();
    (kept, dropped)
}

fn get_json(p: &Proc, path: &str) -> Value {
    ureq::get(&p.url(path)).call().unwrap().into_json().unwrap()
}

fn automerge_at(p: &Proc, id: &str) -> automerge::Automerge {
    let bytes = ureq::get(&p.url(&format!("/v1/docs/orders/{id}/automerge")))
        .call()
        .unwrap();
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut bytes.into_reader(), &mut buf).unwrap();
    automerge::Automerge::load(&buf).unwrap()
}

/// What a consumer of one broker got is every change of every document, in order per
/// document: the JSON messages' last is each document's content, and the Automerge
/// messages' changes are exactly the document's changes.
fn check_exports(broker: &str, hub: &Proc, json_msgs: Vec<Got>, am_msgs: Vec<Got>) {
    for (format, msgs) in [("json", &json_msgs), ("automerge", &am_msgs)] {
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        for g in msgs.iter() {
            assert_eq!(g.ns, "orders", "{broker} {format}: {}", g.dest);
            let before = last.insert(&g.id, g.seq).unwrap_or(0);
            assert!(
                g.seq > before,
                "{broker} {format}: {} went back: {} after {before}",
                g.id,
                g.seq
            );
        }
        assert_eq!(last.len(), DOCS, "{broker} {format}: documents");
    }
    let mut last_of: BTreeMap<&str, &Got> = BTreeMap::new();
    for g in &json_msgs {
        last_of.insert(&g.id, g);
    }
    for (id, g) in last_of {
        let sent: Value = serde_json::from_slice(&g.payload).unwrap();
        let now = get_json(hub, &format!("/v1/docs/orders/{id}"));
        assert_eq!(sent["doc"], now, "{broker}: {id}'s last JSON message");
        assert_eq!(sent["seq"], g.seq);
    }
    let mut merged: BTreeMap<&str, automerge::Automerge> = BTreeMap::new();
    for g in &am_msgs {
        merged
            .entry(&g.id)
            .or_default()
            .load_incremental(&g.payload)
            .unwrap();
    }
    for (id, got) in merged {
        let at_hub = automerge_at(hub, id);
        let hashes = |d: &automerge::Automerge| -> BTreeSet<automerge::ChangeHash> {
            d.get_changes(&[]).iter().map(|c| c.hash()).collect()
        };
        assert_eq!(
            hashes(&got),
            hashes(&at_hub),
            "{broker}: {id}'s changes on the bus are not the document's"
        );
    }
}

/// Write `k` of edge `e`: field `e{e}` of document `d{k % DOCS}` set to `k`.
fn write(edge: &Proc, e: usize, k: usize) {
    ureq::patch(&edge.url(&format!("/v1/docs/orders/d{}", k % DOCS)))
        .send_json(json!({format!("e{e}"): k}))
        .unwrap();
}

fn caught_up(hub: &Proc) -> bool {
    let s = status(hub);
    let last = s["last_seq"].as_u64().unwrap();
    s["exports"].as_array().is_some_and(|e| {
        e.len() == 4
            && e.iter()
                .all(|x| x["position"] == last && x["connected"] == true)
    })
}

#[test]
fn edge_writes_reach_jetstream_and_rabbitmq_through_kills_and_broker_restarts() {
    let rt = runtime();
    let (nats_dir, rabbit_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut nats = Nats::start(nats_dir.path()).unwrap();
    let mut rabbit = Rabbit::start(rabbit_dir.path()).unwrap();
    let (nats_url, rabbit_url) = (nats.url(), rabbit.url());
    rt.block_on(create_stream(
        &nats_url,
        "TIDESYNC",
        &["tidesync.>", "changes.>"],
    ));
    rt.block_on(bind_export_queues(&rabbit_url));

    let d = Binaries::init().unwrap();
    let config = d.path("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[[export]]\nurl = \"{nats_url}\"\nnamespaces = [\"orders\"]\n\
             [[export]]\nurl = \"{nats_url}\"\nnamespaces = [\"orders\"]\nsubject = \"changes.{{ns}}.{{id}}\"\nformat = \"automerge\"\n\
             [[export]]\nurl = \"{rabbit_url}\"\nnamespaces = [\"orders\"]\n\
             [[export]]\nurl = \"{rabbit_url}\"\nnamespaces = [\"orders\"]\nrouting_key = \"changes.{{ns}}.{{id}}\"\nformat = \"automerge\"\n"
        ),
    )
    .unwrap();
    let args = ["--config", config.as_str()];
    let mut hub = d.hub(&args).unwrap();
    let quic = hub.quic.to_string();
    let edges: Vec<Proc> = (1..=2)
        .map(|e| {
            let name = format!("e{e}");
            d.enroll(&name, "edge", &["orders=rw"]).unwrap();
            d.edge(&name, &[&hub], &[]).unwrap()
        })
        .collect();

    let phases = 4;
    let per_phase = WRITES_PER_EDGE / phases;
    for p in 0..phases {
        std::thread::scope(|s| {
            for (e, edge) in edges.iter().enumerate() {
                s.spawn(move || {
                    for k in p * per_phase..(p + 1) * per_phase {
                        write(edge, e + 1, k);
                    }
                });
            }
        });
        // Both brokers go away after the second round of writes, and the third is
        // written while they are down; they come back after it.
        if p == 1 {
            nats.stop();
            rabbit.stop();
        }
        if p == 2 {
            nats = nats.start_again().unwrap();
            rabbit = rabbit.start_again().unwrap();
        }
        if p < 3 {
            // SIGKILL right after the writes, while the exports are likely behind; the
            // hub comes back on its QUIC port, where the edges find it.
            hub.kill();
            hub = d.hub_at("hub", &quic, &args).unwrap();
        }
    }
    let last = WRITES_PER_EDGE - DOCS;
    wait_for(
        "the edges' writes at the hub",
        Duration::from_secs(120),
        || {
            (0..DOCS).all(|j| {
                let v = get_json(&hub, &format!("/v1/docs/orders/d{j}"));
                v["e1"] == last + j && v["e2"] == last + j
            })
        },
    );
    let mut polls = 0;
    wait_for("the exports to catch up", Duration::from_secs(120), || {
        polls += 1;
        if polls % 1000 == 0 {
            eprintln!("exports: {}", status(&hub)["exports"]);
        }
        caught_up(&hub)
    });

    // JetStream: message ids are unique in the stream (it dropped what was sent again).
    let got = rt.block_on(read_jetstream_exports(&nats_url));
    let ids: HashSet<&str> = got.iter().map(|g| g.msg_id.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "a message id is in the stream twice");
    let (json_msgs, am_msgs): (Vec<Got>, Vec<Got>) = got
        .into_iter()
        .partition(|g| g.dest.starts_with("tidesync."));
    check_exports("jetstream", &hub, json_msgs, am_msgs);

    // RabbitMQ keeps what was sent again; the consumer drops it by message id.
    let (json_msgs, json_dups) = dedupe(rt.block_on(read_rabbit_exports(&rabbit_url, "json")));
    let (am_msgs, am_dups) = dedupe(rt.block_on(read_rabbit_exports(&rabbit_url, "changes")));
    eprintln!(
        "rabbitmq: {} + {} messages, {json_dups} + {am_dups} resends dropped by id",
        json_msgs.len(),
        am_msgs.len()
    );
    check_exports("rabbitmq", &hub, json_msgs, am_msgs);

    let metrics = metrics(&hub);
    assert!(
        metrics.contains("tidesync_export_confirmed_messages_total{"),
        "{metrics}"
    );
    // The operator's view: each export, connected and caught up.
    let text = run("tidesync-hub", &["status", "--api", &hub.api.to_string()]).unwrap();
    let exports: Vec<&str> = text.lines().filter(|l| l.starts_with("EXPORT ")).collect();
    assert_eq!(exports.len(), 4, "{text}");
    for line in exports {
        assert!(line.contains(": connected, position "), "{line}");
        assert!(line.contains(" 0 behind "), "{line}");
    }
}

/// Patches per broker (10,000), and the documents they spread over.
const IMPORT_DOCS: usize = 50;
const PATCHES_PER_DOC: usize = 200;

/// Patch `k` of a broker whose documents are named `{prefix}{n}`: field `f{j}` of
/// document `k % IMPORT_DOCS`, so each document ends with 200 fields and a lost patch is
/// a missing field; and `last`, which every patch of the document sets, so a patch
/// applied again after a later one leaves `last` behind (and adds a change).
fn patch(prefix: &str, k: usize) -> Vec<u8> {
    let (doc, j) = (k % IMPORT_DOCS, k / IMPORT_DOCS);
    let body = json!({"ns": "orders", "id": format!("{prefix}{doc}"), "patch": {format!("f{j}"): j, "last": j}});
    serde_json::to_vec(&body).unwrap()
}

/// Whether the hub's JetStream import has settled every message of its stream: none
/// waiting, none delivered and unacknowledged (so none will come again).
async fn nats_import_settled(url: &str, consumer: &str) -> bool {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    let stream = js.get_stream("TIDESYNC_IN").await.unwrap();
    match stream.consumer_info(consumer).await {
        Ok(info) => info.num_pending == 0 && info.num_ack_pending == 0,
        Err(_) => false,
    }
}

fn malformed() -> Vec<Vec<u8>> {
    [
        &b"not json"[..],
        br#"{"ns":"orders","patch":{"a":1}}"#,
        br#"{"ns":"orders","id":"x"}"#,
        br#"{"ns":"orders","id":"x","patch":[1,2]}"#,
        br#"{"ns":"Not A Namespace","id":"x","patch":{"a":1}}"#,
        br#"{"ns":"orders","id":"bad id!","patch":{"a":1}}"#,
        br#"{"ns":"orders","id":"x","patch":{"@deleted":true}}"#,
    ]
    .into_iter()
    .map(<[u8]>::to_vec)
    .collect()
}

async fn publish_nats(url: &str, payloads: Vec<Vec<u8>>) {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    // In windows: the client holds a publish back while too many acks are unread, so
    // more publishes than that with every ack kept for later would wait for ever.
    for window in payloads.chunks(256) {
        let mut acks = Vec::new();
        for p in window {
            acks.push(
                js.publish("tidesync.import.orders", p.clone().into())
                    .await
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
    }
}

async fn publish_rabbit(url: &str, payloads: Vec<Vec<u8>>) {
    let (_conn, ch) = amqp(url).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for p in payloads {
        let persistent = BasicProperties::default().with_delivery_mode(2);
        let c = ch
            .basic_publish(
                "".into(),
                "tidesync.import".into(),
                BasicPublishOptions::default(),
                &p,
                persistent,
            )
            .await
            .unwrap();
        confirms.push(c);
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
}

fn complete(p: &Proc, id: &str) -> bool {
    ureq::get(&p.url(&format!("/v1/docs/orders/{id}")))
        .call()
        .ok()
        .and_then(|r| r.into_json::<Value>().ok())
        .is_some_and(|v| {
            v.as_object()
                .is_some_and(|o| o.len() == PATCHES_PER_DOC + 1)
        })
}

#[test]
fn patches_from_both_buses_land_once_through_a_kill_and_bad_ones_become_dead_letters() {
    let rt = runtime();
    let (nats_dir, rabbit_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let nats = Nats::start(nats_dir.path()).unwrap();
    let rabbit = Rabbit::start(rabbit_dir.path()).unwrap();
    let (nats_url, rabbit_url) = (nats.url(), rabbit.url());
    rt.block_on(create_stream(
        &nats_url,
        "TIDESYNC_IN",
        &["tidesync.import.>", "tidesync.dead"],
    ));
    rt.block_on(async {
        let (_conn, ch) = amqp(&rabbit_url).await;
        declare_queue(&ch, "tidesync.import").await;
    });

    let d = Binaries::init().unwrap();
    let args = [
        "--import",
        nats_url.as_str(),
        "--import",
        rabbit_url.as_str(),
    ];
    let mut hub = d.hub(&args).unwrap();
    d.enroll("edge", "edge", &["orders=rw"]).unwrap();

    let total = IMPORT_DOCS * PATCHES_PER_DOC;
    let half = total / 2;
    let batch = |prefix: &str, range: std::ops::Range<usize>| -> Vec<Vec<u8>> {
        range.map(|k| patch(prefix, k)).collect()
    };
    rt.block_on(publish_nats(&nats_url, batch("n", 0..half)));
    rt.block_on(publish_rabbit(&rabbit_url, batch("r", 0..half)));
    // SIGKILL while both imports are applying: what was applied and not yet
    // acknowledged comes again.
    let mut before_kill = Value::Null;
    wait_for("the imports to start", Duration::from_secs(60), || {
        before_kill = status(&hub);
        (0..2).all(|i| before_kill["imports"][i]["applied"].as_u64() > Some(100))
    });
    hub.kill();
    for i in 0..2 {
        let applied = before_kill["imports"][i]["applied"].as_u64();
        assert!(
            applied < Some(half as u64),
            "the kill came after import {i} had applied its first half: {before_kill}"
        );
    }
    hub = d.hub(&args).unwrap();
    let edge = d.edge("edge", &[&hub], &[]).unwrap();
    let mut second = batch("n", half..total);
    second.extend(malformed());
    rt.block_on(publish_nats(&nats_url, second));
    let mut second = batch("r", half..total);
    second.extend(malformed());
    rt.block_on(publish_rabbit(&rabbit_url, second));

    let docs: Vec<String> = ["n", "r"]
        .iter()
        .flat_map(|p| (0..IMPORT_DOCS).map(move |i| format!("{p}{i}")))
        .collect();
    wait_for("every patch at the hub", Duration::from_secs(180), || {
        docs.iter().all(|id| complete(&hub, id))
    });
    // Until nothing can come again: a message delivered before the kill and not
    // acknowledged is delivered once more, and must not undo a later patch.
    let consumer = status(&hub)["imports"][0]["id"]
        .as_str()
        .unwrap()
        .replace('/', "-");
    wait_for(
        "the JetStream import settled",
        Duration::from_secs(120),
        || rt.block_on(nats_import_settled(&nats_url, &consumer)),
    );
    for id in &docs {
        let v = get_json(&hub, &format!("/v1/docs/orders/{id}"));
        for j in 0..PATCHES_PER_DOC {
            assert_eq!(v[format!("f{j}")], j, "{id}.f{j}");
        }
        assert_eq!(
            v["last"],
            PATCHES_PER_DOC - 1,
            "{id}: an older patch came last"
        );
        // Applied once in effect: one change per patch, whatever was delivered twice.
        let changes = automerge_at(&hub, id).get_changes(&[]).len();
        assert_eq!(changes, PATCHES_PER_DOC, "{id}");
    }
    wait_for("the patches at the edge", Duration::from_secs(60), || {
        docs.iter().all(|id| complete(&edge, id))
    });

    // Every malformed message is a dead letter with its reason; nothing of it was stored.
    let nats_reasons: Vec<String> = rt
        .block_on(read_stream(&nats_url, "TIDESYNC_IN"))
        .into_iter()
        .filter(|(subject, _, _)| subject == "tidesync.dead")
        .map(|(_, h, _)| {
            h.get("Tidesync-Reason")
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        })
        .collect();
    let rabbit_reasons: Vec<String> = rt
        .block_on(drain_queue(&rabbit_url, "tidesync.dead"))
        .iter()
        .map(|(_, p, _)| amqp_header(p, "Tidesync-Reason"))
        .collect();
    for reasons in [&nats_reasons, &rabbit_reasons] {
        assert_eq!(reasons.len(), malformed().len(), "{reasons:?}");
        assert!(reasons.iter().all(|r| !r.is_empty()), "{reasons:?}");
    }
    assert!(ureq::get(&hub.url("/v1/docs/orders/x")).call().is_err());
    let s = status(&hub);
    for i in 0..2 {
        assert!(s["imports"][i]["rejected"].as_u64() >= Some(1), "{s}");
        eprintln!(
            "import {}: {} applied, {} skipped as applied before the kill",
            s["imports"][i]["broker"], s["imports"][i]["applied"], s["imports"][i]["skipped"]
        );
    }
    let text = run("tidesync-hub", &["status", "--api", &hub.api.to_string()]).unwrap();
    let imports: Vec<&str> = text.lines().filter(|l| l.starts_with("IMPORT ")).collect();
    assert_eq!(imports.len(), 2, "{text}");
    for line in imports {
        assert!(line.contains(": connected, "), "{line}");
        assert!(line.contains(" rejected to tidesync.dead"), "{line}");
    }
}
