//! One export: the hub's change feed, from a durable position, out to NATS JetStream or
//! RabbitMQ.
//!
//! The loop reads the feed after the export's position in batches, publishes one message
//! per changed document of its namespaces, waits for the broker's acknowledgement of every
//! message of the batch (JetStream's publish acks, AMQP publisher confirms), and only then
//! moves the position, in one commit of the store with what the batch sent. A few batches
//! are out at once, settled oldest first, so the position only ever moves past
//! acknowledged messages. So a crash, a
//! broker outage or a lost connection resumes from the last acknowledged batch: nothing is
//! lost, and what is sent again carries the same message id (the export, feed epoch and
//! position: `Nats-Msg-Id`, AMQP `message_id`), which JetStream drops as a duplicate within
//! its window and a consumer can drop after it. The feed holds each document once, at its
//! last write, so a document written several times while the export was behind goes out
//! once with all of it: the JSON form its latest content, the Automerge form every change
//! since the document's previous message (each change exactly once after deduplication by
//! change hash; in order, since a document's messages follow its feed positions).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::json;
use tidesync::model::{format_heads, FeedSeq};
use tidesync::store::{FeedEntry, Store};
use tokio_util::sync::CancellationToken;

use crate::bus::{Confirmed, Outgoing, Pending, Publisher};
use crate::config::{Broker, ExportConfig, Format};
use crate::retry::{keep_running, Health};

/// Feed entries read per batch.
const BATCH: usize = 256;

/// An export's settings and what it has done, shared with status and metrics.
#[derive(Debug)]
pub struct ExportState {
    cfg: ExportConfig,
    key: String,
    health: Health,
    /// The feed position every change through which the broker has acknowledged.
    position: AtomicU64,
    /// The local feed's last position when last looked at.
    feed_last: AtomicU64,
    published: AtomicU64,
    confirmed: AtomicU64,
    duplicates: AtomicU64,
    /// Since when the export has been behind the feed (`None`: caught up).
    behind_since: Mutex<Option<Instant>>,
}

/// Why an export session ended.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("broker: {0}")]
    Broker(String),
    #[error("store: {0}")]
    Store(#[from] tidesync::error::StoreError),
}

fn broker(e: impl std::fmt::Display) -> ExportError {
    ExportError::Broker(e.to_string())
}

impl ExportState {
    /// A new export, not started.
    pub fn new(cfg: ExportConfig) -> Self {
        let key = cfg.key();
        Self {
            cfg,
            key,
            health: Health::default(),
            position: AtomicU64::new(0),
            feed_last: AtomicU64::new(0),
            published: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            behind_since: Mutex::new(None),
        }
    }

    /// Feed positions not yet acknowledged by the broker.
    pub fn behind(&self) -> u64 {
        self.feed_last
            .load(Ordering::Relaxed)
            .saturating_sub(self.position.load(Ordering::Relaxed))
    }

    /// Seconds the export has been behind the feed (0 when caught up).
    pub fn lag_seconds(&self) -> f64 {
        self.behind_since
            .lock()
            .ok()
            .and_then(|b| b.map(|t| t.elapsed().as_secs_f64()))
            .unwrap_or(0.0)
    }

    /// The export in `/v1/status`.
    pub fn status(&self) -> serde_json::Value {
        json!({
            "id": self.key,
            "url": self.cfg.shown_url(),
            "broker": self.cfg.broker.as_str(),
            "subject": self.cfg.subject,
            "exchange": (self.cfg.broker == Broker::Amqp).then_some(&self.cfg.exchange),
            "format": self.cfg.format.as_str(),
            "namespaces": self.cfg.namespaces.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "connected": self.health.connected.load(Ordering::Relaxed),
            "position": self.position.load(Ordering::Relaxed),
            "behind": self.behind(),
            "lag_seconds": self.lag_seconds(),
            "published": self.published.load(Ordering::Relaxed),
            "confirmed": self.confirmed.load(Ordering::Relaxed),
            "duplicates": self.duplicates.load(Ordering::Relaxed),
            "failures": self.health.failures.load(Ordering::Relaxed),
            "last_error": self.health.last_error(),
        })
    }

    fn set_behind(&self, behind: bool) {
        if let Ok(mut b) = self.behind_since.lock() {
            match (behind, b.is_some()) {
                (true, false) => *b = Some(Instant::now()),
                (false, true) => *b = None,
                _ => {}
            }
        }
    }

    fn cursor_key(&self) -> String {
        format!("{}/position", self.key)
    }

    fn heads_key(&self, e: &FeedEntry) -> String {
        format!("{}/heads/{}/{}", self.key, e.ns, e.id)
    }
}

/// Runs an export until `stop`: connects, publishes, and reconnects after failures.
pub async fn run(state: Arc<ExportState>, store: Store, stop: CancellationToken) {
    let url = state.cfg.shown_url();
    keep_running(&state.health, "export", &url, &stop, || async {
        session(&state, &store, &stop)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
}

/// Batches published and awaiting their acknowledgements, at most: the next batches are
/// read and published while the broker acknowledges the ones before and the store commits
/// their positions.
const IN_FLIGHT: usize = 4;

/// A published batch: what its commit keeps once the broker acknowledged all of it.
struct Batch {
    last: FeedSeq,
    acks: Vec<Pending>,
    records: Vec<(String, Vec<u8>)>,
}

/// The heads each document of a batch in flight was sent at, ahead of their commit.
type HeadsSent = std::sync::Mutex<HashMap<String, Vec<u8>>>;

/// One connection to the broker until it fails or `stop`: one side publishes batches, the
/// other settles them in order (acknowledgements, then the position's commit).
async fn session(
    state: &Arc<ExportState>,
    store: &Store,
    stop: &CancellationToken,
) -> Result<(), ExportError> {
    let publisher = Publisher::connect(&state.cfg).await.map_err(broker)?;
    state.health.up();
    let epoch = store.feed_epoch();
    let heads_sent = Arc::new(HeadsSent::default());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(IN_FLIGHT);
    let publishing = publish_batches(state, store, &publisher, epoch, &heads_sent, tx);
    let settling = async {
        while let Some(batch) = rx.recv().await {
            settle(state, store, epoch, batch, &heads_sent).await?;
        }
        Ok::<(), ExportError>(())
    };
    tokio::select! {
        ended = futures_util::future::try_join(publishing, settling) => ended.map(drop),
        () = stop.cancelled() => Ok(()),
    }
}

/// A batch read from the feed and rendered, ready to publish.
struct Built {
    last: FeedSeq,
    messages: Vec<Outgoing>,
    records: Vec<(String, Vec<u8>)>,
}

/// Reads the feed after `after` and renders its batch; `None` when there is nothing new.
/// Runs on a blocking thread: reading and rendering documents is the export's CPU work.
fn build(
    state: &ExportState,
    store: &Store,
    epoch: u128,
    after: u64,
    heads_sent: &HeadsSent,
) -> Result<Option<Built>, ExportError> {
    if store.feed_epoch() != epoch {
        // The feed was renewed: a new session starts the new epoch over.
        return Err(broker("the feed was renewed"));
    }
    let entries = store.changes_since(FeedSeq(after), BATCH)?;
    state
        .feed_last
        .store(store.last_seq().0.max(after), Ordering::Relaxed);
    let Some(last) = entries.last().map(|e| e.seq) else {
        return Ok(None);
    };
    let mut built = Built {
        last,
        messages: Vec::with_capacity(entries.len()),
        records: Vec::new(),
    };
    for e in entries.iter().filter(|e| state.cfg.exports(&e.ns)) {
        if let Some(m) = message(state, store, e, epoch, &mut built.records, heads_sent)? {
            built.messages.push(m);
        }
    }
    Ok(Some(built))
}

/// Publishes batch after batch, handing each to the settling side, while the next batch
/// is read and rendered on a blocking thread; waits for the feed when everything is sent.
async fn publish_batches(
    state: &Arc<ExportState>,
    store: &Store,
    publisher: &Publisher,
    epoch: u128,
    heads_sent: &Arc<HeadsSent>,
    settle: tokio::sync::mpsc::Sender<Batch>,
) -> Result<(), ExportError> {
    let mut feed = store.subscribe();
    let mut sent = load_position(store, state, epoch)?;
    state.position.store(sent, Ordering::Relaxed);
    let build_after = |after: u64| {
        let (state, store, heads_sent) = (state.clone(), store.clone(), heads_sent.clone());
        tokio::task::spawn_blocking(move || build(&state, &store, epoch, after, &heads_sent))
    };
    let mut next = build_after(sent);
    loop {
        let built = next
            .await
            .map_err(|e| broker(format!("rendering a batch: {e}")))??;
        let Some(built) = built else {
            if state.position.load(Ordering::Relaxed) >= sent {
                state.set_behind(false);
            }
            // Wakes for new writes, and now and then to see the position caught up.
            let _ = tokio::time::timeout(Duration::from_millis(100), feed.changed()).await;
            next = build_after(sent);
            continue;
        };
        state.set_behind(true);
        sent = built.last.0;
        next = build_after(sent);
        let mut batch = Batch {
            last: built.last,
            acks: Vec::with_capacity(built.messages.len()),
            records: built.records,
        };
        for m in built.messages {
            batch.acks.push(publisher.publish(m).await.map_err(broker)?);
            state.published.fetch_add(1, Ordering::Relaxed);
        }
        settle
            .send(batch)
            .await
            .map_err(|_| broker("the settling side stopped"))?;
    }
}

/// Waits for every acknowledgement of `batch`, then moves the position past it, with the
/// heads it sent, in one commit.
async fn settle(
    state: &ExportState,
    store: &Store,
    epoch: u128,
    batch: Batch,
    heads_sent: &HeadsSent,
) -> Result<(), ExportError> {
    for ack in batch.acks {
        let confirmed = ack.confirmed().await.map_err(broker)?;
        state.confirmed.fetch_add(1, Ordering::Relaxed);
        if confirmed == Confirmed::Duplicate {
            state.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }
    let mut records = batch.records;
    let mut position = epoch.to_le_bytes().to_vec();
    position.extend_from_slice(&batch.last.0.to_le_bytes());
    records.push((state.cursor_key(), position));
    store.set_records(records.clone()).await?;
    if let Ok(mut sent) = heads_sent.lock() {
        for (key, heads) in &records {
            // Committed now, unless a later batch in flight sent the document again.
            if sent.get(key) == Some(heads) {
                sent.remove(key);
            }
        }
    }
    state.position.store(batch.last.0, Ordering::Relaxed);
    Ok(())
}

/// The position kept for this export in `epoch` of the feed; 0 (the start) for none, or
/// for a position in another epoch (the feed was restored or renewed: its positions mean
/// other writes now).
fn load_position(store: &Store, state: &ExportState, epoch: u128) -> Result<u64, ExportError> {
    let Some(bytes) = store.record(&state.cursor_key())? else {
        return Ok(0);
    };
    let (Some(e), Some(s)) = (bytes.get(..16), bytes.get(16..24)) else {
        return Ok(0);
    };
    let kept_epoch = u128::from_le_bytes(e.try_into().unwrap_or([0; 16]));
    let seq = u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
    Ok(if kept_epoch == epoch { seq } else { 0 })
}

/// The message for one feed entry; `None` when there is nothing to send (the document
/// is gone, or no change is new since its last message). Adds what the batch's commit
/// must keep to `records`.
fn message(
    state: &ExportState,
    store: &Store,
    e: &FeedEntry,
    epoch: u128,
    records: &mut Vec<(String, Vec<u8>)>,
    heads_sent: &HeadsSent,
) -> Result<Option<Outgoing>, ExportError> {
    // Unique per export too: two exports into one stream must not drop each other's
    // messages as duplicates.
    let id = format!("{}-{epoch:032x}-{}", &state.key["export/".len()..], e.seq.0);
    let headers = vec![
        ("Tidesync-Ns", e.ns.to_string()),
        ("Tidesync-Id", e.id.to_string()),
        ("Tidesync-Epoch", format!("{epoch:032x}")),
        ("Tidesync-Seq", e.seq.0.to_string()),
        ("Tidesync-Heads", format_heads(&e.heads)),
        ("Tidesync-Format", state.cfg.format.as_str().to_owned()),
    ];
    let payload = match state.cfg.format {
        Format::Json => {
            let content = if e.deleted {
                serde_json::Value::Null
            } else {
                match store.get(&e.ns, &e.id)? {
                    Some(doc) => serde_json::Value::Object(doc.content),
                    None => return Ok(None),
                }
            };
            serde_json::to_vec(&json!({
                "ns": e.ns.as_str(),
                "id": e.id.as_str(),
                "heads": e.heads.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "epoch": format!("{epoch:032x}"),
                "seq": e.seq.0,
                "deleted": e.deleted,
                "doc": content,
            }))
            .map_err(|err| broker(format!("encoding {}/{}: {err}", e.ns, e.id)))?
        }
        Format::Automerge => {
            let Some(doc) = store.doc(&e.ns, &e.id)? else {
                return Ok(None);
            };
            let key = state.heads_key(e);
            let in_flight = heads_sent.lock().ok().and_then(|s| s.get(&key).cloned());
            let kept = match in_flight {
                Some(h) => Some(h),
                None => store.record(&key)?,
            };
            let before: Vec<automerge::ChangeHash> = kept
                .map(|b| {
                    b.chunks_exact(32)
                        .filter_map(|h| automerge::ChangeHash::try_from(h).ok())
                        .collect()
                })
                .unwrap_or_default();
            let changes = doc.get_changes(&before);
            if changes.is_empty() {
                return Ok(None);
            }
            let mut bytes = Vec::new();
            for c in changes {
                bytes.extend_from_slice(c.raw_bytes());
            }
            let heads: Vec<u8> = doc.get_heads().iter().flat_map(|h| h.0).collect();
            if let Ok(mut sent) = heads_sent.lock() {
                sent.insert(key.clone(), heads.clone());
            }
            records.push((key, heads));
            bytes
        }
    };
    Ok(Some(Outgoing {
        id,
        dest: state.cfg.subject_of(e.ns.as_str(), e.id.as_str()),
        headers,
        payload,
        content_type: match state.cfg.format {
            Format::Json => "application/json",
            Format::Automerge => "application/octet-stream",
        },
    }))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExportLabels {
    export: String,
}

/// The exports' metric families.
pub fn register_metrics(
    exports: &[Arc<ExportState>],
    r: &mut prometheus_client::registry::Registry,
) {
    let published = Family::<ExportLabels, Counter>::default();
    let confirmed = Family::<ExportLabels, Counter>::default();
    let failures = Family::<ExportLabels, Counter>::default();
    let behind = Family::<ExportLabels, Gauge>::default();
    let lag = Family::<ExportLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let connected = Family::<ExportLabels, Gauge>::default();
    for e in exports {
        let l = ExportLabels {
            export: e.key.clone(),
        };
        published
            .get_or_create(&l)
            .inc_by(e.published.load(Ordering::Relaxed));
        confirmed
            .get_or_create(&l)
            .inc_by(e.confirmed.load(Ordering::Relaxed));
        failures
            .get_or_create(&l)
            .inc_by(e.health.failures.load(Ordering::Relaxed));
        behind.get_or_create(&l).set(e.behind() as i64);
        lag.get_or_create(&l).set(e.lag_seconds());
        connected
            .get_or_create(&l)
            .set(i64::from(e.health.connected.load(Ordering::Relaxed)));
    }
    r.register(
        "export_published_messages",
        "Messages an export published to its broker",
        published,
    );
    r.register(
        "export_confirmed_messages",
        "Messages the broker acknowledged",
        confirmed,
    );
    r.register(
        "export_failures",
        "Times an export lost or could not reach its broker (it retries)",
        failures,
    );
    r.register(
        "export_lag_feed_positions",
        "Local feed positions the broker has not acknowledged",
        behind,
    );
    r.register(
        "export_lag_seconds",
        "Seconds the export has been behind the local feed (0: caught up)",
        lag,
    );
    r.register(
        "export_connected",
        "1 while the export is connected to its broker",
        connected,
    );
}
