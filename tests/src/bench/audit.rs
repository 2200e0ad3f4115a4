//! `audit`: two hubs sharing 100,000 documents, with 0, 10 and 1,000 differences the feed
//! walk cannot see; one audit each. Reports what it found and repaired, its round trips,
//! bytes and time, and the bytes of the least a one-way list of the differing documents
//! would take (their id and heads), against which the audit's bytes compare.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Map, Value};
use tidesync::model::NodeId;
use tidesync::sync::Role;

use crate::audit_pair::{differing, diverge, fill};
use crate::cluster::{start_at, wait_until, Deployment};

/// Runs the three cases over `docs` shared documents.
pub async fn run(docs: usize) -> Result<Value> {
    let d = Deployment::new()?;
    let dir = tempfile::tempdir()?;
    let (a_id, b_id) = (NodeId::new("hub-a")?, NodeId::new("hub-b")?);
    let (base_a, base_b) = (
        dir.path().join("base-a.redb"),
        dir.path().join("base-b.redb"),
    );
    println!("audit: filling two stores with {docs} shared documents");
    fill(&base_a, &base_b, docs).await?;
    let mut out = Map::new();
    for case in [0usize, 10, 1000] {
        let (pa, pb) = (
            dir.path().join(format!("a-{case}.redb")),
            dir.path().join(format!("b-{case}.redb")),
        );
        std::fs::copy(&base_a, &pa)?;
        std::fs::copy(&base_b, &pb)?;
        let hidden = diverge(&pa, &a_id, &pb, &b_id, docs, case).await?;
        let b = start_at(pb, d.config("hub-b", Role::Hub, &[])?)?;
        let mut cfg = d.config("hub-a", Role::Hub, &[])?;
        cfg.dial = vec![b.addr()];
        let a = start_at(pa, cfg)?;
        wait_until(Duration::from_secs(20), "the hubs connected", || {
            Ok(a.node.peers().iter().any(|p| p.connected))
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensure!(
            differing(&a.store, &b.store)? == hidden,
            "the differences were there before the audit"
        );
        let report = a
            .node
            .audit(&b_id, Vec::new(), Duration::from_secs(600))
            .await?;
        let left = differing(&a.store, &b.store)?;
        ensure!(left.is_empty(), "{} documents still differ", left.len());
        // The least a list of the differing documents would take: id and heads (one head
        // each here).
        let listed: usize = hidden.iter().map(|id| id.len() + 32).sum();
        let ratio = if listed == 0 {
            0.0
        } else {
            report.bytes as f64 / listed as f64
        };
        println!(
            "{case:>5} differences: found {}, repaired {}, {} round trips, {} bytes ({:.2}× the list of {} bytes), {} ms",
            report.differing, report.repaired, report.rounds, report.bytes, ratio, listed, report.ms
        );
        ensure!(
            report.differing == case as u64 && report.repaired == case as u64,
            "found {} and repaired {} of {case}",
            report.differing,
            report.repaired
        );
        out.insert(
            case.to_string(),
            json!({
                "differing": report.differing,
                "repaired": report.repaired,
                "rounds": report.rounds,
                "bytes": report.bytes,
                "ms": report.ms,
                "compared": report.compared,
                "list_bytes": listed,
                "bytes_to_list": (ratio * 100.0).round() / 100.0,
            }),
        );
        a.stop().await;
        b.stop().await;
    }
    out.insert("docs".into(), Value::from(docs));
    Ok(Value::Object(out))
}
