//! Every API error as `{"error": "…"}` with its status, decided in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::{ModelError, StoreError};

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        let status = match e {
            ModelError::TooLarge { .. } | ModelError::TooManyOps { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Model(m) => m.into(),
            StoreError::NotFound => Self::new(StatusCode::NOT_FOUND, "document not found"),
            StoreError::PreconditionFailed { current } => Self::new(
                StatusCode::CONFLICT,
                format!(
                    "If-Match does not match the current heads \"{}\"",
                    crate::model::format_heads(&current)
                ),
            ),
            StoreError::Closed | StoreError::Unavailable(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            StoreError::NoSpace(_) => Self::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
            // Another node still serves it; the reason is in this node's status and log.
            StoreError::Quarantined { ns, id, .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "document {ns}/{id} is quarantined on this node: its stored copy does \
                     not load (see /v1/status); other nodes still serve it"
                ),
            ),
            other => {
                // The details (paths, storage errors) are for the operator, not the client:
                // the client gets an id to quote, the log has the rest.
                let mut id = [0u8; 6];
                let _ = getrandom::fill(&mut id);
                let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
                tracing::error!(error_id = %id, error = %other, "request failed in the store");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("internal error {id} (the node's log has the details)"),
                )
            }
        }
    }
}
