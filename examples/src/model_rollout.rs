//! Rolling out model weights: a hub publishes a model document whose `weights` field
//! references a blob; three edges fetch the weights, each chunk group verified as it
//! arrives; one edge is stopped halfway through and, once restarted, fetches only what
//! it was missing. Every edge then checks the weights against the hash.

use std::io::Write;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::local::{http, http_bytes, Local, Member};

/// What the example ended with, for its test.
#[derive(Debug)]
pub struct RolloutReport {
    /// The weights' BLAKE3 hash (hex).
    pub hash: String,
    /// Their size in bytes.
    pub size: u64,
    /// Whether each edge's copy hashes to `hash`.
    pub verified: Vec<bool>,
    /// Bytes the stopped edge had verified when it was stopped.
    pub stopped_at: u64,
    /// Bytes it found verified when it started again.
    pub resumed: u64,
    /// Bytes it then received (data and verification tree).
    pub received_after_restart: u64,
}

/// Bytes of the example's weights.
const WEIGHTS: usize = 48 << 20;

fn weights() -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut out = Vec::with_capacity(WEIGHTS);
    while out.len() < WEIGHTS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

async fn blobs_status(node: &Member) -> Result<Value> {
    let (_, s) = http("GET", &format!("{}/v1/status", node.api()), None).await?;
    Ok(s["blobs"].clone())
}

/// Whether `node` holds the whole blob (a HEAD says so without fetching anything).
async fn holds(node: &Member, hash: &str) -> Result<bool> {
    let url = format!("{}/v1/blobs/{hash}", node.api());
    let (status, _) = http_bytes("HEAD", &url, None).await?;
    if status != 200 {
        return Ok(false);
    }
    let (_, list) = http("GET", &format!("{}/v1/blobs", node.api()), None).await?;
    Ok(list["blobs"]
        .as_array()
        .is_some_and(|l| l.iter().any(|b| b["hash"] == hash)))
}

/// Runs the example, narrating to `out`.
pub async fn run(out: &mut dyn Write) -> Result<RolloutReport> {
    let local = Local::new("rollout")?;
    // The hub paces each link's blob streams (40 MB/s), as an operator would on a shared
    // uplink; it also makes "halfway" last long enough to stop an edge there.
    let hub = local
        .hub_with("hub", &[], |cfg| cfg.blobs.max_rate = Some(40_000_000))
        .await?;
    let grants = ["models=ro"];
    let mut edges = Vec::new();
    for name in ["infer-1", "infer-2", "infer-3"] {
        edges.push(local.edge(name, &grants, &[hub.quic()]).await?);
    }
    writeln!(
        out,
        "hub, and edges infer-1..3 (models=ro); blob streams paced at 40 MB/s per link"
    )?;

    let bytes = weights();
    let (status, put) = http_bytes(
        "PUT",
        &format!("{}/v1/blobs", hub.api()),
        Some(bytes.clone()),
    )
    .await?;
    ensure!(status == 200, "putting the weights answered {status}");
    let put: Value = serde_json::from_slice(&put)?;
    let hash = put["hash"].as_str().context("no hash")?.to_owned();
    let size = put["size"].as_u64().context("no size")?;
    writeln!(out, "put the weights at the hub: {hash} ({size} bytes)")?;
    let model = json!({
        "model": "resnet50", "version": "2.4.0",
        "weights": {"@blob": hash, "size": size, "type": "application/octet-stream", "name": "resnet50.bin"},
    });
    let (status, _) = http(
        "PUT",
        &format!("{}/v1/docs/models/resnet50", hub.api()),
        Some(model),
    )
    .await?;
    ensure!(status == 200, "publishing the model answered {status}");
    writeln!(
        out,
        "published models/resnet50 referencing it; the edges fetch it (eager)"
    )?;

    // Stop infer-3 once it has about half.
    let third = edges.pop().context("three edges")?;
    let stopped_at;
    let started = std::time::Instant::now();
    loop {
        let done = blobs_status(&third).await?["transfers"][0]["done"]
            .as_u64()
            .unwrap_or(0);
        if done >= size / 2 {
            stopped_at = done;
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "infer-3 never got halfway"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cfg = third.stop().await;
    writeln!(
        out,
        "stopped infer-3 with {stopped_at} of {size} bytes verified"
    )?;
    let third = Member::restart(cfg).await?;
    edges.push(third);
    for e in &edges {
        let started = std::time::Instant::now();
        while !holds(e, &hash).await? {
            ensure!(
                started.elapsed() < Duration::from_secs(60),
                "an edge never got the weights"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let st = blobs_status(&edges[2]).await?;
    let resumed = st["resumed_bytes"].as_u64().unwrap_or(0);
    let received = st["received_bytes"].as_u64().unwrap_or(0);
    writeln!(
        out,
        "infer-3 restarted: {resumed} bytes were verified already, it received {received} more for the {} missing",
        size - resumed
    )?;
    let mut verified = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        let (status, got) =
            http_bytes("GET", &format!("{}/v1/blobs/{hash}", e.api()), None).await?;
        let ok = status == 200 && blake3::hash(&got).to_hex().as_str() == hash;
        writeln!(
            out,
            "infer-{}: weights {} ({} bytes)",
            i + 1,
            if ok { "verified" } else { "DIFFER" },
            got.len()
        )?;
        verified.push(ok);
    }
    Ok(RolloutReport {
        hash,
        size,
        verified,
        stopped_at,
        resumed,
        received_after_restart: received,
    })
}
