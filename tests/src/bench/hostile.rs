//! `hostile`: a hub process under attack while honest edges sync through it.
//!
//! One read-only peer floods the hub with `flood_mb` of valid-looking sync frames (each
//! carries a change it may not write) and never reads what the hub sends back; a second
//! peer keeps sending the Bloom-filter and nesting-depth attacks, reconnecting after each
//! refusal. Meanwhile edge A writes one document at a time and each write is timed until
//! edge B (through the hub) has committed it; the same is measured before the attack. The
//! figures: the hub's resident-memory growth during the attack, the honest p99 with and
//! without it, and whether the hub still answers afterwards.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use automerge::sync::{BloomFilter, Have, State, SyncDoc};
use automerge::transaction::Transactable;
use serde_json::{json, Value};
use tidesync::model::{DocId, Grant, Namespace, NodeId};
use tidesync::net::{Bundle, Ca, Node, NodeConfig};
use tidesync::store::{FeedSeq, Store, StoreConfig};
use tidesync::sync::{Message, Role};

use super::scale::{hub_with_ca, rss_kb};
use super::{percentile, round2};
use crate::cluster::wait_until;
use crate::rogue::{hello, Rogue};

/// Timed honest writes before the attack, and at least as many during it.
const HONEST_WRITES: usize = 200;
/// Attacking connections at once.
const ATTACKERS: usize = 8;
/// Size of one flood frame's change.
const FLOOD_FRAME: usize = 64 << 10;

/// Incompressible text of `len` letters from `seed`.
pub fn noise(len: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// A sync message for `{ns}/{id}` carrying one new change of about `len` bytes of
/// incompressible text: real content, for a peer granted `rw`.
pub fn sync_with_change(ns: &str, id: &str, len: usize, seed: u64) -> Result<Message> {
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    tx.put(automerge::ROOT, "blob", noise(len, seed))?;
    tx.commit();
    let mut msg = automerge::Automerge::new()
        .generate_sync_message(&mut State::new())
        .context("a first message")?;
    msg.changes = doc
        .get_changes(&[])
        .into_iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect::<Vec<_>>()
        .into();
    Ok(Message::Sync {
        ns: ns.into(),
        id: id.into(),
        data: msg.encode(),
    })
}

/// A Bloom attack: `bytes` is the filter (entries, bits per entry, probes, bits).
fn bloom_attack(bytes: &[u8]) -> Result<Message> {
    let bloom = BloomFilter::try_from(bytes)?;
    let mut msg = automerge::Automerge::new()
        .generate_sync_message(&mut State::new())
        .context("a first message")?;
    msg.have = vec![Have {
        last_sync: Vec::new(),
        bloom,
    }];
    Ok(Message::Sync {
        ns: "telemetry".into(),
        id: "bloom".into(),
        data: msg.encode(),
    })
}

/// The depth attack: a document nested 100,000 levels, sent whole.
fn depth_attack() -> Result<Message> {
    let mut deep = automerge::Automerge::new();
    let mut tx = deep.transaction();
    let mut obj = automerge::ROOT;
    for _ in 0..100_000 {
        obj = tx.put_object(&obj, "a", automerge::ObjType::Map)?;
    }
    tx.commit();
    let mut state = tidesync::sync::warm_sync_state(State::new());
    let msg = deep
        .generate_sync_message(&mut state)
        .context("a first message")?;
    Ok(Message::Sync {
        ns: "telemetry".into(),
        id: "deep".into(),
        data: msg.encode(),
    })
}

/// An in-process edge dialing `hub`.
fn edge(
    ca: &Ca,
    dir: &std::path::Path,
    name: &str,
    hub: std::net::SocketAddr,
) -> Result<(Node, Store)> {
    let grants: Vec<Grant> = vec!["*=rw".parse()?];
    let mut cfg = NodeConfig::new(ca.issue(&NodeId::new(name)?, Role::Edge, &grants)?);
    cfg.dial = vec![hub];
    cfg.failover = true;
    cfg.min_backoff = Duration::from_millis(20);
    let store = Store::open(dir.join(format!("{name}.redb")), StoreConfig::default())?;
    Ok((Node::start(store.clone(), cfg)?, store))
}

/// Times `writes` writes at A, each until B has committed it; keeps going while `more`.
async fn honest_latencies(
    a: &Store,
    b: &Store,
    writes: usize,
    more: impl Fn() -> bool,
) -> Result<Vec<Duration>> {
    let ns = Namespace::new("honest")?;
    let mut feed = b.subscribe();
    let mut out = Vec::with_capacity(writes);
    let mut k = 0;
    while out.len() < writes || more() {
        let before: FeedSeq = b.last_seq();
        let id = DocId::new(format!("doc-{}", k % 10))?;
        let started = Instant::now();
        a.patch(&ns, &id, json!({ "n": k }), None).await?;
        tokio::time::timeout(Duration::from_secs(30), feed.wait_for(|s| *s > before))
            .await
            .context("an honest write did not arrive within 30 s")?
            .context("store closed")?;
        out.push(started.elapsed());
        k += 1;
    }
    Ok(out)
}

/// Whether a close is the hub refusing a peer that broke the protocol a moment before.
fn is_penalty(closed: &quinn::ConnectionError) -> bool {
    matches!(closed, quinn::ConnectionError::ApplicationClosed(c)
        if c.error_code == tidesync::net::driver::CLOSE_PENALIZED.into())
}

/// Connects as `bundle`'s node, past the hello.
async fn connect(bundle: &Bundle, hub: std::net::SocketAddr, name: &str) -> Result<Rogue> {
    let mut r = Rogue::connect(bundle, hub).await?;
    r.send(&hello(name, Role::Edge)).await?;
    Ok(r)
}

/// The attacking side, run as its own process by [`hostile`]: floods `flood_mb` MiB as
/// the read-only peer of `flood_bundle` while the peer of `attack_bundle` keeps sending
/// the Bloom and depth attacks, until the flood is done. Returns its figures.
pub async fn attacker(
    hub: std::net::SocketAddr,
    flood_bundle: &std::path::Path,
    attack_bundle: &std::path::Path,
    flood_mb: u64,
) -> Result<Value> {
    let flood_bundle = Bundle::read(flood_bundle)?;
    let attack_bundle = Bundle::read(attack_bundle)?;
    let stop = Arc::new(AtomicBool::new(false));
    let frames: Vec<Message> = (0..16)
        .map(|i| sync_with_change("telemetry", &format!("flood-{i}"), FLOOD_FRAME, i))
        .collect::<Result<_>>()?;
    let frame_bytes = frames.iter().map(|f| f.encode().len() as u64).sum::<u64>() / 16;
    let total_frames = (flood_mb << 20) / frame_bytes;
    let attacks = [
        // Zero bits per entry: a division by zero in Automerge.
        bloom_attack(&[1, 0, 7])?,
        // 2^30 probes: gigabytes allocated.
        bloom_attack(&[1, 10, 0x80, 0x80, 0x80, 0x80, 0x04, 0xff, 0xff])?,
        depth_attack()?,
    ];
    // Several at once: the hub holds each refused connection up to a second for its error
    // to be read, and one attacker in turn would attack once a second.
    let attacks = Arc::new(attacks);
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|k| {
            let (stop, attacks, attack_bundle) =
                (stop.clone(), attacks.clone(), attack_bundle.clone());
            tokio::spawn(async move {
                let (mut sent, mut refused, mut penalized) = (0u64, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let attack = &attacks[(sent as usize + k) % attacks.len()];
                    sent += 1;
                    match Rogue::connect(&attack_bundle, hub).await {
                        Ok(mut r) => {
                            let _ = r.send(&hello("attacker", Role::Edge)).await;
                            let _ = r.send(attack).await;
                            match tokio::time::timeout(Duration::from_secs(5), r.conn.closed())
                                .await
                            {
                                Ok(closed) if is_penalty(&closed) => penalized += 1,
                                Ok(_) => refused += 1,
                                Err(_) => {}
                            }
                        }
                        Err(e) => match e.downcast_ref::<quinn::ConnectionError>() {
                            Some(closed) if is_penalty(closed) => penalized += 1,
                            _ => sent -= 1,
                        },
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (sent, refused, penalized)
            })
        })
        .collect();
    let started = Instant::now();
    let mut r = connect(&flood_bundle, hub, "flooder").await?;
    for i in 0..total_frames {
        r.send(&frames[i as usize % frames.len()]).await?;
    }
    let flood_time = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut attacks_sent, mut attacks_refused, mut attacks_penalized) = (0, 0, 0);
    for a in attackers {
        let (sent, refused, penalized) = a.await?;
        attacks_sent += sent;
        attacks_refused += refused;
        attacks_penalized += penalized;
    }
    drop(r);
    Ok(json!({
        "flood_mb": round2((total_frames * frame_bytes) as f64 / f64::from(1 << 20)),
        "flood_seconds": round2(flood_time.as_secs_f64()),
        "attacks_sent": attacks_sent,
        "attacks_refused": attacks_refused,
        "attacks_penalized": attacks_penalized,
    }))
}

/// Runs the scenario with a flood of `flood_mb` MiB.
pub async fn hostile(flood_mb: u64) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let (hub, ca) = hub_with_ca(dir.path())?;
    let (a_node, a) = edge(&ca, dir.path(), "edge-a", hub.quic)?;
    let (b_node, b) = edge(&ca, dir.path(), "edge-b", hub.quic)?;
    wait_until(Duration::from_secs(20), "edges connected", || {
        Ok([&a_node, &b_node]
            .iter()
            .all(|n| n.peers().iter().any(|p| p.connected)))
    })
    .await?;
    // Warm up, then the quiet baseline.
    honest_latencies(&a, &b, 20, || false).await?;
    let mut idle = honest_latencies(&a, &b, HONEST_WRITES, || false).await?;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kb(hub.pid())?;
    let rss_max = Arc::new(AtomicU64::new(rss_before));
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = Arc::new(AtomicBool::new(true));

    let sampler = {
        let (rss_max, stop, pid) = (rss_max.clone(), stop.clone(), hub.pid());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(kb) = rss_kb(pid) {
                    rss_max.fetch_max(kb, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // The attackers run in their own process at the lowest CPU priority: on a real
    // network their CPU is their own machine's, not shared with the hub and the honest
    // edges; here the two cores are shared, and what they spend encrypting their flood
    // would otherwise be charged to the honest latency. The hub's own work on the attack
    // keeps its normal priority.
    let flood_bundle = dir.path().join("flooder.pem");
    std::fs::write(
        &flood_bundle,
        ca.issue(
            &NodeId::new("flooder")?,
            Role::Edge,
            &["telemetry=ro".parse()?],
        )?
        .to_pem(),
    )?;
    let attack_bundle = dir.path().join("attacker.pem");
    std::fs::write(
        &attack_bundle,
        ca.issue(
            &NodeId::new("attacker")?,
            Role::Edge,
            &["telemetry=rw".parse()?],
        )?
        .to_pem(),
    )?;
    let mut child = std::process::Command::new("nice")
        .args(["-n", "19"])
        .arg(std::env::current_exe()?)
        .arg("hostile-attacker")
        .arg("--attack-hub")
        .arg(hub.quic.to_string())
        .arg("--flood-bundle")
        .arg(&flood_bundle)
        .arg("--attack-bundle")
        .arg(&attack_bundle)
        .arg("--flood-mb")
        .arg(flood_mb.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the attacker process (nice)")?;
    let stdout = child.stdout.take().context("the attacker's stdout")?;
    let report = {
        let flooding = flooding.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let last = std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .last();
            flooding.store(false, Ordering::Relaxed);
            last
        })
    };

    let during = {
        let flooding = flooding.clone();
        honest_latencies(&a, &b, HONEST_WRITES, move || {
            flooding.load(Ordering::Relaxed)
        })
        .await
    };
    let last_line = report
        .join()
        .map_err(|_| anyhow::anyhow!("the attacker's reader panicked"))?;
    let exit = child.wait()?;
    stop.store(true, Ordering::Relaxed);
    sampler.await?;
    let mut during = during?;
    anyhow::ensure!(exit.success(), "the attacker process failed: {exit}");
    let attack: Value = serde_json::from_str(&last_line.context("no report from the attacker")?)?;

    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    let hub_up = agent
        .get(&hub.url("/v1/status"))
        .call()
        .is_ok_and(|r| r.status() == 200);
    a_node.shutdown().await;
    b_node.shutdown().await;
    drop(hub);

    let ms = |d: Duration| round2(d.as_secs_f64() * 1000.0);
    let (p99, idle_p99) = (percentile(&mut during, 99.0), percentile(&mut idle, 99.0));
    let growth_kb = rss_max.load(Ordering::Relaxed).saturating_sub(rss_before);
    Ok(json!({
        "flood_mb": attack["flood_mb"],
        "flood_seconds": attack["flood_seconds"],
        "attacks_sent": attack["attacks_sent"],
        "attacks_refused": attack["attacks_refused"],
        "attacks_penalized": attack["attacks_penalized"],
        "hub_rss_before_mb": round2(rss_before as f64 / 1024.0),
        "rss_growth_mb": round2(growth_kb as f64 / 1024.0),
        "honest_writes": during.len(),
        "honest_p99_ms": ms(p99),
        "honest_idle_p99_ms": ms(idle_p99),
        "honest_p50_ms": ms(percentile(&mut during, 50.0)),
        "honest_idle_p50_ms": ms(percentile(&mut idle, 50.0)),
        "p99_ratio": if idle_p99.is_zero() { 0.0 } else { round2(p99.as_secs_f64() / idle_p99.as_secs_f64()) },
        "hub_up": hub_up,
    }))
}
