//! `priority`: a critical document's latency on a busy thin link. The real binaries, a hub
//! and an edge in a network namespace of its own, talk across [`crate::chaos::wire::Wire`]
//! shaped as a 10 Mbit/s link (20 ms RTT, a quarter second of queue). The edge's classes make `alerts` critical and
//! `telemetry` bulk, and its `--max-rate` keeps it just under the link's rate, so the
//! modem's queue stays short.
//!
//! Idle: the edge writes one alert a second, each timed until the hub serves it. Busy:
//! the same while the edge holds a backlog of bulk documents (`backlog_mb`) and a blob
//! (`blob_mb`) the hub is fetching from it. The bulk goodput during the busy phase shows
//! the link was in use.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::artifact::{live_write_timed, LiveWrite};
use super::{percentile, round2};
use crate::chaos::proxy::Impairment;
use crate::chaos::wire::{Shaping, Wire};
use crate::procs::{connected, metrics, status, wait_for, Binaries, Proc};
use crate::Rng;

/// What the scenario runs.
#[derive(Debug, Clone, Copy)]
pub struct PriorityConfig {
    /// MB of bulk documents the edge holds when the busy phase starts.
    pub backlog_mb: usize,
    /// MiB of the blob in flight (0: none).
    pub blob_mb: usize,
    /// Alerts timed per phase, one a second.
    pub samples: usize,
    /// What shapes the link.
    pub link: Shaping,
}

/// The link: 10 Mbit/s each way.
const LINK_BITS: u64 = 10_000_000;
/// The edge's cap: 80 % of the link, so its packets (QUIC adds its headers and
/// acknowledgements) never fill the modem's queue.
const EDGE_MAX_RATE: u64 = LINK_BITS / 8 * 80 / 100;

const CLASSES: &str = r#"
[[class]]
namespaces = ["alerts"]
priority = "critical"

[[class]]
namespaces = ["telemetry"]
priority = "bulk"
"#;

fn alerts(edge: &Proc, hub: &Proc, samples: usize, from: u64) -> Result<Vec<LiveWrite>> {
    let mut out = Vec::new();
    for i in 0..samples as u64 {
        let started = Instant::now();
        out.push(live_write_timed(edge.api, hub.api, "alerts", from + i)?);
        std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
    }
    Ok(out)
}

/// Bytes the hub has received from the edge: frames and blob streams.
fn received(hub: &Proc) -> u64 {
    status(hub)["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|s| s["node_id"] == "edge"))
        .map_or(0, |s| {
            s["bytes_received"].as_u64().unwrap_or(0)
                + s["blob_received_bytes"].as_u64().unwrap_or(0)
        })
}

/// A node's durable commits so far: all of them, and those slower than about 51 ms (the
/// bucket of its commit-time histogram that ends there).
fn commits(node: &Proc) -> Result<(u64, u64)> {
    let text = metrics(node);
    let (mut all, mut fast) = (None, None);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("tidesync_commit_duration_seconds_") else {
            continue;
        };
        let value = |s: &str| s.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok());
        if rest.starts_with("count") {
            all = value(rest);
        } else if let Some(le) = rest
            .strip_prefix("bucket{le=\"")
            .and_then(|r| r.split('"').next())
            .and_then(|le| le.parse::<f64>().ok())
        {
            if (le - 0.0512).abs() < 1e-6 {
                fast = value(rest);
            }
        }
    }
    let all = all.context("no commit count in the node's metrics")?;
    let fast = fast.context("no 51.2 ms commit bucket in the node's metrics")?;
    Ok((all, all.saturating_sub(fast)))
}

/// Runs the scenario.
pub async fn run(cfg: PriorityConfig) -> Result<Value> {
    let d = Binaries::init()?;
    let link = Wire::start_with(cfg.link, &tokio::runtime::Handle::current(), 7)?;
    link.set(Impairment::thin(Duration::from_millis(20), 0.0, LINK_BITS))?;
    let hub = d.hub_at("hub", &format!("{}:0", link.near), &[])?;
    d.enroll("edge", "edge", &["*=rw"])?;
    let config = d.path("edge.toml");
    std::fs::write(&config, CLASSES)?;
    let rate = EDGE_MAX_RATE.to_string();
    let edge = d.edge_across(
        &link,
        "edge",
        &[hub.quic],
        &["--config", &config, "--max-rate", &rate],
    )?;
    wait_for("the edge connected", Duration::from_secs(20), || {
        connected(&hub, "edge")
    });
    let idle = tokio::task::block_in_place(|| alerts(&edge, &hub, cfg.samples, 0))?;

    // The backlog: bulk documents of random letters (which neither Automerge nor zstd
    // shrinks much), written faster than the link carries them.
    let mut rng = Rng::new(99);
    let doc_kb = 100;
    let docs = cfg.backlog_mb * 1000 / doc_kb;
    let agent = ureq::AgentBuilder::new().build();
    let before = received(&hub);
    let busy_started = Instant::now();
    for i in 0..docs {
        let body: String = (0..doc_kb * 1000)
            .map(|_| char::from(b'a' + rng.range(0, 26) as u8))
            .collect();
        agent
            .put(&edge.url(&format!("/v1/docs/telemetry/t{i:05}")))
            .send_json(json!({ "samples": body }))?;
    }
    let blob = if cfg.blob_mb > 0 {
        let file = d.path("blob.bin");
        {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&file)?);
            let mut chunk = vec![0u8; 1 << 20];
            for _ in 0..cfg.blob_mb {
                for b in chunk.chunks_mut(8) {
                    b.copy_from_slice(&rng.next_u64().to_le_bytes());
                }
                f.write_all(&chunk)?;
            }
            f.flush()?;
            // Synced, or the kernel writes a gigabyte back in the middle of the busy
            // phase and every commit on the machine waits for it.
            f.get_ref().sync_all()?;
        }
        let v: Value = ureq::put(&edge.url("/v1/blobs"))
            .set("Content-Type", "application/octet-stream")
            .send(std::io::BufReader::with_capacity(
                1 << 20,
                std::fs::File::open(&file)?,
            ))?
            .into_json()?;
        let hash = v["hash"].as_str().context("no hash")?.to_owned();
        std::fs::remove_file(&file)?;
        ureq::put(&edge.url("/v1/docs/telemetry/model"))
            .send_json(json!({ "weights": { "@blob": hash, "size": cfg.blob_mb << 20 } }))?;
        Some(hash)
    } else {
        None
    };
    let lag = |p: &Proc| {
        status(p)["peers"]
            .as_array()
            .and_then(|a| a.first().map(|s| s["lag"].as_u64().unwrap_or(0)))
            .unwrap_or(0)
    };
    let backlog_at_start = lag(&edge);
    let measured_from = Instant::now();
    let from_bytes = received(&hub);
    let (hub_commits, edge_commits) = (commits(&hub)?, commits(&edge)?);
    let busy = tokio::task::block_in_place(|| alerts(&edge, &hub, cfg.samples, 1_000_000))?;
    let busy_secs = measured_from.elapsed().as_secs_f64();
    let bulk_bytes = received(&hub) - from_bytes;
    let backlog_at_end = lag(&edge);
    let since = |node: &Proc, (all, slow): (u64, u64)| -> Result<Value> {
        let (now_all, now_slow) = commits(node)?;
        Ok(json!({ "commits": now_all - all, "over_51ms": now_slow - slow }))
    };
    let (hub_commits, edge_commits) = (since(&hub, hub_commits)?, since(&edge, edge_commits)?);
    let blob_arriving = blob.is_some_and(|h| {
        ureq::head(&hub.url(&format!("/v1/blobs/{h}")))
            .call()
            .is_ok_and(|r| r.header("x-tidesync-blob") != Some("held"))
    });
    let ms = |d: Duration| round2(d.as_secs_f64() * 1000.0);
    // In order, to tell a slow moment from a slow phase, and the edge's own part of each
    // (its commit) from the link's and the hub's.
    let in_order = |w: &[LiveWrite], part: fn(&LiveWrite) -> Duration| -> Vec<f64> {
        w.iter().map(|s| ms(part(s))).collect()
    };
    let (busy_ms, busy_acked_ms, idle_ms) = (
        in_order(&busy, |s| s.arrived),
        in_order(&busy, |s| s.acked),
        in_order(&idle, |s| s.arrived),
    );
    let mut idle: Vec<Duration> = idle.iter().map(|s| s.arrived).collect();
    let mut busy: Vec<Duration> = busy.iter().map(|s| s.arrived).collect();
    let (idle_p50, idle_p99) = (percentile(&mut idle, 50.0), percentile(&mut idle, 99.0));
    let (busy_p50, busy_p99) = (percentile(&mut busy, 50.0), percentile(&mut busy, 99.0));
    Ok(json!({
        "samples": cfg.samples,
        "busy_samples_ms": busy_ms,
        "busy_edge_acked_ms": busy_acked_ms,
        "busy_hub_commits": hub_commits,
        "busy_edge_commits": edge_commits,
        "idle_samples_ms": idle_ms,
        "backlog_mb": cfg.backlog_mb,
        "blob_mb": cfg.blob_mb,
        "link_mbit_s": LINK_BITS / 1_000_000,
        "edge_max_rate": EDGE_MAX_RATE,
        "idle_p50_ms": ms(idle_p50),
        "idle_p99_ms": ms(idle_p99),
        "critical_p50_ms": ms(busy_p50),
        "critical_p99_ms": ms(busy_p99),
        "p99_ratio": round2(busy_p99.as_secs_f64() / idle_p99.as_secs_f64().max(1e-6)),
        "bulk_mb_s": round2(bulk_bytes as f64 / 1e6 / busy_secs),
        "link_mb_s": round2(LINK_BITS as f64 / 8e6),
        "backlog_feed_positions_at_start": backlog_at_start,
        "backlog_feed_positions_at_end": backlog_at_end,
        "blob_still_arriving_at_end": blob_arriving,
        "setup_s": round2(measured_from.duration_since(busy_started).as_secs_f64()),
        "hub_received_before_busy": before,
    }))
}
