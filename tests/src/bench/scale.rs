//! `connections`, `memory` and the edge footprint: the real `tidesync-hub` and
//! `tidesync-edge` binaries (release builds), measured from outside through `/proc`.
//!
//! connections: `edges` in-process edges (one process, each with its own redb file and
//! QUIC endpoint) connect to one hub process and stay idle; the hub's resident memory per
//! edge and its CPU use while idle.
//!
//! memory: a hub process over a store of `docs` one-KB documents, each read once through
//! the HTTP API; its resident memory afterwards.
//!
//! footprint: the stripped size of `tidesync-edge`, and an edge process's resident memory
//! once it holds 10,000 documents in sync with a hub and is idle.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tidesync::model::{DocId, Grant, Namespace, NodeId};
use tidesync::net::{Ca, Node, NodeConfig};
use tidesync::store::{Store, StoreConfig};
use tidesync::sync::Role;

use super::round2;
use crate::cluster::wait_until;
use crate::procs::{self, Proc};

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// Resident memory of a process, in KiB.
pub fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc status")
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    // Fields 14 and 15 of stat(5); the slice starts at field 3.
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

fn init_hub(dir: &Path) -> Result<()> {
    procs::run(
        "tidesync-hub",
        &["init", "--data", path_str(dir)?, "--name", "bench"],
    )?;
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 temporary path")
}

fn start_hub(dir: &Path) -> Result<Proc> {
    Proc::start(
        "tidesync-hub",
        &[
            "run",
            "--data",
            path_str(dir)?,
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ],
    )
}

fn doc_count(agent: &ureq::Agent, proc: &Proc) -> Result<u64> {
    let status: Value = agent.get(&proc.url("/v1/status")).call()?.into_json()?;
    status["docs"]
        .as_u64()
        .context("status without a doc count")
}

/// Writes `docs` documents of about one KB into `store`, 64 writers at a time.
async fn fill(store: &Store, ns: &Namespace, docs: usize) -> Result<()> {
    const WRITERS: usize = 64;
    let body: String = "tidesync ".repeat(110);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (store, ns, body) = (store.clone(), ns.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = w;
            while k < docs {
                let id = DocId::new(format!("doc-{k:06}"))?;
                let doc =
                    serde_json::json!({"n": k, "title": format!("document {k}"), "body": body});
                store.put(&ns, &id, doc, None).await?;
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

/// A hub process initialised in `dir/hub`, and its deployment CA to issue edges from.
pub(crate) fn hub_with_ca(dir: &Path) -> Result<(Proc, Ca)> {
    let hub_dir = dir.join("hub");
    init_hub(&hub_dir)?;
    let ca = Ca::from_pem(
        &std::fs::read_to_string(hub_dir.join("ca.pem"))?,
        &std::fs::read_to_string(hub_dir.join("ca-key.pem"))?,
    )?;
    Ok((start_hub(&hub_dir)?, ca))
}

/// Runs the connections scenario: `edges` idle edges for `idle` seconds.
pub async fn connections(edges: usize, idle: Duration) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let (hub, ca) = hub_with_ca(dir.path())?;
    let agent = ureq::AgentBuilder::new().build();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_kb(hub.pid())?;

    let grants: Vec<Grant> = vec!["*=rw".parse()?];
    let mut nodes: Vec<(Node, Store)> = Vec::with_capacity(edges);
    for i in 0..edges {
        let bundle = ca.issue(&NodeId::new(format!("edge-{i:04}"))?, Role::Edge, &grants)?;
        let mut cfg = NodeConfig::new(bundle);
        cfg.dial = vec![hub.quic];
        cfg.failover = true;
        let store = Store::open(
            dir.path().join(format!("edge-{i:04}.redb")),
            StoreConfig {
                doc_cache_bytes: 1 << 20,
                redb_cache_bytes: 1 << 20,
                ..StoreConfig::default()
            },
        )?;
        nodes.push((Node::start(store.clone(), cfg)?, store));
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let started = Instant::now();
    wait_until(Duration::from_secs(120), "all edges connected", || {
        Ok(nodes
            .iter()
            .all(|(n, _)| n.peers().iter().any(|p| p.connected)))
    })
    .await?;
    let connect_ms = started.elapsed().as_millis();
    let hub_view: Value = agent.get(&hub.url("/v1/status")).call()?.into_json()?;
    let hub_connected = hub_view["peers"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p["connected"] == true).count());
    if hub_connected < edges {
        bail!("the hub sees {hub_connected} of {edges} edges connected");
    }
    // Let the handshakes' allocations settle, then measure a quiet window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = cpu_seconds(hub.pid())?;
    let t0 = Instant::now();
    tokio::time::sleep(idle).await;
    let cpu = cpu_seconds(hub.pid())? - cpu0;
    let window = t0.elapsed().as_secs_f64();
    let rss_after = rss_kb(hub.pid())?;
    let still = nodes
        .iter()
        .filter(|(n, _)| n.peers().iter().any(|p| p.connected))
        .count();
    for (n, _) in &nodes {
        n.shutdown().await;
    }
    drop(nodes);
    drop(hub);
    Ok(json!({
        "edges": edges,
        "connected_after_idle": still,
        "connect_all_ms": connect_ms,
        "idle_seconds": round2(window),
        "hub_rss_before_kb": rss_before,
        "hub_rss_kb": rss_after,
        "hub_rss_per_edge_kb": round2(rss_after.saturating_sub(rss_before) as f64 / edges as f64),
        "hub_idle_cpu_pct": round2(cpu / window * 100.0),
    }))
}

/// Runs the memory scenario for `docs` documents: resident MiB after reading each once.
pub async fn memory(docs: usize) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    init_hub(dir.path())?;
    let ns = Namespace::new("mem")?;
    {
        let store = Store::open(dir.path().join("node.redb"), StoreConfig::default())?;
        fill(&store, &ns, docs).await?;
    }
    let hub = start_hub(dir.path())?;
    let agent = ureq::AgentBuilder::new().build();
    if doc_count(&agent, &hub)? != docs as u64 {
        bail!("the hub does not hold the {docs} documents written");
    }
    let rss_start = rss_kb(hub.pid())?;
    let started = Instant::now();
    let mut bytes = 0;
    for k in 0..docs {
        let body = agent
            .get(&hub.url(&format!("/v1/docs/mem/doc-{k:06}")))
            .call()?
            .into_string()?;
        bytes += body.len();
    }
    let read_s = started.elapsed().as_secs_f64();
    let rss = rss_kb(hub.pid())?;
    Ok(json!({
        "docs": docs,
        "rss_mb_start": round2(rss_start as f64 / 1024.0),
        "rss_mb": round2(rss as f64 / 1024.0),
        "read_per_s": (docs as f64 / read_s).round(),
        "avg_doc_bytes": bytes / docs.max(1),
    }))
}

/// The stripped release size of `tidesync-edge`, and its resident memory with 10,000
/// documents in sync and idle.
pub async fn footprint(docs: usize) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let edge_bin = procs::binary("tidesync-edge")?;
    let stripped = dir.path().join("tidesync-edge.stripped");
    let status = std::process::Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&edge_bin)
        .status()
        .context("running strip")?;
    if !status.success() {
        bail!("strip failed");
    }
    let binary_mb = std::fs::metadata(&stripped)?.len() as f64 / (1024.0 * 1024.0);

    let hub_dir = dir.path().join("hub");
    let edge_dir = dir.path().join("edge");
    init_hub(&hub_dir)?;
    std::fs::create_dir_all(&edge_dir)?;
    let bundle = edge_dir.join("edge.pem");
    procs::run(
        "tidesync-hub",
        &[
            "enroll",
            "--data",
            path_str(&hub_dir)?,
            "--name",
            "edge-1",
            "--role",
            "edge",
            "--grant",
            "*=rw",
            "--out",
            path_str(&bundle)?,
        ],
    )?;
    let ns = Namespace::new("foot")?;
    {
        let store = Store::open(edge_dir.join("node.redb"), StoreConfig::default())?;
        fill(&store, &ns, docs).await?;
    }
    let hub = start_hub(&hub_dir)?;
    let hub_addr = hub.quic.to_string();
    let edge = Proc::start(
        "tidesync-edge",
        &[
            "run",
            "--data",
            path_str(&edge_dir)?,
            "--bundle",
            path_str(&bundle)?,
            "--hub",
            &hub_addr,
            "--api",
            "127.0.0.1:0",
        ],
    )?;
    let agent = ureq::AgentBuilder::new().build();
    let started = Instant::now();
    wait_until(
        Duration::from_secs(300),
        "the hub holding the edge's documents",
        || Ok(doc_count(&agent, &hub)? == docs as u64),
    )
    .await?;
    let sync_ms = started.elapsed().as_millis();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_kb(edge.pid())?;
    Ok(json!({
        "edge_binary_mb": round2(binary_mb),
        "edge_rss_mb_10k": round2(rss as f64 / 1024.0),
        "docs": docs,
        "initial_sync_ms": sync_ms,
    }))
}
