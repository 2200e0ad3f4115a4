//! What exports and imports share: their connection's health, and the loop that keeps a
//! session with the broker going, reconnecting after failures.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Waits between attempts to reach the broker: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_LAST: Duration = Duration::from_secs(15);

/// Whether a bridge's connection is up, and how it last failed.
#[derive(Debug, Default)]
pub struct Health {
    /// Connected to the broker now.
    pub connected: AtomicBool,
    /// Sessions that ended in a failure.
    pub failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Health {
    /// The session is up: the last error is over.
    pub fn up(&self) {
        self.connected.store(true, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
    }

    /// Counts a failure; logs it unless it repeats the last one.
    pub fn failed(&self, what: &str, url: &str, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let changed = self
            .last_error
            .lock()
            .map(|mut e| e.replace(why.clone()).as_deref() != Some(why.as_str()))
            .unwrap_or(true);
        if changed {
            tracing::warn!(bridge = what, broker = %url, error = %why, "the bus bridge failed; retrying");
        }
    }

    /// The last failure, until a session is up again.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// Runs sessions until `stop`: each ends by `stop` (done) or by a failure, after which the
/// next starts after a wait that doubles from 250 ms to 15 s.
pub async fn keep_running<F, Fut>(
    health: &Health,
    what: &str,
    url: &str,
    stop: &CancellationToken,
    mut session: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut wait = RETRY_FIRST;
    loop {
        let ended = tokio::select! {
            ended = session() => ended,
            () = stop.cancelled() => Ok(()),
        };
        health.connected.store(false, Ordering::Relaxed);
        match ended {
            Ok(()) => return,
            Err(why) => health.failed(what, url, why),
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        wait = (wait * 2).min(RETRY_LAST);
    }
}
