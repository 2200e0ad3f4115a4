//! One import: JSON merge patches from NATS JetStream or RabbitMQ into the hub's
//! documents.
//!
//! A durable consumer (a JetStream pull consumer of the import's subject, or a consumer
//! of its AMQP queue with manual acknowledgements) hands messages over one at a time; the
//! patch goes through the store's normal write path, and the message is acknowledged
//! only after the commit is durable. A hub that dies before the
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
        let message = consumer.next().await?;
        match apply(state, store, &message.subject, &message.payload).await {
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
    }
}

/// Checks one message and applies its patch, durably.
async fn apply(state: &ImportState, store: &Store, subject: &str, payload: &[u8]) -> Outcome {
    let reject = |why: String| Outcome::Rejected(why);
    if payload.len() > MAX_MESSAGE_BYTES {
        return reject(format!(
            "{} bytes; at most {MAX_MESSAGE_BYTES}",
            payload.len()
        ));
    }
    let body: Value = match serde_json::from_slice(payload) {
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
    let Some(patch) = body.get("patch").filter(|p| p.is_object()) else {
        return reject("\"patch\" is missing or not an object".into());
    };
    match store.patch(&ns, &id, patch.clone(), None).await {
        Ok(_) => Outcome::Applied,
        Err(e @ (StoreError::Model(_) | StoreError::Quarantined { .. })) => reject(e.to_string()),
        Err(e) => Outcome::Later(e.to_string()),
    }
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
