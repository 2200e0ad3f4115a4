//! Blobs: model weights, datasets and other large files, stored beside the documents and
//! synced as content-addressed, verified, resumable transfers.
//!
//! A document references a blob with `{"@blob": "<BLAKE3 hex>", "size": N}` anywhere in
//! its content (`model::blob_ref`). The node keeps:
//! - the blob files (`files`): complete blobs with their bao verification trees, and
//!   partial ones whose verified part is recomputed on resume;
//! - the reference index (`index`), which follows the change feed: which documents
//!   reference which blob, so a peer gets a blob only if it may read such a document, and
//!   a blob nothing references any more is deleted after a grace period (`gc`);
//! - transfers: blobs this node wants (referenced from a namespace whose policy is
//!   `eager`, or read while `lazy`) are fetched from every connected peer that has them
//!   (`fetch`), each chunk group verified as it arrives; peers serve blob streams
//!   (`serve`) at a lower priority than document sync, paced by the blob cap and the link's
//!   (`net::pacing`).
//!
//! The protocol of a blob stream is in `wire`.

pub mod blocks;
pub mod fetch;
pub mod fetcher;
pub mod files;
pub mod gc;
pub mod index;
pub mod serve;
pub mod stall;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::model::{format_blob_hash, BlobRef, Namespace, NsPattern};
use crate::store::Store;
pub use files::{BlobFiles, BlobReader};
pub use index::{BlobIndex, IndexError};

/// When a node fetches the blobs referenced by a namespace's documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FetchPolicy {
    /// As soon as a reference arrives.
    Eager,
    /// On the first read through the API.
    Lazy,
}

impl std::str::FromStr for FetchPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "eager" => Ok(Self::Eager),
            "lazy" => Ok(Self::Lazy),
            other => Err(format!("{other:?} is not a blob policy (eager or lazy)")),
        }
    }
}

/// Default grace period of a blob nothing references any more.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Blobs fetched at once.
pub const MAX_FETCHES: usize = 4;

/// Peers one blob is fetched from at once.
pub const MAX_SOURCES: usize = 4;

/// Blob streams this node serves at once (over all peers); more are told `Busy`.
pub const MAX_SERVING: usize = 32;

/// Settings of a node's blobs.
#[derive(Clone, Debug)]
pub struct BlobConfig {
    /// Fetch policy per namespace pattern (the first match wins).
    pub policies: Vec<(NsPattern, FetchPolicy)>,
    /// The policy of namespaces no pattern matches.
    pub default_policy: FetchPolicy,
    /// How long a blob nothing references is kept.
    pub gc_grace: Duration,
    /// Bytes per second of blob streams per link, each way this node sends; `None`:
    /// uncapped (QUIC's congestion control and the lower priority still apply).
    pub max_rate: Option<u64>,
    /// Fault injection for tests: serve every blob stream with a flipped bit, as a faulty
    /// or hostile peer would.
    pub fault_corrupt_sends: bool,
    /// The newest blob protocol this node speaks: [`wire::BLOB_PROTOCOL`], or
    /// [`wire::PLAIN_BLOB_PROTOCOL`] to serve and ask as a node of that version would
    /// (mixed-version tests).
    pub protocol: u8,
}

impl Default for BlobConfig {
    fn default() -> Self {
        Self {
            policies: Vec::new(),
            default_policy: FetchPolicy::Eager,
            gc_grace: DEFAULT_GC_GRACE,
            max_rate: None,
            fault_corrupt_sends: false,
            protocol: wire::BLOB_PROTOCOL,
        }
    }
}

/// A blob being received.
#[derive(Debug)]
pub struct Transfer {
    /// The blob.
    pub hash: [u8; 32],
    /// Its size.
    pub size: u64,
    /// Bytes of it verified and written (including what an earlier run received).
    pub done: AtomicU64,
    /// `done` when this run started: the rate counts only this run's bytes.
    pub done_at_start: AtomicU64,
    /// Bytes received over the network by this transfer (data and tree).
    pub received: AtomicU64,
    /// Peers it is fetched from now.
    pub sources: AtomicUsize,
    /// When it started.
    pub started: Instant,
    /// The chunks verified so far.
    pub have: Mutex<bao_tree::ChunkRanges>,
    /// Woken whenever `have` grows, for reads streaming the blob as it arrives.
    pub progress: Notify,
}

impl Transfer {
    /// Starts from what the partial files already verify (`bytes` of them).
    fn start_from(&self, have: &bao_tree::ChunkRanges, bytes: u64) {
        if let Ok(mut h) = self.have.lock() {
            *h = have.clone();
        }
        self.done.store(bytes, Ordering::Relaxed);
        self.done_at_start.store(bytes, Ordering::Relaxed);
    }

    /// Whether the bytes `start..end` are verified and written.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        use bao_tree::{ChunkNum, ChunkRanges};
        let want = ChunkRanges::from(ChunkNum::full_chunks(start)..ChunkNum::chunks(end));
        self.have
            .lock()
            .is_ok_and(|have| (want.clone() - have.clone()).is_empty())
    }
}

/// A transfer as `/v1/status` shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TransferStatus {
    /// The blob's hash.
    pub hash: String,
    /// Its size.
    pub size: u64,
    /// Bytes verified so far.
    pub done: u64,
    /// Bytes received over the network by this run.
    pub received: u64,
    /// Peers it comes from now.
    pub sources: usize,
    /// Bytes per second verified since it started.
    pub rate_bytes_s: u64,
}

/// Totals since the node started, for `/v1/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct BlobStats {
    /// Blobs fetched completely.
    pub fetched: AtomicU64,
    /// Fetch attempts that ended without the whole blob.
    pub fetch_failures: AtomicU64,
    /// Bytes received in blob streams.
    pub received_bytes: AtomicU64,
    /// Bytes of partial blobs found verified when their fetch started: what resuming a
    /// cut transfer did not fetch again.
    pub resumed_bytes: AtomicU64,
    /// Bytes sent in blob streams.
    pub sent_bytes: AtomicU64,
    /// Bytes zstd saved on blob streams sent (protocol 2): the plain blocks' size minus
    /// the compressed blocks' size (headers not counted), counted as each block goes.
    pub compression_saved_bytes: AtomicU64,
    /// Transfers cut off because a peer sent data that failed verification.
    pub corrupt: AtomicU64,
    /// Blob streams refused: not readable by the peer, not held, busy or malformed.
    pub refused: AtomicU64,
    /// Blobs deleted by garbage collection.
    pub collected: AtomicU64,
    /// Bytes deleted by garbage collection.
    pub collected_bytes: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    files: BlobFiles,
    index: BlobIndex,
    cfg: BlobConfig,
    transfers: Mutex<BTreeMap<[u8; 32], Arc<Transfer>>>,
    /// Blobs asked for by a read while their policy is `lazy`.
    asked: Mutex<BTreeSet<[u8; 32]>>,
    /// What is verified of blobs partly received, by hash and claimed size: known after
    /// the first attempt, so a retry does not hash the partial file again.
    partials: Mutex<std::collections::HashMap<[u8; 32], (u64, bao_tree::ChunkRanges)>>,
    /// Woken when there may be new blobs to fetch.
    wanted_changed: Notify,
    serving: Arc<tokio::sync::Semaphore>,
    stats: BlobStats,
}

/// A node's blobs: files, references, transfers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Blobs {
    inner: Arc<Inner>,
}

/// Failures of blob operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// A file operation failed.
    #[error("blob storage: {0}")]
    Io(#[from] std::io::Error),
    /// The reference index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// Not held here and not referenced (so not to be fetched).
    #[error("blob not found")]
    NotFound,
    /// Referenced, but could not be fetched in time.
    #[error("blob not fetched in time")]
    Timeout,
}

impl Blobs {
    /// Opens the blobs of the node whose data directory is `dir` (in `dir/blobs`).
    pub fn open(dir: &Path, cfg: BlobConfig) -> Result<Self, BlobError> {
        let files = BlobFiles::open(dir.join("blobs"))?;
        let index = BlobIndex::open(&dir.join("blobs").join("index.redb"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                files,
                index,
                cfg,
                transfers: Mutex::new(BTreeMap::new()),
                asked: Mutex::new(BTreeSet::new()),
                partials: Mutex::default(),
                wanted_changed: Notify::new(),
                serving: Arc::new(tokio::sync::Semaphore::new(MAX_SERVING)),
                stats: BlobStats::default(),
            }),
        })
    }

    /// The blob files.
    pub fn files(&self) -> &BlobFiles {
        &self.inner.files
    }

    /// The reference index.
    pub fn index(&self) -> &BlobIndex {
        &self.inner.index
    }

    /// The settings.
    pub fn config(&self) -> &BlobConfig {
        &self.inner.cfg
    }

    /// Totals since start.
    pub fn stats(&self) -> &BlobStats {
        &self.inner.stats
    }

    /// The fetch policy of a namespace.
    pub fn policy(&self, ns: &Namespace) -> FetchPolicy {
        self.inner
            .cfg
            .policies
            .iter()
            .find(|(p, _)| p.matches(ns))
            .map_or(self.inner.cfg.default_policy, |(_, p)| *p)
    }

    /// The test hook [`BlobConfig::fault_corrupt_sends`].
    fn corrupts_sends(&self) -> bool {
        self.inner.cfg.fault_corrupt_sends
    }

    /// Blobs to fetch now: referenced, not held, and either from a namespace whose policy
    /// is eager or asked for by a read.
    pub fn wanted(&self) -> Result<Vec<BlobRef>, BlobError> {
        let asked = self
            .inner
            .asked
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        let mut out = Vec::new();
        for r in self.inner.index.referenced()? {
            if self.inner.files.held(&r.hash)?.is_some() {
                continue;
            }
            let eager = asked.contains(&r.hash)
                || self
                    .inner
                    .index
                    .namespaces_referencing(&r.hash)?
                    .iter()
                    .any(|ns| self.policy(ns) == FetchPolicy::Eager);
            if eager {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Waits until there may be new blobs to fetch.
    pub async fn wanted_changed(&self) {
        self.inner.wanted_changed.notified().await;
    }

    /// Says there may be new blobs to fetch (a peer connected, a reference arrived).
    pub fn poke(&self) {
        self.inner.wanted_changed.notify_one();
    }

    /// Says `hash` became complete here (fetched or put): no read asks for it any more,
    /// and nothing is known of it as a partial blob.
    pub fn finished(&self, hash: &[u8; 32]) {
        if let Ok(mut asked) = self.inner.asked.lock() {
            asked.remove(hash);
        }
        self.forget_partial(hash);
    }

    /// What an earlier attempt verified of `hash` at `size`, if it is known.
    fn known_partial(&self, hash: &[u8; 32], size: u64) -> Option<bao_tree::ChunkRanges> {
        let map = self.inner.partials.lock().ok()?;
        map.get(hash)
            .filter(|(s, _)| *s == size)
            .map(|(_, h)| h.clone())
    }

    fn remember_partial(&self, hash: [u8; 32], size: u64, have: bao_tree::ChunkRanges) {
        if let Ok(mut map) = self.inner.partials.lock() {
            map.insert(hash, (size, have));
        }
    }

    /// Forgets what was known of a partial blob (it completed, or was discarded).
    pub fn forget_partial(&self, hash: &[u8; 32]) {
        if let Ok(mut map) = self.inner.partials.lock() {
            map.remove(hash);
        }
    }

    /// Registers a transfer (one per blob at a time): `None` if one is under way.
    fn begin_transfer(&self, hash: [u8; 32], size: u64) -> Option<TransferGuard> {
        let mut map = self.inner.transfers.lock().ok()?;
        if map.contains_key(&hash) {
            return None;
        }
        let t = Arc::new(Transfer {
            hash,
            size,
            done: AtomicU64::new(0),
            received: AtomicU64::new(0),
            sources: AtomicUsize::new(0),
            started: Instant::now(),
            done_at_start: AtomicU64::new(0),
            have: Mutex::new(bao_tree::ChunkRanges::empty()),
            progress: Notify::new(),
        });
        map.insert(hash, t.clone());
        Some(TransferGuard {
            blobs: self.clone(),
            transfer: t,
        })
    }

    /// The transfer of `hash` under way, if any.
    pub fn transfer(&self, hash: &[u8; 32]) -> Option<Arc<Transfer>> {
        self.inner.transfers.lock().ok()?.get(hash).cloned()
    }

    /// Asks for `hash` to be fetched now, whatever its namespace's policy (a read wants it).
    pub fn ask(&self, hash: &[u8; 32]) {
        if let Ok(mut asked) = self.inner.asked.lock() {
            asked.insert(*hash);
        }
        self.poke();
    }

    /// Whether a transfer of `hash` is under way.
    pub fn in_transfer(&self, hash: &[u8; 32]) -> bool {
        self.inner
            .transfers
            .lock()
            .map(|m| m.contains_key(hash))
            .unwrap_or(false)
    }

    /// The transfers under way.
    pub fn transfers(&self) -> Vec<TransferStatus> {
        let Ok(map) = self.inner.transfers.lock() else {
            return Vec::new();
        };
        map.values()
            .map(|t| {
                let done = t.done.load(Ordering::Relaxed);
                let secs = t.started.elapsed().as_secs_f64().max(0.001);
                TransferStatus {
                    hash: format_blob_hash(&t.hash),
                    size: t.size,
                    done,
                    received: t.received.load(Ordering::Relaxed),
                    sources: t.sources.load(Ordering::Relaxed),
                    rate_bytes_s: (done.saturating_sub(t.done_at_start.load(Ordering::Relaxed))
                        as f64
                        / secs) as u64,
                }
            })
            .collect()
    }

    /// Follows the store's feed into the reference index until `stop`: new references
    /// wake the fetcher.
    pub async fn run_indexer(self, store: Store, stop: CancellationToken) {
        let mut feed = store.subscribe();
        loop {
            let (blobs, st) = (self.clone(), store.clone());
            let pass = tokio::task::spawn_blocking(move || {
                blobs.inner.index.follow(&st, 4096, unix_now_s())
            })
            .await;
            let more = match pass {
                Ok(Ok(pass)) => {
                    if !pass.added.is_empty() {
                        self.poke();
                    }
                    pass.docs >= 4096
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "indexing blob references failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "the blob reference indexer panicked; retrying");
                    true
                }
            };
            if more {
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = feed.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// Removes a transfer from the registry when its fetch ends, however it ends.
#[derive(Debug)]
struct TransferGuard {
    blobs: Blobs,
    transfer: Arc<Transfer>,
}

impl Drop for TransferGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.blobs.inner.transfers.lock() {
            map.remove(&self.transfer.hash);
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `len` bytes of noise from `seed` (xorshift), for tests of what does not compress.
#[cfg(test)]
pub(crate) fn test_noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}
