//! `latency`, `throughput` and `fanout`: live sync between in-process nodes over real QUIC
//! on 127.0.0.1 with real redb files.
//!
//! latency: edge A → hub H → edge B, single-field writes one at a time, each timed from
//! the call at A until B's store has committed it (and, in the same loop, until H has it:
//! the direct two-node path). The limit is the sum of the same path's raw steps, measured
//! in the same run by [`super::raw_path`].
//!
//! throughput: edge A writes flat out with 64 writers while connected to H; how many of
//! those changes H applies in the same window, and how far behind it falls.
//!
//! fanout: one hub, `edges` edges subscribed to one namespace; each write at the hub is
//! timed until the last edge has committed it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tidesync::model::{DocId, Namespace};
use tidesync::store::{FeedSeq, Store};
use tokio::sync::watch;

use super::raw_path;
use super::{micros, percentile, round2, same_docs};
use crate::cluster::{wait_until, Deployment, TestNode};

/// Documents the latency writes rotate over.
const LATENCY_DOCS: usize = 10;

/// Waits until `feed` moves past `after`, returning the new position.
async fn advanced(feed: &mut watch::Receiver<FeedSeq>, after: FeedSeq) -> Result<FeedSeq> {
    let seq = *feed
        .wait_for(|s| *s > after)
        .await
        .context("store closed")?;
    Ok(seq)
}

fn connected(node: &TestNode, peers: usize) -> bool {
    node.node.peers().iter().filter(|p| p.connected).count() >= peers
}

/// Waits until every node in `nodes` holds the same documents and heads as `source`.
async fn converged(source: &Store, nodes: &[&Store], ns: &Namespace, docs: usize) -> Result<()> {
    wait_until(Duration::from_secs(60), "convergence", || {
        for n in nodes {
            if !same_docs(source, n, ns, docs)? {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    Ok(())
}

/// Runs the latency scenario with `writes` timed writes.
pub async fn latency(writes: usize) -> Result<Value> {
    let d = Deployment::new()?;
    let ns = Namespace::new("lat")?;
    let hub = d.hub("hub", &[])?;
    let a = d.edge("edge-a", &["*=rw"], &[hub.addr()])?;
    let b = d.edge("edge-b", &["*=rw"], &[hub.addr()])?;
    wait_until(Duration::from_secs(10), "edges connected", || {
        Ok(connected(&hub, 2))
    })
    .await?;
    let ids: Vec<DocId> = (0..LATENCY_DOCS)
        .map(|i| DocId::new(format!("doc-{i}")))
        .collect::<Result<_, _>>()?;
    for id in &ids {
        a.store.put(&ns, id, json!({"n": 0}), None).await?;
    }
    converged(&a.store, &[&hub.store, &b.store], &ns, LATENCY_DOCS).await?;

    let mut hub_feed = hub.store.subscribe();
    let mut b_feed = b.store.subscribe();
    let (mut via_hub, mut direct) = (Vec::with_capacity(writes), Vec::with_capacity(writes));
    // A few untimed writes first, so connections and caches are warm.
    for k in 0..writes + 20 {
        let (h0, b0) = (hub.store.last_seq(), b.store.last_seq());
        let id = &ids[k % ids.len()];
        let started = Instant::now();
        a.store.patch(&ns, id, json!({"n": k + 1}), None).await?;
        // The hub commits first; B's commit follows it.
        advanced(&mut hub_feed, h0).await?;
        let at_hub = started.elapsed();
        advanced(&mut b_feed, b0).await?;
        let at_b = started.elapsed();
        if k >= 20 {
            direct.push(at_hub);
            via_hub.push(at_b);
        }
    }
    converged(&a.store, &[&hub.store, &b.store], &ns, LATENCY_DOCS).await?;
    // Synchronous replication: from the write at A until the hub's durable commit of it
    // is confirmed back at A (what `?replicas=1` waits for before its 200).
    let mut replicas1 = Vec::with_capacity(writes);
    for k in 0..writes + 20 {
        let id = &ids[k % ids.len()];
        let started = Instant::now();
        let w = a.store.patch(&ns, id, json!({"r": k + 1}), None).await?;
        let doc = a.store.doc(&ns, id)?.unwrap_or_default();
        let confirmed = a
            .node
            .replicas()
            .wait(&ns, id, &w.heads, 1, Duration::from_secs(5), &doc)
            .await;
        if confirmed < 1 {
            anyhow::bail!("write {k} was not confirmed by the hub within 5 s");
        }
        if k >= 20 {
            replicas1.push(started.elapsed());
        }
    }
    b.stop().await;
    a.stop().await;
    hub.stop().await;

    let raw = raw_path::measure(300).await?;
    let p50 = percentile(&mut via_hub, 50.0);
    let limit_us = raw["limit_us"].as_f64().unwrap_or(0.0);
    let replicas1_limit = raw["direct_limit_us"].as_f64().unwrap_or(0.0)
        + raw["steps_us"]["one_way"].as_f64().unwrap_or(0.0);
    let out = json!({
        "writes": writes,
        "p50_us": micros(p50),
        "p99_us": micros(percentile(&mut via_hub, 99.0)),
        "direct_p50_us": micros(percentile(&mut direct, 50.0)),
        "direct_p99_us": micros(percentile(&mut direct, 99.0)),
        "limit_us": limit_us,
        "direct_limit_us": raw["direct_limit_us"],
        "ratio_to_limit": if limit_us > 0.0 { round2(micros(p50) / limit_us) } else { 0.0 },
        "limit_steps_us": raw["steps_us"],
        "replicas1_p50_us": micros(percentile(&mut replicas1, 50.0)),
        "replicas1_p99_us": micros(percentile(&mut replicas1, 99.0)),
        // The same path raw: the edge's commit, a hop, the hub's commit, a hop back.
        "replicas1_limit_us": replicas1_limit,
        "replicas1_ratio": if replicas1_limit > 0.0 {
            round2(micros(percentile(&mut replicas1, 50.0)) / replicas1_limit)
        } else {
            0.0
        },
    });
    Ok(out)
}

/// Runs the throughput scenario: 64 writers at edge A for `seconds`.
pub async fn throughput(seconds: f64) -> Result<Value> {
    const WRITERS: usize = 64;
    const DOCS: usize = 1000;
    let d = Deployment::new()?;
    let ns = Namespace::new("tput")?;
    let hub = d.hub("hub", &[])?;
    let a = d.edge("edge-a", &["*=rw"], &[hub.addr()])?;
    wait_until(Duration::from_secs(10), "edge connected", || {
        Ok(connected(&hub, 1))
    })
    .await?;
    let ids: Arc<Vec<DocId>> = Arc::new(
        (0..DOCS)
            .map(|i| DocId::new(format!("doc-{i:04}")))
            .collect::<Result<_, _>>()?,
    );
    for id in ids.iter() {
        a.store.put(&ns, id, json!({"n": 0}), None).await?;
    }
    converged(&a.store, &[&hub.store], &ns, DOCS).await?;
    let hub_applied = || -> u64 {
        hub.node
            .peers()
            .iter()
            .map(|p| p.counts.changes_applied)
            .sum::<u64>()
    };
    let base_applied = hub_applied();

    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (store, ns, ids) = (a.store.clone(), ns.clone(), ids.clone());
        let (written, stop) = (written.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = w;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[k % ids.len()];
                store.patch(&ns, id, json!({"n": k + 1}), None).await?;
                written.fetch_add(1, Ordering::Relaxed);
                k += WRITERS;
            }
            anyhow::Ok(())
        }));
    }
    // Sample both counts every 10 ms; lag is how long ago A had written what H has now.
    let started = Instant::now();
    let span = Duration::from_secs_f64(seconds);
    let mut timeline: Vec<(Duration, u64)> = vec![(Duration::ZERO, 0)];
    let mut max_lag = Duration::ZERO;
    let mut applied_in_window = 0;
    let mut total_written = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = started.elapsed();
        if now < span {
            timeline.push((now, written.load(Ordering::Relaxed)));
        } else if !stop.swap(true, Ordering::Relaxed) {
            for t in tasks.drain(..) {
                t.await??;
            }
            total_written = written.load(Ordering::Relaxed);
            timeline.push((started.elapsed(), total_written));
            applied_in_window = hub_applied() - base_applied;
        }
        let applied = hub_applied() - base_applied;
        // The earliest sample at which A had written more than H has applied.
        let behind_since = timeline.iter().find(|(_, w)| *w > applied).map(|(t, _)| *t);
        if let Some(t) = behind_since {
            max_lag = max_lag.max(now.saturating_sub(t));
        }
        if stop.load(Ordering::Relaxed) && applied >= total_written {
            break;
        }
        if now > span + Duration::from_secs(60) {
            anyhow::bail!(
                "the hub did not catch up within 60 s of the end: {applied} of {total_written} applied"
            );
        }
    }
    converged(&a.store, &[&hub.store], &ns, DOCS).await?;
    let drained = started.elapsed();
    a.stop().await;
    hub.stop().await;
    let secs = span.as_secs_f64();
    let writes_per_s = total_written as f64 / secs;
    let applied_per_s = applied_in_window as f64 / secs;
    Ok(json!({
        "seconds": secs,
        "writers": WRITERS,
        "edge_writes": total_written,
        "edge_writes_per_s": writes_per_s.round(),
        "hub_applied_per_s": applied_per_s.round(),
        "applied_ratio": if writes_per_s > 0.0 { round2(applied_per_s / writes_per_s) } else { 0.0 },
        "max_lag_ms": (max_lag.as_secs_f64() * 1e3).round(),
        "drained_ms": ((drained.as_secs_f64() - secs) * 1e3).round(),
    }))
}

/// Runs the fanout scenario: `edges` edges, `writes` writes at the hub.
pub async fn fanout(edges: usize, writes: usize) -> Result<Value> {
    let d = Deployment::new()?;
    let ns = Namespace::new("fan")?;
    let hub = d.hub("hub", &[])?;
    let mut nodes = Vec::with_capacity(edges);
    for i in 0..edges {
        let mut cfg = d.config(
            &format!("edge-{i:03}"),
            tidesync::sync::Role::Edge,
            &["fan=ro"],
        )?;
        cfg.dial = vec![hub.addr()];
        cfg.subscriptions = vec!["fan".parse()?];
        nodes.push(d.start(&format!("edge-{i:03}"), cfg)?);
    }
    wait_until(Duration::from_secs(60), "edges connected", || {
        Ok(connected(&hub, edges))
    })
    .await?;
    let id = DocId::new("board")?;
    hub.store.put(&ns, &id, json!({"n": 0}), None).await?;
    let stores: Vec<&Store> = nodes.iter().map(|n| &n.store).collect();
    converged(&hub.store, &stores, &ns, 1).await?;

    let mut feeds: Vec<_> = nodes.iter().map(|n| n.store.subscribe()).collect();
    let mut samples = Vec::with_capacity(writes);
    for k in 0..writes + 5 {
        let before: Vec<FeedSeq> = nodes.iter().map(|n| n.store.last_seq()).collect();
        let started = Instant::now();
        hub.store.patch(&ns, &id, json!({"n": k + 1}), None).await?;
        for (feed, b) in feeds.iter_mut().zip(before) {
            advanced(feed, b).await?;
        }
        if k >= 5 {
            samples.push(started.elapsed());
        }
    }
    converged(&hub.store, &stores, &ns, 1).await?;
    for n in nodes {
        n.stop().await;
    }
    hub.stop().await;
    let (limit_p50, limit_p99) =
        tokio::task::spawn_blocking(move || raw_path::fanout_commits(edges, writes)).await??;
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    let p50 = ms(percentile(&mut samples, 50.0));
    Ok(json!({
        "edges": edges,
        "writes": writes,
        "p50_ms": p50,
        "p99_ms": ms(percentile(&mut samples, 99.0)),
        "max_ms": ms(percentile(&mut samples, 100.0)),
        "limit_p50_ms": limit_p50,
        "limit_p99_ms": limit_p99,
        "ratio_to_limit": if limit_p50 > 0.0 { round2(p50 / limit_p50) } else { 0.0 },
    }))
}
