//! The API's accept loop: HTTP/1.1 with a deadline for request headers and a cap on open
//! connections, so a client that opens connections and trickles its headers (slowloris)
//! holds neither memory nor file descriptors for long, and never all of them.
//!
//! `axum::serve` sets neither bound, so connections are served here with hyper directly.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Bounds on the API's connections.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// A connection that has not sent a request's whole header block this long after it
    /// started one is closed.
    pub header_timeout: Duration,
    /// Connections open at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// How long a stop waits for open requests (and change streams) before dropping them.
    pub drain: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 256,
            drain: Duration::from_secs(5),
        }
    }
}

/// Serves `app` on `listener` until `stop`, then lets open requests finish (up to
/// `limits.drain`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Each connection task holds a sender; once all are dropped, every request is done.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted:
                    // wait a moment rather than spin.
                    tracing::warn!(error = %e, "the API could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let service = TowerToHyperService::new(app.clone());
        // Upgrades: `/v1/automerge-repo` turns its connection into a WebSocket.
        let conn = http
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let (stop, open) = (stop.clone(), open_tx.clone());
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "API connection ended");
            }
            drop(slot);
            drop(open);
        });
    }
    drop(listener);
    drop(open_tx);
    if tokio::time::timeout(limits.drain, open_rx.recv())
        .await
        .is_err()
    {
        tracing::info!("API requests still open at stop were dropped");
    }
}
