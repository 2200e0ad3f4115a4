//! The connection driver: runs one [`Session`] over one QUIC connection.
//!
//! One task per connection owns the bidirectional stream, the framed reader and writer,
//! and the session. It feeds the session frames, store results and feed movements, and
//! carries out the session's outputs: frames out, feed reads and document loads (from the
//! store's cache or snapshot), sync messages applied through the store's writer (in
//! parallel across documents, never two for one document), cursors saved. A frame that
//! does not decode, one over the size limit, or any protocol error ends the connection
//! with an error sent to the peer; nothing invalid reaches the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::tls::Revocations;
use crate::model::{DocId, Namespace};
use crate::store::{EarlyDoc, Store, SyncApplied};
use crate::sync::{Event, Message, Output, ProtocolError, Session, PROTOCOL_VERSION};
use crate::StoreError;

/// Application error code on QUIC close: a protocol error was sent first.
pub const CLOSE_PROTOCOL: u32 = 1;
/// Application error code on QUIC close: the peer was revoked.
pub const CLOSE_REVOKED: u32 = 2;
/// Application error code on QUIC close: this node is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 3;
/// Application error code on QUIC close: a newer connection to the same peer replaced it.
pub const CLOSE_REPLACED: u32 = 4;

/// Live counters of one peer, across its connections (monotonic except `lag`), shared
/// with status and metrics.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Frame bytes sent, length prefixes included.
    pub bytes_sent: AtomicU64,
    /// Frame bytes received, length prefixes included.
    pub bytes_received: AtomicU64,
    /// Frames sent.
    pub messages_sent: AtomicU64,
    /// Frames received.
    pub messages_received: AtomicU64,
    /// Automerge sync messages received and applied.
    pub syncs_applied: AtomicU64,
    /// Documents whose sync with the peer completed.
    pub docs_synced: AtomicU64,
    /// Messages or changes refused because of the peer's grants.
    pub rejected: AtomicU64,
    /// Local feed positions the peer has not acknowledged yet.
    pub lag: AtomicU64,
    /// Unix milliseconds of the last completed document sync (0: never).
    pub last_sync_ms: AtomicU64,
    /// Documents loaded from the store for this peer.
    pub docs_loaded: AtomicU64,
    /// Automerge changes received from the peer and stored.
    pub changes_applied: AtomicU64,
    /// Protocol errors that ended a connection with this peer.
    pub protocol_errors: AtomicU64,
}

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
type Applies = JoinSet<(Namespace, DocId, Result<SyncApplied, StoreError>)>;

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
    let mut applies: Applies = JoinSet::new();
    let mut saves: JoinSet<Result<(), StoreError>> = JoinSet::new();

    let mut seen_synced = 0;
    let result: Result<(), DriverError> = async {
        loop {
            drain(
                &mut session,
                &mut writer,
                &ctx,
                &counters,
                &mut applies,
                &mut saves,
            )
            .await?;
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
                    if sweep(&mut session, &mut reader, &mut applies, &counters)? == Flow::Closed {
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
                Some(done) = applies.join_next() => {
                    on_applied(&mut session, &counters, done)?;
                    if sweep(&mut session, &mut reader, &mut applies, &counters)? == Flow::Closed {
                        return Ok(());
                    }
                }
                Some(saved) = saves.join_next() => {
                    saved.map_err(|e| DriverError::Stream(e.to_string()))??;
                }
                notice = recv_early(&mut early) => {
                    if let Some(docs) = notice {
                        let peer = session.sync_peer();
                        for d in docs.iter() {
                            session.handle_early(d, || {
                                ctx.store.sync_state(&peer, d.key)
                            });
                        }
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
    applies.detach_all();
    saves.detach_all();
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
    let msg = Message::decode(&frame).map_err(|e| match Message::hello_version(&frame) {
        Some(v) if v != PROTOCOL_VERSION => ProtocolError::version(v),
        _ => ProtocolError::protocol(format!("undecodable frame of {} bytes: {e}", frame.len())),
    })?;
    session.handle_message(msg)?;
    Ok(Flow::Open)
}

/// Hands one finished apply to the session.
fn on_applied(
    session: &mut Session,
    counters: &PeerCounters,
    done: Result<(Namespace, DocId, Result<SyncApplied, StoreError>), tokio::task::JoinError>,
) -> Result<(), DriverError> {
    let (ns, id, result) = done.map_err(|e| DriverError::Stream(e.to_string()))?;
    if let Ok(applied) = &result {
        counters.syncs_applied.fetch_add(1, Ordering::Relaxed);
        counters
            .changes_applied
            .fetch_add(applied.changes_applied, Ordering::Relaxed);
    }
    session.handle_applied(ns, id, result)?;
    Ok(())
}

/// Hands the session every frame already received and every apply already finished,
/// without waiting, so the replies to a burst go out in one flush (few packets) instead of
/// one flush each.
fn sweep(
    session: &mut Session,
    reader: &mut Reader,
    applies: &mut Applies,
    counters: &PeerCounters,
) -> Result<Flow, DriverError> {
    for _ in 0..SWEEP_FRAMES {
        let Some(frame) = reader.next().now_or_never() else {
            break;
        };
        if on_frame(session, counters, frame)? == Flow::Closed {
            return Ok(Flow::Closed);
        }
    }
    while let Some(done) = applies.try_join_next() {
        on_applied(session, counters, done)?;
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

/// Carries out every pending output of the session, then flushes the frames.
async fn drain(
    session: &mut Session,
    writer: &mut Writer,
    ctx: &DriverContext,
    counters: &PeerCounters,
    applies: &mut Applies,
    saves: &mut JoinSet<Result<(), StoreError>>,
) -> Result<(), DriverError> {
    let mut wrote = false;
    let started = Instant::now();
    // Only a hello changes it, and hellos arrive between drains.
    let peer = session.sync_peer();
    while let Some(out) = session.poll_output() {
        match out {
            Output::Send(msg) => {
                let bytes = msg.encode();
                counters.messages_sent.fetch_add(1, Ordering::Relaxed);
                counters
                    .bytes_sent
                    .fetch_add(bytes.len() as u64 + 4, Ordering::Relaxed);
                writer
                    .feed(Bytes::from(bytes))
                    .await
                    .map_err(|e| DriverError::Stream(e.to_string()))?;
                wrote = true;
            }
            Output::ReadFeed { after, limit } => {
                let last = ctx.store.last_seq();
                let entries = ctx.store.changes_since(after, limit)?;
                session.handle_feed(entries, last);
            }
            Output::Load { ns, id } => {
                counters.docs_loaded.fetch_add(1, Ordering::Relaxed);
                let loaded = ctx.store.load_for_sync(&ns, &id, &peer)?;
                session.handle_loaded(ns, id, loaded);
            }
            Output::Apply(apply) => {
                let (store, peer) = (ctx.store.clone(), peer.clone());
                applies.spawn(async move { apply.run(&store, &peer).await });
            }
            Output::SaveCursor(record) => {
                let (store, id) = (ctx.store.clone(), peer.id.clone());
                saves.spawn(async move { store.set_peer_record(&id, record).await });
            }
            Output::Event(event) => match event {
                Event::Rejected { ns, id, reason } => {
                    counters.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %peer.id, %ns, %id, %reason, "refused peer changes");
                }
                Event::PeerError { code, reason } => {
                    tracing::warn!(peer = %peer.id, ?code, %reason, "peer reported an error");
                }
                Event::Connected { .. } => tracing::info!(peer = %peer.id, "session started"),
                Event::CaughtUp => tracing::debug!(peer = %peer.id, "peer caught up"),
            },
        }
        // Keep frames moving during long catch-up bursts.
        if wrote && started.elapsed().as_millis() > 20 {
            SinkExt::<Bytes>::flush(writer)
                .await
                .map_err(|e| DriverError::Stream(e.to_string()))?;
            wrote = false;
        }
    }
    if wrote {
        SinkExt::<Bytes>::flush(writer)
            .await
            .map_err(|e| DriverError::Stream(e.to_string()))?;
    }
    Ok(())
}
