//! How far a peer's catch-up has come: documents and bytes done and left, the rate, and
//! an estimate of the time left, for `/v1/status`, `/metrics` and `status --watch`.
//!
//! A catch-up begins when the peer is found behind the local feed and ends when it has
//! acknowledged everything. Documents left are counted in the feed (one entry per
//! document, up to [`COUNT_CAP`]) when it begins and every [`RECOUNT_EVERY`], and between
//! counts follow the documents synced since; the count includes documents the peer does
//! not take (other subscriptions), so for a partial peer it is an upper bound. Bytes left
//! are estimated at the bytes per document the catch-up has sent so far, since a
//! document's size on the wire is known only once it is sent.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::counters::PeerCounters;
use crate::model::FeedSeq;
use crate::store::Store;

/// Most feed entries counted for one reading (a few milliseconds); beyond it the documents
/// left read as this many until fewer remain.
pub const COUNT_CAP: u64 = 200_000;

/// How often the documents left are counted again while a catch-up runs.
pub const RECOUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The current catch-up of one connection, updated about once a second by its driver.
#[derive(Debug, Default)]
pub struct CatchUp {
    started: Option<Started>,
}

#[derive(Debug)]
struct Started {
    at: Instant,
    docs_synced: u64,
    bytes_sent: u64,
    /// The last count of documents left, when it was made, and `docs_synced` then.
    counted: u64,
    counted_at: Instant,
    synced_at_count: u64,
}

impl CatchUp {
    /// Whether a catch-up is under way (as of the last reading).
    pub fn active(&self) -> bool {
        self.started.is_some()
    }

    /// Reads the peer's position (`lag` feed positions behind) and sets its gauges.
    pub fn update(&mut self, store: &Store, lag: u64, counters: &PeerCounters) {
        let docs_synced = counters.docs_synced.load(Ordering::Relaxed);
        let bytes_sent = counters.bytes_sent.load(Ordering::Relaxed);
        if lag == 0 {
            // Done: the last catch-up's totals stay readable; nothing is left.
            if self.started.take().is_some() {
                counters
                    .catchup_rate_bytes_per_second
                    .store(0, Ordering::Relaxed);
            }
            counters
                .catchup_remaining_documents
                .store(0, Ordering::Relaxed);
            counters.catchup_remaining_bytes.store(0, Ordering::Relaxed);
            counters.catchup_eta_seconds.store(0, Ordering::Relaxed);
            return;
        }
        let count = || {
            let after = FeedSeq(store.last_seq().0.saturating_sub(lag));
            store.feed_entries_after(after, COUNT_CAP).unwrap_or(0)
        };
        let started = match &mut self.started {
            Some(s) => {
                if s.counted_at.elapsed() >= RECOUNT_EVERY {
                    s.counted = count();
                    s.counted_at = Instant::now();
                    s.synced_at_count = docs_synced;
                }
                s
            }
            None => self.started.insert(Started {
                at: Instant::now(),
                docs_synced,
                bytes_sent,
                counted: count(),
                counted_at: Instant::now(),
                synced_at_count: docs_synced,
            }),
        };
        // The peer is behind, so at least one document is left.
        let remaining = started
            .counted
            .saturating_sub(docs_synced.saturating_sub(started.synced_at_count))
            .max(1);
        let done_docs = docs_synced.saturating_sub(started.docs_synced);
        let done_bytes = bytes_sent.saturating_sub(started.bytes_sent);
        let elapsed = started.at.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            done_bytes as f64 / elapsed
        } else {
            0.0
        };
        let remaining_bytes = done_bytes
            .checked_div(done_docs)
            .map_or(0, |per_doc| remaining.saturating_mul(per_doc));
        let eta = if rate >= 1.0 && remaining_bytes > 0 {
            (remaining_bytes as f64 / rate).ceil() as u64
        } else {
            0
        };
        counters
            .catchup_remaining_documents
            .store(remaining, Ordering::Relaxed);
        counters
            .catchup_remaining_bytes
            .store(remaining_bytes, Ordering::Relaxed);
        counters
            .catchup_done_documents
            .store(done_docs, Ordering::Relaxed);
        counters
            .catchup_done_bytes
            .store(done_bytes, Ordering::Relaxed);
        counters
            .catchup_rate_bytes_per_second
            .store(rate as u64, Ordering::Relaxed);
        counters.catchup_eta_seconds.store(eta, Ordering::Relaxed);
    }
}
