//! One import: JSON merge patches from NATS JetStream or RabbitMQ into the hub's
//! documents.
//!
//! A durable consumer (a JetStream pull consumer of the import's subject, or a consumer
//! of its AMQP queue with manual acknowledgements) hands messages over; the import takes
//! what has arrived (up to [`BATCH`]) and applies it through the store's normal write
//! path, the patches of different documents at once (the store's writer commits them
//! together), those of one document one after another in arrival order. Each message is
//! acknowledged only after its commit is durable. A hub that dies before the
//! acknowledgement gets the message again and applies it again, which changes nothing:
//! a merge patch sets values, and setting a value it already has emits no operation. A
//! message that is not a valid patch (not JSON, no document named, a namespace the import
//! may not write, a patch that is not an object or is refused by the store) goes to the
//! dead-letter subject (or queue) with the reason in a `Tidesync-Reason` header, and only
//! once the broker has that copy is the message acknowledged:
//! it is never retried for ever and never half-applied. A store that cannot write for now
//! (a full disk) makes the message come back later instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::FutureExt;
use serde_json::{json, Value};
use tidesync::error::StoreError;
use tidesync::model::{DocId, Namespace};
use tidesync::store::Store;
use tokio_util::sync::CancellationToken;

use crate::bus::Consumer;
use crate::config::ImportConfig;
use crate::retry::{keep_running, Health};

/// Largest message taken, in bytes; a larger one is a dead letter.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Messages applied together at most: those already delivered when the first is taken.
const BATCH: usize = 64;

/// An import's settings and what it has done, shared with status and metrics.
#[derive(Debug)]
pub struct ImportState {
    pub(crate) cfg: ImportConfig,
    pub(crate) key: String,
    health: Health,
    pub(crate) applied: AtomicU64,
    pub(crate) rejected: AtomicU64,
}

/// What became of one message.
#[derive(Clone)]
enum Outcome {
    Applied,
    /// Not a valid patch: to the dead letters, with why.
    Rejected(String),
    /// The store could not write it now: delivered again later.
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
        }
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
        let mut messages = vec![consumer.next().await?];
        // Whatever else has arrived already; a stream's next is cancel-safe, so a message
        // not ready yet stays with the consumer.
        while messages.len() < BATCH {
            match consumer.next().now_or_never() {
                Some(message) => messages.push(message?),
                None => break,
            }
        }
        let outcomes = apply_all(
            state,
            store,
            messages
                .iter()
                .map(|m| (m.subject.as_str(), m.payload.as_slice())),
        )
        .await;
        for (message, outcome) in messages.into_iter().zip(outcomes) {
            settle(state, &consumer, message, outcome).await?;
        }
    }
}

/// Acknowledges, dead-letters or hands back one message after its outcome is durable.
async fn settle(
    state: &ImportState,
    consumer: &Consumer,
    message: crate::bus::Incoming,
    outcome: Outcome,
) -> Result<(), String> {
    match outcome {
        Outcome::Applied => {
            consumer.ack(message).await?;
            state.applied.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::Rejected(why) => {
            consumer.dead_letter(message, &why).await?;
            state.rejected.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::Later(why) => {
            let url = state.cfg.shown_url();
            let why = format!("the store cannot write now: {why}");
            state.health.failed("import", &url, why);
            consumer.later(message).await?;
        }
    }
    Ok(())
}

/// Applies `messages`, each document's patches in order and the documents at once; the
/// outcomes in the messages' order. After a patch the store could not write, the later
/// patches of its document are handed back too, so they never land before it.
async fn apply_all<'m>(
    state: &ImportState,
    store: &Store,
    messages: impl ExactSizeIterator<Item = (&'m str, &'m [u8])>,
) -> Vec<Outcome> {
    let mut outcomes = vec![Outcome::Later(String::new()); messages.len()];
    // Invalid messages form chains of their own (no document).
    let mut chains: Vec<(Option<(Namespace, DocId)>, Chain)> = Vec::new();
    for (n, (subject, payload)) in messages.enumerate() {
        let parsed = parse(state, subject, payload);
        let doc = parsed.as_ref().ok().map(|p| (p.ns.clone(), p.id.clone()));
        match chains.iter_mut().find(|(d, _)| doc.is_some() && *d == doc) {
            Some((_, chain)) => chain.push((n, parsed)),
            None => chains.push((doc, vec![(n, parsed)])),
        }
    }
    let applied = futures_util::future::join_all(chains.into_iter().map(|(_, chain)| async {
        let mut done = Vec::with_capacity(chain.len());
        let mut blocked: Option<String> = None;
        for (n, parsed) in chain {
            let outcome = match (parsed, &blocked) {
                (Err(why), _) => Outcome::Rejected(why),
                (Ok(_), Some(why)) => Outcome::Later(why.clone()),
                (Ok(p), None) => apply(store, p).await,
            };
            if let Outcome::Later(why) = &outcome {
                blocked = Some(why.clone());
            }
            done.push((n, outcome));
        }
        done
    }))
    .await;
    for (n, outcome) in applied.into_iter().flatten() {
        outcomes[n] = outcome;
    }
    outcomes
}

/// One document's messages in arrival order: their positions in the batch, and each
/// checked patch or why it is not valid.
type Chain = Vec<(usize, Result<Patch, String>)>;

/// A checked message: the document it addresses and its merge patch.
struct Patch {
    ns: Namespace,
    id: DocId,
    patch: Value,
}

/// Applies one patch, durably.
async fn apply(store: &Store, p: Patch) -> Outcome {
    match store.patch(&p.ns, &p.id, p.patch, None).await {
        Ok(_) => Outcome::Applied,
        Err(e @ (StoreError::Model(_) | StoreError::Quarantined { .. })) => {
            Outcome::Rejected(e.to_string())
        }
        Err(e) => Outcome::Later(e.to_string()),
    }
}

/// Checks one message: the patch it carries, or why it is not a valid one.
fn parse(state: &ImportState, subject: &str, payload: &[u8]) -> Result<Patch, String> {
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
    Ok(Patch { ns, id, patch })
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
        "import_connected",
        "1 while the import is connected to its broker",
        connected,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidesync::store::StoreConfig;

    /// A batch interleaving eight documents' patches with invalid messages: each
    /// document's patches land in arrival order, each message gets its own outcome in its
    /// place, and nothing of an invalid one is stored.
    #[tokio::test]
    async fn a_batch_applies_each_documents_patches_in_order_and_settles_each_message() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path().join("s.redb"), StoreConfig::default()).expect("store");
        let cfg =
            ImportConfig::new("nats://127.0.0.1:4222", None, Some("ml"), None).expect("config");
        let state = ImportState::new(cfg);
        let mut messages = Vec::new();
        for round in 0..8 {
            for doc in 0..8 {
                let body = json!({"ns": "ml", "id": format!("d{doc}"), "patch": {"v": round, format!("r{round}"): true}});
                messages.push(serde_json::to_vec(&body).expect("json"));
            }
            messages.push(b"not json".to_vec());
            messages.push(
                serde_json::to_vec(&json!({"ns": "other", "id": "x", "patch": {"v": 1}}))
                    .expect("json"),
            );
        }
        let outcomes = apply_all(
            &state,
            &store,
            messages.iter().map(|m| ("patches", m.as_slice())),
        )
        .await;
        assert_eq!(outcomes.len(), messages.len());
        for (n, outcome) in outcomes.iter().enumerate() {
            let valid = n % 10 < 8;
            match outcome {
                Outcome::Applied => assert!(valid, "message {n} is not a valid patch"),
                Outcome::Rejected(why) => {
                    assert!(!valid, "message {n} was rejected: {why}");
                    assert!(!why.is_empty());
                }
                Outcome::Later(why) => panic!("message {n} handed back: {why}"),
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
}
