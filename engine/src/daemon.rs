//! A node process: the store, the sync node and the HTTP API started together, the
//! revocation file watched, and a graceful stop. Both binaries are thin shells around it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::model::{Grants, NodeId, NsPattern};
use crate::net::{Bundle, Crl, CrlError, NetError, Node, NodeConfig, Revocations};
use crate::store::{Store, StoreConfig};
use crate::StoreError;

/// Largest API request body unless configured otherwise (16 MiB).
pub const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;

/// The name of a node's copy of the deployment's revocation list in its data directory
/// (and of the list `tidesync-hub revoke` writes beside the CA).
pub const CRL_FILE: &str = "crl.pem";

/// How often the revocation file is re-read.
pub const REVOCATION_POLL: Duration = Duration::from_millis(250);

/// What a node process runs with.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The redb file.
    pub db_path: PathBuf,
    /// The node's certificate bundle.
    pub bundle: Bundle,
    /// QUIC listen address (hubs).
    pub listen: Option<SocketAddr>,
    /// HTTP API address.
    pub api: SocketAddr,
    /// Addresses to dial.
    pub dial: Vec<SocketAddr>,
    /// Dial only the first address that answers (edges).
    pub failover: bool,
    /// Namespaces to receive.
    pub subscriptions: Vec<NsPattern>,
    /// Bearer token the API requires, if any.
    pub token: Option<String>,
    /// Names the API answers to besides IP addresses and `localhost`.
    pub api_hosts: Vec<String>,
    /// The file `bundle` was read from: a renewed bundle written there (or SIGHUP) is taken
    /// up without a restart.
    pub bundle_file: Option<PathBuf>,
    /// Bounds on the API's connections.
    pub api_limits: api::serve::ServeLimits,
    /// A file of revoked node ids, one per line, re-read while running.
    pub revocation_file: Option<PathBuf>,
    /// The node's copy of the deployment's revocation list (a CRL, PEM): read at start,
    /// re-read while running (so `revoke` can write it in place), and rewritten whenever
    /// the node takes up a newer list from a peer or a bundle.
    pub crl_file: Option<PathBuf>,
    /// Largest API request body.
    pub max_body: usize,
    /// Store settings.
    pub store: StoreConfig,
    /// Keep-alive and idle timeout of the node's connections.
    pub timers: crate::net::tls::Timers,
    /// Forget peers unseen for this long (see [`NodeConfig::forget_peers_after`]).
    pub forget_peers_after: Option<std::time::Duration>,
    /// Audit dialed peers this often (see [`NodeConfig::audit_every`]).
    pub audit_every: Option<std::time::Duration>,
    /// Replicas a write waits for by default, per namespace pattern (first match).
    pub replica_defaults: Vec<(NsPattern, usize)>,
    /// Blob settings (the blobs live in `blobs/` beside the database file).
    pub blobs: crate::blobs::BlobConfig,
    /// Classes, bandwidth caps and compression of the node's links.
    pub traffic: crate::net::TrafficConfig,
    /// The namespace of the documents of automerge-repo clients (`/v1/automerge-repo`).
    pub repo_namespace: crate::model::Namespace,
    /// Parts of the node outside this crate (a hub's bus bridge), started with it.
    pub extensions: Vec<std::sync::Arc<dyn crate::extension::Extension>>,
}

/// Failures to start a node process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The store did not open.
    #[error("opening the store {path}: {source}")]
    Store {
        /// The file.
        path: PathBuf,
        /// Why.
        source: StoreError,
    },
    /// The blob directory did not open.
    #[error("opening the blobs in {path}: {source}")]
    Blobs {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: crate::blobs::BlobError,
    },
    /// The sync node did not start.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The bundle is unusable.
    #[error(transparent)]
    Tls(#[from] crate::net::TlsError),
    /// The API address could not be bound.
    #[error("cannot bind the API on {addr}: {source}")]
    Api {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The revocation file could not be read.
    #[error("reading the revocation list {path}: {source}")]
    Revocations {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The node's copy of the revocation list is damaged. Starting without it could admit
    /// a revoked peer, so the node does not start.
    #[error(
        "{path} is not a valid revocation list of this deployment ({source}); restore it, \
         or delete it to start from the list in the bundle and take up the newest from peers"
    )]
    Crl {
        /// The file.
        path: PathBuf,
        /// Why.
        source: crate::net::CrlError,
    },
}

/// A running node process: what `tidesync-hub run` and `tidesync-edge run` are.
///
/// ```
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tidesync::daemon::{Daemon, DaemonConfig};
/// use tidesync::model::NodeId;
/// use tidesync::net::Ca;
/// use tidesync::store::StoreConfig;
/// use tidesync::model::Role;
///
/// let dir = tempfile::tempdir()?;
/// let ca = Ca::generate("example")?;
/// let hub = Daemon::start(DaemonConfig {
///     db_path: dir.path().join("hub.redb"),
///     bundle: ca.issue(&NodeId::new("hub-1")?, Role::Hub, &[])?,
///     listen: Some(([127, 0, 0, 1], 0).into()),
///     api: ([127, 0, 0, 1], 0).into(),
///     dial: Vec::new(),
///     failover: false,
///     subscriptions: vec![tidesync::model::NsPattern::all()],
///     token: None,
///     api_hosts: Vec::new(),
///     bundle_file: None,
///     api_limits: Default::default(),
///     revocation_file: None,
///     crl_file: None,
///     max_body: tidesync::daemon::DEFAULT_MAX_BODY,
///     store: StoreConfig::default(),
///     timers: Default::default(),
///     forget_peers_after: None,
///     audit_every: None,
///     replica_defaults: Vec::new(),
///     blobs: Default::default(),
///     traffic: Default::default(),
///     repo_namespace: tidesync::api::repo::default_namespace(),
///     extensions: Vec::new(),
/// })
/// .await?;
/// // The real addresses, also for port 0, as the binaries print them.
/// assert!(hub.ready_line().starts_with("tidesync listening quic=127.0.0.1:"));
/// hub.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Daemon {
    /// The sync node.
    pub node: Node,
    /// The store.
    pub store: Store,
    /// The QUIC address actually bound.
    pub quic_addr: SocketAddr,
    /// The API address actually bound.
    pub api_addr: SocketAddr,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Reads a revocation file: node ids, one per line; blank lines and `#` comments ignored.
/// No file is an empty list (a deployment that never revoked anyone). A line that is not a
/// node id makes the whole file an error: a damaged list must not pass for a shorter one.
pub fn read_revocations(path: &std::path::Path) -> std::io::Result<Vec<NodeId>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            NodeId::new(l).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "line {:?} is not a node id: {e}",
                        l.chars().take(80).collect::<String>()
                    ),
                )
            })
        })
        .collect()
}

/// How often the bundle file is checked for a renewal.
pub const BUNDLE_POLL: Duration = Duration::from_secs(1);

/// Takes up a renewed bundle: when the file's content changes (checked every
/// [`BUNDLE_POLL`]) or on SIGHUP. A file that does not read as a renewal of this node's
/// bundle is reported and the node keeps the certificate it has.
async fn watch_bundle(path: PathBuf, node: Node, stop: CancellationToken) {
    // Compared by content (a bounded read: a bundle is a few KB), so a rewrite with the same
    // bytes is no renewal and a renewal written within the same second is still seen.
    let read = |path: &std::path::Path| {
        read_bounded(path, crate::net::pki::MAX_BUNDLE_FILE + 1)
            .ok()
            .flatten()
    };
    let mut last = read(&path);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let forced = tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(BUNDLE_POLL) => false,
            () = hangup => true,
        };
        let now = read(&path);
        if now.is_none() || (!forced && now == last) {
            continue;
        }
        last = now;
        match crate::net::Bundle::read(&path).map_err(crate::net::NetError::from) {
            Ok(bundle) => match node.reload_bundle(&bundle) {
                Ok(()) => tracing::info!(
                    path = %path.display(),
                    days_left = node.cert_not_after().map(crate::net::node::days_until),
                    "took up the renewed certificate"
                ),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "refused the new bundle; keeping the current certificate")
                }
            },
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the new bundle; keeping the current certificate")
            }
        }
    }
}

/// Re-reads the revocation file of a running node, for [`apply_revocations`].
fn reread_revocations(
    path: &std::path::Path,
    revocations: &Revocations,
) -> Result<Vec<NodeId>, String> {
    if path.exists() {
        read_revocations(path).map_err(|e| e.to_string())
    } else if revocations.ids().is_empty() {
        // Never written, or it listed nobody: nothing is lost.
        Ok(Vec::new())
    } else {
        Err("the file is missing".to_owned())
    }
}

/// Puts what [`reread_revocations`] read in force. Anything but a readable, well-formed
/// file keeps the list as it is and says so (log, `/v1/status`, `/metrics`): a deleted or
/// damaged file never readmits anyone, and a list only shrinks at a restart.
fn apply_revocations(
    path: &std::path::Path,
    read: Result<Vec<NodeId>, String>,
    revocations: &Revocations,
) {
    match read {
        Ok(mut ids) => {
            ids.extend(revocations.ids());
            revocations.replace(ids);
            if revocations.set_problem("revoked", None) {
                tracing::info!(path = %path.display(), "the revocation list is readable again");
            }
        }
        Err(why) => {
            if revocations.set_problem("revoked", Some(why.clone())) {
                tracing::error!(
                    path = %path.display(),
                    error = %why,
                    "cannot read the revocation list; keeping the last good one"
                );
            }
        }
    }
}

/// Largest revocation list file read: the DER limit, as base64, with room for headers.
const MAX_CRL_FILE: u64 = 2 * crate::sync::validate::MAX_REVOCATION_LIST as u64;

/// Reads at most `limit` bytes of a file: `Ok(None)` if there is none.
fn read_bounded(path: &std::path::Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    match std::fs::File::open(path).and_then(|f| f.take(limit).read_to_end(&mut bytes)) {
        Ok(_) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads the node's copy of the revocation list: `Ok(None)` if there is none.
fn read_crl_file(path: &std::path::Path, ca: &[u8]) -> Result<Option<Crl>, CrlError> {
    match read_bounded(path, MAX_CRL_FILE) {
        Ok(Some(bytes)) => parse_crl_file(&bytes, ca).map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(CrlError::Malformed(e.to_string())),
    }
}

fn parse_crl_file(bytes: &[u8], ca: &[u8]) -> Result<Crl, CrlError> {
    let text = std::str::from_utf8(bytes).map_err(|e| CrlError::Malformed(e.to_string()))?;
    Crl::from_pem(text, ca)
}

/// Re-reads the node's copy of the revocation list while it runs: a newer list written
/// there (by `tidesync-hub revoke`, or copied in) is taken up and passed on to the peers.
/// A missing or older copy is rewritten from the list in force; a damaged one is reported
/// (log, `/v1/status`, `/metrics`) and the list in force stays.
fn reread_crl(
    path: &std::path::Path,
    revocations: &Revocations,
    ca: &[u8],
    last: &mut Option<Option<Vec<u8>>>,
) {
    let in_force = revocations.crl().map(|c| c.number());
    let bytes = match read_bounded(path, MAX_CRL_FILE) {
        Ok(b) => b,
        Err(e) => {
            let why = format!("{}: {e}", path.display());
            if revocations.set_problem("crl", Some(why)) {
                tracing::error!(path = %path.display(), error = %e, "cannot read the revocation list file; keeping the list in force");
            }
            return;
        }
    };
    // Checked once per content, and again after the list in force changed.
    let unchanged = last.as_ref() == Some(&bytes) && bytes.is_some() == in_force.is_some();
    if unchanged {
        return;
    }
    let had_file = matches!(last, Some(Some(_)));
    *last = Some(bytes.clone());
    let read = match bytes {
        Some(b) => parse_crl_file(&b, ca).map(Some),
        None => Ok(None),
    };
    match read {
        Ok(Some(crl)) => {
            if revocations.set_problem("crl", None) {
                tracing::info!(path = %path.display(), "the revocation list file is valid again");
            }
            if let Some(newer) = revocations.crl().filter(|c| c.number() > crl.number()) {
                let lacking = crl
                    .entries()
                    .iter()
                    .filter(|e| !newer.revokes(&e.serial))
                    .count();
                if lacking > 0 {
                    // Lists of one CA only grow; this one was issued from another copy of
                    // the CA directory, or with a clock set back.
                    tracing::error!(
                        path = %path.display(),
                        found = crl.number(),
                        in_force = newer.number(),
                        lacking,
                        "the revocation list file revokes certificates the newer list in force \
                         does not; those are not refused. Run `tidesync-hub revoke` for them \
                         again at the CA"
                    );
                }
                // Older than the list in force (taken up from the store, a bundle or a
                // peer since): the file gets the newer one.
                revocations.write_file();
            } else {
                revocations.take_up(crl);
            }
        }
        Ok(None) => {
            if in_force.is_some() {
                // Without a file before, this is the first list the node took up (the
                // keeper writes it too); with one, the file was deleted.
                if had_file {
                    tracing::warn!(
                        path = %path.display(),
                        in_force,
                        "the revocation list file is missing; rewriting it from the list in force"
                    );
                }
                revocations.write_file();
            }
        }
        Err(e) => {
            let why = format!("{}: {e}", path.display());
            if revocations.set_problem("crl", Some(why.clone())) {
                tracing::error!(
                    path = %path.display(),
                    error = %e,
                    "the revocation list file is damaged; keeping the list in force"
                );
            }
        }
    }
}

impl Daemon {
    /// Opens the store, starts the node and the API.
    pub async fn start(cfg: DaemonConfig) -> Result<Self, DaemonError> {
        let identity = cfg.bundle.identity()?;
        let revocations = Revocations::new();
        if let Some(path) = &cfg.revocation_file {
            let ids = read_revocations(path).map_err(|source| DaemonError::Revocations {
                path: path.clone(),
                source,
            })?;
            revocations.replace(ids);
        }
        let ca = cfg.bundle.ca_der().to_vec();
        if let Some(path) = &cfg.crl_file {
            let crl = read_crl_file(path, &ca).map_err(|source| DaemonError::Crl {
                path: path.clone(),
                source,
            })?;
            if let Some(crl) = crl {
                revocations.take_up(crl);
            }
            revocations.persist_to(path.clone(), ca.clone());
        }
        let store =
            Store::open(&cfg.db_path, cfg.store.clone()).map_err(|source| DaemonError::Store {
                path: cfg.db_path.clone(),
                source,
            })?;
        let blob_dir = cfg.db_path.parent().map_or_else(
            || std::path::PathBuf::from("."),
            std::path::Path::to_path_buf,
        );
        let blobs = crate::blobs::Blobs::open(&blob_dir, cfg.blobs.clone()).map_err(|source| {
            DaemonError::Blobs {
                path: blob_dir.join("blobs"),
                source,
            }
        })?;
        let mut ncfg = NodeConfig::new(cfg.bundle.clone());
        ncfg.blobs = Some(blobs);
        ncfg.listen = cfg.listen;
        ncfg.dial = cfg.dial.clone();
        ncfg.failover = cfg.failover;
        ncfg.subscriptions = cfg.subscriptions.clone();
        ncfg.revocations = revocations.clone();
        ncfg.timers = cfg.timers;
        ncfg.traffic = cfg.traffic.clone();
        ncfg.forget_peers_after = cfg.forget_peers_after;
        ncfg.audit_every = cfg.audit_every;
        let node = Node::start(store.clone(), ncfg)?;
        let quic_addr = node.local_addr().map_err(|source| DaemonError::Api {
            addr: cfg.api,
            source,
        })?;
        let listener = tokio::net::TcpListener::bind(cfg.api)
            .await
            .map_err(|source| DaemonError::Api {
                addr: cfg.api,
                source,
            })?;
        let api_addr = listener.local_addr().map_err(|source| DaemonError::Api {
            addr: cfg.api,
            source,
        })?;
        let write_grants = match identity.role {
            crate::model::Role::Hub => Grants::everything(),
            crate::model::Role::Edge => identity.grants.clone(),
        };
        let cancel = CancellationToken::new();
        let app = api::router(ApiState {
            replica_defaults: cfg.replica_defaults.clone(),
            store: store.clone(),
            node: Some(node.clone()),
            node_id: identity.node_id.clone(),
            role: identity.role,
            write_grants,
            token: cfg.token.clone(),
            hosts: cfg.api_hosts.clone(),
            max_body: cfg.max_body,
            repo: api::repo::RepoEndpoint::new(
                cfg.repo_namespace.clone(),
                identity.node_id.as_str(),
                cancel.child_token(),
            ),
            extensions: cfg.extensions.clone(),
        });
        let mut tasks = Vec::new();
        for e in &cfg.extensions {
            tasks.extend(e.start(store.clone(), cancel.child_token()));
        }
        let stop = cancel.clone();
        tasks.push(tokio::spawn(api::serve::serve(
            listener,
            app,
            cfg.api_limits,
            stop,
        )));
        if let Some(path) = cfg.bundle_file.clone() {
            let stop = cancel.clone();
            let node = node.clone();
            tasks.push(tokio::spawn(watch_bundle(path, node, stop)));
        }
        if cfg.revocation_file.is_some() || cfg.crl_file.is_some() {
            let (ids_file, crl_file) = (cfg.revocation_file.clone(), cfg.crl_file.clone());
            let stop = cancel.clone();
            let ca = std::sync::Arc::new(ca);
            tasks.push(tokio::spawn(async move {
                let mut last_read = None;
                loop {
                    // File reads, signature checks and fsyncs: off the async threads.
                    let (ids_file, crl_file) = (ids_file.clone(), crl_file.clone());
                    let (revocations, ca) = (revocations.clone(), ca.clone());
                    let mut last = last_read.take();
                    last_read = tokio::task::spawn_blocking(move || {
                        // `revoke` writes the list, then the name: read in the other order
                        // and put in force in the same, a name found here has its list in
                        // force first, so the connection it cuts off is handed the list.
                        let ids = ids_file
                            .as_ref()
                            .map(|path| (path, reread_revocations(path, &revocations)));
                        if let Some(path) = &crl_file {
                            reread_crl(path, &revocations, &ca, &mut last);
                        }
                        if let Some((path, read)) = ids {
                            apply_revocations(path, read, &revocations);
                        }
                        last
                    })
                    .await
                    .unwrap_or_default();
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(REVOCATION_POLL) => {}
                    }
                }
            }));
        }
        Ok(Self {
            node,
            store,
            quic_addr,
            api_addr,
            cancel,
            tasks,
        })
    }

    /// The line every binary prints once it is ready.
    pub fn ready_line(&self) -> String {
        format!(
            "tidesync listening quic={} api={}",
            self.quic_addr, self.api_addr
        )
    }

    /// Starts, prints the ready line on stdout, and runs until SIGINT or SIGTERM, then stops
    /// gracefully.
    pub async fn run_until_signal(cfg: DaemonConfig) -> Result<(), DaemonError> {
        let daemon = Self::start(cfg).await?;
        println!("{}", daemon.ready_line());
        wait_for_signal().await;
        daemon.shutdown().await;
        Ok(())
    }

    /// Stops the API (in-flight requests finish), tells peers, and lets queued writes
    /// commit before the store closes.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.node.shutdown().await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
