//! The data-center use case: two regional hubs share model deployment records (`models`,
//! written by operators at a hub, read-only at the edges) with edge inference nodes, and
//! the edges report their health (`health`, written by edges). Grants do their job: an
//! edge's attempt to change a model record is refused and never leaves it.

use std::io::Write;
use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Value};

use crate::local::{http, wait_for, Local};

/// What the example ended with, for its test.
#[derive(Debug)]
pub struct RegistryReport {
    /// The model record as each edge reads it.
    pub model_at_edges: Vec<Value>,
    /// Health reports (by edge) each hub holds.
    pub health_at_hubs: Vec<Vec<String>>,
    /// The HTTP status of an edge's write to `models`.
    pub edge_write_to_models: u16,
    /// The model record at the hubs after that attempt.
    pub model_at_hubs_after: Vec<Value>,
}

/// Runs the example, narrating to `out`.
pub async fn run(out: &mut dyn Write) -> Result<RegistryReport> {
    let local = Local::new("registry")?;
    let hub_eu = local.hub("hub-eu", &[]).await?;
    let hub_us = local.hub("hub-us", &[hub_eu.quic()]).await?;
    let grants = ["models=ro", "health=rw"];
    let edges = [
        local.edge("infer-eu-1", &grants, &[hub_eu.quic()]).await?,
        local.edge("infer-eu-2", &grants, &[hub_eu.quic()]).await?,
        local.edge("infer-us-1", &grants, &[hub_us.quic()]).await?,
    ];
    writeln!(out, "hubs hub-eu and hub-us (peered); edges infer-eu-1, infer-eu-2 on hub-eu, infer-us-1 on hub-us")?;
    writeln!(out, "edge grants: models=ro, health=rw\n")?;

    let record = json!({
        "model": "resnet50", "version": "2.3.1", "sha256": "9f2c…e1", "rollout": 0.25,
        "regions": ["eu", "us"]
    });
    let (status, _) = http(
        "PUT",
        &format!("{}/v1/docs/models/resnet50", hub_us.api()),
        Some(record.clone()),
    )
    .await?;
    ensure!(status == 200, "PUT at hub-us answered {status}");
    writeln!(
        out,
        "operator at hub-us: PUT /v1/docs/models/resnet50 -> {status}"
    )?;

    let mut model_at_edges = Vec::new();
    for e in &edges {
        let url = format!("{}/v1/docs/models/resnet50", e.api());
        let started = std::time::Instant::now();
        let got = loop {
            let (status, got) = http("GET", &url, None).await?;
            if status == 200 && got == record {
                break got;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "the record never reached the edge"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let took = started.elapsed();
        writeln!(
            out,
            "  {} has it after {:.1} ms",
            e.daemon.node.identity().node_id.as_str(),
            took.as_secs_f64() * 1e3
        )?;
        model_at_edges.push(got);
    }

    writeln!(out, "\nedges report their health:")?;
    for (i, e) in edges.iter().enumerate() {
        let name = e.daemon.node.identity().node_id.as_str().to_owned();
        let report = json!({"gpu_util": 0.4 + 0.1 * i as f64, "model": "resnet50", "version": "2.3.1", "ok": true});
        let (status, _) = http(
            "PUT",
            &format!("{}/v1/docs/health/{name}", e.api()),
            Some(report),
        )
        .await?;
        writeln!(out, "  {name}: PUT /v1/docs/health/{name} -> {status}")?;
    }
    let mut health_at_hubs = Vec::new();
    for hub in [&hub_eu, &hub_us] {
        let ns = tidesync::model::Namespace::new("health")?;
        wait_for(
            "every health report at the hub",
            Duration::from_secs(10),
            || Ok(hub.daemon.store.list(&ns)?.len() == edges.len()),
        )
        .await?;
        let ids: Vec<String> = hub
            .daemon
            .store
            .list(&ns)?
            .into_iter()
            .map(|d| d.id.as_str().to_owned())
            .collect();
        writeln!(
            out,
            "  {} holds reports from {}",
            hub.daemon.node.identity().node_id.as_str(),
            ids.join(", ")
        )?;
        health_at_hubs.push(ids);
    }

    let url = format!("{}/v1/docs/models/resnet50", edges[0].api());
    let (status, body) = http("PATCH", &url, Some(json!({"rollout": 1.0}))).await?;
    writeln!(
        out,
        "\ninfer-eu-1 tries to roll resnet50 out to 100%: PATCH -> {status} {body}"
    )?;
    // Give a write that should not travel the time it would have needed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut model_at_hubs_after = Vec::new();
    for hub in [&hub_eu, &hub_us] {
        let (_, doc) = http(
            "GET",
            &format!("{}/v1/docs/models/resnet50", hub.api()),
            None,
        )
        .await?;
        writeln!(
            out,
            "  {} still has rollout {}",
            hub.daemon.node.identity().node_id.as_str(),
            doc["rollout"]
        )?;
        model_at_hubs_after.push(doc);
    }

    for e in edges {
        e.stop().await;
    }
    hub_us.stop().await;
    hub_eu.stop().await;
    Ok(RegistryReport {
        model_at_edges,
        health_at_hubs,
        edge_write_to_models: status,
        model_at_hubs_after,
    })
}
