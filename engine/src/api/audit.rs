//! `POST /v1/audit`: compare this node's documents with a connected peer's and repair
//! every difference (see [`crate::sync::audit`]).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::ApiState;
use crate::model::{NodeId, NsPattern};
use crate::net::audit::{AuditOutcome, DEFAULT_AUDIT_TIMEOUT};
use crate::sync::session::MAX_AUDIT_PATTERNS;

/// Longest an audit request may wait.
const MAX_AUDIT_TIMEOUT_MS: u64 = 3_600_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditBody {
    /// The peer's node id.
    peer: String,
    /// Namespace patterns compared (default: every namespace the two share).
    #[serde(default)]
    namespaces: Vec<String>,
    /// How long to wait for the comparison and the repairs, in milliseconds.
    timeout_ms: Option<u64>,
}

pub(super) async fn audit(
    State(state): State<ApiState>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<AuditOutcome>, ApiError> {
    let bytes = super::body(bytes)?;
    let body: AuditBody = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"peer\": NODE, \"namespaces\": [PATTERN, …]}}: {e}"),
        )
    })?;
    let peer = NodeId::new(&body.peer)?;
    if body.namespaces.len() > MAX_AUDIT_PATTERNS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_AUDIT_PATTERNS} namespace patterns"),
        ));
    }
    let namespaces = body
        .namespaces
        .iter()
        .map(NsPattern::new)
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = match body.timeout_ms {
        Some(ms) if ms > MAX_AUDIT_TIMEOUT_MS => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("timeout_ms is at most {MAX_AUDIT_TIMEOUT_MS}"),
            ))
        }
        Some(ms) => Duration::from_millis(ms),
        None => DEFAULT_AUDIT_TIMEOUT,
    };
    let Some(node) = &state.node else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node runs without sync: there is no peer to audit",
        ));
    };
    node.audit(&peer, namespaces, timeout)
        .await
        .map(Json)
        .map_err(|e| ApiError::new(e.status(), e.to_string()))
}
