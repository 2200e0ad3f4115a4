//! RabbitMQ (AMQP 0-9-1): exports publish persistent, mandatory messages with a
//! `message_id` to a durable topic exchange, in confirm mode; imports read a durable
//! queue with manual acknowledgements, and dead letters go to a durable queue of their
//! own through the default exchange, confirmed before the message is settled.
//!
//! Queues and exchanges an operator declared keep their settings (quorum queues, say):
//! the bridge declares one only when a passive declaration finds none.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use super::{Confirmed, Handle, Incoming, Outgoing, Pending, CONNECT_TIMEOUT};
use crate::config::ImportConfig;

/// Messages the broker hands an import before it has acknowledged earlier ones.
const PREFETCH: u16 = 32;

/// Persistent: a durable queue keeps the message across a broker restart.
const PERSISTENT: u8 = 2;

async fn connect(url: &str) -> Result<Connection, String> {
    let connecting = Connection::connect(url, ConnectionProperties::default());
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| format!("connecting: no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("connecting: {e}"))
}

fn name(s: &str) -> Result<ShortString, String> {
    ShortString::try_new(s).map_err(|e| format!("{s:?}: {e}"))
}

/// Declares durable queue `queue` unless it exists (with whatever settings it has).
async fn ensure_queue(conn: &Connection, queue: &str) -> Result<(), String> {
    let probe = conn.create_channel().await.map_err(|e| e.to_string())?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    // A queue that is not there closes the probing channel: a fresh one declares it.
    if probe
        .queue_declare(name(queue)?, passive, FieldTable::default())
        .await
        .is_ok()
    {
        return Ok(());
    }
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.queue_declare(
        name(queue)?,
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| format!("declaring queue {queue}: {e}"))?;
    Ok(())
}

/// Declares durable topic exchange `exchange` unless it exists.
async fn ensure_exchange(conn: &Connection, exchange: &str) -> Result<(), String> {
    let probe = conn.create_channel().await.map_err(|e| e.to_string())?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    if probe
        .exchange_declare(
            name(exchange)?,
            lapin::ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await
        .is_ok()
    {
        return Ok(());
    }
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        name(exchange)?,
        lapin::ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await
    .map_err(|e| format!("declaring exchange {exchange}: {e}"))
}

async fn confirming_channel(conn: &Connection) -> Result<Channel, String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("confirm mode: {e}"))?;
    Ok(ch)
}

fn table(headers: &[(&str, &str)]) -> Result<FieldTable, String> {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        t.insert(
            name(k)?,
            AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
        );
    }
    Ok(t)
}

/// Publishes with `mandatory` set, so a message no queue takes comes back and counts as
/// a failure (the export retries) rather than being dropped by the exchange.
fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    }
}

/// An export's connection and confirming channel.
pub(crate) struct Publisher {
    _conn: Connection,
    channel: Channel,
    exchange: ShortString,
}

impl Publisher {
    pub async fn connect(url: &str, exchange: &str) -> Result<Self, String> {
        let conn = connect(url).await?;
        ensure_exchange(&conn, exchange).await?;
        let channel = confirming_channel(&conn).await?;
        Ok(Self {
            _conn: conn,
            channel,
            exchange: name(exchange)?,
        })
    }

    pub async fn publish(&self, m: Outgoing) -> Result<Pending, String> {
        let headers: Vec<(&str, &str)> = m.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let properties = BasicProperties::default()
            .with_message_id(name(&m.id)?)
            .with_delivery_mode(PERSISTENT)
            .with_content_type(m.content_type.into())
            .with_headers(table(&headers)?);
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.clone(),
                name(&m.dest)?,
                mandatory(),
                &m.payload,
                properties,
            )
            .await
            .map_err(|e| format!("publishing: {e}"))?;
        Ok(Pending::Amqp(confirm, m.dest))
    }
}

pub(crate) async fn confirmed(
    confirm: lapin::PublisherConfirm,
    dest: &str,
) -> Result<Confirmed, String> {
    match confirm
        .await
        .map_err(|e| format!("publisher confirm: {e}"))?
    {
        Confirmation::Ack(None) => Ok(Confirmed::Stored),
        Confirmation::Ack(Some(returned)) => Err(format!(
            "no queue takes routing key {dest} ({}); bind one to the exchange",
            returned.reply_text
        )),
        Confirmation::Nack(_) => Err(format!("the broker refused the message to {dest}")),
        Confirmation::NotRequested => Err("the channel is not in confirm mode".into()),
    }
}

/// An import's consumer of its queue, and the channel dead letters go out on.
pub(crate) struct Consumer {
    _conn: Connection,
    consumer: lapin::Consumer,
    publish: Channel,
    dead_letter: String,
}

impl Consumer {
    pub async fn connect(cfg: &ImportConfig, tag: &str) -> Result<Self, String> {
        let conn = connect(&cfg.url).await?;
        ensure_queue(&conn, &cfg.subject).await?;
        ensure_queue(&conn, &cfg.dead_letter).await?;
        let publish = confirming_channel(&conn).await?;
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(|e| format!("prefetch: {e}"))?;
        let consumer = ch
            .basic_consume(
                name(&cfg.subject)?,
                name(tag)?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("consuming {}: {e}", cfg.subject))?;
        Ok(Self {
            _conn: conn,
            consumer,
            publish,
            dead_letter: cfg.dead_letter.clone(),
        })
    }

    pub async fn next(&mut self) -> Result<Incoming, String> {
        let delivery = self
            .consumer
            .next()
            .await
            .ok_or("the broker ended the subscription")?
            .map_err(|e| format!("receiving: {e}"))?;
        Ok(Incoming {
            subject: delivery.routing_key.to_string(),
            payload: delivery.data,
            // RabbitMQ puts a message it gets back (the hub stopped before acknowledging
            // it) at its old place in the queue, ahead of newer ones.
            position: None,
            handle: Handle::Amqp(delivery.acker),
        })
    }

    pub async fn dead_letter(
        &self,
        acker: &lapin::Acker,
        routing_key: &str,
        payload: &[u8],
        reason: &str,
    ) -> Result<(), String> {
        let (payload, cut) = super::dead_letter_payload(payload);
        let mut headers = vec![
            ("Tidesync-Reason", super::cut_reason(reason)),
            ("Tidesync-Routing-Key", routing_key),
        ];
        if let Some(len) = &cut {
            headers.push(("Tidesync-Truncated-From", len.as_str()));
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_headers(table(&headers)?);
        let confirm = self
            .publish
            .basic_publish(
                ShortString::from(""),
                name(&self.dead_letter)?,
                mandatory(),
                payload,
                properties,
            )
            .await
            .map_err(|e| format!("dead letter: {e}"))?;
        confirmed(confirm, &self.dead_letter)
            .await
            .map_err(|e| format!("dead letter: {e}"))?;
        ack(acker).await.map_err(|e| format!("acknowledging: {e}"))
    }
}

pub(crate) async fn ack(acker: &lapin::Acker) -> Result<(), String> {
    acker
        .ack(BasicAckOptions::default())
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}
