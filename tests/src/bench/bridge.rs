//! `bridge`: the hub's export to NATS JetStream against the broker's own publish limit,
//! the export's lag under load, and the import's rate, with a real `nats-server`.
//!
//! - Export: a store holding `docs` one-KB documents starts an export (the bridge as the
//!   hub runs it) and is timed until the broker has acknowledged all of them. Its
//!   document cache is `--bridge-cache-mb` (the hub's `--cache-mb`): one that holds the
//!   documents measures the export, a smaller one the disk reads behind it.
//! - Limit, in the same run: the same JSON payloads, with the same headers, published by
//!   a plain JetStream client in windows of the export's batch size, each window's acks
//!   awaited: the fastest acknowledged publishing of that work. Beside it, how fast the
//!   store alone reads and renders the documents (`read_per_s`), the export's other bound.
//! - Lag: 64 writers write new documents flat out for `seconds` while the export runs; a
//!   subscriber times each document from its durable write to its message's arrival.
//! - Import: `docs` patches waiting in a stream, timed from the import's start until all
//!   are applied, durably.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tidesync::extension::Extension;
use tidesync::model::{DocId, Namespace};
use tidesync::store::{Store, StoreConfig};
use tidesync_bridge::{Bridge, ExportConfig, ImportConfig};
use tokio_util::sync::CancellationToken;

use super::{micros, percentile, round2};
use crate::brokers::Nats;

/// Writers of the lag phase.
const WRITERS: usize = 64;

/// The export's batch: the window the limit publishes in too.
const WINDOW: usize = 256;

/// Runs the scenario with `docs` documents (and patches), the lag phase for `seconds`, the
/// exporting store's document cache holding `cache_mb` MiB (a hub's `--cache-mb`).
pub async fn run(docs: usize, seconds: f64, cache_mb: u64) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let nats = Nats::start(&dir.path().join("nats"))?;
    let url = nats.url();
    let js = jetstream::new(async_nats::connect(&url).await?);
    for (name, subjects) in [
        ("EXPORT", vec!["tidesync.>".to_owned()]),
        ("LIMIT", vec!["limit.>".to_owned()]),
        ("IMPORT", vec!["patches.>".to_owned()]),
    ] {
        js.create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects,
            ..Default::default()
        })
        .await?;
    }
    let ns = Namespace::new("bench")?;

    // Export of a backlog.
    let cfg = StoreConfig {
        doc_cache_bytes: cache_mb << 20,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path().join("export.redb"), cfg)?;
    for i in 0..docs {
        store
            .put(&ns, &DocId::new(format!("d{i}"))?, document(i), None)
            .await?;
    }
    // What reading and rendering the documents alone allows: an export's other bound.
    let started = Instant::now();
    for i in 0..docs {
        store.get(&ns, &DocId::new(format!("d{i}"))?)?;
    }
    let read_per_s = docs as f64 / started.elapsed().as_secs_f64();
    let bridge = Bridge::new(vec![ExportConfig::new(&url, &[], None, None)?], vec![]);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let tasks = bridge.start(store.clone(), stop.clone());
    let target = store.last_seq().0;
    eprintln!("bridge: {docs} documents written; exporting");
    wait_until(Duration::from_secs(600), || {
        export_position(&bridge) >= Some(target)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", bridge.status()))?;
    let export_s = started.elapsed().as_secs_f64();
    eprintln!("bridge: exported {docs} documents in {export_s:.2} s");

    // The limit: the messages the export sent, sent again by a plain client.
    let sent = read_all(&js, "EXPORT").await?;
    let started = Instant::now();
    for (w, window) in sent.chunks(WINDOW).enumerate() {
        let mut acks = Vec::with_capacity(window.len());
        for (n, (subject, headers, payload)) in window.iter().enumerate() {
            let mut headers = headers.clone();
            headers.insert("Nats-Msg-Id", format!("limit-{w}-{n}").as_str());
            let subject = subject.replacen("tidesync.", "limit.", 1);
            acks.push(
                js.publish_with_headers(subject, headers, payload.clone().into())
                    .await?,
            );
        }
        for a in acks {
            a.await?;
        }
    }
    let limit_s = started.elapsed().as_secs_f64();
    eprintln!("bridge: the plain publisher sent them in {limit_s:.2} s");
    let export_per_s = sent.len() as f64 / export_s;
    let limit_per_s = sent.len() as f64 / limit_s;

    // Lag under 64 writers.
    let mut subscriber = async_nats::connect(&url)
        .await?
        .subscribe("tidesync.bench.>")
        .await?;
    let written: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let arrived: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let listening = {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            while let Some(m) = subscriber.next().await {
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Tidesync-Id"))
                    .map(|v| v.as_str().to_owned());
                if let (Some(id), Ok(mut a)) = (id, arrived.lock()) {
                    a.push((id, Instant::now()));
                }
            }
        })
    };
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (store, ns, written) = (store.clone(), ns.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < until {
                let id = format!("w{w}-{n}");
                store
                    .put(&ns, &DocId::new(id.as_str())?, document(n), None)
                    .await?;
                if let Ok(mut w) = written.lock() {
                    w.insert(id, Instant::now());
                }
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut load_writes = 0;
    for w in writers {
        load_writes += w.await??;
    }
    eprintln!("bridge: {load_writes} writes by {WRITERS} writers");
    let target = store.last_seq().0;
    wait_until(Duration::from_secs(120), || {
        export_position(&bridge) >= Some(target)
    })
    .await?;
    eprintln!("bridge: the export caught up with the load");
    tokio::time::sleep(Duration::from_millis(200)).await;
    listening.abort();
    let mut lags: Vec<Duration> = {
        let written = written.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let arrived = arrived.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        arrived
            .iter()
            .filter_map(|(id, at)| written.get(id).map(|w| at.saturating_duration_since(*w)))
            .collect()
    };
    if lags.len() < load_writes / 2 {
        bail!(
            "only {} of {load_writes} writes were seen on the bus",
            lags.len()
        );
    }
    let lag_p50 = percentile(&mut lags, 50.0);
    let lag_p99 = percentile(&mut lags, 99.0);
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }

    eprintln!("bridge: export stopped; publishing {docs} patches");
    // Import of waiting patches.
    // In windows: the client holds publishes back while too many acks are unread.
    let all: Vec<usize> = (0..docs).collect();
    for window in all.chunks(WINDOW) {
        let mut acks = Vec::with_capacity(window.len());
        for i in window {
            let body = json!({"ns": "bench", "id": format!("d{}", i % 1000), "patch": {format!("f{i}"): i}});
            acks.push(
                js.publish("patches.bench", serde_json::to_vec(&body)?.into())
                    .await?,
            );
        }
        for a in acks {
            a.await?;
        }
    }
    eprintln!("bridge: importing");
    let store = Store::open(dir.path().join("import.redb"), StoreConfig::default())?;
    let bridge = Bridge::new(
        vec![],
        vec![ImportConfig::new(&url, Some("patches.>"), None, None)?],
    );
    let stop = CancellationToken::new();
    let started = Instant::now();
    let tasks = bridge.start(store, stop.clone());
    wait_until(Duration::from_secs(600), || {
        bridge
            .status()
            .iter()
            .find(|(k, _)| *k == "imports")
            .and_then(|(_, v)| v[0]["applied"].as_u64())
            >= Some(docs as u64)
    })
    .await?;
    let import_per_s = docs as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }

    Ok(json!({
        "messages": sent.len(),
        "cache_mb": cache_mb,
        "export_per_s": export_per_s.round(),
        "limit_per_s": limit_per_s.round(),
        "ratio": round2(export_per_s / limit_per_s),
        "read_per_s": read_per_s.round(),
        "writers": WRITERS,
        "load_writes": load_writes,
        "lag_p50_ms": micros(lag_p50) / 1000.0,
        "lag_p99_ms": micros(lag_p99) / 1000.0,
        "import_per_s": import_per_s.round(),
    }))
}

/// About a kilobyte of JSON.
fn document(i: usize) -> Value {
    json!({
        "model": format!("resnet-{i}"),
        "stage": "canary",
        "notes": "rollout record ".repeat(60),
        "n": i,
    })
}

fn export_position(bridge: &Bridge) -> Option<u64> {
    bridge
        .status()
        .into_iter()
        .find(|(k, _)| *k == "exports")
        .and_then(|(_, v)| v[0]["position"].as_u64())
}

async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Every message of stream `name`: subject, headers, payload.
async fn read_all(
    js: &jetstream::Context,
    name: &str,
) -> Result<Vec<(String, async_nats::HeaderMap, Vec<u8>)>> {
    let mut stream = js.get_stream(name).await?;
    let last = stream.info().await?.state.last_sequence;
    let mut out = Vec::new();
    for n in 1..=last {
        let m = stream.get_raw_message(n).await?;
        out.push((m.subject.to_string(), m.headers, m.payload.to_vec()));
    }
    Ok(out)
}
