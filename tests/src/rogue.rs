//! A hand-driven protocol client for tests: it authenticates like a node, then sends
//! exactly the frames (or bytes) a test wants, to check how a hub treats a faulty or
//! hostile peer.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tidesync::net::pki::SERVER_NAME;
use tidesync::net::{tls, Bundle, Revocations};
use tidesync::sync::{Hello, Message, Role, PROTOCOL_VERSION};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// A hello claiming to be `node_id` in `role`, with an arbitrary feed epoch.
pub fn hello(node_id: &str, role: Role) -> Message {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        node_id: node_id.into(),
        role,
        feed_epoch: 7,
        feed_last: 0,
        resume: None,
        subscriptions: vec![],
    })
}

/// A hello as protocol version 1 encoded it, before `Hello::feed_last`: postcard by hand
/// (variant 0, version 1, node id, role, feed epoch 5, no resume, no subscriptions).
pub fn hello_v1(node_id: &str, role: Role) -> Vec<u8> {
    let mut out = vec![0, 1, node_id.len() as u8];
    out.extend_from_slice(node_id.as_bytes());
    out.extend_from_slice(&[role as u8, 5, 0, 0]);
    out
}

/// A connected rogue peer.
#[derive(Debug)]
pub struct Rogue {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    writer: FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
    reader: FramedRead<quinn::RecvStream, LengthDelimitedCodec>,
    _endpoint: quinn::Endpoint,
}

impl Rogue {
    /// Dials `addr` with `bundle`'s identity and opens the sync stream.
    pub async fn connect(bundle: &Bundle, addr: SocketAddr) -> Result<Self> {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        endpoint.set_default_client_config(tls::client_config(
            bundle,
            &Revocations::new(),
            tls::Timers::default(),
            tidesync::sync::PROTOCOL_VERSION,
        )?);
        let conn = endpoint.connect(addr, SERVER_NAME)?.await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Self {
            conn,
            writer: FramedWrite::new(send, LengthDelimitedCodec::new()),
            reader: FramedRead::new(
                recv,
                LengthDelimitedCodec::builder()
                    .max_frame_length(64 << 20)
                    .new_codec(),
            ),
            _endpoint: endpoint,
        })
    }

    /// Sends one message as a frame.
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.send_frame(&msg.encode()).await
    }

    /// Sends arbitrary bytes as one frame.
    pub async fn send_frame(&mut self, payload: &[u8]) -> Result<()> {
        self.writer.send(Bytes::copy_from_slice(payload)).await?;
        Ok(())
    }

    /// Writes raw bytes on the stream, bypassing framing.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.get_mut().write_all(bytes).await?;
        Ok(())
    }

    /// The next message from the hub; `None` when the stream or connection ends.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<Message>> {
        match tokio::time::timeout(timeout, self.reader.next()).await {
            Err(_) => anyhow::bail!("no message within {timeout:?}"),
            Ok(None) | Ok(Some(Err(_))) => Ok(None),
            Ok(Some(Ok(frame))) => Ok(Some(Message::decode(&frame).context("hub sent garbage")?)),
        }
    }

    /// Messages until one matches `pred` (which is returned) or the stream ends.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Message) -> bool,
    ) -> Result<Option<Message>> {
        loop {
            match self.recv(timeout).await? {
                Some(m) if pred(&m) => return Ok(Some(m)),
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }

    /// Whether the hub closed the connection within `timeout`.
    pub async fn closed_within(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.conn.closed())
            .await
            .is_ok()
    }
}
