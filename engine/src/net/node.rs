//! A running node: the quinn endpoint, its accept loop, the dial loops, and the registry
//! that keeps one connection per peer.
//!
//! Hubs listen and may dial other hubs; edges only dial hubs. A dial loop reconnects with
//! exponential backoff and jitter; with `failover`, it tries its addresses in order and
//! uses the first that answers. When two connections to one peer exist (both sides
//! dialed), the one dialed by the smaller node id stays, so both sides pick the same.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use serde_json::{json, Value};

use super::audit::{self, AuditError, AuditOutcome, AuditRequest};
use super::counters::{PeerCounters, PeerCounts};
use super::crl::Crl;
use super::driver::{self, DriverContext, DriverError, CLOSE_REPLACED, CLOSE_SHUTDOWN};
use super::penalties::Penalties;
use super::pki::{Bundle, TlsError, SERVER_NAME};
use super::placement;
use super::tls::{self, Revocations};
use crate::blobs::Blobs;
use crate::model::{Identity, NodeId, NsPattern, Role};
use crate::store::Store;
use crate::sync::{ErrorCode, Session, SessionConfig};

/// How long a dial waits for the handshake before moving to the next address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a peer may stay away before its rows are dropped, by default: long enough
/// for any device that is merely switched off for a holiday.
pub const DEFAULT_FORGET_PEERS_AFTER: Duration = Duration::from_secs(90 * 86_400);

/// How often a dialed connection is checked for silence (see `Node::watch_silence`).
const SILENCE_CHECK: Duration = Duration::from_millis(250);
/// How often an edge on a hub it ranks lower tries the better ones (jittered by half).
const PROBE_EVERY: Duration = Duration::from_secs(15);
/// The longest an edge waits between tries of better hubs that turn it away as full.
const MAX_PROBE_EVERY: Duration = Duration::from_secs(300);

/// Edges with a live connection, but for `except` (an edge reconnecting replaces its own).
fn edges_held(peers: &HashMap<NodeId, PeerEntry>, except: Option<&NodeId>) -> usize {
    peers
        .iter()
        .filter(|(id, e)| e.conn.is_some() && e.role == Role::Edge && Some(*id) != except)
        .count()
}

/// Whether a hub closed the connection because it holds `--max-peers` edges.
fn turned_away(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(ref c))
            if c.error_code == quinn::VarInt::from_u32(driver::CLOSE_FULL)
    )
}

/// How often a node audits the peers it dialed, unless configured.
pub const DEFAULT_AUDIT_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Longest time between two looks for peers to forget.
const FORGET_SWEEP: Duration = Duration::from_secs(3600);

/// Settings of a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's certificate, key and CA.
    pub bundle: Bundle,
    /// Where to accept connections (hubs). `None`: dial only (edges).
    pub listen: Option<SocketAddr>,
    /// Addresses to dial.
    pub dial: Vec<SocketAddr>,
    /// Use only the first address of `dial` that answers, moving on when it fails (edges);
    /// otherwise keep a connection to every address (hub mesh).
    pub failover: bool,
    /// Namespaces to receive.
    pub subscriptions: Vec<NsPattern>,
    /// Node ids refused at the handshake and cut off when added.
    pub revocations: Revocations,
    /// Largest frame, in bytes.
    pub max_frame: usize,
    /// First reconnect delay; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// Bytes of one peer's sync messages received and not yet committed, past which the
    /// node stops reading from it (flow control then holds the peer).
    pub max_inbound_bytes: usize,
    /// Keep-alive and idle timeout of connections.
    pub timers: tls::Timers,
    /// Forget peers unseen for this long (their cursors and sync states); `None` keeps
    /// them for ever.
    pub forget_peers_after: Option<Duration>,
    /// Audit each peer this node dialed this often (see [`Node::audit`]); `None`: only
    /// when asked.
    pub audit_every: Option<Duration>,
    /// The node's blobs: served to peers, fetched from them. `None`: no blobs (peers'
    /// blob requests go unanswered).
    pub blobs: Option<Blobs>,
    /// What goes first on each link, how fast, and how compressed.
    pub traffic: TrafficConfig,
    /// Local time of day, for batch windows.
    pub clock: super::batch::LocalClock,
}

/// How a node uses its links: namespace classes, bandwidth caps and compression.
#[derive(Clone, Debug)]
pub struct TrafficConfig {
    /// Namespace classes: priorities, batches, caps.
    pub classes: Arc<crate::model::Classes>,
    /// Bytes per second this node sends on each link at most (`None`: no cap).
    pub max_rate: Option<u64>,
    /// Whether sync payloads are compressed with zstd where it pays, on links whose peer
    /// supports it.
    pub compress: bool,
    /// The newest protocol version offered: [`crate::sync::PROTOCOL_VERSION`], or 7 (no
    /// compressed batches) or 6 (no classes, no compression) to speak as an older node
    /// (mixed-version tests).
    pub max_protocol: u16,
    /// Edges this node (a hub) holds at most; the next is turned away as full.
    pub max_peers: Option<usize>,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        Self {
            classes: Arc::default(),
            max_rate: None,
            compress: true,
            max_protocol: crate::sync::PROTOCOL_VERSION,
            max_peers: None,
        }
    }
}

impl NodeConfig {
    /// Defaults: no listening, no dialing, all namespaces, 16 MiB frames.
    pub fn new(bundle: Bundle) -> Self {
        Self {
            bundle,
            listen: None,
            dial: Vec::new(),
            failover: false,
            subscriptions: vec![NsPattern::all()],
            revocations: Revocations::new(),
            max_frame: 16 * 1024 * 1024,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_inbound_bytes: 32 << 20,
            timers: tls::Timers::default(),
            forget_peers_after: Some(DEFAULT_FORGET_PEERS_AFTER),
            audit_every: Some(DEFAULT_AUDIT_EVERY),
            blobs: None,
            traffic: TrafficConfig::default(),
            clock: super::batch::LocalClock::system(),
        }
    }
}

/// Failures to start a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The bundle or TLS setup is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A bundle given to a running node is not a renewal of the one it runs with.
    #[error("{0}")]
    BundleMismatch(String),
    /// The revocation list a bundle carries is not a valid list of its deployment.
    #[error("the bundle's revocation list: {0}")]
    Revocations(#[from] super::crl::CrlError),
}

/// Takes up the revocation list kept in the store, and returns its number (0: none).
fn take_up_kept(store: &Store, bundle: &Bundle, revocations: &Revocations) -> u64 {
    let kept = match store.revocation_list() {
        Ok(Some(der)) => der,
        Ok(None) => return 0,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the revocation list kept in the store");
            return 0;
        }
    };
    match Crl::verify(&kept, bundle.ca_der()) {
        Ok(crl) => {
            let number = crl.number();
            revocations.take_up(crl);
            number
        }
        Err(e) => {
            tracing::error!(error = %e, "the revocation list kept in the store is not valid; ignoring it");
            0
        }
    }
}

/// Keeps every newer revocation list the node takes up, in the store and in the file the
/// daemon named, so a restart starts from it even if one of the two is lost. `kept` is the
/// number already in the store. Runs until the node stops, keeping the last list then.
async fn keep_revocations(
    revocations: Revocations,
    store: Store,
    mut kept: u64,
    stop: CancellationToken,
) {
    let mut changes = revocations.subscribe();
    let mut file_written = 0;
    // The first round keeps what the node started with (its file, its bundle), which may
    // be newer than the store's copy.
    let mut stopping = false;
    loop {
        if let Some(crl) = revocations.crl() {
            if crl.number() > kept {
                match store.set_revocation_list(crl.der().to_vec()).await {
                    Ok(()) => kept = crl.number(),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot keep the revocation list in the store")
                    }
                }
            }
            if crl.number() > file_written {
                let r = revocations.clone();
                let _ = tokio::task::spawn_blocking(move || r.write_file()).await;
                file_written = crl.number();
            }
        }
        if stopping {
            return;
        }
        stopping = tokio::select! {
            changed = changes.changed() => changed.is_err(),
            () = stop.cancelled() => true,
        };
    }
}

/// Takes up the revocation list `bundle` carries, if it is newer than the one in force.
fn take_up_bundled(bundle: &Bundle, revocations: &Revocations) -> Result<(), NetError> {
    if let Some(der) = bundle.revocations_der() {
        revocations.offer(der, bundle.ca_der())?;
    }
    Ok(())
}

/// Seconds from now until `t` (negative once past), as metrics show certificate expiry.
pub fn seconds_until(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Whole days from now until `t` (negative once past), as status shows certificate expiry.
pub fn days_until(t: SystemTime) -> i64 {
    seconds_until(t) / 86_400
}

/// A peer as `/v1/status`, `/metrics` and the `status` command show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer's node id.
    pub node_id: NodeId,
    /// Its role.
    pub role: Role,
    /// Its address, as last seen.
    pub addr: SocketAddr,
    /// Whether a connection is up.
    pub connected: bool,
    /// How far this node has durably received the peer's feed.
    pub cursor: u64,
    /// The peer's counters, added up over all its connections.
    pub counts: PeerCounts,
    /// When the certificate it last connected with expires.
    pub cert_not_after: Option<SystemTime>,
    /// UDP traffic of the current connection, QUIC and TLS overhead included.
    pub udp: UdpStats,
}

/// UDP traffic of one connection (zero when none is up); its JSON keys start `udp_`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct UdpStats {
    /// Bytes sent.
    #[serde(rename = "udp_bytes_sent")]
    pub bytes_sent: u64,
    /// Bytes received.
    #[serde(rename = "udp_bytes_received")]
    pub bytes_received: u64,
    /// Datagrams sent.
    #[serde(rename = "udp_datagrams_sent")]
    pub datagrams_sent: u64,
    /// Datagrams received.
    #[serde(rename = "udp_datagrams_received")]
    pub datagrams_received: u64,
}

impl PeerStatus {
    /// The peer as one JSON object of `/v1/status`: identity and connection, then every
    /// counter under its own name.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "node_id": self.node_id.as_str(),
            "role": self.role.as_str(),
            "addr": self.addr.to_string(),
            "connected": self.connected,
            "cursor": self.cursor,
            "cert_days_left": self.cert_not_after.map(days_until),
        });
        for part in [
            serde_json::to_value(&self.counts),
            serde_json::to_value(self.udp),
        ] {
            if let (Some(obj), Ok(Value::Object(more))) = (v.as_object_mut(), part) {
                obj.extend(more);
            }
        }
        if let Some(obj) = v.as_object_mut() {
            obj.insert("progress".into(), self.progress());
        }
        v
    }

    /// The peer's catch-up (see [`super::progress`]): what `status --watch` draws.
    pub fn progress(&self) -> Value {
        let c = &self.counts;
        let active = c.catchup_remaining_documents > 0;
        json!({
            "active": active,
            "documents_done": c.catchup_done_documents,
            "documents_remaining": c.catchup_remaining_documents,
            "bytes_done": c.catchup_done_bytes,
            "bytes_remaining": c.catchup_remaining_bytes,
            "rate_bytes_per_second": c.catchup_rate_bytes_per_second,
            "eta_seconds": (active && c.catchup_eta_seconds > 0).then_some(c.catchup_eta_seconds),
        })
    }
}

struct PeerEntry {
    conn_id: u64,
    conn: Option<quinn::Connection>,
    dialed_by: NodeId,
    role: Role,
    addr: SocketAddr,
    counters: Arc<PeerCounters>,
    /// When the certificate the peer last connected with expires.
    cert_not_after: Option<SystemTime>,
    /// Hands audits to the connection's driver.
    audits: mpsc::Sender<AuditRequest>,
    /// Set once the connection's sync stream is open: only then may blob streams be
    /// opened (the sync stream must be the first).
    ready: Arc<AtomicBool>,
}

struct Inner {
    /// The deployment CA certificate (DER): it signs every revocation list.
    ca: Arc<[u8]>,
    store: Store,
    identity: Identity,
    cfg: NodeConfig,
    endpoint: quinn::Endpoint,
    /// The TLS settings for dialing, replaced when the bundle is renewed.
    client: std::sync::RwLock<quinn::ClientConfig>,
    /// When this node's own certificate expires (the bundle in use).
    cert_not_after: std::sync::RwLock<Option<SystemTime>>,
    peers: Mutex<HashMap<NodeId, PeerEntry>>,
    next_conn: AtomicU64,
    handshake_failures: AtomicU64,
    /// Peers refused for a while after a protocol error.
    penalties: Penalties,
    /// Connections refused because their peer was serving a penalty.
    penalty_refusals: AtomicU64,
    /// Edges turned away because this hub held `max_peers` already.
    refused_full: AtomicU64,
    /// Peers dropped by [`Node::forget_unseen_peers`].
    peers_forgotten: AtomicU64,
    /// Which peers hold which versions, for writes waiting for replicas.
    replicas: Arc<super::replicas::Replicas>,
    /// When this node last moved to a new feed epoch (see [`MIN_EPOCH_RENEWAL_GAP`]).
    last_renewal: Mutex<Option<Instant>>,
    cancel: CancellationToken,
    tasks: Mutex<JoinSet<()>>,
}

/// A running node. Dropping it does not stop it; call [`Node::shutdown`].
///
/// A hub and an edge in one process, over real QUIC on loopback: a write at the edge is
/// pushed to the hub as soon as it commits.
///
/// ```
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tidesync::model::{DocId, Namespace, NodeId};
/// use tidesync::net::{Ca, Node, NodeConfig};
/// use tidesync::store::{Store, StoreConfig};
/// use tidesync::sync::Role;
///
/// let dir = tempfile::tempdir()?;
/// let ca = Ca::generate("example")?;
/// let mut hub_cfg = NodeConfig::new(ca.issue(&NodeId::new("hub-1")?, Role::Hub, &[])?);
/// hub_cfg.listen = Some(([127, 0, 0, 1], 0).into());
/// let hub_store = Store::open(dir.path().join("hub.redb"), StoreConfig::default())?;
/// let hub = Node::start(hub_store.clone(), hub_cfg)?;
///
/// let grants = ["config=rw".parse()?];
/// let mut edge_cfg = NodeConfig::new(ca.issue(&NodeId::new("edge-1")?, Role::Edge, &grants)?);
/// edge_cfg.dial = vec![hub.local_addr()?];
/// let edge_store = Store::open(dir.path().join("edge.redb"), StoreConfig::default())?;
/// let edge = Node::start(edge_store.clone(), edge_cfg)?;
///
/// let (ns, id) = (Namespace::new("config")?, DocId::new("site")?);
/// edge_store.put(&ns, &id, serde_json::json!({"mode": "eco"}), None).await?;
/// let mut seen = hub_store.get(&ns, &id)?;
/// for _ in 0..500 {
///     if seen.is_some() { break; }
///     tokio::time::sleep(Duration::from_millis(10)).await;
///     seen = hub_store.get(&ns, &id)?;
/// }
/// assert_eq!(seen.ok_or("not synced")?.content["mode"], "eco");
/// edge.shutdown().await;
/// hub.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.inner.identity.node_id)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Binds the endpoint and starts accepting and dialing. Must run inside tokio.
    pub fn start(store: Store, cfg: NodeConfig) -> Result<Self, NetError> {
        let identity = cfg.bundle.identity()?;
        let kept = take_up_kept(&store, &cfg.bundle, &cfg.revocations);
        take_up_bundled(&cfg.bundle, &cfg.revocations)?;
        let max_protocol = cfg.traffic.max_protocol;
        let client = tls::client_config(&cfg.bundle, &cfg.revocations, cfg.timers, max_protocol)?;
        let (addr, server) = match cfg.listen {
            Some(addr) => (
                addr,
                Some(tls::server_config(
                    &cfg.bundle,
                    &cfg.revocations,
                    cfg.timers,
                    max_protocol,
                )?),
            ),
            None => (SocketAddr::from(([0, 0, 0, 0], 0)), None),
        };
        let bind = |source| NetError::Bind { addr, source };
        let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
        let runtime = quinn::default_runtime().ok_or_else(|| {
            bind(std::io::Error::other(
                "no async runtime to run the endpoint on",
            ))
        })?;
        // The endpoint's stateless-reset key comes from the node's key, so a node restarted
        // on the same address resets its peers' old connections at their next packet
        // instead of leaving them to the idle timeout.
        let mut endpoint =
            quinn::Endpoint::new(tls::endpoint_config(&cfg.bundle), server, socket, runtime)
                .map_err(bind)?;
        endpoint.set_default_client_config(client.clone());
        let cert_not_after = cfg.bundle.not_after().ok();
        let ca: Arc<[u8]> = Arc::from(cfg.bundle.ca_der().as_ref());
        let node = Self {
            inner: Arc::new(Inner {
                ca,
                store,
                identity,
                cfg,
                endpoint,
                client: std::sync::RwLock::new(client),
                cert_not_after: std::sync::RwLock::new(cert_not_after),
                peers: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
                handshake_failures: AtomicU64::new(0),
                penalties: Penalties::default(),
                penalty_refusals: AtomicU64::new(0),
                refused_full: AtomicU64::new(0),
                peers_forgotten: AtomicU64::new(0),
                replicas: Arc::default(),
                last_renewal: Mutex::new(None),
                cancel: CancellationToken::new(),
                tasks: Mutex::new(JoinSet::new()),
            }),
        };
        {
            let (store, revocations) =
                (node.inner.store.clone(), node.inner.cfg.revocations.clone());
            let stop = node.inner.cancel.clone();
            node.spawn(keep_revocations(revocations, store, kept, stop));
        }
        if node.inner.cfg.listen.is_some() {
            let n = node.clone();
            node.spawn(async move { n.accept_loop().await });
        }
        if let Some(unseen_for) = node.inner.cfg.forget_peers_after {
            node.spawn(node.clone().forget_loop(unseen_for));
        }
        if let Some(every) = node.inner.cfg.audit_every {
            node.spawn(node.clone().audit_loop(every));
        }
        if let Some(blobs) = node.inner.cfg.blobs.clone() {
            let stop = node.inner.cancel.clone();
            node.spawn(
                blobs
                    .clone()
                    .run_indexer(node.inner.store.clone(), stop.clone()),
            );
            node.spawn(blobs.clone().run_gc(stop.clone()));
            let n = node.clone();
            node.spawn(crate::blobs::fetcher::run_fetcher(
                blobs,
                move || n.blob_sources(),
                stop,
            ));
        }
        if node.inner.cfg.failover {
            let n = node.clone();
            let addrs = node.inner.cfg.dial.clone();
            node.spawn(async move { n.dial_loop(addrs).await });
        } else {
            for addr in node.inner.cfg.dial.clone() {
                let n = node.clone();
                node.spawn(async move { n.dial_loop(vec![addr]).await });
            }
        }
        Ok(node)
    }

    fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            tasks.spawn(fut);
        }
    }

    /// The address the endpoint is bound to (the real port when 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// This node's identity.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The node's store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Uses `bundle` for every handshake from now on: a renewed certificate for this same
    /// node, taken up without a restart. Connections up keep running on the certificate
    /// they were made with; the store, the sync state and the peers' cursors are untouched
    /// (they belong to the node id, which does not change). A bundle for another node, role
    /// or grants, or from another CA, is refused: that is a new enrollment and a restart.
    pub fn reload_bundle(&self, bundle: &Bundle) -> Result<(), NetError> {
        let identity = bundle.identity()?;
        let current = &self.inner.identity;
        if identity.node_id != current.node_id
            || identity.role != current.role
            || identity.grants != current.grants
            || bundle.ca_der() != self.inner.cfg.bundle.ca_der()
        {
            return Err(NetError::BundleMismatch(format!(
                "the new bundle is for {} ({}) from {} CA; this node is {} ({}); \
                 restart with it to change identity or grants",
                identity.node_id,
                identity.role.as_str(),
                if bundle.ca_der() == self.inner.cfg.bundle.ca_der() {
                    "the same"
                } else {
                    "another"
                },
                current.node_id,
                current.role.as_str()
            )));
        }
        take_up_bundled(bundle, &self.inner.cfg.revocations)?;
        let (timers, max_protocol) = (self.inner.cfg.timers, self.inner.cfg.traffic.max_protocol);
        let client = tls::client_config(bundle, &self.inner.cfg.revocations, timers, max_protocol)?;
        if self.inner.cfg.listen.is_some() {
            let server =
                tls::server_config(bundle, &self.inner.cfg.revocations, timers, max_protocol)?;
            self.inner.endpoint.set_server_config(Some(server));
        }
        if let Ok(mut c) = self.inner.client.write() {
            *c = client;
        }
        if let Ok(mut t) = self.inner.cert_not_after.write() {
            *t = bundle.not_after().ok();
        }
        Ok(())
    }

    /// The revocation list this node enforces.
    pub fn revocations(&self) -> &Revocations {
        &self.inner.cfg.revocations
    }

    /// The deployment CA certificate (DER): what scoped API tokens are verified against.
    pub fn ca_der(&self) -> &[u8] {
        &self.inner.ca
    }

    /// When the certificate this node presents expires.
    pub fn cert_not_after(&self) -> Option<SystemTime> {
        self.inner.cert_not_after.read().ok().and_then(|t| *t)
    }

    /// Handshakes refused so far (bad or revoked certificates, wrong roles).
    pub fn handshake_failures(&self) -> u64 {
        self.inner.handshake_failures.load(Ordering::Relaxed)
    }

    /// Connections refused so far because their peer broke the protocol a moment before
    /// (see [`super::penalties`]).
    pub fn penalty_refusals(&self) -> u64 {
        self.inner.penalty_refusals.load(Ordering::Relaxed)
    }

    /// Edges turned away because this hub held `--max-peers` edges already.
    pub fn refused_full(&self) -> u64 {
        self.inner.refused_full.load(Ordering::Relaxed)
    }

    /// Edges connected now.
    pub fn edges_connected(&self) -> usize {
        self.inner
            .peers
            .lock()
            .map_or(0, |peers| edges_held(&peers, None))
    }

    /// Edges this hub holds at most (`--max-peers`).
    pub fn max_peers(&self) -> Option<usize> {
        self.inner.cfg.traffic.max_peers
    }

    /// Which peers hold which versions of documents: what writes with `?replicas=K`
    /// wait on.
    pub fn replicas(&self) -> &super::replicas::Replicas {
        &self.inner.replicas
    }

    /// Peers forgotten so far (see [`Node::forget_unseen_peers`]).
    pub fn peers_forgotten(&self) -> u64 {
        self.inner.peers_forgotten.load(Ordering::Relaxed)
    }

    /// Drops the rows kept for peers unseen for `unseen_for` (their cursors and sync
    /// states: a hub met by thousands of short-lived edges would keep them for ever), and
    /// their entries in [`Node::peers`]. A forgotten peer that comes back syncs from
    /// scratch. Runs by itself every hour (or a quarter of `unseen_for`, if shorter) when
    /// [`NodeConfig::forget_peers_after`] is set. Returns the peers forgotten.
    pub async fn forget_unseen_peers(&self, unseen_for: Duration) -> Vec<NodeId> {
        let connected: Vec<NodeId> = self
            .inner
            .peers
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|(_, e)| e.conn.is_some())
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default();
        let forgotten = match self
            .inner
            .store
            .forget_peers_unseen_for(unseen_for, &connected)
            .await
        {
            Ok(forgotten) => forgotten,
            Err(e) => {
                tracing::warn!(error = %e, "forgetting peers unseen for long failed; trying again later");
                return Vec::new();
            }
        };
        if let Ok(mut peers) = self.inner.peers.lock() {
            for peer in &forgotten {
                if peers.get(peer).is_some_and(|e| e.conn.is_none()) {
                    peers.remove(peer);
                }
            }
        }
        for peer in &forgotten {
            tracing::info!(
                peer = %peer,
                unseen_for_s = unseen_for.as_secs(),
                "forgot a peer unseen for long (its cursor and sync states); if it comes back, it syncs from scratch"
            );
        }
        self.inner
            .peers_forgotten
            .fetch_add(forgotten.len() as u64, Ordering::Relaxed);
        forgotten
    }

    /// Compares what this node and `peer` hold in `namespaces` (empty: all they share) and
    /// repairs every difference (see [`crate::sync::audit`]); answers once the repairs are
    /// done, or after `timeout`.
    pub async fn audit(
        &self,
        peer: &NodeId,
        namespaces: Vec<NsPattern>,
        timeout: Duration,
    ) -> Result<AuditOutcome, AuditError> {
        let started = Instant::now();
        let sender = self
            .inner
            .peers
            .lock()
            .ok()
            .and_then(|p| {
                p.get(peer)
                    .filter(|e| e.conn.is_some())
                    .map(|e| e.audits.clone())
            })
            .ok_or_else(|| AuditError::NotConnected(peer.to_string()))?;
        let (reply, answer) = oneshot::channel();
        sender
            .try_send(AuditRequest { namespaces, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => AuditError::Busy(peer.to_string()),
                mpsc::error::TrySendError::Closed(_) => AuditError::Ended(peer.to_string()),
            })?;
        let report = match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(outcome)) => outcome?,
            Ok(Err(_)) => return Err(AuditError::Ended(peer.to_string())),
            Err(_) => {
                return Err(AuditError::TimedOut {
                    peer: peer.to_string(),
                    after: timeout,
                })
            }
        };
        let outcome = audit::outcome(peer, &report, started.elapsed());
        tracing::info!(
            peer = %peer,
            compared = outcome.compared,
            differing = outcome.differing,
            repaired = outcome.repaired,
            ms = outcome.ms,
            "audit done"
        );
        Ok(outcome)
    }

    /// Audits every connected peer this node dialed, every `every`: the dialing side
    /// audits, so a link is audited once.
    async fn audit_loop(self, every: Duration) {
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let me = self.inner.identity.node_id.clone();
            let dialed: Vec<NodeId> = self
                .inner
                .peers
                .lock()
                .map(|p| {
                    p.iter()
                        .filter(|(_, e)| e.conn.is_some() && e.dialed_by == me)
                        .map(|(id, _)| id.clone())
                        .collect()
                })
                .unwrap_or_default();
            for peer in dialed {
                let timeout = every.min(audit::DEFAULT_AUDIT_TIMEOUT);
                if let Err(e) = self.audit(&peer, Vec::new(), timeout).await {
                    tracing::warn!(peer = %peer, error = %e, "periodic audit failed; trying again next time");
                }
            }
        }
    }

    async fn forget_loop(self, unseen_for: Duration) {
        let every = (unseen_for / 4).clamp(Duration::from_secs(1), FORGET_SWEEP);
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            self.forget_unseen_peers(unseen_for).await;
        }
    }

    /// The connected peers blobs may be fetched from (their sync stream is open).
    fn blob_sources(&self) -> Vec<crate::blobs::fetch::Source> {
        let Ok(peers) = self.inner.peers.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = peers
            .iter()
            .filter(|(_, e)| e.ready.load(Ordering::Acquire))
            .filter_map(|(id, e)| {
                Some(crate::blobs::fetch::Source {
                    peer: id.clone(),
                    conn: e.conn.clone()?,
                    counters: e.counters.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }

    /// The node's blobs, if it has them.
    pub fn blobs(&self) -> Option<&Blobs> {
        self.inner.cfg.blobs.as_ref()
    }

    /// Every peer seen since start, connected or not.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let Ok(peers) = self.inner.peers.lock() else {
            return Vec::new();
        };
        let mut out: Vec<PeerStatus> = peers
            .iter()
            .map(|(id, e)| PeerStatus {
                node_id: id.clone(),
                role: e.role,
                addr: e.addr,
                connected: e.conn.is_some(),
                cursor: self
                    .inner
                    .store
                    .peer_cursor(id)
                    .ok()
                    .flatten()
                    .map_or(0, |c| c.seq),
                counts: e.counters.read(),
                cert_not_after: e.cert_not_after,
                udp: e.conn.as_ref().map_or_else(UdpStats::default, |c| {
                    let s = c.stats();
                    UdpStats {
                        bytes_sent: s.udp_tx.bytes,
                        bytes_received: s.udp_rx.bytes,
                        datagrams_sent: s.udp_tx.datagrams,
                        datagrams_received: s.udp_rx.datagrams,
                    }
                }),
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Closes every live connection (peers reconnect as usual).
    pub fn drop_connections(&self) {
        if let Ok(peers) = self.inner.peers.lock() {
            for e in peers.values() {
                if let Some(conn) = &e.conn {
                    conn.close(CLOSE_REPLACED.into(), b"dropped");
                }
            }
        }
    }

    /// Stops dialing and accepting, tells every peer, and waits for the tasks to end.
    /// Writes already acknowledged are durable; those in flight finish in the store.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner
            .endpoint
            .close(CLOSE_SHUTDOWN.into(), b"shutting down");
        let tasks = self
            .inner
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .ok();
        if let Some(mut tasks) = tasks {
            while tasks.join_next().await.is_some() {}
        }
        self.inner.endpoint.wait_idle().await;
    }

    async fn accept_loop(&self) {
        loop {
            let incoming = tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                i = self.inner.endpoint.accept() => match i {
                    Some(i) => i,
                    None => return,
                },
            };
            let n = self.clone();
            self.spawn(async move {
                match incoming.await {
                    Ok(conn) => {
                        n.run_connection(conn, false).await;
                    }
                    Err(e) => {
                        n.inner.handshake_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "refused an incoming connection");
                    }
                }
            });
        }
    }

    async fn dial_loop(&self, addrs: Vec<SocketAddr>) {
        let cfg = &self.inner.cfg;
        // An edge spreads over its hubs: each prefers the hubs in its own rendezvous order.
        let addrs = if cfg.failover {
            placement::rendezvous_order(&self.inner.identity.node_id, &addrs)
        } else {
            addrs
        };
        let mut backoff = cfg.min_backoff;
        while !self.inner.cancel.is_cancelled() {
            let mut rank = 0;
            while rank < addrs.len() {
                let addr = addrs[rank];
                rank += 1;
                let client = match self.inner.client.read() {
                    Ok(c) => c.clone(),
                    Err(_) => return,
                };
                let connecting = match self.inner.endpoint.connect_with(client, addr, SERVER_NAME) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "cannot dial");
                        continue;
                    }
                };
                // A hub that does not answer within CONNECT_TIMEOUT is skipped for the next.
                let conn = tokio::select! {
                    _ = self.inner.cancel.cancelled() => return,
                    c = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => match c {
                        Ok(c) => c,
                        Err(_) => {
                            tracing::info!(%addr, "no answer; trying the next address");
                            continue;
                        }
                    },
                };
                match conn {
                    Ok(conn) => {
                        let mut next = Some((conn, rank - 1));
                        let (mut full, mut carried_any) = (false, false);
                        while let Some((conn, at)) = next.take() {
                            // The watches end with the connection's session: a handle they
                            // kept would keep the connection open.
                            let (carried, fresh) = {
                                let run = self.run_connection(conn.clone(), true);
                                let watch = self.watch_silence(&conn, addrs[at]);
                                let better = self.probe_better(&addrs[..at]);
                                tokio::pin!(run, watch, better);
                                tokio::select! {
                                    carried = &mut run => (carried, None),
                                    fresh = &mut watch => (run.await, fresh.map(|c| (c, at))),
                                    better = &mut better => {
                                        tracing::info!(hub = %addrs[better.1], "a hub this node prefers is back: moving to it");
                                        conn.close(CLOSE_REPLACED.into(), b"moving to a preferred hub");
                                        (run.await, Some(better))
                                    }
                                }
                            };
                            full = turned_away(&conn);
                            drop(conn);
                            // Only a connection that carried a session resets the backoff:
                            // a peer that refuses us after the handshake is not hammered.
                            if carried {
                                backoff = cfg.min_backoff;
                                carried_any = true;
                            }
                            next = fresh;
                        }
                        if full {
                            tracing::info!(%addr, "the hub is full: trying the next");
                            continue;
                        }
                        if !carried_any && cfg.failover {
                            // A hub that takes the handshake but no session (it refuses
                            // this node for a while) does not keep it from the next.
                            continue;
                        }
                        // After a connection ends, start again from the first address.
                        break;
                    }
                    Err(e) => {
                        tracing::info!(%addr, error = %e, "dial failed");
                        if matches!(e, quinn::ConnectionError::TransportError(_)) {
                            self.inner
                                .handshake_failures
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            let delay = jitter(backoff);
            backoff = (backoff * 2).min(cfg.max_backoff);
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// While this edge is connected to a hub it ranks below `better`, tries those every
    /// [`PROBE_EVERY`] (jittered): returns a connection to the best one that completes a
    /// handshake and does not turn it away at once, with its rank. Pends for ever when
    /// there is no better hub. A hub that turns it away as full is tried less often,
    /// doubling up to [`MAX_PROBE_EVERY`].
    async fn probe_better(&self, better: &[SocketAddr]) -> (quinn::Connection, usize) {
        if better.is_empty() {
            return std::future::pending().await;
        }
        let mut every = PROBE_EVERY;
        loop {
            tokio::time::sleep(jitter(every)).await;
            for (rank, &addr) in better.iter().enumerate() {
                let Some(client) = self.inner.client.read().ok().map(|c| c.clone()) else {
                    continue;
                };
                let Ok(connecting) = self.inner.endpoint.connect_with(client, addr, SERVER_NAME)
                else {
                    continue;
                };
                let Ok(Ok(conn)) = tokio::time::timeout(CONNECT_TIMEOUT, connecting).await else {
                    continue;
                };
                // A full hub closes at once, after the handshake; give it the round trip.
                let settle = conn.rtt() * 3 + Duration::from_millis(200);
                if tokio::time::timeout(settle, conn.closed()).await.is_ok() {
                    if turned_away(&conn) {
                        every = (every * 2).min(MAX_PROBE_EVERY);
                    }
                    continue;
                }
                return (conn, rank);
            }
        }
    }

    /// Watches a dialed connection for silence: a healthy one hears at least an
    /// acknowledgement per keep-alive. After two keep-alives of nothing, it dials `addr`
    /// afresh; if that handshake succeeds, the peer is there under a new connection (it
    /// restarted, or a partition healed) while the old one waits out QUIC's retransmission
    /// backoff, which doubles up to the idle timeout: the old one is closed and the fresh
    /// one returned, to be run at once. If the dial fails the old one is kept (it may come
    /// back when a partition heals) and watched again. Returns `None` once the connection
    /// ends by itself.
    async fn watch_silence(
        &self,
        conn: &quinn::Connection,
        addr: SocketAddr,
    ) -> Option<quinn::Connection> {
        let silence = self.inner.cfg.timers.keep_alive * 2 + Duration::from_millis(500);
        let mut last_rx = conn.stats().udp_rx.datagrams;
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                _ = conn.closed() => return None,
                _ = self.inner.cancel.cancelled() => return None,
                _ = tokio::time::sleep(SILENCE_CHECK) => {}
            }
            let rx = conn.stats().udp_rx.datagrams;
            if rx != last_rx || heard.elapsed() < silence {
                if rx != last_rx {
                    (last_rx, heard) = (rx, Instant::now());
                }
                continue;
            }
            let client = self.inner.client.read().ok()?.clone();
            let Ok(connecting) = self.inner.endpoint.connect_with(client, addr, SERVER_NAME) else {
                heard = Instant::now();
                continue;
            };
            let fresh = tokio::select! {
                _ = conn.closed() => return None,
                _ = self.inner.cancel.cancelled() => return None,
                c = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => c,
            };
            match fresh {
                Ok(Ok(fresh)) => {
                    tracing::info!(%addr, silent_ms = heard.elapsed().as_millis() as u64, "the peer went silent and answered a fresh dial (restarted?): moving to the new connection");
                    conn.close(
                        CLOSE_REPLACED.into(),
                        b"silent; replaced by a fresh connection",
                    );
                    return Some(fresh);
                }
                _ => heard = Instant::now(),
            }
        }
    }

    /// Registers the connection (settling duplicates), runs its session, unregisters it.
    /// Returns whether the peer said anything (the session got going).
    async fn run_connection(&self, conn: quinn::Connection, dialer: bool) -> bool {
        let identity = match tls::peer_identity(&conn) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "connection without a usable identity");
                conn.close(driver::CLOSE_PROTOCOL.into(), b"no identity");
                return false;
            }
        };
        // Subscribed before the check, so no revocation after it goes unseen.
        let revoked = self.inner.cfg.revocations.subscribe();
        // The handshake read the serial already; one that cannot be read is refused.
        let revocations = &self.inner.cfg.revocations;
        let refused = tls::peer_serial(&conn)
            .is_none_or(|serial| revocations.refuses(&identity.node_id, &serial));
        if refused {
            // The handshake checks this too; a list that changed meanwhile is caught here.
            self.inner
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            conn.close(driver::CLOSE_REVOKED.into(), b"revoked");
            return false;
        }
        if let Some(left) = self
            .inner
            .penalties
            .refused_for(&identity.node_id, Instant::now())
        {
            self.inner.penalty_refusals.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %identity.node_id, left_ms = left.as_millis() as u64, "refusing a peer that broke the protocol");
            let reason = format!("refused for {} ms after a protocol error", left.as_millis());
            conn.close(driver::CLOSE_PENALIZED.into(), reason.as_bytes());
            return false;
        }
        let me = &self.inner.identity.node_id;
        let (peer, role) = (identity.node_id.clone(), identity.role);
        let dialed_by = if dialer { me.clone() } else { peer.clone() };
        let conn_id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let (audits_tx, audits_rx) = mpsc::channel(4);
        let ready = Arc::new(AtomicBool::new(false));
        let counters = {
            let Ok(mut peers) = self.inner.peers.lock() else {
                return false;
            };
            // Counters live as long as the node: they add up over reconnects.
            let counters = peers
                .get(&peer)
                .map(|e| e.counters.clone())
                .unwrap_or_default();
            let full = self.inner.cfg.traffic.max_peers.filter(|&max| {
                !dialer && role == Role::Edge && edges_held(&peers, Some(&peer)) >= max
            });
            if let Some(max) = full {
                self.inner.refused_full.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %peer, max, "turning an edge away: this hub is full");
                let reason = format!("hub full: it holds {max} edges (--max-peers); try another");
                conn.close(driver::CLOSE_FULL.into(), reason.as_bytes());
                return false;
            }
            if let Some(e) = peers.get(&peer) {
                if let Some(old) = &e.conn {
                    // Keep the connection dialed by the smaller node id; a reconnect of the
                    // same dialer replaces its stale predecessor.
                    if e.dialed_by < dialed_by {
                        conn.close(CLOSE_REPLACED.into(), b"duplicate connection");
                        return true;
                    }
                    old.close(CLOSE_REPLACED.into(), b"replaced");
                }
            }
            peers.insert(
                peer.clone(),
                PeerEntry {
                    conn_id,
                    conn: Some(conn.clone()),
                    dialed_by,
                    role,
                    addr: conn.remote_address(),
                    counters: counters.clone(),
                    cert_not_after: tls::peer_cert_not_after(&conn),
                    audits: audits_tx,
                    ready: ready.clone(),
                },
            );
            counters
        };
        let store = &self.inner.store;
        if let Err(e) = store.peer_seen(&peer).await {
            tracing::warn!(peer = %peer, error = %e, "recording when the peer was seen failed");
        }
        let record = store.peer_cursor(&peer).ok().flatten();
        let mut scfg = SessionConfig::new(me.clone(), self.inner.identity.role, store.feed_epoch());
        scfg.subscriptions = self.inner.cfg.subscriptions.clone();
        scfg.max_inbound_bytes = self.inner.cfg.max_inbound_bytes;
        scfg.audit_salt = Some(audit::salt());
        scfg.classes = self.inner.cfg.traffic.classes.clone();
        scfg.version = crate::sync::version_for_alpn(tls::alpn(&conn).as_deref());
        // Frames are compressed in batches on protocol 8: documents go without Automerge's
        // deflate, which would hide from zstd what they share.
        scfg.raw_payloads =
            self.inner.cfg.traffic.compress && scfg.version >= crate::sync::PROTOCOL_VERSION;
        counters
            .protocol
            .store(u64::from(scfg.version), Ordering::Relaxed);
        counters.blob_protocol.store(0, Ordering::Relaxed);
        let session = Session::new(scfg, identity, record, store.last_seq());
        // Counters add up over reconnects: this connection's frames are the difference.
        let received_before = counters.messages_received.load(Ordering::Relaxed);
        let ctx = DriverContext {
            store: store.clone(),
            revocations: self.inner.cfg.revocations.clone(),
            ca: self.inner.ca.clone(),
            max_frame: self.inner.cfg.max_frame,
            shutdown: self.inner.cancel.clone(),
            replicas: self.inner.replicas.clone(),
            blobs: self.inner.cfg.blobs.clone(),
            ready,
            classes: self.inner.cfg.traffic.classes.clone(),
            max_rate: self.inner.cfg.traffic.max_rate,
            compress: self.inner.cfg.traffic.compress,
            clock: self.inner.cfg.clock.clone(),
        };
        // The driver ends itself on shutdown, once its writes at the store are done: when
        // `shutdown` returns, nothing of this node holds the store any more.
        let ended = driver::run(
            conn.clone(),
            session,
            dialer,
            ctx,
            counters.clone(),
            revoked,
            audits_rx,
        )
        .await;
        if let Err(DriverError::FeedWentBack) = ended {
            self.move_to_new_epoch().await;
        }
        // A version mismatch or a feed that went back is no attack.
        if matches!(&ended, Err(DriverError::Protocol(e)) if e.code == ErrorCode::Protocol) {
            let penalty = self.inner.penalties.strike(&peer, Instant::now());
            tracing::info!(peer = %peer, penalty_ms = penalty.as_millis() as u64, "peer refused for a while after its protocol error");
        }
        // Seen until now: the unseen time counts from the end of the last connection.
        // Recorded while the peer still shows as connected, so a sweep in between never
        // judges it by when this connection began.
        if let Err(e) = store.peer_seen(&peer).await {
            tracing::debug!(peer = %peer, error = %e, "recording when the peer was seen failed");
        }
        if let Ok(mut peers) = self.inner.peers.lock() {
            if let Some(e) = peers.get_mut(&peer) {
                if e.conn_id == conn_id {
                    e.conn = None;
                }
            }
        }
        counters.messages_received.load(Ordering::Relaxed) > received_before
    }
}

/// Shortest time between two feed epoch renewals of one node.
pub const MIN_EPOCH_RENEWAL_GAP: Duration = Duration::from_secs(600);

impl Node {
    /// A peer found this node's feed gone back (restored from an old copy): moves the
    /// store to a new feed epoch and closes every connection, so that each peer, on
    /// reconnecting, walks the whole feed again and sets aside the sync states it kept
    /// for the old epoch.
    async fn move_to_new_epoch(&self) {
        // Any peer can claim the feed went back (a resume past its end, `FeedBehind`), and
        // each renewal makes every peer walk the whole feed again: at most one per gap. A
        // peer's session still walks from the start when its cursor is past the end.
        if let Ok(mut last) = self.inner.last_renewal.lock() {
            if let Some(ago) = last
                .map(|t| t.elapsed())
                .filter(|a| *a < MIN_EPOCH_RENEWAL_GAP)
            {
                tracing::warn!(
                    renewed_s_ago = ago.as_secs(),
                    "a peer says this node's feed went back; the feed epoch was renewed \
                     moments ago, so not again"
                );
                return;
            }
            *last = Some(Instant::now());
        }
        let old = self.inner.store.feed_epoch();
        match self.inner.store.renew_feed_epoch().await {
            Ok(new) => tracing::warn!(
                old = %format_args!("{old:032x}"),
                new = %format_args!("{new:032x}"),
                "this node's feed went back (restored from an old copy?): moved to a new \
                 feed epoch; every peer syncs it again"
            ),
            Err(e) => {
                tracing::error!(error = %e, "moving to a new feed epoch failed");
                return;
            }
        }
        let conns: Vec<quinn::Connection> = match self.inner.peers.lock() {
            Ok(peers) => peers.values().filter_map(|e| e.conn.clone()).collect(),
            Err(_) => return,
        };
        for c in conns {
            c.close(driver::CLOSE_NEW_EPOCH.into(), b"new feed epoch");
        }
    }
}

/// `d` scaled by a random factor in [0.5, 1.5), so reconnecting nodes spread out.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = getrandom::fill(&mut b).map_or(0x8000, |()| u16::from_le_bytes(b));
    d.mul_f64(0.5 + f64::from(r) / 65536.0)
}
