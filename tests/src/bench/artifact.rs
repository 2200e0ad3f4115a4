//! `artifact`: a large blob (1 GiB by default) from a hub process to an edge process over
//! loopback, against the raw limit measured in the same run: the same bytes over one
//! plain quinn stream, written to a file and fsynced. Also: the memory growth of both
//! processes during the transfer; a document write at the edge during the transfer,
//! timed until the hub has it, against the same without a transfer; an edge killed with
//! SIGKILL at about half the blob, restarted, and the bytes it then receives against the
//! bytes it was missing; the fan-out of a blob to 10 edges; and a CSV dataset, which
//! blob streams compress: its rate and the bytes on the wire against its size.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::scale::rss_kb;
use super::{micros, percentile, round2};
use crate::blob_files::{noise_file, same_files, telemetry_csv_file};
use crate::procs::{connected, status, Binaries, Proc};

const MIB: u64 = 1 << 20;

/// Settings of one run.
#[derive(Clone, Copy, Debug)]
pub struct ArtifactConfig {
    /// MiB of the blob sent hub → edge.
    pub blob_mb: u64,
    /// Edges of the fan-out.
    pub fanout_edges: usize,
    /// MiB of the blob fanned out.
    pub fanout_mb: u64,
    /// MiB of the CSV dataset sent hub → edge after the blob.
    pub dataset_mb: u64,
}

fn wait(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let started = Instant::now();
    while !check()? {
        if started.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(started.elapsed())
}

fn holds(p: &Proc, hash: &str) -> bool {
    ureq::head(&p.url(&format!("/v1/blobs/{hash}")))
        .call()
        .is_ok_and(|r| r.header("x-tidesync-blob") == Some("held"))
}

fn blobs_status(p: &Proc) -> Value {
    status(p)["blobs"].clone()
}

/// Streams `file` into the node as a blob; its hash.
fn put(node: &Proc, file: &Path) -> Result<String> {
    let f = std::fs::File::open(file)?;
    let v: Value = ureq::put(&node.url("/v1/blobs"))
        .set("Content-Type", "application/octet-stream")
        .send(std::io::BufReader::with_capacity(1 << 20, f))?
        .into_json()?;
    v["hash"].as_str().map(str::to_owned).context("no hash")
}

fn reference(node: &Proc, ns: &str, hash: &str, size: u64) -> Result<()> {
    ureq::put(&node.url(&format!("/v1/docs/{ns}/model")))
        .send_json(json!({"weights": {"@blob": hash, "size": size}}))?;
    Ok(())
}

/// One write at `edge`, timed until `hub` serves it.
fn live_write(edge: &Proc, hub: &Proc, i: u64) -> Result<Duration> {
    live_write_at(edge.api, hub.api, "live", i)
}

/// The raw limit: `file` over one plain quinn stream on loopback, written to `out` and
/// fsynced. Seconds.
async fn raw_quinn(file: &Path, out: &Path) -> Result<f64> {
    let (server, client) = super::raw_path::loopback_endpoints()?;
    let addr = server.local_addr()?;
    let out = out.to_owned();
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let mut recv = conn.accept_uni().await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
        let writer = std::thread::spawn(move || -> Result<()> {
            let mut f = std::fs::File::create(&out)?;
            while let Some(chunk) = rx.blocking_recv() {
                f.write_all(&chunk)?;
            }
            f.sync_all()?;
            Ok(())
        });
        while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
            tx.send(chunk.bytes).await?;
        }
        drop(tx);
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        anyhow::Ok(())
    });
    let started = Instant::now();
    let conn = client.connect(addr, "localhost")?.await?;
    let mut send = conn.open_uni().await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let path = file.to_owned();
    let reader = std::thread::spawn(move || -> Result<()> {
        let mut f = std::fs::File::open(path)?;
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            tx.blocking_send(buf)?;
        }
    });
    while let Some(buf) = rx.recv().await {
        send.write_all(&buf).await?;
    }
    send.finish()?;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    receiver.await??;
    let secs = started.elapsed().as_secs_f64();
    conn.close(0u32.into(), b"done");
    Ok(secs)
}

/// Samples the peak RSS of `pids` every 20 ms until `stop`.
fn sample_rss(pids: Vec<u32>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let peaks: Vec<AtomicU64> = pids.iter().map(|_| AtomicU64::new(0)).collect();
        while !stop.load(Ordering::Relaxed) {
            for (pid, peak) in pids.iter().zip(&peaks) {
                if let Ok(kb) = rss_kb(*pid) {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peaks.iter().map(|p| p.load(Ordering::Relaxed)).collect()
    })
}

/// Runs the scenario.
pub async fn run(cfg: ArtifactConfig) -> Result<Value> {
    let d = Binaries::init()?;
    let size = cfg.blob_mb * MIB;
    let file = Path::new(&d.path("weights.bin")).to_owned();
    noise_file(&file, size, 42)?;

    // The raw limit, in the same run.
    let raw_out = Path::new(&d.path("raw.bin")).to_owned();
    let raw_secs = raw_quinn(&file, &raw_out).await?;
    std::fs::remove_file(&raw_out)?;
    let limit_mb_s = size as f64 / MIB as f64 / raw_secs;

    let hub = d.hub(&[])?;
    // Only edge-1 reads the dataset: edge-2's resume counts the weights alone.
    d.enroll("edge-1", "edge", &["models=rw", "live=rw", "datasets=rw"])?;
    d.enroll("edge-2", "edge", &["models=rw", "live=rw"])?;
    let put_started = Instant::now();
    let hash = tokio::task::block_in_place(|| put(&hub, &file))?;
    let put_mb_s = size as f64 / MIB as f64 / put_started.elapsed().as_secs_f64();

    let edge = d.edge("edge-1", &[&hub], &[])?;
    tokio::task::block_in_place(|| -> Result<()> {
        wait("edge-1 connected", Duration::from_secs(20), || {
            Ok(connected(&hub, "edge-1"))
        })?;
        for i in 0..10 {
            live_write(&edge, &hub, i)?;
        }
        Ok(())
    })?;
    let mut idle = Vec::new();
    for i in 10..210 {
        idle.push(tokio::task::block_in_place(|| live_write(&edge, &hub, i))?);
    }
    let idle_p99 = percentile(&mut idle, 99.0);

    // The transfer, with live writes and memory sampled alongside.
    let rss_before = (rss_kb(hub.pid())?, rss_kb(edge.pid())?);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(vec![hub.pid(), edge.pid()], stop.clone());
    let live: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let writer = {
        let (stop, live) = (stop.clone(), live.clone());
        let (edge, hub) = (edge.api, hub.api);
        std::thread::spawn(move || {
            let mut i = 1000;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(t) = live_write_at(edge, hub, "live", i) {
                    if let Ok(mut l) = live.lock() {
                        l.push(t);
                    }
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = Instant::now();
    reference(&hub, "models", &hash, size)?;
    tokio::task::block_in_place(|| {
        wait("the blob at edge-1", Duration::from_secs(600), || {
            Ok(holds(&edge, &hash))
        })
    })?;
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let peaks = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    let _ = writer.join();
    let throughput_mb_s = size as f64 / MIB as f64 / secs;
    let rss_growth_mb = peaks[0]
        .saturating_sub(rss_before.0)
        .max(peaks[1].saturating_sub(rss_before.1)) as f64
        / 1024.0;
    let mut during = live.lock().map(|l| l.clone()).unwrap_or_default();
    let live_samples = during.len();
    let live_p99 = percentile(&mut during, 99.0);
    let copy = Path::new(&d.path("edge-1"))
        .join("blobs")
        .join(format!("{hash}.data"));
    let identical = tokio::task::block_in_place(|| same_files(&file, &copy))?;
    if !identical {
        bail!("the edge's copy differs from the blob");
    }
    let dataset = tokio::task::block_in_place(|| dataset(&d, &hub, &edge, cfg.dataset_mb))?;
    drop(edge);

    // Resume: killed at about half, restarted.
    let edge2 = d.edge("edge-2", &[&hub], &[])?;
    let mut at_kill = 0;
    tokio::task::block_in_place(|| {
        wait("half the blob at edge-2", Duration::from_secs(600), || {
            at_kill = blobs_status(&edge2)["transfers"][0]["done"]
                .as_u64()
                .unwrap_or(0);
            Ok(at_kill >= size / 2)
        })
    })?;
    edge2.kill();
    let edge2 = d.edge("edge-2", &[&hub], &[])?;
    tokio::task::block_in_place(|| {
        wait(
            "the blob at the restarted edge-2",
            Duration::from_secs(600),
            || Ok(holds(&edge2, &hash)),
        )
    })?;
    let st = blobs_status(&edge2);
    let resumed = st["resumed_bytes"].as_u64().unwrap_or(0);
    let received = st["received_bytes"].as_u64().unwrap_or(0);
    let missing = size.saturating_sub(resumed).max(1);
    let resume_extra_ratio = received as f64 / missing as f64 - 1.0;
    drop(edge2);

    // Fan-out of another blob to `fanout_edges` edges at once.
    let fan_size = cfg.fanout_mb * MIB;
    let fan_file = Path::new(&d.path("shard.bin")).to_owned();
    noise_file(&fan_file, fan_size, 43)?;
    let fan_hash = tokio::task::block_in_place(|| put(&hub, &fan_file))?;
    let mut fans = Vec::new();
    for i in 0..cfg.fanout_edges {
        let name = format!("fan-{i}");
        d.enroll(&name, "edge", &["fanout=rw"])?;
        fans.push(d.edge(&name, &[&hub], &[])?);
    }
    tokio::task::block_in_place(|| {
        wait(
            "the fan-out edges connected",
            Duration::from_secs(30),
            || Ok((0..cfg.fanout_edges).all(|i| connected(&hub, &format!("fan-{i}")))),
        )
    })?;
    let started = Instant::now();
    reference(&hub, "fanout", &fan_hash, fan_size)?;
    tokio::task::block_in_place(|| {
        wait(
            "the blob at every fan-out edge",
            Duration::from_secs(900),
            || Ok(fans.iter().all(|f| holds(f, &fan_hash))),
        )
    })?;
    let fan_secs = started.elapsed().as_secs_f64();

    Ok(json!({
        "blob_mb": cfg.blob_mb,
        "throughput_mb_s": round2(throughput_mb_s),
        "limit_mb_s": round2(limit_mb_s),
        "ratio": round2(throughput_mb_s / limit_mb_s),
        "put_mb_s": round2(put_mb_s),
        "rss_growth_mb": round2(rss_growth_mb),
        "live_write_p99_us": micros(live_p99),
        "idle_write_p99_us": micros(idle_p99),
        "live_p99_ratio": round2(live_p99.as_secs_f64() / idle_p99.as_secs_f64().max(1e-9)),
        "live_writes": live_samples,
        "resume_at_mb": round2(at_kill as f64 / MIB as f64),
        "resumed_mb": round2(resumed as f64 / MIB as f64),
        "resume_received_mb": round2(received as f64 / MIB as f64),
        "resume_extra_ratio": (resume_extra_ratio * 10_000.0).round() / 10_000.0,
        "fanout_edges": cfg.fanout_edges,
        "fanout_mb": cfg.fanout_mb,
        "fanout_seconds": round2(fan_secs),
        "fanout_mb_s": round2(fan_size as f64 / MIB as f64 * cfg.fanout_edges as f64 / fan_secs),
        "dataset_mb": cfg.dataset_mb,
        "dataset_mb_s": round2(dataset.mb_s),
        "dataset_wire_ratio": (dataset.wire_ratio * 1000.0).round() / 1000.0,
    }))
}

/// What sending the dataset cost.
struct Dataset {
    /// MiB per second, reference to verified copy at the edge.
    mb_s: f64,
    /// Blob stream bytes the edge received over the dataset's size.
    wire_ratio: f64,
}

/// A CSV dataset of `mb` MiB put at `hub` and fetched by `edge`, compared byte for byte.
fn dataset(d: &Binaries, hub: &Proc, edge: &Proc, mb: u64) -> Result<Dataset> {
    let size = mb * MIB;
    let file = Path::new(&d.path("telemetry.csv")).to_owned();
    telemetry_csv_file(&file, size, 44)?;
    let hash = put(hub, &file)?;
    let received = || blobs_status(edge)["received_bytes"].as_u64().unwrap_or(0);
    let before = received();
    let started = Instant::now();
    reference(hub, "datasets", &hash, size)?;
    wait("the dataset at the edge", Duration::from_secs(600), || {
        Ok(holds(edge, &hash))
    })?;
    let secs = started.elapsed().as_secs_f64();
    let copy = Path::new(&d.path("edge-1"))
        .join("blobs")
        .join(format!("{hash}.data"));
    if !same_files(&file, &copy)? {
        bail!("the edge's copy differs from the dataset");
    }
    Ok(Dataset {
        mb_s: mb as f64 / secs,
        wire_ratio: received().saturating_sub(before) as f64 / size as f64,
    })
}

/// One write at the edge API `edge`, timed until the hub API `hub` serves it.
pub fn live_write_at(
    edge: std::net::SocketAddr,
    hub: std::net::SocketAddr,
    ns: &str,
    i: u64,
) -> Result<Duration> {
    Ok(live_write_timed(edge, hub, ns, i)?.arrived)
}

/// How long a live write took: to be acknowledged by the edge, and to be served by the
/// hub (both from the write).
#[derive(Clone, Copy, Debug)]
pub struct LiveWrite {
    /// Until the edge's API answered the write (its commit).
    pub acked: Duration,
    /// Until the hub served it.
    pub arrived: Duration,
}

/// [`live_write_at`], with the edge's own part of the time.
pub fn live_write_timed(
    edge: std::net::SocketAddr,
    hub: std::net::SocketAddr,
    ns: &str,
    i: u64,
) -> Result<LiveWrite> {
    let started = Instant::now();
    ureq::put(&format!("http://{edge}/v1/docs/{ns}/w")).send_json(json!({ "i": i }))?;
    let acked = started.elapsed();
    loop {
        if let Ok(r) = ureq::get(&format!("http://{hub}/v1/docs/{ns}/w")).call() {
            let v: Value = r.into_json()?;
            if v["i"] == i {
                return Ok(LiveWrite {
                    acked,
                    arrived: started.elapsed(),
                });
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("a live write did not reach the hub in 30 s");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}
