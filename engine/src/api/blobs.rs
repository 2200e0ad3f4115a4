//! `PUT /v1/blobs`, `GET /v1/blobs`, and `GET`/`HEAD /v1/blobs/{hash}`.
//!
//! Bodies stream both ways: a put is hashed and written as it arrives (a 10 GiB file never
//! sits in memory) and answered only once it is durable; a read streams from the file.
//! A read of a blob that is referenced here but not held (a `lazy` namespace, or an
//! `eager` one still fetching) waits for the fetch, up to `?timeout_ms=`.

use std::io;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::ApiState;
use crate::blobs::wire::MAX_BLOB_SIZE;
use crate::blobs::{BlobError, Blobs};
use crate::model::{format_blob_hash, parse_blob_hash};

/// How long a read waits for a blob being fetched, unless `?timeout_ms=` says.
pub const DEFAULT_READ_WAIT: Duration = Duration::from_secs(60);

/// Longest `?timeout_ms=`.
pub const MAX_READ_WAIT: Duration = Duration::from_secs(3600);

/// Bytes read from the file per body chunk.
const READ_CHUNK: usize = 256 * 1024;

fn blobs_of(state: &ApiState) -> Result<&Blobs, ApiError> {
    state
        .node
        .as_ref()
        .and_then(|n| n.blobs())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "this node keeps no blobs"))
}

impl From<BlobError> for ApiError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "blob not found"),
            BlobError::Timeout => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "the blob is referenced here but could not be fetched in time",
            ),
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

fn io_error(e: io::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("blob storage: {e}"),
    )
}

/// `PUT /v1/blobs`: stores the body as a blob; answers `{"hash","size"}` once durable.
pub async fn put_blob(State(state): State<ApiState>, body: Body) -> Result<Response, ApiError> {
    let blobs = blobs_of(&state)?.clone();
    // `None` ends the body; a channel closed without it (an upload cut off) stores
    // nothing.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(8);
    let files = blobs.files().clone();
    let writer = tokio::task::spawn_blocking(move || -> io::Result<Option<([u8; 32], u64)>> {
        let mut put = files.begin_put()?;
        loop {
            match rx.blocking_recv() {
                Some(Some(chunk)) => {
                    if put.size() + chunk.len() as u64 > MAX_BLOB_SIZE {
                        return Ok(None);
                    }
                    put.write(&chunk)?;
                }
                Some(None) => return put.finish().map(Some),
                None => return Err(io::Error::other("the upload was cut off")),
            }
        }
    });
    let mut stream = body.into_data_stream();
    let mut cut = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if tx.send(Some(c)).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                cut = Some(e.to_string());
                break;
            }
        }
    }
    if let Some(why) = cut {
        // The writer sees the channel close without an end and drops what it wrote.
        drop(tx);
        let _ = writer.await;
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the upload was cut off: {why}"),
        ));
    }
    // A writer that stopped early (too large, a disk error) answers below.
    let _ = tx.send(None).await;
    drop(tx);
    let stored = writer
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(io_error)?;
    let Some((hash, size)) = stored else {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a blob may have at most {MAX_BLOB_SIZE} bytes"),
        ));
    };
    blobs.finished(&hash);
    Ok((
        StatusCode::OK,
        Json(json!({"hash": format_blob_hash(&hash), "size": size})),
    )
        .into_response())
}

/// `GET /v1/blobs`: the blobs held here, with the documents referencing each, the
/// transfers under way and the space used.
pub async fn list_blobs(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let blobs = blobs_of(&state)?.clone();
    let listed = tokio::task::spawn_blocking(move || -> Result<Value, BlobError> {
        let mut out = Vec::new();
        for (hash, size) in blobs.files().list()? {
            let docs = blobs.index().docs_referencing(&hash)?;
            out.push(json!({
                "hash": format_blob_hash(&hash),
                "size": size,
                "docs": docs,
            }));
        }
        Ok(json!({
            "blobs": out,
            "bytes_used": blobs.files().used_bytes(),
            "transfers": blobs.transfers(),
        }))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(listed))
}

/// Query of a blob read.
#[derive(Debug, Deserialize)]
pub struct ReadQuery {
    /// How long to wait for a blob being fetched.
    timeout_ms: Option<u64>,
}

/// A byte range of a `Range` header, resolved against the blob's size.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    All,
    Part { start: u64, end: u64 },
    Unsatisfiable,
}

/// Reads one `bytes=` range (`a-b`, `a-`, `-n`). Several ranges, or another unit, are
/// answered with the whole blob, as HTTP allows.
fn parse_range(value: Option<&HeaderValue>, size: u64) -> Wanted {
    let Some(spec) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Wanted::All;
    };
    if spec.contains(',') {
        return Wanted::All;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Wanted::All;
    };
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.is_empty(), b.is_empty()) {
        (true, true) => return Wanted::All,
        (true, false) => match b.parse::<u64>() {
            Ok(0) => return Wanted::Unsatisfiable,
            Ok(n) => (size.saturating_sub(n), size),
            Err(_) => return Wanted::All,
        },
        (false, _) => {
            let Ok(start) = a.parse::<u64>() else {
                return Wanted::All;
            };
            let end = if b.is_empty() {
                size
            } else {
                match b.parse::<u64>() {
                    Ok(last) if last >= start => last.saturating_add(1).min(size),
                    _ => return Wanted::All,
                }
            };
            (start, end)
        }
    };
    if range.0 >= size || range.0 >= range.1 {
        return Wanted::Unsatisfiable;
    }
    Wanted::Part {
        start: range.0,
        end: range.1,
    }
}

/// `GET`/`HEAD /v1/blobs/{hash}`: the blob's bytes (or the asked `Range` of them), with
/// the hash as `ETag`.
pub async fn get_blob(
    State(state): State<ApiState>,
    Path(hash): Path<String>,
    Query(q): Query<ReadQuery>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let blobs = blobs_of(&state)?.clone();
    let hash = parse_blob_hash(&hash).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "a blob hash is 64 hex digits (BLAKE3)",
        )
    })?;
    let wait = q
        .timeout_ms
        .map_or(DEFAULT_READ_WAIT, Duration::from_millis)
        .min(MAX_READ_WAIT);
    // HEAD says whether the blob can be read here without fetching anything.
    let (source, state, size) = if method == Method::HEAD {
        let (state, size) = peek(&blobs, &hash)?;
        (None, state, size)
    } else {
        let source = find(&blobs, &hash, wait).await?;
        let (state, size) = (source.state(), source.size());
        (Some(source), state, size)
    };
    let etag = format!("\"{}\"", format_blob_hash(&hash));
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut out = HeaderMap::new();
    let put = |out: &mut HeaderMap, name, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            out.insert(name, v);
        }
    };
    put(&mut out, header::ETAG, etag);
    put(&mut out, header::ACCEPT_RANGES, "bytes".to_owned());
    put(
        &mut out,
        header::CONTENT_TYPE,
        "application/octet-stream".to_owned(),
    );
    put(
        &mut out,
        header::HeaderName::from_static(STATE_HEADER),
        state.to_owned(),
    );
    if not_modified {
        return Ok((StatusCode::NOT_MODIFIED, out).into_response());
    }
    let (status, start, end) = match parse_range(headers.get(header::RANGE), size) {
        Wanted::All => (StatusCode::OK, 0, size),
        Wanted::Part { start, end } => {
            put(
                &mut out,
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{size}", end - 1),
            );
            (StatusCode::PARTIAL_CONTENT, start, end)
        }
        Wanted::Unsatisfiable => {
            put(&mut out, header::CONTENT_RANGE, format!("bytes */{size}"));
            return Ok((StatusCode::RANGE_NOT_SATISFIABLE, out).into_response());
        }
    };
    put(&mut out, header::CONTENT_LENGTH, (end - start).to_string());
    let Some(source) = source else {
        return Ok((status, out).into_response());
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
    tokio::spawn(stream_out(blobs, hash, source, start..end, wait, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((status, out, Body::from_stream(stream)).into_response())
}

/// Where a read's bytes come from.
enum Source {
    /// A complete blob.
    Held { file: std::fs::File, size: u64 },
    /// A blob being fetched: bytes are served as soon as they are verified.
    Arriving {
        file: std::fs::File,
        size: u64,
        transfer: std::sync::Arc<crate::blobs::Transfer>,
    },
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Self::Held { size, .. } | Self::Arriving { size, .. } => *size,
        }
    }

    fn state(&self) -> &'static str {
        match self {
            Self::Held { .. } => "held",
            Self::Arriving { .. } => "arriving",
        }
    }
}

/// Response header saying where a read's bytes come from: `held` (a complete blob here),
/// `arriving` (being fetched; a GET streams it as it is verified) or `referenced` (a HEAD
/// of a blob a document here references that is not fetched yet; a GET fetches it).
pub const STATE_HEADER: &str = "x-tidesync-blob";

/// What a HEAD answers, without starting a fetch: the blob's state and size.
fn peek(blobs: &Blobs, hash: &[u8; 32]) -> Result<(&'static str, u64), ApiError> {
    if let Some(size) = blobs.files().held(hash).map_err(io_error)? {
        return Ok(("held", size));
    }
    let size = blobs
        .index()
        .referenced_size(hash)
        .map_err(BlobError::from)?
        .ok_or(BlobError::NotFound)?;
    let state = if blobs.in_transfer(hash) {
        "arriving"
    } else {
        "referenced"
    };
    Ok((state, size))
}

/// The blob held here, or, for one referenced here and not held, its transfer (started
/// if need be, whatever the namespace's policy): the read streams it as it arrives.
async fn find(blobs: &Blobs, hash: &[u8; 32], wait: Duration) -> Result<Source, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(r) = blobs.files().reader(hash).map_err(io_error)? {
            let size = r.size();
            return Ok(Source::Held { file: r.data, size });
        }
        let Some(size) = blobs
            .index()
            .referenced_size(hash)
            .map_err(BlobError::from)?
        else {
            return Err(BlobError::NotFound.into());
        };
        if let Some(transfer) = blobs.transfer(hash) {
            // The transfer opened (created) the partial file before registering... or is
            // finishing: then the blob is held on the next turn.
            if let Ok(file) = blobs.files().partial_reader(hash, size) {
                if transfer.size == size {
                    return Ok(Source::Arriving {
                        file,
                        size,
                        transfer,
                    });
                }
            }
        }
        blobs.ask(hash);
        if tokio::time::Instant::now() >= deadline {
            return Err(BlobError::Timeout.into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Streams `start..end` of `source` into `tx`; bytes of a blob being fetched only once
/// they are verified. A fetch that stalls longer than `wait` ends the body with an error.
async fn stream_out(
    blobs: Blobs,
    hash: [u8; 32],
    source: Source,
    range: std::ops::Range<u64>,
    wait: Duration,
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
) {
    let (file, mut transfer) = match source {
        Source::Held { file, .. } => (file, None),
        Source::Arriving { file, transfer, .. } => (file, Some(transfer)),
    };
    let file = std::sync::Arc::new(file);
    let (mut at, end) = (range.start, range.end);
    while at < end {
        let n = READ_CHUNK.min((end - at) as usize);
        let mut waited = Duration::ZERO;
        while let Some(t) = transfer.clone() {
            if t.covers(at, at + n as u64) {
                break;
            }
            let step = Duration::from_millis(200);
            let _ = tokio::time::timeout(step, t.progress.notified()).await;
            // The transfer may have completed (the file, renamed, is still this one) or
            // given up and started again (the next one knows what this one verified).
            if blobs.files().held(&hash).ok().flatten().is_some() {
                transfer = None;
            } else if let Some(next) = blobs.transfer(&hash) {
                transfer = Some(next);
            }
            waited += step;
            if waited > wait {
                let _ = tx
                    .send(Err(io::Error::other("the blob stopped arriving")))
                    .await;
                return;
            }
        }
        let f = file.clone();
        let read = tokio::task::spawn_blocking(move || {
            use positioned_io::ReadAt;
            let mut buf = vec![0u8; n];
            f.read_exact_at(at, &mut buf).map(|()| Bytes::from(buf))
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        let failed = read.is_err();
        if tx.send(read).await.is_err() || failed {
            return;
        }
        at += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> Wanted {
        parse_range(Some(&HeaderValue::from_str(v).expect("header")), size)
    }

    #[test]
    fn ranges_resolve_as_http_says() {
        assert_eq!(range("bytes=0-9", 100), Wanted::Part { start: 0, end: 10 });
        assert_eq!(
            range("bytes=90-", 100),
            Wanted::Part {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            range("bytes=-10", 100),
            Wanted::Part {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            range("bytes=-1000", 100),
            Wanted::Part { start: 0, end: 100 }
        );
        assert_eq!(
            range("bytes=50-1000", 100),
            Wanted::Part {
                start: 50,
                end: 100
            }
        );
        assert_eq!(range("bytes=100-", 100), Wanted::Unsatisfiable);
        assert_eq!(range("bytes=-0", 100), Wanted::Unsatisfiable);
        assert_eq!(range("bytes=9-3", 100), Wanted::All);
        assert_eq!(range("bytes=0-1,5-6", 100), Wanted::All);
        assert_eq!(range("items=0-1", 100), Wanted::All);
        assert_eq!(parse_range(None, 100), Wanted::All);
    }
}
