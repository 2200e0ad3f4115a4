//! The demo: a hub and three edges over real QUIC and real redb files in a temporary
//! directory. One edge goes offline, both sides write to the same fields, the edge comes
//! back, and everything converges: content, conflicts, bytes on the wire, peer status.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tidesync::model::{DocId, Namespace};
use tidesync::store::Store;

use crate::local::{wait_for, Local, Member};

/// What the demo ended with, for its test.
#[derive(Debug)]
pub struct DemoReport {
    /// The document's JSON on each node (hub, edge-1, edge-2, edge-3).
    pub content: Vec<Value>,
    /// The document's heads on each node.
    pub heads: Vec<Vec<String>>,
    /// The concurrent values of `/title` listed by the conflicts view on each node.
    pub title_alternatives: Vec<Vec<Value>>,
    /// How long the whole demo took.
    pub took: Duration,
}

fn heads(store: &Store, ns: &Namespace, id: &DocId) -> Result<Vec<String>> {
    Ok(store
        .get(ns, id)?
        .map(|d| d.heads.iter().map(|h| h.to_string()).collect())
        .unwrap_or_default())
}

fn content(store: &Store, ns: &Namespace, id: &DocId) -> Result<Value> {
    Ok(store
        .get(ns, id)?
        .map_or(Value::Null, |d| Value::Object(d.content)))
}

/// Runs the demo, narrating to `out`.
pub async fn run(out: &mut dyn Write) -> Result<DemoReport> {
    let started = Instant::now();
    let local = Local::new("demo")?;
    let ns = Namespace::new("lists")?;
    let id = DocId::new("groceries")?;
    writeln!(
        out,
        "Tidesync demo: one hub, three edges, real QUIC and redb"
    )?;
    writeln!(out, "  files in {}\n", local.dir().display())?;

    let hub = local.hub("hub", &[]).await?;
    let e1 = local.edge("edge-1", &["*=rw"], &[hub.quic()]).await?;
    let e2 = local.edge("edge-2", &["*=rw"], &[hub.quic()]).await?;
    let e3 = local.edge("edge-3", &["*=rw"], &[hub.quic()]).await?;
    wait_for("three edges connected", Duration::from_secs(10), || {
        Ok(hub
            .daemon
            .node
            .peers()
            .iter()
            .filter(|p| p.connected)
            .count()
            == 3)
    })
    .await?;
    writeln!(
        out,
        "1. hub on {} with edge-1, edge-2, edge-3 connected",
        hub.quic()
    )?;

    let first = json!({"title": "Groceries", "items": {"milk": 1, "bread": 1}});
    e1.daemon.store.put(&ns, &id, first.clone(), None).await?;
    let took = wait_for(
        "the list at edge-2 and edge-3",
        Duration::from_secs(5),
        || {
            Ok(content(&e2.daemon.store, &ns, &id)? == first
                && content(&e3.daemon.store, &ns, &id)? == first)
        },
    )
    .await?;
    writeln!(
        out,
        "2. edge-1 writes lists/groceries; edge-2 and edge-3 have it {:.1} ms later\n   {first}",
        took.as_secs_f64() * 1e3
    )?;

    let e3_cfg = e3.stop().await;
    writeln!(
        out,
        "3. edge-3 goes offline (its node stops; its redb file stays)"
    )?;
    {
        // edge-3 keeps working offline: open its store directly, as an app would.
        let offline = Store::open(&e3_cfg.db_path, e3_cfg.store.clone())?;
        offline
            .patch(
                &ns,
                &id,
                json!({"title": "Weekend groceries", "items": {"eggs": 12}}),
                None,
            )
            .await?;
        writeln!(
            out,
            "   edge-3, offline: title = \"Weekend groceries\", adds eggs"
        )?;
    }
    e1.daemon
        .store
        .patch(
            &ns,
            &id,
            json!({"title": "Groceries (urgent)", "items": {"milk": 2}}),
            None,
        )
        .await?;
    writeln!(
        out,
        "   edge-1, online:  title = \"Groceries (urgent)\", milk = 2"
    )?;

    let healed = Instant::now();
    let e3 = Member::restart(e3_cfg).await?;
    let nodes: [&Member; 4] = [&hub, &e1, &e2, &e3];
    wait_for("all four nodes converged", Duration::from_secs(20), || {
        let h = heads(&hub.daemon.store, &ns, &id)?;
        let mut same = true;
        for n in &nodes {
            same &= heads(&n.daemon.store, &ns, &id)? == h;
        }
        Ok(same && h.len() == 2)
    })
    .await?;
    writeln!(
        out,
        "4. edge-3 reconnects; all four nodes converge in {:.1} ms",
        healed.elapsed().as_secs_f64() * 1e3
    )?;

    let names = ["hub", "edge-1", "edge-2", "edge-3"];
    let mut report = DemoReport {
        content: Vec::new(),
        heads: Vec::new(),
        title_alternatives: Vec::new(),
        took: Duration::ZERO,
    };
    writeln!(out, "\n   node     document (the same everywhere)")?;
    for (name, n) in names.iter().zip(nodes) {
        let c = content(&n.daemon.store, &ns, &id)?;
        writeln!(out, "   {name:<8} {c}")?;
        report.content.push(c);
        report.heads.push(heads(&n.daemon.store, &ns, &id)?);
        let conflicts = n
            .daemon
            .store
            .conflicts(&ns, &id)?
            .context("the document exists")?;
        let title = conflicts
            .into_iter()
            .find(|c| c.path == "/title")
            .map(|c| c.values)
            .unwrap_or_default();
        report.title_alternatives.push(title);
    }
    writeln!(
        out,
        "\n5. conflicts view (GET /v1/docs/lists/groceries/conflicts), the same on every node:\n   /title: {} (the first is the visible winner; nothing was lost)",
        Value::from(report.title_alternatives[0].clone())
    )?;

    writeln!(
        out,
        "\n6. the hub's peers (what `tidesync-hub status` shows)"
    )?;
    writeln!(
        out,
        "   {:<8} {:<10} {:>4} {:>12} {:>12} {:>8} {:>8}",
        "PEER", "STATE", "LAG", "FRAMES OUT", "FRAMES IN", "BYTES", "UDP"
    )?;
    let mut peers = hub.daemon.node.peers();
    peers.sort_by(|a, b| a.node_id.as_str().cmp(b.node_id.as_str()));
    for p in peers {
        writeln!(
            out,
            "   {:<8} {:<10} {:>4} {:>12} {:>12} {:>8} {:>8}",
            p.node_id.as_str(),
            if p.connected { "connected" } else { "down" },
            p.counts.lag,
            p.counts.messages_sent,
            p.counts.messages_received,
            p.counts.bytes_sent + p.counts.bytes_received,
            p.udp.bytes_sent + p.udp.bytes_received,
        )?;
    }
    writeln!(
        out,
        "   BYTES: sync frames both ways since start; UDP: the current connection on the\n   wire, QUIC, TLS 1.3 and certificates included"
    )?;

    for n in [e3, e2, e1, hub] {
        n.stop().await;
    }
    report.took = started.elapsed();
    writeln!(
        out,
        "\ndone in {:.1} s; the temporary directory is removed",
        report.took.as_secs_f64()
    )?;
    Ok(report)
}
