//! The brokers behind one face: what an export publishes and an import consumes, whether
//! the bus is NATS JetStream ([`nats`]) or RabbitMQ ([`amqp`]). Each side keeps the same
//! promise: a publish counts only once the broker has acknowledged it, and a consumed
//! message is settled (acknowledged, dead-lettered or handed back) only after its fate is
//! durable.

mod amqp;
mod nats;

use std::time::Duration;

use crate::config::{Broker, ExportConfig, ImportConfig};

/// How long a broker has to connect, and to acknowledge a message.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// One message to publish.
#[derive(Debug)]
pub(crate) struct Outgoing {
    /// What makes a resend recognisable: `Nats-Msg-Id`, AMQP `message_id`.
    pub id: String,
    /// The subject (NATS) or routing key (AMQP).
    pub dest: String,
    /// Namespace, id, heads, epoch and position, as headers.
    pub headers: Vec<(&'static str, String)>,
    pub payload: Vec<u8>,
    /// `application/json` or `application/octet-stream`.
    pub content_type: &'static str,
}

/// A connection an export publishes on.
pub(crate) enum Publisher {
    Nats(nats::Publisher),
    Amqp(amqp::Publisher),
}

/// A published message whose acknowledgement is still to come.
pub(crate) enum Pending {
    Nats(async_nats::jetstream::context::PublishAckFuture),
    Amqp(lapin::PublisherConfirm, String),
}

/// What the broker said of a message it acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Confirmed {
    Stored,
    /// JetStream had it already (same id within its window) and dropped this copy.
    Duplicate,
}

impl Publisher {
    /// Connects to the export's broker and readies what it publishes to.
    pub async fn connect(cfg: &ExportConfig) -> Result<Self, String> {
        match cfg.broker {
            Broker::Nats => nats::Publisher::connect(&cfg.url).await.map(Self::Nats),
            Broker::Amqp => amqp::Publisher::connect(&cfg.url, &cfg.exchange)
                .await
                .map(Self::Amqp),
        }
    }

    /// Sends `m`; the returned [`Pending`] resolves when the broker has it.
    pub async fn publish(&self, m: Outgoing) -> Result<Pending, String> {
        match self {
            Self::Nats(p) => p.publish(m).await.map(Pending::Nats),
            Self::Amqp(p) => p.publish(m).await,
        }
    }
}

impl Pending {
    /// Waits for the broker's acknowledgement, at most [`ACK_TIMEOUT`].
    pub async fn confirmed(self) -> Result<Confirmed, String> {
        let wait = async {
            match self {
                Self::Nats(ack) => nats::confirmed(ack).await,
                Self::Amqp(confirm, dest) => amqp::confirmed(confirm, &dest).await,
            }
        };
        tokio::time::timeout(ACK_TIMEOUT, wait)
            .await
            .map_err(|_| format!("no acknowledgement within {ACK_TIMEOUT:?}"))?
    }
}

/// A message an import took from the broker, to be settled once.
pub(crate) struct Incoming {
    /// The subject (NATS) or routing key (AMQP) it arrived with.
    pub subject: String,
    pub payload: Vec<u8>,
    handle: Handle,
}

enum Handle {
    Nats(Box<async_nats::jetstream::Message>),
    Amqp(lapin::Acker),
}

/// An import's subscription.
pub(crate) enum Consumer {
    Nats(nats::Consumer),
    Amqp(amqp::Consumer),
}

impl Consumer {
    /// Connects to the import's broker and subscribes, durably.
    pub async fn connect(cfg: &ImportConfig, name: &str) -> Result<Self, String> {
        match cfg.broker {
            Broker::Nats => nats::Consumer::connect(cfg, name).await.map(Self::Nats),
            Broker::Amqp => amqp::Consumer::connect(cfg, name).await.map(Self::Amqp),
        }
    }

    /// The next message; an error when the subscription ended.
    pub async fn next(&mut self) -> Result<Incoming, String> {
        match self {
            Self::Nats(c) => c.next().await,
            Self::Amqp(c) => c.next().await,
        }
    }

    /// The message is applied, durably: the broker may forget it.
    pub async fn ack(&self, m: Incoming) -> Result<(), String> {
        match m.handle {
            Handle::Nats(msg) => nats::ack(&msg).await,
            Handle::Amqp(acker) => amqp::ack(&acker).await,
        }
        .map_err(|e| format!("acknowledging: {e}"))
    }

    /// The message is not a valid patch: a copy with `reason` goes to the dead letters,
    /// and once the broker has that copy, the message itself is settled for good.
    pub async fn dead_letter(&self, m: Incoming, reason: &str) -> Result<(), String> {
        match (self, m.handle) {
            (Self::Nats(c), Handle::Nats(msg)) => c.dead_letter(msg, reason).await,
            (Self::Amqp(c), Handle::Amqp(acker)) => {
                c.dead_letter(&acker, &m.subject, &m.payload, reason).await
            }
            _ => Err("a message of another broker".into()),
        }
    }

    /// The store cannot write now: the broker delivers the message again later.
    pub async fn later(&self, m: Incoming) -> Result<(), String> {
        match m.handle {
            Handle::Nats(msg) => nats::later(&msg).await,
            Handle::Amqp(acker) => amqp::later(&acker).await,
        }
        .map_err(|e| format!("handing back: {e}"))
    }
}
