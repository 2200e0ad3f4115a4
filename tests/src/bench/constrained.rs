//! `constrained`: catch-up over a poor link. The real binaries, a hub and an edge in a
//! network namespace of its own, talk across [`crate::chaos::wire::Wire`] shaped as a long,
//! thin, lossy link (300 ms RTT, 1 Mbit/s, 10 % loss each way) and, in the same run, the
//! same link without loss. The edge writes 500 documents while the link is down; once it
//! is up, the time from the edge's connection to the hub holding all of them gives the
//! goodput (document bytes per second).

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use super::round2;
use crate::chaos::proxy::Impairment;
use crate::chaos::wire::{Carried, Shaping, Wire};
use crate::procs::{connected, status, Binaries};
use crate::traffic::text_doc;
use crate::Rng;

/// One catch-up over a link of this shape; returns (document bytes, seconds, link tally).
pub async fn catch_up_over(
    shaping: Shaping,
    shape: Impairment,
    docs: usize,
    edge_flags: &[&str],
) -> Result<(u64, f64, Value)> {
    let d = Binaries::init()?;
    let link = Wire::start_with(shaping, &tokio::runtime::Handle::current(), 42)?;
    link.set(Impairment {
        block_up: true,
        block_down: true,
        ..shape
    })?;
    let hub = d.hub_at("hub", &format!("{}:0", link.near), &[])?;
    d.enroll("edge", "edge", &["*=rw"])?;
    let edge = d.edge_across(&link, "edge", &[hub.quic], edge_flags)?;
    let mut rng = Rng::new(42);
    let mut bytes = 0u64;
    let agent = ureq::AgentBuilder::new().build();
    for i in 0..docs {
        let mut doc = text_doc(&mut rng, i);
        // About 1.5 KB each: a catch-up of a few seconds on a clean 1 Mbit/s link.
        if let Some(notes) = doc.get_mut("notes") {
            *notes = json!(notes
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(800)
                .collect::<String>());
        }
        let body = doc.to_string();
        bytes += body.len() as u64;
        agent
            .put(&edge.url(&format!("/v1/docs/notes/n{i:04}")))
            .set("content-type", "application/json")
            .send_string(&body)?;
    }
    link.set(shape)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !connected(&hub, "edge") {
        anyhow::ensure!(Instant::now() < deadline, "the edge never connected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    while status(&hub)["docs"].as_u64().unwrap_or(0) < docs as u64 {
        anyhow::ensure!(Instant::now() < deadline, "the catch-up did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let (up, down): (Carried, Carried) = link.carried()?;
    let tally = json!({
        "up_dropped": up.dropped,
        "down_dropped": down.dropped,
        "up_bytes": up.bytes,
        "down_bytes": down.bytes,
    });
    drop(edge);
    drop(hub);
    Ok((bytes, secs, tally))
}

/// The scenario: `docs` documents over 300 ms RTT and 1 Mbit/s, with 10 % loss and
/// without, the edge sending with BBR (`--congestion bbr`, for such links); and with
/// 10 % loss under the default CUBIC, to show what the setting is for.
pub async fn run(docs: usize, shaping: Shaping) -> Result<Value> {
    let rtt = Duration::from_millis(300);
    let bbr = ["--congestion", "bbr"];
    let (bytes, clean_s, clean_tally) =
        catch_up_over(shaping, Impairment::thin(rtt, 0.0, 1_000_000), docs, &bbr).await?;
    let (_, lossy_s, lossy_tally) =
        catch_up_over(shaping, Impairment::thin(rtt, 0.10, 1_000_000), docs, &bbr).await?;
    let (_, cubic_s, _) =
        catch_up_over(shaping, Impairment::thin(rtt, 0.10, 1_000_000), docs, &[]).await?;
    let clean = bytes as f64 / 1000.0 / clean_s;
    let lossy = bytes as f64 / 1000.0 / lossy_s;
    let cubic = bytes as f64 / 1000.0 / cubic_s;
    Ok(json!({
        "cubic_lossy_kb_s": round2(cubic),
        "cubic_ratio": round2(cubic / clean),
        "docs": docs,
        "doc_bytes": bytes,
        "clean_s": round2(clean_s),
        "lossy_s": round2(lossy_s),
        "clean_kb_s": round2(clean),
        "lossy_kb_s": round2(lossy),
        "ratio": round2(lossy / clean),
        "link_kb_s": 125.0,
        "link": shaping.to_string(),
        "clean_link": clean_tally,
        "lossy_link": lossy_tally,
    }))
}
