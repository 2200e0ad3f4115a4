//! `write`: durable small JSON patches across 1,000 documents, against the raw limit.
//!
//! Tidesync: `W` concurrent writers (1, 8, 64) each patch one integer field of a document
//! (round robin over 1,000), awaiting the durable acknowledgement before the next write.
//!
//! The limit, on one thread: the same change made with plain `automerge` on documents held
//! in memory, its bytes (`save_after`) inserted into a plain redb table, and a
//! `Durability::Immediate` commit after every 1, 8 or 64 writes. That is the least work any
//! store of Automerge changes in redb can do per write, with perfect batching.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use redb::{Database, Durability, TableDefinition};
use serde_json::{json, Value};
use tidesync::model::{DocId, Namespace};
use tidesync::store::{Store, StoreConfig};

use super::{micros, percentile, round2};

const DOCS: usize = 1000;
const WRITER_COUNTS: [usize; 3] = [1, 8, 64];
const IDLE_SAMPLES: usize = 300;
/// Rounds each throughput point is split into, alternating Tidesync and the limit.
const ROUNDS: u32 = 3;
const RAW: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("raw");

/// Runs the scenario; each throughput figure is measured over `seconds`.
pub async fn run(seconds: f64) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let span = Duration::from_secs_f64(seconds);

    let store = Store::open(dir.path().join("tidesync.redb"), StoreConfig::default())?;
    let ns = Namespace::new("bench")?;
    let ids: Arc<Vec<DocId>> = Arc::new(
        (0..DOCS)
            .map(|i| DocId::new(format!("doc-{i:04}")))
            .collect::<Result<_, _>>()?,
    );
    for id in ids.iter() {
        store
            .put(&ns, id, json!({"f0": 0, "name": id.as_str()}), None)
            .await?;
    }

    let raw_db = Database::builder().create(dir.path().join("raw.redb"))?;
    let mut raw_docs = raw_documents()?;

    let mut tidesync = serde_json::Map::new();
    let mut limit = serde_json::Map::new();
    for writers in WRITER_COUNTS {
        // Alternate short rounds of both, so a noisy machine slows both alike.
        let (mut done, mut raw_done) = (0.0, 0.0);
        for _ in 0..ROUNDS {
            done += tidesync_rate(&store, &ns, &ids, writers, span / ROUNDS).await?;
            raw_done += raw_rate(&raw_db, &mut raw_docs, writers, span / ROUNDS)?;
        }
        tidesync.insert(
            writers.to_string(),
            json!((done / f64::from(ROUNDS)).round()),
        );
        limit.insert(
            writers.to_string(),
            json!((raw_done / f64::from(ROUNDS)).round()),
        );
    }

    // Idle latency, likewise interleaved: a sample of each, in turn.
    let mut idle_samples = Vec::with_capacity(IDLE_SAMPLES);
    let mut raw_samples = Vec::with_capacity(IDLE_SAMPLES);
    for i in 0..IDLE_SAMPLES {
        idle_samples.push(idle_write(&store, &ns, &ids, i).await?);
        raw_samples.push(raw_idle_write(&raw_db, &mut raw_docs, i)?);
    }
    let idle = (
        micros(percentile(&mut idle_samples, 50.0)),
        micros(percentile(&mut idle_samples, 99.0)),
    );
    let limit_idle = micros(percentile(&mut raw_samples, 50.0));

    let ratio = |w: usize| -> f64 {
        let t = tidesync[&w.to_string()].as_f64().unwrap_or(0.0);
        let l = limit[&w.to_string()].as_f64().unwrap_or(f64::INFINITY);
        round2(t / l)
    };
    println!("write: durable single-field patches over {DOCS} documents");
    println!(
        "{:>8} {:>16} {:>16} {:>8}",
        "writers", "tidesync w/s", "limit w/s", "ratio"
    );
    for w in WRITER_COUNTS {
        println!(
            "{:>8} {:>16} {:>16} {:>8}",
            w,
            tidesync[&w.to_string()].to_string(),
            limit[&w.to_string()].to_string(),
            ratio(w)
        );
    }
    println!(
        "idle write latency: p50 {} us, p99 {} us; limit (one durable redb commit + one automerge change) p50 {} us; p50 ratio {}",
        idle.0,
        idle.1,
        limit_idle,
        round2(idle.0 / limit_idle)
    );
    Ok(json!({
        "scenario": "write",
        "docs": DOCS,
        "seconds_per_point": seconds,
        "writes_per_s": tidesync,
        "limit_writes_per_s": limit,
        "ratio_to_limit": ratio(64),
        "idle_write_latency_us": {"p50": idle.0, "p99": idle.1},
        "limit_idle_write_us": limit_idle,
        "idle_latency_ratio": round2(idle.0 / limit_idle),
    }))
}

/// Writes per second with `writers` concurrent tasks for `span`.
async fn tidesync_rate(
    store: &Store,
    ns: &Namespace,
    ids: &Arc<Vec<DocId>>,
    writers: usize,
    span: Duration,
) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, ns, ids, stop, done) = (
            store.clone(),
            ns.clone(),
            ids.clone(),
            stop.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[i % DOCS];
                store
                    .patch(&ns, id, json!({ format!("f{}", i % 4): i }), None)
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += writers;
            }
            anyhow::Ok(())
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(span).await;
    stop.store(true, Ordering::Relaxed);
    let writes = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    for t in tasks {
        t.await??;
    }
    Ok(writes as f64 / elapsed.as_secs_f64())
}

/// One lone write after the store has gone idle.
async fn idle_write(store: &Store, ns: &Namespace, ids: &[DocId], i: usize) -> Result<Duration> {
    tokio::time::sleep(Duration::from_millis(1)).await;
    let id = &ids[(i * 7) % DOCS];
    let started = Instant::now();
    store.patch(ns, id, json!({ "idle": i }), None).await?;
    Ok(started.elapsed())
}

fn raw_documents() -> Result<Vec<Automerge>> {
    (0..DOCS)
        .map(|i| {
            let mut doc = Automerge::new();
            let mut tx = doc.transaction();
            tx.put(ROOT, "f0", 0)?;
            tx.put(ROOT, "name", format!("doc-{i:04}"))?;
            tx.commit();
            Ok(doc)
        })
        .collect()
}

/// One raw write: an Automerge change and its bytes into the open table.
fn raw_change(
    doc: &mut Automerge,
    table: &mut redb::Table<(u64, u64), &[u8]>,
    key: (u64, u64),
    value: i64,
) -> Result<()> {
    let before = doc.get_heads();
    let mut tx = doc.transaction();
    tx.put(ROOT, format!("f{}", value % 4), value)?;
    tx.commit();
    table.insert(key, doc.save_after(&before).as_slice())?;
    Ok(())
}

/// Raw writes per second, committing every `batch` writes, on this thread.
fn raw_rate(db: &Database, docs: &mut [Automerge], batch: usize, span: Duration) -> Result<f64> {
    let started = Instant::now();
    let mut writes = 0u64;
    while started.elapsed() < span {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut table = txn.open_table(RAW)?;
            for _ in 0..batch {
                let d = (writes as usize * 7) % DOCS;
                raw_change(&mut docs[d], &mut table, (d as u64, writes), writes as i64)?;
                writes += 1;
            }
        }
        txn.commit()?;
    }
    Ok(writes as f64 / started.elapsed().as_secs_f64())
}

/// One automerge change plus one durable redb commit, after a pause.
fn raw_idle_write(db: &Database, docs: &mut [Automerge], i: usize) -> Result<Duration> {
    std::thread::sleep(Duration::from_millis(1));
    let d = (i * 7) % DOCS;
    let started = Instant::now();
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    {
        let mut table = txn.open_table(RAW)?;
        raw_change(
            &mut docs[d],
            &mut table,
            (d as u64, u64::MAX - i as u64),
            i as i64,
        )?;
    }
    txn.commit()?;
    Ok(started.elapsed())
}
