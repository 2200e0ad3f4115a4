//! The local HTTP API, the same on edges and hubs.
//!
//! Handlers validate names and bodies, call the store, and map every failure to a status
//! and `{"error": …}` through `error`. Writes answer after the durable commit. This module
//! owns no state of its own: the store and the node are shared with the rest of the
//! process.

pub mod access;
mod audit;
mod backup;
pub mod blobs;
pub mod error;
pub mod guard;
pub mod replication;
pub mod repo;
pub mod serve;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::model::{format_heads, parse_heads, DocId, Grants, Namespace, NodeId};
use crate::model::{NsPattern, Role};
use crate::net::{Node, PeerStatus};
use crate::store::{FeedSeq, Store, WriteOutcome};
use access::Access;
use error::ApiError;
use replication::{answer_write, wait_for_heads, ReadQuery, WriteQuery};

/// What the API serves.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// The node's store.
    pub store: Store,
    /// The running node, for status (absent when the API runs without sync).
    pub node: Option<Node>,
    /// This node's id.
    pub node_id: NodeId,
    /// This node's role.
    pub role: Role,
    /// Namespaces local clients may write: an edge's own grants; everything on a hub.
    pub write_grants: Grants,
    /// If set, every request but `/v1/health` needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Names the API answers to besides IP addresses and `localhost` (the `Host` check).
    pub hosts: Vec<String>,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Replicas a write waits for by default, per namespace pattern (the first that
    /// matches); `?replicas=` wins.
    pub replica_defaults: Vec<(NsPattern, usize)>,
    /// The automerge-repo endpoint: its namespace and its clients.
    pub repo: repo::RepoEndpoint,
    /// Parts of the node outside this crate, in its status and metrics.
    pub extensions: Vec<std::sync::Arc<dyn crate::extension::Extension>>,
}

impl ApiState {
    /// Replicas a write to `ns` waits for when the request does not say.
    pub fn default_replicas(&self, ns: &Namespace) -> usize {
        self.replica_defaults
            .iter()
            .find(|(p, _)| p.matches(ns))
            .map_or(0, |(_, k)| *k)
    }
}

/// The API's routes over `state`.
pub fn router(state: ApiState) -> Router {
    let max_body = state.max_body;
    let protected = Router::new()
        .route("/v1/docs/{ns}", get(list_docs))
        .route(
            "/v1/docs/{ns}/{id}",
            get(get_doc)
                .put(put_doc)
                .patch(patch_doc)
                .delete(delete_doc),
        )
        .route("/v1/docs/{ns}/{id}/conflicts", get(conflicts))
        .route(
            "/v1/docs/{ns}/{id}/automerge",
            get(get_automerge).post(post_automerge),
        )
        .route("/v1/changes", get(changes))
        .route("/v1/status", get(status))
        .route("/v1/backup", get(backup::backup))
        .route("/v1/audit", axum::routing::post(audit::audit))
        .route("/v1/blobs", get(blobs::list_blobs).put(blobs::put_blob))
        .route("/v1/blobs/{hash}", get(blobs::get_blob))
        .route("/metrics", get(metrics))
        // `access::REPO_PATH`, spelled out so the docs' checks read it here.
        .route("/v1/automerge-repo", get(repo::connect))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            access::authorize,
        ));
    Router::new()
        .route("/v1/health", get(health))
        .merge(protected)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::same_origin_only,
        ))
        .with_state(state)
}

fn names(ns: &str, id: &str) -> Result<(Namespace, DocId), ApiError> {
    Ok((Namespace::new(ns)?, DocId::new(id)?))
}

pub(crate) fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| ApiError::new(e.status(), e.body_text()))
}

fn json_body(bytes: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body(bytes)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))
}

fn if_match(headers: &HeaderMap) -> Result<Option<Vec<automerge::ChangeHash>>, ApiError> {
    match headers.get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => {
            let text = v
                .to_str()
                .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "If-Match is not text"))?;
            Ok(Some(parse_heads(text)?))
        }
    }
}

fn check_writable(state: &ApiState, access: &Access, ns: &Namespace) -> Result<(), ApiError> {
    if !state.write_grants.can_write(ns) {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("namespace {ns} is not granted for writing on this node"),
        ))
    } else if !access.can_write(ns) {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("the token does not grant writing namespace {ns}"),
        ))
    } else {
        Ok(())
    }
}

fn written(w: WriteOutcome, replicas: Option<usize>) -> Response {
    let etag = etag(&w.heads);
    let mut body = json!({
        "heads": w.heads.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "seq": w.seq.0,
    });
    if let (Some(n), Some(obj)) = (replicas, body.as_object_mut()) {
        obj.insert("replicas".into(), json!(n));
    }
    let mut resp = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

fn etag(heads: &[automerge::ChangeHash]) -> String {
    format!("\"{}\"", format_heads(heads))
}

fn heads_json(heads: &[automerge::ChangeHash]) -> Value {
    json!(heads.iter().map(ToString::to_string).collect::<Vec<_>>())
}

/// 200 while the node can write; 503 with the reason while a storage fault stops writes
/// (the store recovers by itself once the cause is gone).
async fn health(State(state): State<ApiState>) -> Response {
    match state.store.fault() {
        None => Json(json!({
            "status": "ok",
            "node_id": state.node_id.as_str(),
            "role": state.role.as_str(),
        }))
        .into_response(),
        Some(f) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "storage fault",
                "reason": f.reason,
                "no_space": f.no_space,
                "node_id": state.node_id.as_str(),
                "role": state.role.as_str(),
            })),
        )
            .into_response(),
    }
}

async fn list_docs(
    State(state): State<ApiState>,
    Extension(access): Extension<Access>,
    Path(ns): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ns = Namespace::new(ns)?;
    access.check_read(&ns)?;
    let docs: Vec<Value> = state
        .store
        .list(&ns)?
        .into_iter()
        .map(|d| json!({"id": d.id.as_str(), "heads": heads_json(&d.heads), "deleted": d.deleted}))
        .collect();
    Ok(Json(json!({ "docs": docs })))
}

async fn get_doc(
    State(state): State<ApiState>,
    Extension(access): Extension<Access>,
    Path((ns, id)): Path<(String, String)>,
    Query(q): Query<ReadQuery>,
) -> Result<Response, ApiError> {
    let (ns, id) = names(&ns, &id)?;
    access.check_read(&ns)?;
    wait_for_heads(&state, &ns, &id, &q).await?;
    let doc = state.store.get(&ns, &id)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("document {ns}/{id} not found"),
        )
    })?;
    let mut resp = Json(Value::Object(doc.content)).into_response();
    if let Ok(v) = HeaderValue::from_str(&etag(&doc.heads)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

async fn put_doc(
    State(state): State<ApiState>,
    Extension(access): Extension<Access>,
    Path((ns, id)): Path<(String, String)>,
    Query(q): Query<WriteQuery>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (ns, id) = names(&ns, &id)?;
    check_writable(&state, &access, &ns)?;
    let wait = q.checked(&state, &ns)?;
    let content = json_body(bytes)?;
    let w = state
        .store
        .put(&ns, &id, content, if_match(&headers)?)
        .await?;
    answer_write(&state, &ns, &id, w, wait).await
}

async fn patch_doc(
    State(state): State<ApiState>,
    Extension(access): Extension<Access>,
    Path((ns, id)): Path<(String, String)>,
    Query(q): Query<WriteQuery>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (ns, id) = names(&ns, &id)?;
    check_writable(&state, &access, &ns)?;
    let wait = q.checked(&state, &ns)?;
    let patch = json_body(bytes)?;
    let w = state
        .store
        .patch(&ns, &id, patch, if_match(&headers)?)
        .await?;
    answer_write(&state, &ns, &id, w, wait).await
}

async fn delete_doc(
    State(state): State<ApiState>,
    Extension(access): Extension<Access>,
    Path((ns, id)): Path<(String, String)>,
    Query(q): Query<WriteQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (ns, id) = names(&ns, &id)?;
    check_writable(&state, &access, &ns)?;
    let wait = q.checked(&state, &ns)?;
    let w = state.store.delete(&ns, &id, if_match(&headers)?).await?;
    answer_write(&state, &ns, &id, w, wait).await
}

async fn conflicts(
    State(state): State<ApiState>,
    Extension(access): Extension<Access>,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (ns, id) = names(&ns, &id)?;
    access.check_read(&ns)?;
    let found = state.store.conflicts(&ns, &id)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("document {ns}/{id} not found"),
        )
    })?;
    Ok(Json(json!({ "conflicts": found })))
}

async fn get_automerge(
    State(state): State<ApiState>,
    Extension(access): Extension<Access>,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (ns, id) = names(&ns, &id)?;
    access.check_read(&ns)?;
    let doc = state
        .store
        .export(&ns, &id)?
        .filter(|d| !d.deleted)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("document {ns}/{id} not found"),
            )
        })?;
    let mut resp = (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        doc.bytes,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&etag(&doc.heads)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

async fn post_automerge(
    State(state): State<ApiState>,
    Extension(access): Extension<Access>,
    Path((ns, id)): Path<(String, String)>,
    Query(q): Query<WriteQuery>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (ns, id) = names(&ns, &id)?;
    check_writable(&state, &access, &ns)?;
    let wait = q.checked(&state, &ns)?;
    let bytes = body(bytes)?;
    let w = state.store.import(&ns, &id, bytes.to_vec()).await?;
    answer_write(&state, &ns, &id, w, wait).await
}

#[derive(Debug, Deserialize)]
struct ChangesQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

const CHANGES_PAGE: usize = 1000;

async fn changes(
    State(state): State<ApiState>,
    Query(q): Query<ChangesQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let since = FeedSeq(q.since.unwrap_or(0));
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_sse {
        return Ok(Sse::new(change_stream(state.store.clone(), since))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response());
    }
    let limit = q.limit.unwrap_or(CHANGES_PAGE).min(CHANGES_PAGE);
    let last = state.store.last_seq();
    let entries = state.store.changes_since(since, limit)?;
    let last_seq = if entries.len() < limit {
        last.max(entries.last().map_or(since, |e| e.seq))
    } else {
        entries.last().map_or(since, |e| e.seq)
    };
    Ok(Json(json!({
        "changes": entries.iter().map(feed_json).collect::<Vec<_>>(),
        "last_seq": last_seq.0,
    }))
    .into_response())
}

fn feed_json(e: &crate::store::FeedEntry) -> Value {
    json!({
        "seq": e.seq.0,
        "ns": e.ns.as_str(),
        "id": e.id.as_str(),
        "heads": heads_json(&e.heads),
        "deleted": e.deleted,
    })
}

/// Every change after `since`, then each new one as it commits, as SSE events with the
/// feed seq as event id (so a client can resume with `since`).
fn change_stream(store: Store, since: FeedSeq) -> impl Stream<Item = Result<Event, Infallible>> {
    let watch = store.subscribe();
    stream::unfold(
        (store, watch, since, Vec::<Event>::new()),
        |(store, mut watch, mut pos, mut ready)| async move {
            loop {
                if let Some(event) = ready.pop() {
                    return Some((Ok(event), (store, watch, pos, ready)));
                }
                match store.changes_since(pos, CHANGES_PAGE) {
                    Ok(entries) if !entries.is_empty() => {
                        for e in entries.iter().rev() {
                            ready.push(
                                Event::default()
                                    .id(e.seq.0.to_string())
                                    .event("change")
                                    .data(feed_json(e).to_string()),
                            );
                        }
                        pos = entries.last().map_or(pos, |e| e.seq);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "change stream ended");
                        return None;
                    }
                }
                if watch.changed().await.is_err() {
                    return None;
                }
            }
        },
    )
}

async fn status(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let peers: Vec<Value> = state
        .node
        .as_ref()
        .map(|n| n.peers())
        .unwrap_or_default()
        .iter()
        .map(PeerStatus::to_json)
        .collect();
    let crl = state.node.as_ref().and_then(|n| n.revocations().crl());
    let mut status = json!({
        "node_id": state.node_id.as_str(),
        "role": state.role.as_str(),
        "feed_epoch": format!("{:032x}", state.store.feed_epoch()),
        "store_fault": state.store.fault().map(|f| json!({"reason": f.reason, "no_space": f.no_space})),
        "quarantined": state.store.quarantined(),
        "last_seq": state.store.last_seq().0,
        "docs": state.store.doc_count()?,
        "cert_days_left": state
            .node
            .as_ref()
            .and_then(Node::cert_not_after)
            .map(crate::net::node::days_until),
        "revocation_list_error": state.node.as_ref().and_then(|n| n.revocations().problem()),
        "revocation_list_number": crl.as_ref().map(|c| c.number()),
        "edges_connected": state.node.as_ref().map(Node::edges_connected),
        "max_peers": state.node.as_ref().and_then(Node::max_peers),
        "revoked_certificates": crl.as_ref().map_or(0, |c| c.entries().len()),
        "peers": peers,
        "blobs": state.node.as_ref().and_then(Node::blobs).map(blob_status),
    });
    if let Some(obj) = status.as_object_mut() {
        for (key, value) in state.extensions.iter().flat_map(|e| e.status()) {
            obj.insert(key.to_owned(), value);
        }
    }
    Ok(Json(status))
}

/// The blob part of `/v1/status`.
fn blob_status(blobs: &crate::blobs::Blobs) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = blobs.stats();
    json!({
        "held": blobs.files().list().map_or(0, |l| l.len()),
        "bytes_used": blobs.files().used_bytes(),
        "transfers": blobs.transfers(),
        "fetched": s.fetched.load(Relaxed),
        "fetch_failures": s.fetch_failures.load(Relaxed),
        "received_bytes": s.received_bytes.load(Relaxed),
        "resumed_bytes": s.resumed_bytes.load(Relaxed),
        "sent_bytes": s.sent_bytes.load(Relaxed),
        "compression_saved_bytes": s.compression_saved_bytes.load(Relaxed),
        "corrupt": s.corrupt.load(Relaxed),
        "refused": s.refused.load(Relaxed),
        "collected": s.collected.load(Relaxed),
    })
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let body = crate::metrics::render(&state.store, state.node.as_ref(), &state.extensions);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
