//! The connection driver: runs one [`Session`] over one QUIC connection, as quinn's
//! `ConnectionDriver` runs a quinn-proto connection.
//!
//! One task per connection owns the bidirectional stream, the framed reader and writer,
//! and the session. It feeds the session frames, the store's feed movements and early
//! notices, and has [`Exec`] carry out the session's outputs: frames out, feed reads and
//! document loads (from the store's cache or snapshot), sync messages applied through the
//! store's writer (spawned, so in parallel across documents; the session never has two
//! out for one document), cursors saved. A frame that does not decode, one over the size
//! limit, or any protocol error ends the connection with an error sent to the peer;
//! nothing invalid reaches the store.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::counters::PeerCounters;
use super::exec::{Exec, ExecError, Outbox, WriteDone, Writes};
use super::log_limit::LogLimit;
use super::tls::Revocations;
use crate::model::NodeId;
use crate::store::Store;
use crate::sync::{validate, EarlyDoc, Event, Message, ProtocolError, Session, PROTOCOL_VERSION};
use crate::StoreError;

/// Application error code on QUIC close: a protocol error was sent first.
pub const CLOSE_PROTOCOL: u32 = 1;
/// Application error code on QUIC close: the peer was revoked.
pub const CLOSE_REVOKED: u32 = 2;
/// Application error code on QUIC close: this node is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 3;
/// Application error code on QUIC close: a newer connection to the same peer replaced it.
pub const CLOSE_REPLACED: u32 = 4;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// Either side broke the protocol; the error was sent to the peer.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to the stream failed.
    #[error("stream: {0}")]
    Stream(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The peer's certificate was revoked.
    #[error("peer revoked")]
    Revoked,
}

impl From<ExecError> for DriverError {
    fn from(e: ExecError) -> Self {
        match e {
            ExecError::Protocol(e) => Self::Protocol(e),
            ExecError::Store(e) => Self::Store(e),
            ExecError::Stream(e) => Self::Stream(e),
        }
    }
}

/// What a driver needs besides the connection.
#[derive(Clone, Debug)]
pub struct DriverContext {
    /// The node's store.
    pub store: Store,
    /// The node's revocation list.
    pub revocations: Revocations,
    /// Largest frame accepted or sent, in bytes.
    pub max_frame: usize,
}

type Writer = FramedWrite<quinn::SendStream, LengthDelimitedCodec>;
type Reader = FramedRead<quinn::RecvStream, LengthDelimitedCodec>;
type Writing = JoinSet<WriteDone>;

/// Frames already received that one sweep hands to the session at most.
const SWEEP_FRAMES: usize = 256;

/// Whether the peer's side of the stream is still open.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Open,
    Closed,
}

fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec()
}

/// Runs the session until the connection ends. `dialer` opens the stream; the acceptor
/// waits for it.
pub async fn run(
    conn: quinn::Connection,
    mut session: Session,
    dialer: bool,
    ctx: DriverContext,
    counters: Arc<PeerCounters>,
) -> Result<(), DriverError> {
    let (send, recv) = if dialer {
        conn.open_bi().await?
    } else {
        conn.accept_bi().await?
    };
    let mut reader = FramedRead::new(recv, codec(ctx.max_frame));
    let mut writer = FramedWrite::new(send, codec(ctx.max_frame));
    let mut feed = ctx.store.subscribe();
    let mut early = Some(ctx.store.subscribe_early());
    let mut revoked = ctx.revocations.subscribe();
    let peer_id = session.peer().node_id.clone();
    let exec = Exec {
        store: &ctx.store,
        counters: &counters,
    };
    let mut writing: Writing = JoinSet::new();
    let mut log = LogLimit::new(Instant::now());

    let mut seen_synced = 0;
    let result: Result<(), DriverError> = async {
        loop {
            let mut outbox = Frames::new(&mut writer, &counters, &peer_id, &mut log);
            exec.drain(
                &mut session,
                &mut outbox,
                &mut Writes::Spawned(&mut writing),
            )
            .await?;
            outbox.flush().await?;
            let synced = session.stats().docs_synced;
            if synced > seen_synced {
                counters
                    .docs_synced
                    .fetch_add(synced - seen_synced, Ordering::Relaxed);
                seen_synced = synced;
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                counters.last_sync_ms.store(now, Ordering::Relaxed);
            }
            counters.lag.store(session.lag(), Ordering::Relaxed);
            tokio::select! {
                frame = reader.next() => {
                    if on_frame(&mut session, &counters, frame)? == Flow::Closed {
                        return Ok(());
                    }
                    if sweep(&exec, &mut session, &mut reader, &mut writing)? == Flow::Closed {
                        return Ok(());
                    }
                }
                changed = feed.changed() => {
                    if changed.is_err() {
                        return Ok(()); // the store closed
                    }
                    let last = *feed.borrow_and_update();
                    session.handle_feed_advanced(last);
                }
                Some(done) = writing.join_next() => {
                    let done = done.map_err(|e| DriverError::Stream(e.to_string()))?;
                    exec.finish(&mut session, done)?;
                    if sweep(&exec, &mut session, &mut reader, &mut writing)? == Flow::Closed {
                        return Ok(());
                    }
                }
                notice = recv_early(&mut early) => {
                    for d in notice.iter().flat_map(|docs| docs.iter()) {
                        session.handle_early(d);
                    }
                }
                _ = revoked.changed() => {
                    if ctx.revocations.is_revoked(&peer_id) {
                        return Err(DriverError::Revoked);
                    }
                }
            }
        }
    }
    .await;

    match &result {
        Err(DriverError::Protocol(e)) => {
            counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %peer_id, error = %e, "closing connection: protocol error");
            let _ = writer.send(Bytes::from(e.to_message().encode())).await;
            let _ = writer.get_mut().finish();
            conn.close(CLOSE_PROTOCOL.into(), e.reason.as_bytes());
        }
        Err(DriverError::Revoked) => {
            tracing::warn!(peer = %peer_id, "closing connection: peer revoked");
            conn.close(CLOSE_REVOKED.into(), b"revoked");
        }
        Err(e) => tracing::info!(peer = %peer_id, error = %e, "connection ended"),
        Ok(()) => tracing::info!(peer = %peer_id, "connection closed"),
    }
    // Writes already handed to the store finish there; their results no longer matter.
    writing.detach_all();
    result
}

/// Hands one frame (or the stream's end) to the session.
fn on_frame(
    session: &mut Session,
    counters: &PeerCounters,
    frame: Option<Result<bytes::BytesMut, std::io::Error>>,
) -> Result<Flow, DriverError> {
    let frame = match frame {
        Some(Ok(f)) => f,
        // The codec reports bad frames as InvalidData; anything else is the connection
        // going away.
        Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Err(ProtocolError::from_frame_error(&e).into());
        }
        Some(Err(e)) => return Err(DriverError::Stream(e.to_string())),
        None => return Ok(Flow::Closed),
    };
    counters.messages_received.fetch_add(1, Ordering::Relaxed);
    counters
        .bytes_received
        .fetch_add(frame.len() as u64 + 4, Ordering::Relaxed);
    validate::check_frame(&frame)?;
    let msg = Message::decode(&frame).map_err(|e| match Message::hello_version(&frame) {
        Some(v) if v != PROTOCOL_VERSION => ProtocolError::version(v),
        _ => ProtocolError::protocol(format!("undecodable frame of {} bytes: {e}", frame.len())),
    })?;
    session.handle_message(msg)?;
    Ok(Flow::Open)
}

/// Hands the session every frame already received and every apply already finished,
/// without waiting, so the replies to a burst go out in one flush (few packets) instead of
/// one flush each.
fn sweep(
    exec: &Exec<'_>,
    session: &mut Session,
    reader: &mut Reader,
    writing: &mut Writing,
) -> Result<Flow, DriverError> {
    for _ in 0..SWEEP_FRAMES {
        let Some(frame) = reader.next().now_or_never() else {
            break;
        };
        if on_frame(session, exec.counters, frame)? == Flow::Closed {
            return Ok(Flow::Closed);
        }
    }
    while let Some(done) = writing.try_join_next() {
        let done = done.map_err(|e| DriverError::Stream(e.to_string()))?;
        exec.finish(session, done)?;
    }
    Ok(Flow::Open)
}

/// The next early notice of the store (see `Store::subscribe_early`); `None` after missed
/// notices, which only cost the head start. Pends forever once the store is closing.
async fn recv_early(
    early: &mut Option<broadcast::Receiver<Arc<[EarlyDoc]>>>,
) -> Option<Arc<[EarlyDoc]>> {
    let Some(rx) = early else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        Ok(docs) => Some(docs),
        Err(broadcast::error::RecvError::Lagged(_)) => None,
        Err(broadcast::error::RecvError::Closed) => {
            *early = None;
            None
        }
    }
}

/// The driver's outbox: frames into the QUIC stream, flushed every 20 ms during a long
/// drain (so catch-up bursts keep moving) and once at its end; events into the log.
struct Frames<'a> {
    writer: &'a mut Writer,
    counters: &'a PeerCounters,
    peer: &'a NodeId,
    /// The connection's budget of warning lines.
    log: &'a mut LogLimit,
    started: Instant,
    unflushed: bool,
}

impl<'a> Frames<'a> {
    fn new(
        writer: &'a mut Writer,
        counters: &'a PeerCounters,
        peer: &'a NodeId,
        log: &'a mut LogLimit,
    ) -> Self {
        Self {
            writer,
            counters,
            peer,
            log,
            started: Instant::now(),
            unflushed: false,
        }
    }

    async fn flush(&mut self) -> Result<(), ExecError> {
        if self.unflushed {
            SinkExt::<Bytes>::flush(self.writer)
                .await
                .map_err(|e| ExecError::Stream(e.to_string()))?;
            self.unflushed = false;
        }
        Ok(())
    }
}

impl Outbox for Frames<'_> {
    async fn send(&mut self, msg: Message) -> Result<(), ExecError> {
        let bytes = msg.encode();
        self.counters.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_sent
            .fetch_add(bytes.len() as u64 + 4, Ordering::Relaxed);
        self.writer
            .feed(Bytes::from(bytes))
            .await
            .map_err(|e| ExecError::Stream(e.to_string()))?;
        self.unflushed = true;
        if self.started.elapsed().as_millis() > 20 {
            self.flush().await?;
        }
        Ok(())
    }

    fn event(&mut self, event: Event) {
        let peer = self.peer;
        match event {
            // What a peer causes on every frame is logged within the connection's budget.
            Event::Rejected { ns, id, reason } => {
                if let Some(suppressed) = self.log.allow(Instant::now()) {
                    tracing::warn!(%peer, %ns, %id, %reason, suppressed, "refused peer changes");
                }
            }
            Event::PeerError { code, reason } => {
                if let Some(suppressed) = self.log.allow(Instant::now()) {
                    tracing::warn!(%peer, ?code, %reason, suppressed, "peer reported an error");
                }
            }
            Event::Connected { .. } => tracing::info!(%peer, "session started"),
            Event::CaughtUp => tracing::debug!(%peer, "peer caught up"),
        }
    }
}
