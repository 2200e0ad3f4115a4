//! The fetch scheduler: which wanted blob is fetched when, from which peers, and when a
//! blob that could not be fetched is tried again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fetch::{fetch_blob, Fetched, Source};
use super::Blobs;
use crate::model::format_blob_hash;

/// First wait before a blob that could not be fetched is tried again; it doubles up to
/// [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between tries of one blob.
const MAX_RETRY: Duration = Duration::from_secs(15);

/// Fetches the blobs this node wants, [`super::MAX_FETCHES`] at a time, from the peers
/// `sources` names when asked, until `stop`. Woken by new references, new peers and
/// reads of lazy blobs; a blob that could not be fetched is tried again with backoff.
pub async fn run_fetcher<F>(blobs: Blobs, sources: F, stop: CancellationToken)
where
    F: Fn() -> Vec<Source> + Send + 'static,
{
    let mut retry: HashMap<[u8; 32], (Instant, Duration)> = HashMap::new();
    let mut running = tokio::task::JoinSet::new();
    let mut inflight = HashSet::new();
    loop {
        let wanted = {
            let b = blobs.clone();
            tokio::task::spawn_blocking(move || b.wanted())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        };
        let now = Instant::now();
        let mut next_retry: Option<Instant> = None;
        let peers = if wanted.is_empty() {
            Vec::new()
        } else {
            sources()
        };
        for r in wanted {
            if inflight.len() >= super::MAX_FETCHES || peers.is_empty() {
                break;
            }
            if inflight.contains(&r.hash) {
                continue;
            }
            if let Some((at, _)) = retry.get(&r.hash) {
                if *at > now {
                    next_retry = Some(next_retry.map_or(*at, |n: Instant| n.min(*at)));
                    continue;
                }
            }
            if r.size > super::wire::MAX_BLOB_SIZE {
                continue;
            }
            inflight.insert(r.hash);
            // Spread the load: each blob starts with another peer first.
            let mut ps = peers.clone();
            let turn = (r.hash[0] as usize) % ps.len();
            ps.rotate_left(turn);
            let b = blobs.clone();
            running.spawn(async move {
                let got = fetch_blob(&b, r.hash, r.size, ps).await;
                (r.hash, got)
            });
        }
        let sleep_until = next_retry.unwrap_or_else(|| Instant::now() + MAX_RETRY);
        tokio::select! {
            () = stop.cancelled() => break,
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok((hash, got)) = done {
                    inflight.remove(&hash);
                    match got {
                        Ok(Fetched::Complete) => { retry.remove(&hash); }
                        Ok(Fetched::AlreadyRunning) => {}
                        Ok(Fetched::Incomplete { missing }) => {
                            let wait = retry.get(&hash).map_or(FIRST_RETRY, |(_, w)| (*w * 2).min(MAX_RETRY));
                            tracing::debug!(blob = %format_blob_hash(&hash), missing, retry_ms = wait.as_millis() as u64, "blob not complete yet");
                            retry.insert(hash, (Instant::now() + wait, wait));
                        }
                        Err(e) => {
                            let wait = retry.get(&hash).map_or(FIRST_RETRY, |(_, w)| (*w * 2).min(MAX_RETRY));
                            tracing::warn!(blob = %format_blob_hash(&hash), error = %e, "fetching a blob failed");
                            retry.insert(hash, (Instant::now() + wait, wait));
                        }
                    }
                } else {
                    // A fetch task panicked: forget what was in flight and look again.
                    inflight.clear();
                }
            }
            () = blobs.wanted_changed() => {
                // Something new: a blob asked for by a read or a new peer is worth a try now.
                retry.retain(|_, (at, _)| *at <= Instant::now() + FIRST_RETRY);
            }
            () = tokio::time::sleep_until(sleep_until) => {}
        }
    }
    running.abort_all();
}
