//! Replication a client chooses per request: writes that answer only once K peers hold
//! them (`?replicas=K&timeout_ms=T`, synchronous replication), and reads that wait until
//! this node holds given heads (`?heads=H1,H2&timeout_ms=T`, read-your-writes across
//! nodes).

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::error::ApiError;
use super::ApiState;
use crate::model::{parse_heads, DocId, Namespace};
use crate::store::WriteOutcome;

/// How long a write waits for its replicas, or a read for its heads, unless told.
pub const DEFAULT_WAIT_MS: u64 = 5_000;
/// Longest wait a request may ask for: each waiting request holds one of the API's
/// connections.
pub const MAX_WAIT_MS: u64 = 120_000;
pub use crate::net::replicas::MAX_REPLICAS;

/// `?replicas=K&timeout_ms=T` on writes.
#[derive(Debug, Default, Deserialize)]
pub struct WriteQuery {
    /// Peers that must hold the write before the 200.
    pub replicas: Option<usize>,
    /// How long to wait for them, in milliseconds.
    pub timeout_ms: Option<u64>,
}

/// `?heads=H1,H2&timeout_ms=T` on reads.
#[derive(Debug, Default, Deserialize)]
pub struct ReadQuery {
    /// Heads the answer must include (an ETag from another node, quotes optional).
    pub heads: Option<String>,
    /// How long to wait for them, in milliseconds.
    pub timeout_ms: Option<u64>,
}

fn wait_time(timeout_ms: Option<u64>) -> Result<Duration, ApiError> {
    let ms = timeout_ms.unwrap_or(DEFAULT_WAIT_MS);
    if ms > MAX_WAIT_MS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("timeout_ms is at most {MAX_WAIT_MS}"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

/// What a write waits for once committed, checked before the write is made so a bad
/// query stores nothing.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaWait {
    want: usize,
    timeout: Duration,
}

impl WriteQuery {
    /// The wait this query asks for in `ns` (the namespace's default when it names no
    /// count), or a 400 that names the bad parameter.
    pub fn checked(&self, state: &ApiState, ns: &Namespace) -> Result<ReplicaWait, ApiError> {
        let want = self.replicas.unwrap_or_else(|| state.default_replicas(ns));
        if want > MAX_REPLICAS {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("replicas is at most {MAX_REPLICAS}"),
            ));
        }
        let timeout = wait_time(self.timeout_ms)?;
        Ok(ReplicaWait { want, timeout })
    }
}

/// The answer to a committed write: at once without `replicas`; else once `replicas`
/// peers hold it (200), or after `timeout_ms` with the count reached (202: durable here,
/// still replicating). Both carry `"replicas": n`.
pub async fn answer_write(
    state: &ApiState,
    ns: &Namespace,
    id: &DocId,
    w: WriteOutcome,
    wait: ReplicaWait,
) -> Result<Response, ApiError> {
    let ReplicaWait { want, timeout } = wait;
    if want == 0 {
        return Ok(super::written(w, None));
    }
    let confirmed = match (&state.node, state.store.doc(ns, id)?) {
        (Some(node), Some(doc)) => {
            node.replicas()
                .wait(ns, id, &w.heads, want, timeout, &doc)
                .await
        }
        // Without sync no peer will ever hold it.
        _ => 0,
    };
    let short = confirmed < want;
    let mut resp = super::written(w, Some(confirmed));
    if short {
        *resp.status_mut() = StatusCode::ACCEPTED;
    }
    Ok(resp)
}

/// Waits until this node's copy of `ns/id` holds every head in `q.heads` (none asked:
/// at once). 504 with a JSON error after `timeout_ms`.
pub async fn wait_for_heads(
    state: &ApiState,
    ns: &Namespace,
    id: &DocId,
    q: &ReadQuery,
) -> Result<(), ApiError> {
    let Some(text) = q.heads.as_deref().filter(|t| !t.trim().is_empty()) else {
        return Ok(());
    };
    let wanted = parse_heads(text.trim().trim_matches('"'))
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("heads: {e}")))?;
    let timeout = wait_time(q.timeout_ms)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut feed = state.store.subscribe();
    loop {
        // Subscribed before the check, so a commit between the two is not missed.
        feed.borrow_and_update();
        if state.store.holds_heads(ns, id, &wanted)? {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, feed.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "document {ns}/{id} does not hold the asked heads after {} ms: \
                         the write has not reached this node yet",
                        timeout.as_millis()
                    ),
                ))
            }
        }
    }
}
