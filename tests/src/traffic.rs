//! Workloads for the traffic features (classes, caps, compression): realistic text, noise,
//! and an edge that catches up a backlog it wrote while offline.

use std::time::Duration;

use anyhow::{Context, Result};
use automerge::transaction::Transactable;
use serde_json::{json, Value};
use tidesync::model::{DocId, Namespace};
use tidesync::net::{Node, PeerCounts};
use tidesync::store::{Store, StoreConfig};
use tidesync::sync::Role;

use crate::cluster::{wait_until, Deployment, TestNode};
use crate::Rng;

/// A number below `n`.
fn below(rng: &mut Rng, n: usize) -> usize {
    rng.range(0, n as u64) as usize
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "rollout",
    "edge",
    "device",
    "reported",
    "a",
    "temperature",
    "of",
    "degrees",
    "while",
    "inference",
    "latency",
    "stayed",
    "under",
    "budget",
    "and",
    "the",
    "operator",
    "approved",
    "next",
    "stage",
    "after",
    "review",
    "sensor",
    "calibration",
    "drifted",
    "slightly",
    "during",
    "night",
    "shift",
    "so",
    "we",
    "scheduled",
    "maintenance",
    "for",
    "line",
    "three",
    "batch",
    "completed",
    "without",
    "errors",
    "but",
    "two",
    "units",
    "need",
    "firmware",
    "update",
    "before",
    "friday",
    "customer",
    "feedback",
    "mentions",
    "faster",
    "startup",
    "lower",
    "power",
    "draw",
    "in",
    "warehouse",
    "north",
    "region",
    "dataset",
    "version",
    "contains",
    "labelled",
    "images",
    "from",
    "cameras",
    "at",
    "dock",
];

/// Prose of about `len` bytes: sentences of common words with numbers, as notes,
/// descriptions and logs read.
pub fn realistic_text(rng: &mut Rng, len: usize) -> String {
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        let words = 6 + below(rng, 12);
        for w in 0..words {
            let word = WORDS[below(rng, WORDS.len())];
            if w == 0 {
                let mut c = word.chars();
                if let Some(first) = c.next() {
                    s.extend(first.to_uppercase());
                    s.push_str(c.as_str());
                }
            } else {
                s.push(' ');
                s.push_str(word);
            }
            if below(rng, 9) == 0 {
                s.push_str(&format!(" {}", below(rng, 10_000)));
            }
        }
        s.push_str(". ");
    }
    s
}

/// A saved Automerge document holding `len` random bytes (as a bytes value, which no
/// compression shrinks).
pub fn noise_doc(rng: &mut Rng, len: usize) -> Result<Vec<u8>> {
    let mut noise = vec![0u8; len];
    for chunk in noise.chunks_mut(8) {
        let r = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    let mut doc = automerge::AutoCommit::new();
    doc.put(
        automerge::ROOT,
        "payload",
        automerge::ScalarValue::Bytes(noise),
    )?;
    Ok(doc.save())
}

/// A JSON document of about 4 KB of realistic text: a record with a few short fields and
/// longer notes.
pub fn text_doc(rng: &mut Rng, i: usize) -> Value {
    let status = ["ok", "degraded", "maintenance"][below(rng, 3)];
    json!({
        "title": realistic_text(rng, 60),
        "device": format!("edge-{:04}", i % 97),
        "status": status,
        "summary": realistic_text(rng, 600),
        "notes": realistic_text(rng, 3000),
        "tags": ["line-3", "night", "calibration"],
    })
}

/// What a catch-up cost: the edge's counters for its hub once the hub holds everything.
#[derive(Debug, Clone)]
pub struct CatchUp {
    /// The edge's link to the hub.
    pub edge: PeerCounts,
    /// Documents caught up.
    pub docs: usize,
}

/// What an offline edge wrote before it catches up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// JSON documents of about 4 KB of realistic text.
    Text,
    /// Documents holding 4 KB of random bytes each (Automerge bytes values).
    Noise,
    /// Documents edited ten times each with short patches of text (a status, a reading, a
    /// note): many small changes, which Automerge leaves uncompressed (under 256 bytes).
    Edits,
}

/// An edge writes `docs` documents while offline, then catches up with a hub; both nodes
/// compress or not. Returns the edge's counters once the hub holds all of them.
pub async fn catch_up(docs: usize, backlog: Backlog, compress: bool) -> Result<CatchUp> {
    let d = Deployment::new()?;
    let mut hub_cfg = d.config("hub", Role::Hub, &[])?;
    hub_cfg.traffic.compress = compress;
    let hub = d.start("hub", hub_cfg)?;
    let mut cfg = d.config("edge", Role::Edge, &["*=rw"])?;
    cfg.traffic.compress = compress;
    cfg.dial = vec![hub.addr()];
    let path = d.dir().join("edge.redb");
    let store = Store::open(&path, StoreConfig::default())?;
    let ns = Namespace::new("notes")?;
    let mut rng = Rng::new(0x5eed);
    for i in 0..docs {
        let id = DocId::new(format!("n-{i:05}"))?;
        match backlog {
            Backlog::Text => {
                store.put(&ns, &id, text_doc(&mut rng, i), None).await?;
            }
            Backlog::Edits => {
                for k in 0..10 {
                    let status = ["ok", "degraded", "maintenance"][k % 3];
                    let patch = json!({
                        "status": status,
                        "reading": below(&mut rng, 10_000),
                        format!("note{}", k % 4): realistic_text(&mut rng, 80),
                    });
                    store.patch(&ns, &id, patch, None).await?;
                }
            }
            Backlog::Noise => {
                store.import(&ns, &id, noise_doc(&mut rng, 4096)?).await?;
            }
        }
    }
    let node = Node::start(store.clone(), cfg.clone())?;
    let edge = TestNode {
        node,
        store,
        path,
        cfg,
    };
    wait_until(
        Duration::from_secs(120),
        "the hub holds the backlog",
        || Ok(hub.store.list(&ns)?.len() == docs && link(&edge).is_ok_and(|c| c.lag == 0)),
    )
    .await?;
    let counts = link(&edge)?;
    edge.stop().await;
    hub.stop().await;
    Ok(CatchUp { edge: counts, docs })
}

/// A node's counters of its one connected peer.
pub fn link(node: &TestNode) -> Result<PeerCounts> {
    node.node
        .peers()
        .into_iter()
        .find(|p| p.connected)
        .map(|p| p.counts)
        .context("no connected peer")
}
