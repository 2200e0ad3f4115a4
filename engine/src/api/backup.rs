//! `GET /v1/backup`: a consistent copy of the node's store, streamed while it keeps
//! running (what `tidesync-hub backup` and `tidesync-edge backup` save).

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::ApiState;
use crate::store::{BackupSummary, Store};

/// Bytes read from the copy per chunk of the response.
const CHUNK: usize = 256 << 10;

/// Whether a copy is being made or sent: one at a time, since each takes the disk space
/// of the whole database until its response ends.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Holds [`RUNNING`] until dropped (with the response's body).
struct OneAtATime;

impl OneAtATime {
    fn take() -> Option<Self> {
        RUNNING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Self)
    }
}

impl Drop for OneAtATime {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

pub(super) async fn backup(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let one = OneAtATime::take().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "a backup is being made already; try again when it is done",
        )
    })?;
    let store = state.store.clone();
    let made = tokio::task::spawn_blocking(move || snapshot(&store))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let (file, len, summary) = made;
    let body = futures_util::stream::try_unfold((file, one), |(mut f, one)| async move {
        let (f, chunk) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; CHUNK];
            let n = f.read(&mut buf)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((f, buf))
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok::<_, std::io::Error>((!chunk.is_empty()).then(|| (Bytes::from(chunk), (f, one))))
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert("x-tidesync-backup-docs", HeaderValue::from(summary.docs));
    Ok(response)
}

/// Writes the copy next to the database (where there is room for it), opens it and
/// unlinks it: the open file is all that is left, and it goes when the response ends.
fn snapshot(store: &Store) -> Result<(std::fs::File, u64, BackupSummary), ApiError> {
    let mut name = [0u8; 8];
    getrandom::fill(&mut name)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let dir = store.path().parent().map_or_else(
        || std::path::PathBuf::from("."),
        std::path::Path::to_path_buf,
    );
    let tmp = dir.join(format!(".backup-{}.redb", u64::from_le_bytes(name)));
    let summary = store.backup_to(&tmp)?;
    let opened = std::fs::File::open(&tmp).and_then(|f| Ok((f.metadata()?.len(), f)));
    let _ = std::fs::remove_file(&tmp);
    let (len, file) = opened.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the copy: {e}"),
        )
    })?;
    Ok((file, len, summary))
}
