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
    /// Where the message stands in its stream, for a broker that numbers them
    /// (JetStream): messages of one document are applied in this order, once.
    pub position: Option<Position>,
    handle: Handle,
}

/// A message's place in a numbered stream: the stream (which a re-created stream of the
/// same name is not) and its sequence number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    pub stream: [u8; 8],
    pub seq: u64,
}

impl Position {
    /// The 16 bytes an import keeps per document.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut out = self.stream.to_vec();
        out.extend_from_slice(&self.seq.to_le_bytes());
        out
    }

    /// Whether a message at `self` was applied already, given the position `kept` for its
    /// document: the same stream, and not after it.
    pub fn applied_by(self, kept: &[u8]) -> bool {
        let (Some(stream), Some(seq)) = (kept.get(..8), kept.get(8..16)) else {
            return false;
        };
        let seq = u64::from_le_bytes(seq.try_into().unwrap_or([0; 8]));
        stream == self.stream && self.seq <= seq
    }
}

/// Longest reason a dead letter carries, in bytes: the reason may quote the message.
const MAX_REASON: usize = 1024;

/// Most of the original message a dead letter carries, in bytes: with the reason and the
/// headers it must still fit the broker's largest message.
const MAX_DEAD_LETTER_PAYLOAD: usize = 512 * 1024;

/// `reason`, cut to [`MAX_REASON`] bytes at a character boundary.
fn cut_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// What of `payload` a dead letter carries, and its full length when that is cut.
fn dead_letter_payload(payload: &[u8]) -> (&[u8], Option<String>) {
    if payload.len() > MAX_DEAD_LETTER_PAYLOAD {
        (
            &payload[..MAX_DEAD_LETTER_PAYLOAD],
            Some(payload.len().to_string()),
        )
    } else {
        (payload, None)
    }
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

    /// The store cannot write now and the import holds `held` to try again: tells a broker
    /// that redelivers unacknowledged messages after a while (JetStream) to wait.
    pub async fn hold(&self, held: &[Incoming]) -> Result<(), String> {
        for m in held {
            if let Handle::Nats(msg) = &m.handle {
                nats::in_progress(msg).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hostile message's dead letter stays within what a broker takes: the reason (which
    /// may quote the message) is cut at a character boundary, the payload at its bound
    /// with its full length said.
    #[test]
    fn dead_letters_are_bounded_whatever_the_message() {
        let reason = format!("invalid document id {:?}", "é".repeat(4096));
        let cut = cut_reason(&reason);
        assert!(
            cut.len() <= MAX_REASON && cut.len() > MAX_REASON - 4,
            "{}",
            cut.len()
        );
        assert!(reason.starts_with(cut));
        assert_eq!(cut_reason("short"), "short");

        let big = vec![b'x'; 1 << 20];
        let (payload, full) = dead_letter_payload(&big);
        assert_eq!(payload.len(), MAX_DEAD_LETTER_PAYLOAD);
        assert_eq!(full.as_deref(), Some("1048576"));
        let small = b"not json";
        assert_eq!(dead_letter_payload(small), (&small[..], None));
    }

    /// A position is taken for applied only in the same stream and not after the kept one.
    #[test]
    fn positions_compare_only_within_one_stream() {
        let kept = Position {
            stream: [1; 8],
            seq: 10,
        }
        .to_bytes();
        assert!(Position {
            stream: [1; 8],
            seq: 10
        }
        .applied_by(&kept));
        assert!(Position {
            stream: [1; 8],
            seq: 3
        }
        .applied_by(&kept));
        assert!(!Position {
            stream: [1; 8],
            seq: 11
        }
        .applied_by(&kept));
        assert!(!Position {
            stream: [2; 8],
            seq: 3
        }
        .applied_by(&kept));
        assert!(!Position {
            stream: [1; 8],
            seq: 3
        }
        .applied_by(b"short"));
    }
}
