//! The soak run: a deployment of real processes under a seeded schedule of faults.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::proxy::{Impairment, Link};
use crate::procs::{Binaries, Proc};
use crate::Rng;

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// How long faults are injected; the run goes on until every kind was injected once.
    pub duration: Duration,
    /// Hubs (peered in a line through proxies), at least 1.
    pub hubs: usize,
    /// Edges, each with a proxied link to every hub.
    pub edges: usize,
    /// Seeds the fault schedule and the writers.
    pub seed: u64,
    /// How long a node may take to converge after a heal before the run counts it slow.
    pub converge_within: Duration,
}

/// What happened.
#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    /// Writes acknowledged (200) by some node.
    pub acked: u64,
    /// Acknowledged writes missing on some node at the end.
    pub lost: u64,
    /// Documents whose heads differ between nodes at the end.
    pub divergent: u64,
    /// Longest time from a heal to all nodes converged.
    pub max_converge_ms: u64,
    /// Heals that took longer than `converge_within` (or never converged).
    pub slow_heals: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Writes that got no acknowledgement (their node was down, stopped or cut off).
    pub unacknowledged: u64,
}

impl SoakReport {
    /// The report as the benchmark's JSON.
    pub fn to_json(&self, cfg: &SoakConfig) -> Value {
        json!({
            "minutes": (cfg.duration.as_secs_f64() / 60.0 * 100.0).round() / 100.0,
            "seed": cfg.seed,
            "hubs": cfg.hubs,
            "edges": cfg.edges,
            "acked": self.acked,
            "lost": self.lost,
            "divergent": self.divergent,
            "max_converge_ms": self.max_converge_ms,
            "slow_heals": self.slow_heals,
            "heals": self.faults.values().sum::<u64>(),
            "faults": self.faults,
            "unacknowledged": self.unacknowledged,
        })
    }
}

/// The kinds of fault, each injected in turn in a seeded order.
const FAULTS: [&str; 8] = [
    "delay",
    "loss",
    "reorder",
    "partition",
    "partition_one_way",
    "sigstop",
    "kill_edge",
    "kill_hub",
];

const NS: &str = "soak";

/// How a node is (re)started.
enum Role {
    Hub {
        data: String,
        listen: String,
        extra: Vec<String>,
    },
    Edge {
        name: String,
        hubs: Vec<SocketAddr>,
    },
}

struct Node {
    name: String,
    role: Role,
    proc: Mutex<Option<Proc>>,
    /// Its API base, which changes when it restarts.
    api: RwLock<String>,
    /// Writes that reached it and were acknowledged: (doc, field) → value.
    acked: Mutex<Vec<(String, String, u64)>>,
    unacked: AtomicU64,
}

impl Node {
    fn start(&self, d: &Binaries) -> Result<()> {
        let proc = match &self.role {
            Role::Hub {
                data,
                listen,
                extra,
            } => {
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                d.hub_at(data, listen, &extra)?
            }
            Role::Edge { name, hubs } => d.edge_at(name, hubs, &[])?,
        };
        if let Ok(mut api) = self.api.write() {
            *api = format!("http://{}", proc.api);
        }
        if let Ok(mut p) = self.proc.lock() {
            *p = Some(proc);
        }
        Ok(())
    }

    fn kill(&self) {
        if let Some(p) = self.proc.lock().ok().and_then(|mut p| p.take()) {
            p.kill();
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self
            .proc
            .lock()
            .ok()
            .and_then(|p| p.as_ref().map(Proc::pid))
        {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    fn url(&self, path: &str) -> String {
        let base = self.api.read().map(|a| a.clone()).unwrap_or_default();
        format!("{base}{path}")
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(2))
        .build()
}

impl Node {
    fn new(name: String, role: Role, proc: Proc) -> Arc<Self> {
        Arc::new(Self {
            name,
            role,
            api: RwLock::new(format!("http://{}", proc.api)),
            proc: Mutex::new(Some(proc)),
            acked: Mutex::new(Vec::new()),
            unacked: AtomicU64::new(0),
        })
    }
}

/// The deployment under test.
struct Cluster {
    d: Binaries,
    nodes: Vec<Arc<Node>>,
    hubs: usize,
    /// Every proxied link, named "edge-1->hub-0".
    links: Vec<(String, Link)>,
    /// The links that carry traffic when nothing fails: between hubs, and from each edge
    /// to the hub it prefers. Faults hit these three times in four.
    primary: Vec<usize>,
}

impl Cluster {
    fn start(cfg: &SoakConfig, rt: &tokio::runtime::Handle, rng: &mut Rng) -> Result<Self> {
        let d = Binaries::init()?;
        let mut nodes: Vec<Arc<Node>> = Vec::new();
        let mut links: Vec<(String, Link)> = Vec::new();
        let mut hub_addrs: Vec<SocketAddr> = Vec::new();
        let mut primary = Vec::new();
        for h in 0..cfg.hubs {
            let (data, mut extra) = if h == 0 {
                ("hub".to_owned(), Vec::new())
            } else {
                let name = format!("hub-{h}");
                let bundle = d.enroll(&name, "hub", &[])?;
                (name, vec!["--bundle".to_owned(), bundle])
            };
            if h > 0 {
                // Each hub peers with the one before it, through a link that can fail.
                let link = Link::start(rt, hub_addrs[h - 1], rng.next_u64())?;
                extra.extend(["--peer".to_owned(), link.listen.to_string()]);
                primary.push(links.len());
                links.push((format!("hub-{h}->hub-{}", h - 1), link));
            }
            let args: Vec<&str> = extra.iter().map(String::as_str).collect();
            let proc = d.hub_at(&data, "127.0.0.1:0", &args)?;
            // Restarts reuse the port the OS picked, so peers and proxies find it again.
            let listen = proc.quic.to_string();
            hub_addrs.push(proc.quic);
            let role = Role::Hub {
                data: data.clone(),
                listen,
                extra,
            };
            nodes.push(Node::new(format!("hub-{h}"), role, proc));
        }
        for e in 0..cfg.edges {
            let name = format!("edge-{e}");
            d.enroll(&name, "edge", &["*=rw"])?;
            // Each edge has its own link to every hub.
            let mut hubs = Vec::new();
            for k in 0..cfg.hubs {
                let h = (e + k) % cfg.hubs;
                let link = Link::start(rt, hub_addrs[h], rng.next_u64())?;
                hubs.push(link.listen);
                if k == 0 {
                    primary.push(links.len());
                }
                links.push((format!("{name}->hub-{h}"), link));
            }
            // The edge prefers the hub its rendezvous ranking puts first.
            let me = tidesync::model::NodeId::new(name.as_str())?;
            let first = tidesync::net::placement::rendezvous_order(&me, &hubs)[0];
            let at = hubs.iter().position(|h| *h == first).unwrap_or(0);
            let preferred = links.len() - hubs.len() + at;
            if let Some(p) = primary.last_mut() {
                *p = preferred;
            }
            let proc = d.edge_at(&name, &hubs, &[])?;
            let role = Role::Edge {
                name: name.clone(),
                hubs,
            };
            nodes.push(Node::new(name, role, proc));
        }
        Ok(Self {
            d,
            nodes,
            hubs: cfg.hubs,
            links,
            primary,
        })
    }

    /// Every node's documents of the soak namespace: id → heads; `None` if a node does not
    /// answer.
    fn heads(&self, agent: &ureq::Agent) -> Option<Vec<BTreeMap<String, String>>> {
        self.nodes
            .iter()
            .map(|n| {
                let list: Value = agent
                    .get(&n.url(&format!("/v1/docs/{NS}")))
                    .call()
                    .ok()?
                    .into_json()
                    .ok()?;
                Some(
                    list["docs"]
                        .as_array()?
                        .iter()
                        .filter_map(|d| {
                            Some((d["id"].as_str()?.to_owned(), d["heads"].to_string()))
                        })
                        .collect(),
                )
            })
            .collect()
    }

    /// Whether every node answers with the same documents and heads.
    fn converged(&self, agent: &ureq::Agent) -> bool {
        self.heads(agent)
            .is_some_and(|all| all.windows(2).all(|w| w[0] == w[1]))
    }

    /// Acknowledged writes missing somewhere, and documents whose heads differ.
    fn audit(&self, agent: &ureq::Agent) -> (u64, u64, u64) {
        let mut expected: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        let mut acked = 0;
        for n in &self.nodes {
            if let Ok(list) = n.acked.lock() {
                for (doc, field, value) in list.iter() {
                    acked += 1;
                    expected
                        .entry(doc.clone())
                        .or_default()
                        .push((field.clone(), *value));
                }
            }
        }
        let mut lost = 0;
        for n in &self.nodes {
            for (doc, fields) in &expected {
                let content: Option<Value> = agent
                    .get(&n.url(&format!("/v1/docs/{NS}/{doc}")))
                    .call()
                    .ok()
                    .and_then(|r| r.into_json().ok());
                for (field, value) in fields {
                    let there = content
                        .as_ref()
                        .is_some_and(|c| c[field.as_str()] == json!(value));
                    if !there {
                        lost += 1;
                    }
                }
            }
        }
        let divergent = match self.heads(agent) {
            Some(all) => {
                let ids: std::collections::BTreeSet<&String> =
                    all.iter().flat_map(|m| m.keys()).collect();
                ids.into_iter()
                    .filter(|id| all.windows(2).any(|w| w[0].get(*id) != w[1].get(*id)))
                    .count() as u64
            }
            None => expected.len() as u64,
        };
        (acked, lost, divergent)
    }
}

/// One writer per node: merge patches that each add a field of their own, so every
/// acknowledged write can be looked for at the end. Documents rotate every 20 s so none
/// grows without bound.
fn writer(node: Arc<Node>, seed: u64, pause: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    let agent = agent();
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if pause.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        n += 1;
        let doc = format!("d{}-{}", started.elapsed().as_secs() / 20, rng.range(0, 6));
        let field = format!("{}_{n}", node.name);
        let ok = agent
            .request("PATCH", &node.url(&format!("/v1/docs/{NS}/{doc}")))
            .send_json(json!({ field.clone(): n }))
            .is_ok();
        if ok {
            if let Ok(mut acked) = node.acked.lock() {
                acked.push((doc, field, n));
            }
        } else {
            node.unacked.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(rng.range(20, 80)));
    }
}

/// Runs the soak. Fails only if the deployment cannot be set up or a node cannot be
/// restarted; the promises are in the report.
pub fn run(cfg: &SoakConfig, progress: impl Fn(&str)) -> Result<SoakReport> {
    if cfg.hubs == 0 {
        bail!("a soak needs at least one hub");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut rng = Rng::new(cfg.seed);
    let cluster = Cluster::start(cfg, rt.handle(), &mut rng)?;
    let agent = agent();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.converged(&agent) {
        if Instant::now() > deadline {
            bail!("the deployment never came up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (pause, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let writers: Vec<_> = cluster
        .nodes
        .iter()
        .map(|n| {
            let (n, p, s, seed) = (n.clone(), pause.clone(), stop.clone(), rng.next_u64());
            std::thread::spawn(move || writer(n, seed, p, s))
        })
        .collect();

    let mut report = SoakReport::default();
    let started = Instant::now();
    let mut order: Vec<&'static str> = Vec::new();
    // At least one round: every kind is injected however short the run.
    while started.elapsed() < cfg.duration || report.faults.len() < FAULTS.len() {
        if order.is_empty() {
            order = FAULTS.to_vec();
            // A seeded shuffle: every kind once per round.
            for i in (1..order.len()).rev() {
                order.swap(i, rng.range(0, i as u64 + 1) as usize);
            }
        }
        let kind = order.pop().unwrap_or("delay");
        let hold = Duration::from_millis(rng.range(800, 3000));
        let what = inject(&cluster, kind, hold, &mut rng)?;
        *report.faults.entry(kind).or_default() += 1;
        // Writes stop while the heal is timed: convergence to a moving target says little.
        pause.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
        let healed = Instant::now();
        let limit = Duration::from_secs(30);
        while !cluster.converged(&agent) && healed.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(25));
        }
        let took = healed.elapsed();
        report.max_converge_ms = report.max_converge_ms.max(took.as_millis() as u64);
        if took > cfg.converge_within {
            report.slow_heals += 1;
        }
        progress(&format!(
            "{:>6.1}s {kind:<18} {what:<28} converged in {} ms",
            started.elapsed().as_secs_f64(),
            took.as_millis()
        ));
        pause.store(false, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(rng.range(300, 1200)));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.join();
    }
    // The final word: give the last writes time to spread, then look everywhere.
    let settle = Instant::now();
    while !cluster.converged(&agent) && settle.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (acked, lost, divergent) = cluster.audit(&agent);
    report.acked = acked;
    report.lost = lost;
    report.divergent = divergent;
    report.unacknowledged = cluster
        .nodes
        .iter()
        .map(|n| n.unacked.load(Ordering::Relaxed))
        .sum();
    for n in &cluster.nodes {
        n.kill();
    }
    drop(cluster.links);
    Ok(report)
}

/// Injects one fault of `kind` for `hold`, then heals it. Returns what was hit.
fn inject(c: &Cluster, kind: &str, hold: Duration, rng: &mut Rng) -> Result<String> {
    let pick = |rng: &mut Rng, len: usize| rng.range(0, len as u64) as usize;
    match kind {
        "delay" | "loss" | "reorder" | "partition" | "partition_one_way" => {
            let at = if !c.primary.is_empty() && rng.range(0, 4) > 0 {
                c.primary[pick(rng, c.primary.len())]
            } else {
                pick(rng, c.links.len())
            };
            let (name, link) = &c.links[at];
            let imp = match kind {
                "delay" => Impairment {
                    delay: Duration::from_millis(rng.range(50, 300)),
                    jitter: Duration::from_millis(rng.range(0, 50)),
                    ..Impairment::CLEAR
                },
                "loss" => Impairment {
                    loss: rng.range(10, 40) as f64 / 100.0,
                    ..Impairment::CLEAR
                },
                "reorder" => Impairment {
                    delay: Duration::from_millis(2),
                    jitter: Duration::from_millis(rng.range(10, 60)),
                    ..Impairment::CLEAR
                },
                "partition" => Impairment {
                    block_up: true,
                    block_down: true,
                    ..Impairment::CLEAR
                },
                _ => {
                    let up = rng.range(0, 2) == 0;
                    Impairment {
                        block_up: up,
                        block_down: !up,
                        ..Impairment::CLEAR
                    }
                }
            };
            link.set(imp);
            std::thread::sleep(hold);
            link.set(Impairment::CLEAR);
            Ok(name.clone())
        }
        "sigstop" => {
            let node = &c.nodes[pick(rng, c.nodes.len())];
            node.signal("-STOP");
            std::thread::sleep(hold);
            node.signal("-CONT");
            Ok(node.name.clone())
        }
        "kill_edge" | "kill_hub" => {
            let range = if kind == "kill_hub" {
                0..c.hubs
            } else {
                c.hubs..c.nodes.len()
            };
            if range.is_empty() {
                return Ok("none".into());
            }
            let node = &c.nodes[range.start + pick(rng, range.len())];
            node.kill();
            std::thread::sleep(hold);
            node.start(&c.d)
                .with_context(|| format!("restarting {}", node.name))?;
            Ok(node.name.clone())
        }
        other => bail!("unknown fault {other}"),
    }
}
