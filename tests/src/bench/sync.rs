//! `catchup` and `idle-reconnect`: two nodes over real QUIC on 127.0.0.1, real redb files.
//!
//! catchup: edge B is down while hub A makes `changes` changes across `docs` documents;
//! B restarts and converges. Measured: time from B's start to convergence, frames and
//! bytes both ways (frame bytes, and UDP bytes on the wire with QUIC, TLS and the
//! handshake), against the raw bytes of the Automerge changes B lacked.
//!
//! idle-reconnect: A and B hold the same `n` documents and have acknowledged each other's
//! feeds; B restarts. Measured: frames, bytes and documents loaded on either side until
//! both report nothing left to send.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tidesync::model::{DocId, Namespace};
use tidesync::net::PeerStatus;
use tidesync::store::Store;

use super::same_docs;
use crate::cluster::{start_at, wait_until, Deployment, TestNode};

const WRITERS: usize = 32;

/// Makes `changes` single-field changes round robin over `docs` documents of `ns`.
pub async fn populate(store: &Store, ns: &Namespace, docs: usize, changes: usize) -> Result<()> {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (store, ns) = (store.clone(), ns.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = w;
            while k < changes {
                let id = DocId::new(format!("doc-{:05}", k % docs))?;
                let patch = json!({ format!("f{}", k % 3): k, "last": k });
                store.patch(&ns, &id, patch, None).await?;
                k += WRITERS;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The raw bytes of every Automerge change in the namespace's documents.
fn raw_change_bytes(store: &Store, ns: &Namespace) -> Result<u64> {
    let mut total = 0;
    for d in store.list(ns)? {
        let bytes = store.export(ns, &d.id)?.context("listed doc")?.bytes;
        let doc = automerge::Automerge::load(&bytes)?;
        total += doc
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().len() as u64)
            .sum::<u64>();
    }
    Ok(total)
}

fn link(node: &TestNode) -> Result<PeerStatus> {
    node.node
        .peers()
        .into_iter()
        .find(|p| p.connected)
        .context("no connected peer")
}

async fn both_caught_up(a: &TestNode, b: &TestNode) -> Result<()> {
    wait_until(Duration::from_secs(120), "both sides caught up", || {
        Ok(matches!((link(a), link(b)), (Ok(pa), Ok(pb)) if pa.counts.lag == 0 && pb.counts.lag == 0))
    })
    .await?;
    Ok(())
}

/// Runs catch-up of `docs` documents / `changes` changes.
pub async fn catchup(docs: usize, changes: usize) -> Result<Value> {
    let d = Deployment::new()?;
    let ns = Namespace::new("catchup")?;
    let a = d.hub("hub-a", &[])?;
    let b = d.edge("edge-b", &["*=rw"], &[a.addr()])?;
    wait_until(Duration::from_secs(10), "B connected", || {
        Ok(link(&b).is_ok())
    })
    .await?;
    let (path, cfg) = b.stop().await;

    populate(&a.store, &ns, docs, changes).await?;
    let raw = raw_change_bytes(&a.store, &ns)?;

    let started = Instant::now();
    let b = start_at(path, cfg)?;
    wait_until(Duration::from_secs(120), "B converged", || {
        same_docs(&a.store, &b.store, &ns, docs)
    })
    .await?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    // The bytes include the acknowledgements that follow convergence: wait for the hub to
    // hear all of them, and for its last `Synced` to arrive.
    both_caught_up(&a, &b).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let p = link(&b)?;
    let wire = p.udp.bytes_sent + p.udp.bytes_received;
    let frames = p.counts.bytes_sent + p.counts.bytes_received;
    let out = json!({
        "docs": docs,
        "changes": changes,
        "ms": (ms * 10.0).round() / 10.0,
        "messages": p.counts.messages_sent + p.counts.messages_received,
        "bytes": wire,
        "frame_bytes": frames,
        "bytes_received": p.udp.bytes_received,
        "datagrams": p.udp.datagrams_sent + p.udp.datagrams_received,
        "raw_change_bytes": raw,
        "bytes_ratio": ratio(wire, raw),
        "frame_bytes_ratio": ratio(frames, raw),
        "received_ratio": ratio(p.udp.bytes_received, raw),
    });
    b.stop().await;
    a.stop().await;
    Ok(out)
}

/// Runs an idle reconnect with `n` documents in sync.
pub async fn idle_reconnect(n: usize) -> Result<Value> {
    let d = Deployment::new()?;
    let ns = Namespace::new("idle")?;
    let a = d.hub("hub-a", &[])?;
    populate(&a.store, &ns, n, n).await?;
    let b = d.edge("edge-b", &["*=rw"], &[a.addr()])?;
    wait_until(Duration::from_secs(300), "initial sync", || {
        same_docs(&a.store, &b.store, &ns, n)
    })
    .await?;
    both_caught_up(&a, &b).await?;
    // Let the last acknowledgements and cursors reach the disks.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (path, cfg) = b.stop().await;
    wait_until(Duration::from_secs(10), "A saw B leave", || {
        Ok(link(&a).is_err())
    })
    .await?;
    // A's counters for B add up over connections; B's start from zero with B.
    let a_loaded_before: u64 = a.node.peers().iter().map(|p| p.counts.docs_loaded).sum();

    let started = Instant::now();
    let b = start_at(path, cfg)?;
    wait_until(Duration::from_secs(10), "B reconnected", || {
        Ok(link(&b).is_ok() && link(&a).is_ok())
    })
    .await?;
    both_caught_up(&a, &b).await?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (pa, pb) = (link(&a)?, link(&b)?);
    let out = json!({
        "docs": n,
        "ms": (ms * 10.0).round() / 10.0,
        "messages": pb.counts.messages_sent + pb.counts.messages_received,
        "bytes": pb.counts.bytes_sent + pb.counts.bytes_received,
        "udp_bytes": pb.udp.bytes_sent + pb.udp.bytes_received,
        "docs_loaded": pa.counts.docs_loaded - a_loaded_before + pb.counts.docs_loaded,
    });
    b.stop().await;
    a.stop().await;
    Ok(out)
}

fn ratio(x: u64, y: u64) -> f64 {
    if y == 0 {
        return 0.0;
    }
    ((x as f64 / y as f64) * 1000.0).round() / 1000.0
}
