//! NATS JetStream: publishes with `Nats-Msg-Id` and publish acks; imports through a
//! durable pull consumer of the stream that covers the import's subject.

use std::time::Duration;

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
    /// The stream's identity: its name and when it was created.
    stream: [u8; 8],
}

impl Consumer {
    /// Subscribes through the durable consumer `name`. A consumer left with messages
    /// delivered and not acknowledged (the hub stopped or lost the connection while
    /// applying them) is made again from its acknowledgement floor: JetStream would
    /// deliver those messages again only after [`ACK_WAIT`], behind newer ones, and a
    /// patch applied after a later one of its document would undo it. Made again, the
    /// consumer delivers everything after the floor in stream order, and the import skips
    /// what it had applied already.
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
        if let Ok(info) = stream.consumer_info(name).await {
            if info.num_ack_pending > 0 {
                deliver_policy = DeliverPolicy::ByStartSequence {
                    start_sequence: info.ack_floor.stream_sequence.saturating_add(1),
                };
                stream
                    .delete_consumer(name)
                    .await
                    .map_err(|e| format!("making consumer {name} again: {e}"))?;
            }
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
            stream: stream_id,
        })
    }

    pub async fn next(&mut self) -> Result<Incoming, String> {
        let message = self
            .messages
            .next()
            .await
            .ok_or("the broker ended the subscription")?
            .map_err(|e| format!("receiving: {e}"))?;
        let position = message.info().ok().map(|i| Position {
            stream: self.stream,
            seq: i.stream_sequence,
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
