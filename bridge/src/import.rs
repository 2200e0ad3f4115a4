//! One import: JSON merge patches from NATS JetStream or RabbitMQ into the hub's
//! documents.
//!
//! A durable consumer (a JetStream pull consumer of the import's subject, or a consumer
//! of its AMQP queue with manual acknowledgements) hands messages over; the import takes
//! what has arrived (up to [`BATCH`]) and applies it through the store's normal write
//! path, the patches of different documents at once (the store's writer commits them
//! together), those of one document one after another in arrival order. Each message is
//! acknowledged as soon as its commit is durable.
//!
//! A hub that dies before the acknowledgement gets the message again. JetStream numbers
//! its messages: the import keeps, per document, the stream position of the last patch it
//! applied (after the patch's commit, before the acknowledgement), skips what it holds
//! already, and on reconnecting makes its consumer deliver again, in stream order,
//! everything after what was acknowledged (see `bus::nats`), so a patch delivered again
//! never lands after a later one of its document. RabbitMQ puts a message back at its
//! place in the queue; a patch it delivers again is applied again, which changes nothing
//! when nothing later of its document has landed: a merge patch sets values, and setting
//! a value it already has emits no operation. A message that is not a valid patch (not JSON, no document named, a namespace the import
//! may not write, a patch that is not an object or is refused by the store) goes to the
//! dead-letter subject (or queue) with the reason in a `Tidesync-Reason` header, and only
//! once the broker has that copy is the message acknowledged:
//! it is never retried for ever and never half-applied. A store that cannot write for now
//! (a full disk) has the import hold the message, and the later ones of its document, and
//! try them again every few seconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::{json, Value};
use tidesync::error::StoreError;
use tidesync::model::{DocId, Namespace};
use tidesync::store::Store;
use tokio_util::sync::CancellationToken;

use crate::bus::{Consumer, Incoming, Position};
use crate::config::ImportConfig;
use crate::retry::{keep_running, Health};

/// Largest message taken, in bytes; a larger one is a dead letter.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Messages applied together at most: those already delivered when the first is taken.
const BATCH: usize = 64;

/// Bytes of messages a batch takes beyond its first, about: the patches of a batch are
/// parsed before any is applied.
const BATCH_BYTES: usize = 8 << 20;

/// How long messages the store could not write are held before they are tried again.
const RETRY_WRITE: Duration = Duration::from_secs(5);

/// An import's settings and what it has done, shared with status and metrics.
#[derive(Debug)]
pub struct ImportState {
    pub(crate) cfg: ImportConfig,
    pub(crate) key: String,
    health: Health,
    pub(crate) applied: AtomicU64,
    pub(crate) rejected: AtomicU64,
    /// Messages delivered again that their document held already.
    pub(crate) skipped: AtomicU64,
}

/// What became of one message.
enum Outcome {
    Applied,
    /// Delivered again, and its document holds it already: acknowledged, not applied.
    Skipped,
    /// Not a valid patch: to the dead letters, with why.
    Rejected(String),
    /// The store could not write it now: held and tried again.
    Later(String),
}

impl ImportState {
    /// A new import, not started.
    pub fn new(cfg: ImportConfig) -> Self {
        let key = cfg.key();
        Self {
            cfg,
            key,
            health: Health::default(),
            applied: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// Where the position of the last message applied to a document is kept.
    fn applied_key(&self, ns: &Namespace, id: &DocId) -> String {
        format!("{}/applied/{ns}/{id}", self.key)
    }

    /// The import in `/v1/status`.
    pub fn status(&self) -> Value {
        json!({
            "id": self.key,
            "url": self.cfg.shown_url(),
            "broker": self.cfg.broker.as_str(),
            "subject": self.cfg.subject,
            "queue": (self.cfg.broker == crate::config::Broker::Amqp).then_some(&self.cfg.subject),
            "dead_letter": self.cfg.dead_letter,
            "namespace": self.cfg.namespace.as_ref().map(ToString::to_string),
            "connected": self.health.connected.load(Ordering::Relaxed),
            "applied": self.applied.load(Ordering::Relaxed),
            "rejected": self.rejected.load(Ordering::Relaxed),
            "skipped": self.skipped.load(Ordering::Relaxed),
            "failures": self.health.failures.load(Ordering::Relaxed),
            "last_error": self.health.last_error(),
        })
    }
}

/// Runs an import until `stop`: connects, applies, and reconnects after failures.
pub async fn run(state: Arc<ImportState>, store: Store, stop: CancellationToken) {
    let url = state.cfg.shown_url();
    keep_running(&state.health, "import", &url, &stop, || {
        session(&state, &store)
    })
    .await;
}

async fn session(state: &ImportState, store: &Store) -> Result<(), String> {
    // The durable consumer's name (JetStream) or consumer tag (AMQP).
    let name = state.key.replace('/', "-");
    let mut consumer = Consumer::connect(&state.cfg, &name).await?;
    state.health.up();
    loop {
        let (mut batch, failed) = take(&mut consumer).await?;
        loop {
            batch = apply_batch(state, store, batch, Incoming::view, |m, outcome| {
                settle(state, &consumer, m, outcome)
            })
            .await?;
            if batch.is_empty() {
                break;
            }
            // The store cannot write: keep the messages (the broker delivering them again
            // behind newer ones would reorder a document's patches) and try again.
            consumer.hold(&batch).await?;
            tokio::time::sleep(RETRY_WRITE).await;
        }
        if let Some(e) = failed {
            return Err(e);
        }
    }
}

/// The next message, and those that have arrived already: at most [`BATCH`] of them and
/// about [`BATCH_BYTES`]. A receiving error after the first ends the batch, and is
/// returned once the batch is settled.
async fn take(consumer: &mut Consumer) -> Result<(Vec<Incoming>, Option<String>), String> {
    let first = consumer.next().await?;
    let mut bytes = first.payload.len();
    let mut batch = vec![first];
    while batch.len() < BATCH && bytes < BATCH_BYTES {
        // A stream's next is cancel-safe: a message not ready yet stays with the consumer.
        match consumer.next().now_or_never() {
            Some(Ok(m)) => {
                bytes += m.payload.len();
                batch.push(m);
            }
            Some(Err(e)) => return Ok((batch, Some(e))),
            None => break,
        }
    }
    Ok((batch, None))
}

/// Acknowledges or dead-letters one message once its outcome is durable.
async fn settle(
    state: &ImportState,
    consumer: &Consumer,
    message: Incoming,
    outcome: Outcome,
) -> Result<(), String> {
    match outcome {
        Outcome::Applied => {
            consumer.ack(message).await?;
            state.applied.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::Skipped => {
            consumer.ack(message).await?;
            state.skipped.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::Rejected(why) => {
            consumer.dead_letter(message, &why).await?;
            state.rejected.fetch_add(1, Ordering::Relaxed);
        }
        // Held by the batch, never settled.
        Outcome::Later(_) => {}
    }
    Ok(())
}

/// What the batch needs of a message: its subject, payload and stream position.
type View<'m> = (&'m str, &'m [u8], Option<Position>);

impl Incoming {
    fn view(&self) -> View<'_> {
        (
            self.subject.as_str(),
            self.payload.as_slice(),
            self.position,
        )
    }
}

/// Applies a batch, each document's patches one after another in arrival order and the
/// documents at once (the store's writer commits them together), settling each message
/// as soon as its outcome is durable. Returns the messages to try again: a patch the store
/// could not write, and the later patches of its document, so none lands before it.
/// A settling error ends the batch once every document's chain has stopped.
async fn apply_batch<T, S, F>(
    state: &ImportState,
    store: &Store,
    items: Vec<T>,
    view: impl Fn(&T) -> View<'_>,
    settle: S,
) -> Result<Vec<T>, String>
where
    S: Fn(T, Outcome) -> F,
    F: std::future::Future<Output = Result<(), String>>,
{
    // Invalid messages form chains of their own (no document).
    let mut chains: Vec<(Option<DocKey>, Chain<T>)> = Vec::new();
    for item in items {
        let (subject, payload, position) = view(&item);
        let parsed = parse(state, subject, payload, position);
        let doc = parsed.as_ref().ok().map(|p| (p.ns.clone(), p.id.clone()));
        match chains.iter_mut().find(|(d, _)| doc.is_some() && *d == doc) {
            Some((_, chain)) => chain.push((item, parsed)),
            None => chains.push((doc, vec![(item, parsed)])),
        }
    }
    let settle = &settle;
    let ended = futures_util::future::join_all(chains.into_iter().map(|(_, chain)| async move {
        let mut held = Vec::new();
        for (item, parsed) in chain {
            if !held.is_empty() {
                held.push(item);
                continue;
            }
            let outcome = match parsed {
                Err(why) => Outcome::Rejected(why),
                Ok(p) => apply(state, store, p).await,
            };
            if let Outcome::Later(why) = &outcome {
                let why = format!("the store cannot write now: {why}");
                state.health.failed("import", &state.cfg.shown_url(), why);
                held.push(item);
            } else {
                settle(item, outcome).await?;
            }
        }
        Ok::<_, String>(held)
    }))
    .await;
    let mut held = Vec::new();
    for chain in ended {
        held.extend(chain?);
    }
    Ok(held)
}

/// The document a patch addresses.
type DocKey = (Namespace, DocId);

/// One document's messages in arrival order, each with its checked patch or why it is
/// not a valid one.
type Chain<T> = Vec<(T, Result<Patch, String>)>;

/// A checked message: the document it addresses, its merge patch, and where it stands
/// in its stream.
struct Patch {
    ns: Namespace,
    id: DocId,
    patch: Value,
    position: Option<Position>,
}

/// Applies one patch, durably, unless its document holds it already: a message of a
/// numbered stream at or before the position kept for its document was applied (and is
/// delivered again because the hub stopped before acknowledging it).
async fn apply(state: &ImportState, store: &Store, p: Patch) -> Outcome {
    let kept = p.position.map(|at| (at, state.applied_key(&p.ns, &p.id)));
    if let Some((at, key)) = &kept {
        match store.record(key) {
            Ok(Some(bytes)) if at.applied_by(&bytes) => return Outcome::Skipped,
            Ok(_) => {}
            Err(e) => return Outcome::Later(e.to_string()),
        }
    }
    match store.patch(&p.ns, &p.id, p.patch, None).await {
        Ok(_) => {}
        // The store cannot write for now; it goes on by itself once it can.
        Err(
            e @ (StoreError::NoSpace(_)
            | StoreError::Unavailable(_)
            | StoreError::Closed
            | StoreError::Storage(_)
            | StoreError::WriteFailed(_)),
        ) => return Outcome::Later(e.to_string()),
        // Refused for this patch or this document, as it would be again.
        Err(e) => return Outcome::Rejected(e.to_string()),
    }
    // After the patch's commit: a stop in between applies the patch once more, which
    // changes nothing, since no later patch of the document has landed yet.
    if let Some((at, key)) = kept {
        if let Err(e) = store.set_records(vec![(key, at.to_bytes())]).await {
            return Outcome::Later(e.to_string());
        }
    }
    Outcome::Applied
}

/// Checks one message: the patch it carries, or why it is not a valid one.
fn parse(
    state: &ImportState,
    subject: &str,
    payload: &[u8],
    position: Option<Position>,
) -> Result<Patch, String> {
    let reject = |why: String| Err(why);
    if payload.len() > MAX_MESSAGE_BYTES {
        return reject(format!(
            "{} bytes; at most {MAX_MESSAGE_BYTES}",
            payload.len()
        ));
    }
    let mut body: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => return reject(format!("not JSON: {e}")),
    };
    let text = |k: &str| body.get(k).and_then(Value::as_str);
    let Some(ns) = text("ns").or(state.cfg.namespace.as_ref().map(Namespace::as_str)) else {
        return reject(format!("no \"ns\" (subject {subject})"));
    };
    let ns = match Namespace::new(ns) {
        Ok(ns) => ns,
        Err(e) => return reject(e.to_string()),
    };
    if state.cfg.namespace.as_ref().is_some_and(|only| *only != ns) {
        return reject(format!("namespace {ns} is not this import's"));
    }
    let id = match text("id").map(DocId::new) {
        Some(Ok(id)) => id,
        Some(Err(e)) => return reject(e.to_string()),
        None => return reject("no \"id\"".into()),
    };
    let Some(patch) = body
        .get_mut("patch")
        .filter(|p| p.is_object())
        .map(Value::take)
    else {
        return reject("\"patch\" is missing or not an object".into());
    };
    Ok(Patch {
        ns,
        id,
        patch,
        position,
    })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ImportLabels {
    import: String,
}

/// The imports' metric families.
pub fn register_metrics(
    imports: &[Arc<ImportState>],
    r: &mut prometheus_client::registry::Registry,
) {
    use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
    let applied = Family::<ImportLabels, Counter>::default();
    let rejected = Family::<ImportLabels, Counter>::default();
    let skipped = Family::<ImportLabels, Counter>::default();
    let connected = Family::<ImportLabels, Gauge>::default();
    for i in imports {
        let l = ImportLabels {
            import: i.key.clone(),
        };
        applied
            .get_or_create(&l)
            .inc_by(i.applied.load(Ordering::Relaxed));
        rejected
            .get_or_create(&l)
            .inc_by(i.rejected.load(Ordering::Relaxed));
        skipped
            .get_or_create(&l)
            .inc_by(i.skipped.load(Ordering::Relaxed));
        connected
            .get_or_create(&l)
            .set(i64::from(i.health.connected.load(Ordering::Relaxed)));
    }
    r.register(
        "import_applied_messages",
        "Patches from the broker applied and acknowledged",
        applied,
    );
    r.register(
        "import_rejected_messages",
        "Messages from the broker that were not valid patches, sent to the dead-letter subject",
        rejected,
    );
    r.register(
        "import_skipped_messages",
        "Messages the broker delivered again after their patch was applied, acknowledged without applying them again",
        skipped,
    );
    r.register(
        "import_connected",
        "1 while the import is connected to its broker",
        connected,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tidesync::store::StoreConfig;

    fn state() -> ImportState {
        let cfg =
            ImportConfig::new("nats://127.0.0.1:4222", None, Some("ml"), None).expect("config");
        ImportState::new(cfg)
    }

    /// A message of the test: its number, payload and stream position.
    type Msg = (usize, Vec<u8>, Option<Position>);

    /// Applies `messages` as one batch; each message's outcome, by number, and those held.
    async fn run(state: &ImportState, store: &Store, messages: Vec<Msg>) -> Vec<(usize, String)> {
        let settled = Mutex::new(Vec::new());
        let held = apply_batch(
            state,
            store,
            messages,
            |(_, payload, position)| ("patches", payload.as_slice(), *position),
            |(n, _, _), outcome| {
                let what = match outcome {
                    Outcome::Applied => "applied".to_owned(),
                    Outcome::Skipped => "skipped".to_owned(),
                    Outcome::Rejected(why) => format!("rejected: {why}"),
                    Outcome::Later(why) => format!("later: {why}"),
                };
                settled.lock().expect("lock").push((n, what));
                async { Ok(()) }
            },
        )
        .await
        .expect("settled");
        assert!(held.is_empty(), "the store could write");
        let mut settled = settled.into_inner().expect("lock");
        settled.sort();
        settled
    }

    fn patch(doc: usize, round: usize) -> Vec<u8> {
        let body = json!({"ns": "ml", "id": format!("d{doc}"), "patch": {"v": round, format!("r{round}"): true}});
        serde_json::to_vec(&body).expect("json")
    }

    /// A batch interleaving eight documents' patches with invalid messages: each
    /// document's patches land in arrival order, each message is settled once with its
    /// own outcome, and nothing of an invalid one is stored.
    #[tokio::test]
    async fn a_batch_applies_each_documents_patches_in_order_and_settles_each_message() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path().join("s.redb"), StoreConfig::default()).expect("store");
        let state = state();
        let mut messages = Vec::new();
        for round in 0..8 {
            for doc in 0..8 {
                messages.push((messages.len(), patch(doc, round), None));
            }
            messages.push((messages.len(), b"not json".to_vec(), None));
            let other = json!({"ns": "other", "id": "x", "patch": {"v": 1}});
            messages.push((
                messages.len(),
                serde_json::to_vec(&other).expect("json"),
                None,
            ));
        }
        let settled = run(&state, &store, messages).await;
        assert_eq!(settled.len(), 80, "every message settled once");
        for (n, what) in &settled {
            if n % 10 < 8 {
                assert_eq!(what, "applied", "message {n}");
            } else {
                assert!(what.starts_with("rejected: "), "message {n}: {what}");
            }
        }
        let ns = Namespace::new("ml").expect("ns");
        for doc in 0..8 {
            let id = DocId::new(format!("d{doc}")).expect("id");
            let content = store
                .get(&ns, &id)
                .expect("read")
                .expect("document")
                .content;
            assert_eq!(content["v"], json!(7), "d{doc}: the last patch wins");
            assert_eq!(content.len(), 9, "d{doc}: every patch landed");
            let changes = store
                .doc(&ns, &id)
                .expect("read")
                .expect("doc")
                .get_changes(&[])
                .len();
            assert_eq!(changes, 8, "d{doc}: one change per patch");
        }
        let other = Namespace::new("other").expect("ns");
        assert!(store
            .get(&other, &DocId::new("x").expect("id"))
            .expect("read")
            .is_none());
    }

    /// JetStream delivers again what a stopped hub had applied and not acknowledged: the
    /// import skips it rather than let an older patch land after a newer one; a stream
    /// made anew (positions from 1 again) is not taken for the old one.
    #[tokio::test]
    async fn a_patch_delivered_again_after_a_later_one_is_skipped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path().join("s.redb"), StoreConfig::default()).expect("store");
        let state = state();
        let at = |stream: u8, seq: u64| {
            Some(Position {
                stream: [stream; 8],
                seq,
            })
        };
        let first = vec![(0, patch(0, 0), at(1, 10)), (1, patch(0, 1), at(1, 11))];
        assert_eq!(
            run(&state, &store, first).await,
            [(0, "applied".into()), (1, "applied".into())]
        );
        // Both again, in order, as a consumer made again from its floor delivers them.
        let again = vec![(2, patch(0, 0), at(1, 10)), (3, patch(0, 1), at(1, 11))];
        assert_eq!(
            run(&state, &store, again).await,
            [(2, "skipped".into()), (3, "skipped".into())]
        );
        let ns = Namespace::new("ml").expect("ns");
        let id = DocId::new("d0").expect("id");
        let doc = store.doc(&ns, &id).expect("read").expect("doc");
        assert_eq!(doc.get_changes(&[]).len(), 2, "nothing applied twice");
        assert_eq!(
            store.get(&ns, &id).expect("read").expect("doc").content["v"],
            json!(1)
        );
        // A new stream numbers from 1 again: its patches are new.
        let renewed = vec![(4, patch(0, 2), at(2, 1))];
        assert_eq!(run(&state, &store, renewed).await, [(4, "applied".into())]);
        assert_eq!(
            store.get(&ns, &id).expect("read").expect("doc").content["v"],
            json!(2)
        );
    }
}
