//! The hub's change feed out to NATS JetStream, with a real `nats-server` (`scripts/test`
//! installs it): every change reaches the stream, in order per document, while the hub is
//! killed with SIGKILL three times and the broker is restarted once; what a restart sends
//! again is recognisable by its message id.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use serde_json::{json, Value};
use tidesync_tests::procs::{metrics, status, wait_for, Binaries, Proc};

const DOCS: usize = 50;

/// A `nats-server -js` on a port the OS picked, keeping its streams in `dir`.
struct Nats {
    child: Child,
    port: u16,
    dir: PathBuf,
}

fn nats_server() -> PathBuf {
    for candidate in [
        "nats-server",
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
    ] {
        let found = Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return PathBuf::from(candidate);
        }
    }
    panic!("nats-server is not installed: run scripts/test, which installs Debian's nats-server");
}

impl Nats {
    /// Starts on `port` (0: one the OS picks) and waits until it listens.
    fn start(dir: &Path, port: u16) -> Self {
        let port_arg = if port == 0 {
            "-1".to_owned()
        } else {
            port.to_string()
        };
        let mut child = Command::new(nats_server())
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    let _ = tx.send(rest.rsplit(':').next().unwrap_or("").trim().to_owned());
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("nats-server did not start listening")
            .parse()
            .unwrap();
        Self {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL).
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same streams.
    fn start_again(mut self) -> Self {
        self.stop();
        Self::start(&self.dir, self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message of the stream: its subject, headers we read, and payload.
struct Got {
    msg_id: String,
    ns: String,
    id: String,
    seq: u64,
    payload: Vec<u8>,
    subject: String,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn create_stream(url: &str) {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: "TIDESYNC".into(),
        subjects: vec!["tidesync.>".into(), "changes.>".into()],
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Every message of the stream, in stream order.
async fn read_stream(url: &str) -> Vec<Got> {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    let mut stream = js.get_stream("TIDESYNC").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for n in 1..=last {
        let Ok(m) = stream.get_raw_message(n).await else {
            continue;
        };
        let header = |k: &str| {
            m.headers
                .get(k)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        out.push(Got {
            msg_id: header("Nats-Msg-Id"),
            ns: header("Tidesync-Ns"),
            id: header("Tidesync-Id"),
            seq: header("Tidesync-Seq").parse().unwrap(),
            payload: m.payload.to_vec(),
            subject: m.subject.to_string(),
        });
    }
    out
}

fn write(hub: &Proc, i: usize) {
    let doc = format!("d{}", i % DOCS);
    ureq::patch(&hub.url(&format!("/v1/docs/orders/{doc}")))
        .send_json(json!({"n": i / DOCS + 1, "last": i}))
        .unwrap();
}

fn caught_up(hub: &Proc) -> bool {
    let s = status(hub);
    let last = s["last_seq"].as_u64().unwrap();
    s["exports"].as_array().is_some_and(|e| {
        e.len() == 2
            && e.iter()
                .all(|x| x["position"] == last && x["connected"] == true)
    })
}

#[test]
fn every_change_reaches_jetstream_through_kills_and_a_broker_restart() {
    let rt = runtime();
    let broker_dir = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(broker_dir.path(), 0);
    rt.block_on(create_stream(&nats.url()));

    let d = Binaries::init().unwrap();
    let config = d.path("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[[export]]\nurl = \"{}\"\nnamespaces = [\"orders\"]\nsubject = \"changes.{{ns}}.{{id}}\"\nformat = \"automerge\"\n",
            nats.url()
        ),
    )
    .unwrap();
    let url = nats.url();
    let args = ["--export", url.as_str(), "--config", config.as_str()];
    let mut hub = d.hub(&args).unwrap();

    let total = 1000;
    let phases = [0, 250, 500, 750, total];
    for (p, w) in phases.windows(2).enumerate() {
        for i in w[0]..w[1] {
            write(&hub, i);
        }
        // The broker goes away after the second round of writes, and the third is written
        // while it is down; it comes back after it.
        if p == 1 {
            nats.stop();
        }
        if p == 2 {
            nats = nats.start_again();
        }
        if p < 3 {
            // SIGKILL right after the writes, while the export is likely behind.
            hub.kill();
            hub = d.hub(&args).unwrap();
        }
    }
    wait_for("the exports to catch up", Duration::from_secs(60), || {
        caught_up(&hub)
    });

    let got = rt.block_on(read_stream(&nats.url()));
    let (json_msgs, am_msgs): (Vec<&Got>, Vec<&Got>) =
        got.iter().partition(|g| g.subject.starts_with("tidesync."));
    assert!(!json_msgs.is_empty() && !am_msgs.is_empty());

    // Message ids are unique in the stream: JetStream dropped what was sent again.
    for msgs in [&json_msgs, &am_msgs] {
        let ids: HashSet<&str> = msgs.iter().map(|g| g.msg_id.as_str()).collect();
        assert_eq!(ids.len(), msgs.len(), "a message id is in the stream twice");
    }

    // JSON: per document, positions only grow, and the last message is the document now.
    let mut last_of: BTreeMap<String, &Got> = BTreeMap::new();
    for g in &json_msgs {
        assert_eq!(g.ns, "orders");
        if let Some(prev) = last_of.get(&g.id) {
            assert!(
                g.seq > prev.seq,
                "{} went back: {} after {}",
                g.id,
                g.seq,
                prev.seq
            );
        }
        last_of.insert(g.id.clone(), g);
    }
    assert_eq!(last_of.len(), DOCS);
    for (id, g) in &last_of {
        let now: Value = ureq::get(&hub.url(&format!("/v1/docs/orders/{id}")))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        let sent: Value = serde_json::from_slice(&g.payload).unwrap();
        if sent["doc"] != now {
            let all: Vec<String> = json_msgs
                .iter()
                .filter(|m| &m.id == id)
                .map(|m| {
                    let v: Value = serde_json::from_slice(&m.payload).unwrap();
                    format!("{} {} {}", m.msg_id, m.seq, v["doc"])
                })
                .collect();
            let changes: Value = ureq::get(&hub.url("/v1/changes?since=0"))
                .call()
                .unwrap()
                .into_json()
                .unwrap();
            let feed: Vec<&Value> = changes["changes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| &c["id"] == id)
                .collect();
            panic!(
                "{id}: now {now}, sent {all:#?}, feed {feed:?}, status {}",
                status(&hub)
            );
        }
        assert_eq!(sent["seq"], g.seq);
    }

    // Automerge: the changes of each document's messages, merged, are the document at
    // the hub: every change arrived (duplicates merge away by hash).
    let mut changes: BTreeMap<String, automerge::Automerge> = BTreeMap::new();
    let mut positions: BTreeMap<String, u64> = BTreeMap::new();
    for g in &am_msgs {
        let last = positions.insert(g.id.clone(), g.seq).unwrap_or(0);
        assert!(g.seq > last, "{} went back", g.id);
        changes
            .entry(g.id.clone())
            .or_default()
            .load_incremental(&g.payload)
            .unwrap();
    }
    for i in 0..DOCS {
        let id = format!("d{i}");
        let bytes = ureq::get(&hub.url(&format!("/v1/docs/orders/{id}/automerge")))
            .call()
            .unwrap();
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut bytes.into_reader(), &mut buf).unwrap();
        let at_hub = automerge::Automerge::load(&buf).unwrap();
        let mut heads = changes[&id].get_heads();
        let mut want = at_hub.get_heads();
        heads.sort();
        want.sort();
        assert_eq!(
            heads, want,
            "{id}: the stream's changes do not add up to the document"
        );
        assert_eq!(
            changes[&id].get_changes(&[]).len(),
            at_hub.get_changes(&[]).len(),
            "{id}"
        );
    }
    let metrics = metrics(&hub);
    assert!(
        metrics.contains("tidesync_export_lag_feed_positions{"),
        "{metrics}"
    );
}

async fn create_import_stream(url: &str) {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: "TIDESYNC_IN".into(),
        subjects: vec!["tidesync.import.>".into(), "tidesync.dead".into()],
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn publish(url: &str, messages: Vec<(String, Vec<u8>)>) {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    let mut acks = Vec::new();
    for (subject, payload) in messages {
        acks.push(js.publish(subject, payload.into()).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
}

const IMPORT_DOCS: usize = 20;
const PATCHES_PER_DOC: usize = 100;

/// Patch `k`: field `f{j}` of document `d{k % 20}`, so each document ends with 100 fields
/// and a lost patch is a missing field.
fn patch(k: usize) -> (String, Vec<u8>) {
    let (doc, j) = (k % IMPORT_DOCS, k / IMPORT_DOCS);
    let body = json!({"ns": "orders", "id": format!("d{doc}"), "patch": {format!("f{j}"): j}});
    (
        format!("tidesync.import.orders.d{doc}"),
        serde_json::to_vec(&body).unwrap(),
    )
}

#[test]
fn patches_from_jetstream_land_once_and_bad_ones_become_dead_letters() {
    let rt = runtime();
    let broker_dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(broker_dir.path(), 0);
    let url = nats.url();
    rt.block_on(create_import_stream(&url));

    let d = Binaries::init().unwrap();
    let args = ["--import", url.as_str()];
    let mut hub = d.hub(&args).unwrap();
    d.enroll("edge", "edge", &["orders=rw"]).unwrap();

    let total = IMPORT_DOCS * PATCHES_PER_DOC;
    let mut malformed: Vec<(String, Vec<u8>)> = [
        b"not json".to_vec(),
        br#"{"ns":"orders","patch":{"a":1}}"#.to_vec(),
        br#"{"ns":"orders","id":"x"}"#.to_vec(),
        br#"{"ns":"orders","id":"x","patch":[1,2]}"#.to_vec(),
        br#"{"ns":"Not A Namespace","id":"x","patch":{"a":1}}"#.to_vec(),
        br#"{"ns":"orders","id":"bad id!","patch":{"a":1}}"#.to_vec(),
        br#"{"ns":"orders","id":"x","patch":{"@deleted":true}}"#.to_vec(),
    ]
    .into_iter()
    .map(|p| ("tidesync.import.orders.bad".to_owned(), p))
    .collect();
    let first: Vec<_> = (0..total / 2).map(patch).collect();
    let mut second: Vec<_> = (total / 2..total).map(patch).collect();
    second.append(&mut malformed);
    rt.block_on(publish(&url, first));
    // SIGKILL while it is applying: what was applied and not yet acknowledged comes again.
    wait_for("the import to start", Duration::from_secs(30), || {
        status(&hub)["imports"][0]["applied"].as_u64() > Some(100)
    });
    hub.kill();
    hub = d.hub(&args).unwrap();
    // An edge of the restarted hub (whose QUIC port the OS picked anew).
    let edge = d.edge("edge", &[&hub], &[]).unwrap();
    rt.block_on(publish(&url, second));

    let complete = |p: &Proc, i: usize| {
        ureq::get(&p.url(&format!("/v1/docs/orders/d{i}")))
            .call()
            .ok()
            .and_then(|r| r.into_json::<Value>().ok())
            .is_some_and(|v| v.as_object().is_some_and(|o| o.len() == PATCHES_PER_DOC))
    };
    wait_for("every patch at the hub", Duration::from_secs(60), || {
        (0..IMPORT_DOCS).all(|i| complete(&hub, i))
    });
    for i in 0..IMPORT_DOCS {
        let v: Value = ureq::get(&hub.url(&format!("/v1/docs/orders/d{i}")))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        for j in 0..PATCHES_PER_DOC {
            assert_eq!(v[format!("f{j}")], j, "d{i}.f{j}");
        }
        // Applied once in effect: one change per patch, whatever was delivered twice.
        let bytes = ureq::get(&hub.url(&format!("/v1/docs/orders/d{i}/automerge")))
            .call()
            .unwrap();
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut bytes.into_reader(), &mut buf).unwrap();
        let doc = automerge::Automerge::load(&buf).unwrap();
        assert_eq!(doc.get_changes(&[]).len(), PATCHES_PER_DOC, "d{i}");
    }
    wait_for("the patches at the edge", Duration::from_secs(30), || {
        (0..IMPORT_DOCS).all(|i| complete(&edge, i))
    });

    // Every malformed message is a dead letter with its reason; nothing of it was stored.
    let got = rt.block_on(async {
        let js = jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
        let mut stream = js.get_stream("TIDESYNC_IN").await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut reasons = Vec::new();
        for n in 1..=last {
            let m = stream.get_raw_message(n).await.unwrap();
            if m.subject.as_str() == "tidesync.dead" {
                let reason = m
                    .headers
                    .get("Tidesync-Reason")
                    .map(|v| v.as_str().to_owned());
                reasons.push(reason.unwrap_or_default());
            }
        }
        reasons
    });
    assert_eq!(got.len(), 7, "{got:?}");
    assert!(got.iter().all(|r| !r.is_empty()), "{got:?}");
    assert!(ureq::get(&hub.url("/v1/docs/orders/x")).call().is_err());
    assert!(status(&hub)["imports"][0]["rejected"].as_u64() >= Some(1));
}
