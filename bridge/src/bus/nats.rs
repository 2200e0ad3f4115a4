//! NATS JetStream: publishes with `Nats-Msg-Id` and publish acks; imports through a
//! durable pull consumer of the stream that covers the import's subject.

use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::RetentionPolicy;
use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy, AckKind};
use futures_util::StreamExt;

use super::{Confirmed, Handle, Incoming, Outgoing, Position, ACK_TIMEOUT, CONNECT_TIMEOUT};
use crate::config::ImportConfig;

/// How long JetStream waits for an import's acknowledgement before it delivers again.
const ACK_WAIT: Duration = Duration::from_secs(30);

async fn context(url: &str) -> Result<jetstream::Context, String> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(CONNECT_TIMEOUT)
        .connect(url)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let mut js = jetstream::new(client);
    js.set_timeout(ACK_TIMEOUT);
    Ok(js)
}

fn headers(m: &Outgoing) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", m.id.as_str());
    h.insert("Content-Type", m.content_type);
    for (k, v) in &m.headers {
        h.insert(*k, v.as_str());
    }
    h
}

/// An export's JetStream context.
pub(crate) struct Publisher {
    js: jetstream::Context,
}

impl Publisher {
    pub async fn connect(url: &str) -> Result<Self, String> {
        Ok(Self {
            js: context(url).await?,
        })
    }

    pub async fn publish(
        &self,
        m: Outgoing,
    ) -> Result<jetstream::context::PublishAckFuture, String> {
        let headers = headers(&m);
        self.js
            .publish_with_headers(m.dest, headers, m.payload.into())
            .await
            .map_err(|e| format!("publishing: {e}"))
    }
}

pub(crate) async fn confirmed(
    ack: jetstream::context::PublishAckFuture,
) -> Result<Confirmed, String> {
    let ack = ack.await.map_err(|e| format!("publish ack: {e}"))?;
    Ok(if ack.duplicate {
        Confirmed::Duplicate
    } else {
        Confirmed::Stored
    })
}

/// An import's durable pull consumer.
pub(crate) struct Consumer {
    js: jetstream::Context,
    messages: pull::Stream,
    dead_letter: String,
    /// The stream's identity (its name and when it was created), for a stream that keeps
    /// messages by limits; `None` for an interest or work-queue stream, whose consumer is
    /// not made over, so a message delivered again may be one never applied and is not
    /// skipped by position.
    stream: Option<[u8; 8]>,
    /// The consumer sequence the next delivery must carry. JetStream numbers every
    /// delivery; a gap means deliveries this session never got (lost in a reconnect of
    /// the client), which JetStream will deliver again only later, behind newer ones.
    expected: u64,
}

impl Consumer {
    /// Subscribes through the durable consumer `name`. A consumer left with messages
    /// delivered and not acknowledged (the hub stopped or lost the connection while
    /// applying them) is made again from its acknowledgement floor: JetStream would
    /// deliver those messages again only after [`ACK_WAIT`], behind newer ones, and a
    /// patch applied after a later one of its document would undo it. Made again, the
    /// consumer delivers everything after the floor in stream order, and the import skips
    /// what it had applied already. Only a stream that keeps messages by limits is made
    /// over so: deleting the consumer of an interest or work-queue stream would drop the
    /// messages it holds. A consumer another client is pulling from is refused: an
    /// import's consumer serves one hub.
    pub async fn connect(cfg: &ImportConfig, name: &str) -> Result<Self, String> {
        let js = context(&cfg.url).await?;
        let stream_name = js
            .stream_by_subject(cfg.subject.clone())
            .await
            .map_err(|e| format!("no stream covers {}: {e}", cfg.subject))?;
        let stream = js
            .get_stream(&stream_name)
            .await
            .map_err(|e| format!("stream {stream_name}: {e}"))?;
        let created = stream.cached_info().created.to_string();
        let identity = blake3::hash(format!("{stream_name}\0{created}").as_bytes());
        let mut stream_id = [0u8; 8];
        stream_id.copy_from_slice(&identity.as_bytes()[..8]);
        let mut deliver_policy = DeliverPolicy::All;
        let mut expected = 1;
        match stream.consumer_info(name).await {
            Ok(info) if info.num_waiting > 0 => {
                return Err(format!(
                    "another client is pulling from consumer {name}: an import's consumer serves one hub"
                ))
            }
            Ok(info)
                if info.num_ack_pending > 0
                    && stream.cached_info().config.retention == RetentionPolicy::Limits =>
            {
                deliver_policy = DeliverPolicy::ByStartSequence {
                    start_sequence: info.ack_floor.stream_sequence.saturating_add(1),
                };
                stream
                    .delete_consumer(name)
                    .await
                    .map_err(|e| format!("making consumer {name} again: {e}"))?;
            }
            Ok(info) => expected = info.delivered.consumer_sequence.saturating_add(1),
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {}
            Err(e) => return Err(format!("consumer {name}: {e}")),
        }
        let consumer = stream
            .get_or_create_consumer(
                name,
                pull::Config {
                    durable_name: Some(name.to_owned()),
                    filter_subject: cfg.subject.clone(),
                    ack_wait: ACK_WAIT,
                    deliver_policy,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("consumer {name}: {e}"))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| format!("consuming: {e}"))?;
        Ok(Self {
            js,
            messages,
            dead_letter: cfg.dead_letter.clone(),
            stream: (stream.cached_info().config.retention == RetentionPolicy::Limits)
                .then_some(stream_id),
            expected,
        })
    }

    pub async fn next(&mut self) -> Result<Incoming, String> {
        let message = self
            .messages
            .next()
            .await
            .ok_or("the broker ended the subscription")?
            .map_err(|e| format!("receiving: {e}"))?;
        let info = message
            .info()
            .map_err(|e| format!("a message without its stream position: {e}"))?;
        if info.consumer_sequence != self.expected {
            // Ending the session makes the consumer again from its floor, in order.
            return Err(format!(
                "delivery {} came after {}: deliveries were lost on the way; resubscribing",
                info.consumer_sequence,
                self.expected.saturating_sub(1)
            ));
        }
        self.expected += 1;
        let position = self.stream.map(|stream| Position {
            stream,
            seq: info.stream_sequence,
        });
        Ok(Incoming {
            subject: message.subject.to_string(),
            payload: message.payload.to_vec(),
            position,
            handle: Handle::Nats(Box::new(message)),
        })
    }

    pub async fn dead_letter(
        &self,
        message: Box<jetstream::Message>,
        reason: &str,
    ) -> Result<(), String> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Tidesync-Reason", super::cut_reason(reason));
        headers.insert("Tidesync-Subject", message.subject.as_str());
        let (payload, cut) = super::dead_letter_payload(&message.payload);
        if let Some(len) = cut {
            headers.insert("Tidesync-Truncated-From", len.as_str());
        }
        self.js
            .publish_with_headers(self.dead_letter.clone(), headers, payload.to_vec().into())
            .await
            .map_err(|e| format!("dead letter: {e}"))?
            .await
            .map_err(|e| format!("dead letter: {e}"))?;
        message
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| format!("acknowledging: {e}"))
    }
}

pub(crate) async fn ack(m: &jetstream::Message) -> Result<(), String> {
    m.ack().await.map_err(|e| e.to_string())
}

/// Restarts the wait before JetStream delivers `m` again.
pub(crate) async fn in_progress(m: &jetstream::Message) -> Result<(), String> {
    m.ack_with(AckKind::Progress)
        .await
        .map_err(|e| format!("holding a message: {e}"))
}
