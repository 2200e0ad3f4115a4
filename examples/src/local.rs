//! A deployment on this machine for the examples: a CA, hubs and edges as in-process
//! [`Daemon`]s (the same code the binaries run) over real QUIC and real redb files in a
//! temporary directory that is removed on drop.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tidesync::daemon::{Daemon, DaemonConfig};
use tidesync::model::{Grant, NodeId, NsPattern};
use tidesync::net::Ca;
use tidesync::store::StoreConfig;
use tidesync::sync::Role;

/// A CA and a directory for the nodes' files.
#[derive(Debug)]
pub struct Local {
    ca: Ca,
    dir: tempfile::TempDir,
}

/// A running node and what restarts it.
#[derive(Debug)]
pub struct Member {
    /// The running node: store, sync node and HTTP API.
    pub daemon: Daemon,
    cfg: DaemonConfig,
}

impl Member {
    /// The HTTP API's base URL.
    pub fn api(&self) -> String {
        format!("http://{}", self.daemon.api_addr)
    }

    /// The QUIC address.
    pub fn quic(&self) -> SocketAddr {
        self.daemon.quic_addr
    }

    /// Stops the node (it is offline from here on); its redb file stays.
    pub async fn stop(self) -> DaemonConfig {
        self.daemon.shutdown().await;
        self.cfg
    }

    /// Starts a stopped node again on its redb file.
    pub async fn restart(cfg: DaemonConfig) -> Result<Self> {
        Ok(Self {
            daemon: Daemon::start(cfg.clone()).await?,
            cfg,
        })
    }
}

impl Local {
    /// A new CA named `name` and a new temporary directory.
    pub fn new(name: &str) -> Result<Self> {
        Ok(Self {
            ca: Ca::generate(name)?,
            dir: tempfile::tempdir()?,
        })
    }

    /// Where the nodes' files live.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn config(&self, name: &str, role: Role, grants: &[&str]) -> Result<DaemonConfig> {
        let grants: Vec<Grant> = grants.iter().map(|g| g.parse()).collect::<Result<_, _>>()?;
        let bundle = self.ca.issue(&NodeId::new(name)?, role, &grants)?;
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        // A directory per node: its database and its blobs.
        let data = self.dir.path().join(name);
        std::fs::create_dir_all(&data)?;
        Ok(DaemonConfig {
            db_path: data.join("node.redb"),
            bundle,
            listen: (role == Role::Hub).then_some(loopback),
            api: loopback,
            dial: Vec::new(),
            failover: role == Role::Edge,
            subscriptions: vec![NsPattern::all()],
            token: None,
            api_hosts: Vec::new(),
            bundle_file: None,
            api_limits: Default::default(),
            revocation_file: None,
            crl_file: None,
            max_body: 16 << 20,
            store: StoreConfig::with_cache_budget(32 << 20),
            timers: Default::default(),
            forget_peers_after: None,
            audit_every: None,
            replica_defaults: Vec::new(),
            blobs: Default::default(),
            traffic: Default::default(),
            repo_namespace: tidesync::api::repo::default_namespace(),
            extensions: Vec::new(),
        })
    }

    /// Starts a hub that also dials the hubs at `peers`.
    pub async fn hub(&self, name: &str, peers: &[SocketAddr]) -> Result<Member> {
        self.hub_with(name, peers, |_| {}).await
    }

    /// Starts a hub as [`Self::hub`] does, with `tune` changing its settings first.
    pub async fn hub_with(
        &self,
        name: &str,
        peers: &[SocketAddr],
        tune: impl FnOnce(&mut DaemonConfig),
    ) -> Result<Member> {
        let mut cfg = self.config(name, Role::Hub, &[])?;
        cfg.dial = peers.to_vec();
        tune(&mut cfg);
        Member::restart(cfg).await
    }

    /// Starts an edge with `grants` (like `models=ro`), dialing `hubs` in order.
    pub async fn edge(&self, name: &str, grants: &[&str], hubs: &[SocketAddr]) -> Result<Member> {
        let mut cfg = self.config(name, Role::Edge, grants)?;
        cfg.dial = hubs.to_vec();
        Member::restart(cfg).await
    }
}

/// Polls `check` every 10 ms until it holds; fails after `timeout`. Returns the time taken.
pub async fn wait_for(
    what: &str,
    timeout: Duration,
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

/// One HTTP request to a node's API: the status and the JSON body (`null` if none).
pub async fn http(method: &str, url: &str, body: Option<Value>) -> Result<(u16, Value)> {
    let content_type = if method == "PATCH" {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    let body = body.map(|b| (content_type, b.to_string().into_bytes()));
    let (status, bytes) = request(method, url, body).await?;
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok((status, json))
}

/// Raw bytes to or from a node's API (the Automerge endpoints): the status and the body.
pub async fn http_bytes(method: &str, url: &str, body: Option<Vec<u8>>) -> Result<(u16, Vec<u8>)> {
    request(method, url, body.map(|b| ("application/octet-stream", b))).await
}

/// Sends one request off the async threads; an error status is an answer, not a failure.
async fn request(
    method: &str,
    url: &str,
    body: Option<(&'static str, Vec<u8>)>,
) -> Result<(u16, Vec<u8>)> {
    let (method, url) = (method.to_owned(), url.to_owned());
    tokio::task::spawn_blocking(move || {
        let req = ureq::request(&method, &url);
        let res = match body {
            Some((content_type, b)) => req.set("Content-Type", content_type).send_bytes(&b),
            None => req.call(),
        };
        let res = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e).with_context(|| format!("{method} {url}")),
        };
        let status = res.status();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut res.into_reader(), &mut bytes)?;
        Ok((status, bytes))
    })
    .await?
}
