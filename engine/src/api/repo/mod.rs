//! `GET /v1/automerge-repo`: the automerge-repo network protocol over WebSocket, so that an
//! unmodified automerge-repo app (browser or Node, with its WebSocket network adapter)
//! uses a node as its sync server.
//!
//! The node is one more repo peer. Each document a client syncs lives in the node's repo
//! namespace under its automerge-repo document id, so it replicates to every other node
//! like any document and is readable and writable through the JSON API and the CLI. A
//! client's sync messages go through the store's normal apply path, so its changes are
//! durable before the node's reply names them, and the grant checks, op limits and depth
//! limits of peer sync apply. Sync states with clients live in memory only: a client that
//! reconnects starts a new exchange, which Automerge makes cheap. Ephemeral messages go to
//! the node's other clients of the same document and are never stored.

mod conn;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::access::Access;
use super::error::ApiError;
use super::ApiState;
use crate::model::{DocId, Namespace};
use crate::store::Store;

/// The namespace of automerge-repo documents unless configured (`--repo-namespace`).
pub const DEFAULT_NAMESPACE: &str = "repo";

/// [`DEFAULT_NAMESPACE`] as a namespace.
pub fn default_namespace() -> Namespace {
    Namespace::new(DEFAULT_NAMESPACE).unwrap_or_else(|_| unreachable!("a valid namespace"))
}

/// Ephemeral messages waiting for slow clients; past this a client misses the oldest
/// (ephemeral data is presence and cursors: the next one replaces it).
const EPHEMERAL_BACKLOG: usize = 64;

/// WebSocket clients of one node at once; more are answered 503. An upgraded connection
/// leaves the HTTP server's own connection count, so this is its bound.
pub const MAX_CLIENTS: u64 = 1024;

/// The automerge-repo endpoint of a node: shared by its WebSocket connections.
#[derive(Clone, Debug)]
pub struct RepoEndpoint {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    namespace: Namespace,
    /// This node's automerge-repo peer id.
    peer_id: String,
    ephemeral: broadcast::Sender<Arc<Relayed>>,
    next_client: AtomicU64,
    clients: AtomicU64,
    /// Cancelled when the node stops: every client is disconnected.
    stop: CancellationToken,
    /// The repo documents each commit changed, read from the feed once for all clients.
    changed: broadcast::Sender<Arc<Vec<DocId>>>,
    following: AtomicBool,
}

/// Batches of changed documents waiting for slow clients; a client that falls further
/// behind resyncs every document it has.
const CHANGED_BACKLOG: usize = 256;

/// Feed entries read per look at the store's feed.
const FEED_PAGE: usize = 1000;

/// An ephemeral message on its way to the node's other clients.
#[derive(Debug)]
struct Relayed {
    from_client: u64,
    /// The sender's peer id, prefixed with its connection number: a client cannot pass
    /// as another one (automerge-repo deduplicates presence by sender and session).
    sender: String,
    session: String,
    count: u64,
    document: String,
    data: Vec<u8>,
}

impl RepoEndpoint {
    /// The endpoint of node `node_id`, keeping documents in `namespace`; `stop` ends
    /// every client's connection.
    pub fn new(namespace: Namespace, node_id: &str, stop: CancellationToken) -> Self {
        let (ephemeral, _) = broadcast::channel(EPHEMERAL_BACKLOG);
        let (changed, _) = broadcast::channel(CHANGED_BACKLOG);
        Self {
            inner: Arc::new(Inner {
                namespace,
                peer_id: format!("tidesync-{node_id}"),
                ephemeral,
                next_client: AtomicU64::new(1),
                clients: AtomicU64::new(0),
                stop,
                changed,
                following: AtomicBool::new(false),
            }),
        }
    }

    /// Where the clients' documents live.
    pub fn namespace(&self) -> &Namespace {
        &self.inner.namespace
    }

    /// WebSocket clients connected now.
    pub fn clients(&self) -> u64 {
        self.inner.clients.load(Ordering::Relaxed)
    }

    /// The repo documents changed from now on; the first call starts the one task that
    /// follows the store's feed for every client.
    fn changes(&self, store: &Store) -> broadcast::Receiver<Arc<Vec<DocId>>> {
        let rx = self.inner.changed.subscribe();
        if !self.inner.following.swap(true, Ordering::AcqRel) {
            tokio::spawn(follow(self.clone(), store.clone()));
        }
        rx
    }

    /// Counts a new client in, unless [`MAX_CLIENTS`] are connected.
    fn admit(&self) -> Option<Admitted> {
        let before = self.inner.clients.fetch_add(1, Ordering::Relaxed);
        let admitted = Admitted(self.clone());
        (before < MAX_CLIENTS).then_some(admitted)
    }
}

/// Reads the feed as commits land and tells the clients which repo documents changed,
/// until the node stops.
async fn follow(endpoint: RepoEndpoint, store: Store) {
    let mut feed = store.subscribe();
    let mut seen = store.last_seq();
    let stop = endpoint.inner.stop.clone();
    loop {
        tokio::select! {
            changed = feed.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
        loop {
            let entries = match store.changes_since(seen, FEED_PAGE) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "automerge-repo clients: reading the change feed failed");
                    break;
                }
            };
            let Some(last) = entries.last() else {
                break;
            };
            seen = last.seq;
            let ids: Vec<DocId> = entries
                .into_iter()
                .filter(|e| e.ns == endpoint.inner.namespace)
                .map(|e| e.id)
                .collect();
            if !ids.is_empty() {
                // No receiver is not an error: no client is connected.
                let _ = endpoint.inner.changed.send(Arc::new(ids));
            }
        }
    }
}

/// A client counted in [`RepoEndpoint::clients`] for as long as it lives.
#[derive(Debug)]
struct Admitted(RepoEndpoint);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.inner.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Upgrades to a WebSocket after the access checks: the token (if any) must grant the
/// repo namespace, and a browser page of another origin must bring a token, so that a
/// page the user merely visits cannot use a node that has no API token.
pub(crate) async fn connect(
    State(state): State<ApiState>,
    Extension(access): Extension<Access>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{REPO}: a WebSocket upgrade is required ({e})"),
        )
    })?;
    let ns = state.repo.namespace().clone();
    access.check_read(&ns)?;
    // With an API token, every request here presented one (or a scoped token).
    let token_presented = state.token.is_some() || matches!(access, Access::Scoped(_));
    if cross_origin(&headers) && !token_presented {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "a page of another origin must present a token (?token=)",
        ));
    }
    let writable = state.write_grants.can_write(&ns) && access.can_write(&ns);
    let admitted = state.repo.admit().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_CLIENTS} automerge-repo clients are connected; try again later"),
        )
    })?;
    let max = state.max_body;
    Ok(upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| conn::run(socket, state, access, writable, admitted)))
}

const REPO: &str = super::access::REPO_PATH;

/// Whether a browser says the page comes from another origin than this API.
fn cross_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .is_none_or(|(_, h)| !h.eq_ignore_ascii_case(host))
}
