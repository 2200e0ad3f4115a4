//! Garbage collection: a blob no document references is deleted once its grace period
//! has passed since it lost its last reference (or, for a blob put and never referenced,
//! since it was written). A blob being received is never collected.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::{unix_now_s, BlobError, Blobs};
use crate::model::format_blob_hash;

/// What one collection did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Blobs deleted.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Blobs {
    /// Deletes the blobs unreferenced for longer than the grace period, as of `now_s`.
    pub fn collect_garbage(&self, now_s: u64) -> Result<Collected, BlobError> {
        let grace = self.config().gc_grace.as_secs();
        let mut done = Collected::default();
        for (hash, size) in self.files().list()? {
            // Checked again under the lock: a put of the same bytes meanwhile renews it.
            let _deleting = self.files().lock();
            if self.in_transfer(&hash) || self.index().is_referenced(&hash)? {
                continue;
            }
            let since = match self.index().unreferenced_since(&hash)? {
                Some(s) => s,
                // Never referenced: put through the API and not (yet) named by a document.
                None => written_at(self, &hash).unwrap_or(now_s),
            };
            if now_s.saturating_sub(since) < grace {
                continue;
            }
            self.files().remove(&hash)?;
            self.index().forget(&hash)?;
            done.blobs += 1;
            done.bytes += size;
            tracing::info!(blob = %format_blob_hash(&hash), size, "deleted a blob no document references");
        }
        // What was received of blobs no document references at that size any more (a
        // reference that went, or one that claimed a wrong size) goes at once.
        for (hash, size) in self.files().partials()? {
            if self.in_transfer(&hash) || self.index().referenced_size(&hash)? == Some(size) {
                continue;
            }
            self.files().discard_partial(&hash, size);
            self.forget_partial(&hash);
        }
        let stats = self.stats();
        stats.collected.fetch_add(done.blobs, Ordering::Relaxed);
        stats
            .collected_bytes
            .fetch_add(done.bytes, Ordering::Relaxed);
        Ok(done)
    }

    /// Collects garbage every so often (a tenth of the grace period, between 1 s and an
    /// hour) until `stop`.
    pub async fn run_gc(self, stop: CancellationToken) {
        let every =
            (self.config().gc_grace / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let b = self.clone();
            match tokio::task::spawn_blocking(move || b.collect_garbage(unix_now_s())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "blob garbage collection failed"),
                Err(e) => tracing::error!(error = %e, "blob garbage collection panicked"),
            }
        }
    }
}

fn written_at(blobs: &Blobs, hash: &[u8; 32]) -> Option<u64> {
    let path = blobs
        .files()
        .dir()
        .join(format!("{}.data", format_blob_hash(hash)));
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}
