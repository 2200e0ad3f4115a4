//! In-process deployments over real QUIC on 127.0.0.1: a CA, hubs and edges with their own
//! redb files in a temporary directory, and polling helpers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tidesync::model::{DocId, Grant, Namespace, NodeId};
use tidesync::net::{Bundle, Ca, Node, NodeConfig, Revocations};
use tidesync::store::{Store, StoreConfig};
use tidesync::sync::Role;

/// A CA and a directory for the nodes' files.
#[derive(Debug)]
pub struct Deployment {
    /// The deployment CA.
    pub ca: Ca,
    dir: tempfile::TempDir,
}

/// A node started by a test.
#[derive(Debug)]
pub struct TestNode {
    /// The running node.
    pub node: Node,
    /// Its store.
    pub store: Store,
    /// The redb file, for restarts.
    pub path: PathBuf,
    /// Its config, for restarts.
    pub cfg: NodeConfig,
}

impl TestNode {
    /// The QUIC address.
    pub fn addr(&self) -> SocketAddr {
        self.node
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Stops the node and closes its store.
    pub async fn stop(self) -> (PathBuf, NodeConfig) {
        self.node.shutdown().await;
        drop(self.node);
        drop(self.store);
        (self.path, self.cfg)
    }
}

impl Deployment {
    /// A new CA in a new directory.
    pub fn new() -> Result<Self> {
        Ok(Self {
            ca: Ca::generate("test")?,
            dir: tempfile::tempdir()?,
        })
    }

    /// The directory of the nodes' files.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// A certificate bundle for a node.
    pub fn bundle(&self, name: &str, role: Role, grants: &[&str]) -> Result<Bundle> {
        let grants: Vec<Grant> = grants.iter().map(|g| g.parse()).collect::<Result<_, _>>()?;
        Ok(self.ca.issue(&NodeId::new(name)?, role, &grants)?)
    }

    /// A node config with this deployment's bundle for `name`.
    pub fn config(&self, name: &str, role: Role, grants: &[&str]) -> Result<NodeConfig> {
        let mut cfg = NodeConfig::new(self.bundle(name, role, grants)?);
        cfg.min_backoff = Duration::from_millis(20);
        cfg.max_backoff = Duration::from_millis(500);
        if role == Role::Hub {
            cfg.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        }
        Ok(cfg)
    }

    /// Starts a node named `name` with `cfg`.
    pub fn start(&self, name: &str, cfg: NodeConfig) -> Result<TestNode> {
        let path = self.dir.path().join(format!("{name}.redb"));
        start_at(path, cfg)
    }

    /// A hub listening on an OS-picked port, dialing `peers`.
    pub fn hub(&self, name: &str, peers: &[SocketAddr]) -> Result<TestNode> {
        let mut cfg = self.config(name, Role::Hub, &[])?;
        cfg.dial = peers.to_vec();
        self.start(name, cfg)
    }

    /// An edge with `grants`, dialing `hubs` (first that answers).
    pub fn edge(&self, name: &str, grants: &[&str], hubs: &[SocketAddr]) -> Result<TestNode> {
        let mut cfg = self.config(name, Role::Edge, grants)?;
        cfg.dial = hubs.to_vec();
        cfg.failover = true;
        self.start(name, cfg)
    }
}

/// Starts a node on an existing (or new) redb file.
pub fn start_at(path: PathBuf, cfg: NodeConfig) -> Result<TestNode> {
    let store = Store::open(&path, StoreConfig::default())?;
    let node = Node::start(store.clone(), cfg.clone())?;
    Ok(TestNode {
        node,
        store,
        path,
        cfg,
    })
}

/// Polls `check` every 10 ms until it holds, failing after `timeout`.
pub async fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if check()? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An honest edge writes document `honest-{i}` in `ns`; fails unless the write reaches
/// `hub` within `within`. Hostile-peer tests call it between attacks: the node must keep
/// serving everyone else.
pub async fn honest_write_arrives(
    edge: &TestNode,
    hub: &TestNode,
    ns: &Namespace,
    i: u32,
    within: Duration,
) -> Result<()> {
    let id = DocId::new(format!("honest-{i}"))?;
    let started = Instant::now();
    let w = edge
        .store
        .put(ns, &id, serde_json::json!({ "i": i }), None)
        .await?;
    let written = started.elapsed();
    let arrived = wait_until(within, "the honest write at the hub", || {
        Ok(hub.store.get(ns, &id)?.is_some_and(|d| d.heads == w.heads))
    })
    .await;
    if std::env::var_os("TIDESYNC_TEST_TRACE").is_some() {
        println!("honest write {i}: stored at the edge in {written:?}, at the hub {arrived:?}");
    }
    arrived.map(|_| ())
}

/// Revocations shared by a test and a node.
pub fn revocations() -> Revocations {
    Revocations::new()
}
