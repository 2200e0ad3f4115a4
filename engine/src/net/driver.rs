//! The connection driver: runs one [`Session`] over one QUIC connection, as quinn's
//! `ConnectionDriver` runs a quinn-proto connection.
//!
//! One task per connection owns the bidirectional stream, the framed reader, the queue of
//! frames to send, and the session. It feeds the session frames, the store's feed
//! movements and early notices, and has [`Exec`] carry out the session's outputs: frames
//! out, feed reads and document loads (from the store's cache or snapshot), sync messages
//! applied through the store's writer (spawned, so in parallel across documents; the
//! session never has two out for one document), cursors saved. A frame that does not
//! decode, one over the size limit, or any protocol error ends the connection with an
//! error sent to the peer; nothing invalid reaches the store.
//!
//! Flow: the driver reads only while the session wants frames (its budget of uncommitted
//! peer messages), so a flooding peer is held by QUIC flow control; and it writes its
//! queue in the same `select!` as it reads, never instead of reading, so two nodes that
//! both have more to send than a stream window cannot wait on each other. The queue's
//! room is what the session is told it may send ([`Session::set_can_send`]).
//!
//! Cut means cut: when the peer is dropped (protocol error, revocation), its applies still
//! queued at the store are abandoned and the store is waited for before the connection
//! closes, so nothing the peer sent commits, or relays, after it was dropped.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::audit::{AuditError, AuditRequest};
use super::batch::{BatchClock, LocalClock};
use super::counters::PeerCounters;
use super::exec::{Exec, ExecError, Outbox, WriteDone, Writes};
use super::frames;
use super::log_limit::LogLimit;
use super::pacing::LinkPacing;
use super::revocations::{Offered, Revocations};
use super::send_queue::SendQueue;
use crate::model::{ClassId, Classes, Namespace, NodeId, Priority};
use crate::store::Store;
use crate::sync::{
    AuditReport, EarlyDoc, Event, Message, ProtocolError, Session, CLASSES_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use crate::StoreError;

/// Application error code on QUIC close: a protocol error was sent first.
pub const CLOSE_PROTOCOL: u32 = 1;
/// Application error code on QUIC close: the peer was revoked.
pub const CLOSE_REVOKED: u32 = 2;
/// Application error code on QUIC close: this node is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 3;
/// Application error code on QUIC close: a newer connection to the same peer replaced it.
pub const CLOSE_REPLACED: u32 = 4;
/// Application error code on QUIC close: the peer broke the protocol a moment ago and is
/// refused for a while (see [`super::penalties`]).
pub const CLOSE_PENALIZED: u32 = 5;
/// Application error code on QUIC close: this node moved to a new feed epoch; reconnect.
pub const CLOSE_NEW_EPOCH: u32 = 6;
/// Application error code on QUIC close: this hub holds `--max-peers` edges; the edge
/// tries its next hub.
pub const CLOSE_FULL: u32 = 7;

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
    /// This node's feed went back (`Session::feed_went_back`): the node must move to a new
    /// feed epoch before it syncs on.
    #[error("this node's feed went back (restored from an old copy?)")]
    FeedWentBack,
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
    /// The deployment CA certificate (DER), which signs every revocation list a peer
    /// may offer.
    pub ca: Arc<[u8]>,
    /// Largest frame accepted or sent, in bytes.
    pub max_frame: usize,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// Where the peer's durable acknowledgements go, for writes waiting for replicas.
    pub replicas: Arc<super::replicas::Replicas>,
    /// The node's blobs, served to the peer on streams beside the sync stream.
    pub blobs: Option<crate::blobs::Blobs>,
    /// Set once the sync stream is open, when blob streams may follow.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// The node's namespace classes.
    pub classes: Arc<Classes>,
    /// Bytes per second this node sends on the link at most (`--max-rate`).
    pub max_rate: Option<u64>,
    /// Whether document payloads are compressed where it pays (on protocol 7 links, in
    /// batches on protocol 8).
    pub compress: bool,
    /// Local time of day, for the windows of batch classes.
    pub clock: LocalClock,
}

/// How long the peer may take to let this node open its class streams.
const OPEN_CLASS_STREAMS: Duration = Duration::from_secs(10);
/// How often each class's backlog to the peer is published for status.
const CLASS_STATS_EVERY: Duration = Duration::from_secs(1);

type Reader = FramedRead<quinn::RecvStream, LengthDelimitedCodec>;
type Writing = JoinSet<WriteDone>;

/// Frames already received that one sweep hands to the session at most.
const SWEEP_FRAMES: usize = 256;

/// Bytes queued past which frames are written during a drain, not only after it, so long
/// catch-up bursts keep moving.
const WRITE_DURING_DRAIN: usize = 64 << 10;
/// How long the last frames (an error) may take to leave when the connection ends.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the peer's side of the stream is still open.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Open,
    Closed,
}

/// The connection's peer as the revocation lists name it.
struct PeerCert<'a> {
    id: &'a NodeId,
    serial: &'a [u8],
}

/// Resolves once the peer is refused: at once if it already is, else at the change that
/// refuses it. Never resolves if the list goes away (the node is shutting down).
async fn revocation_of(
    list: &Revocations,
    peer: &PeerCert<'_>,
    changes: &mut watch::Receiver<u64>,
) {
    loop {
        if list.refuses(peer.id, peer.serial) {
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// The next change of the lists; pends forever once they are gone.
async fn lists_changed(changes: &mut watch::Receiver<u64>) {
    if changes.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The revocation lists on this connection: the newest this node knows the peer to hold,
/// so each list crosses it once, whichever side took it up first.
struct ListExchange {
    ca: Arc<[u8]>,
    peer_holds: u64,
    /// Offers from the peer in the current window, and when the window began: each
    /// offer costs a parse and a signature check, and an honest peer offers a list only
    /// when it takes up a new one.
    offers: u32,
    window: Instant,
}

/// Most lists a peer may offer per [`OFFER_WINDOW`].
const MAX_OFFERS: u32 = 8;
const OFFER_WINDOW: Duration = Duration::from_secs(10);

impl ListExchange {
    /// Offers the peer the list in force if it may not hold it yet.
    fn pass_on(&mut self, revocations: &Revocations, session: &mut Session) {
        if let Some(crl) = revocations.crl() {
            if crl.number() > self.peer_holds {
                self.peer_holds = crl.number();
                session.send_revocations(crl.der().to_vec());
            }
        }
    }

    /// Checks a list the peer offered, and takes it up if it is newer. One that is not
    /// signed by the deployment CA is a protocol error: no honest node sends it.
    fn take_offer(
        &mut self,
        revocations: &Revocations,
        session: &mut Session,
    ) -> Result<(), ProtocolError> {
        let Some(der) = session.take_offered_revocations() else {
            return Ok(());
        };
        let now = Instant::now();
        if now.duration_since(self.window) > OFFER_WINDOW {
            (self.window, self.offers) = (now, 0);
        }
        self.offers += 1;
        if self.offers > MAX_OFFERS {
            return Err(ProtocolError::protocol(format!(
                "more than {MAX_OFFERS} revocation lists in {} s",
                OFFER_WINDOW.as_secs()
            )));
        }
        let offered = revocations
            .offer(&der, &self.ca)
            .map_err(|e| ProtocolError::protocol(format!("revocation list: {e}")))?;
        if offered == Offered::TakenUp {
            if let Some(crl) = revocations.crl() {
                self.peer_holds = self.peer_holds.max(crl.number());
            }
        }
        Ok(())
    }
}

fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec()
}

/// Runs the session until the connection ends. `dialer` opens the stream; the acceptor
/// waits for it.
///
/// `revoked` must be subscribed before the caller last checked the peer against the list:
/// every wait here (for the stream, which the peer opens when it likes; for frames; for
/// room to write) is raced against it, so a revocation made at any moment after that
/// check ends the connection.
pub async fn run(
    conn: quinn::Connection,
    mut session: Session,
    dialer: bool,
    ctx: DriverContext,
    counters: Arc<PeerCounters>,
    mut revoked: watch::Receiver<u64>,
    mut audits: mpsc::Receiver<AuditRequest>,
) -> Result<(), DriverError> {
    let peer_id = session.peer().node_id.clone();
    // `Node::run_connection` refused a peer whose serial cannot be read.
    let serial = super::tls::peer_serial(&conn).unwrap_or_default();
    let peer = PeerCert {
        id: &peer_id,
        serial: &serial,
    };
    let opened = tokio::select! {
        opened = async {
            if dialer { conn.open_bi().await } else { conn.accept_bi().await }
        } => opened,
        () = revocation_of(&ctx.revocations, &peer, &mut revoked) => {
            tracing::warn!(peer = %peer_id, "closing connection: peer revoked");
            conn.close(CLOSE_REVOKED.into(), b"revoked");
            return Err(DriverError::Revoked);
        }
        () = ctx.shutdown.cancelled() => {
            conn.close(CLOSE_SHUTDOWN.into(), b"shutting down");
            return Ok(());
        }
    };
    let (send, recv) = opened?;
    let version = session.protocol_version();
    let pacing = LinkPacing::new(ctx.max_rate, &ctx.classes);
    // The sync stream carries normal documents and everything else; on protocol 7, critical
    // and bulk documents have streams of their own, opened critical first (the peer tells
    // them apart by their order).
    let mut queues = vec![SendQueue::new(send, Priority::Normal, ctx.max_frame)];
    if version >= CLASSES_PROTOCOL_VERSION {
        for p in [Priority::Critical, Priority::Bulk] {
            let stream = tokio::time::timeout(OPEN_CLASS_STREAMS, conn.open_uni())
                .await
                .map_err(|_| DriverError::Stream("the peer lets no class stream open".into()))??;
            queues.push(SendQueue::new(stream, p, ctx.max_frame));
        }
    }
    // Blob streams come after the sync stream, and end with the connection's driver.
    let blob_stop = ctx.shutdown.child_token();
    let _blob_stop = blob_stop.clone().drop_guard();
    if let Some(blobs) = &ctx.blobs {
        let peer = crate::blobs::serve::ServedPeer {
            id: peer_id.clone(),
            grants: session.peer().grants.clone(),
            counters: counters.clone(),
            compress: ctx.compress,
        };
        tokio::spawn(crate::blobs::serve::serve_connection(
            blobs.clone(),
            conn.clone(),
            peer,
            pacing.link(),
            blob_stop,
        ));
        ctx.ready.store(true, std::sync::atomic::Ordering::Release);
        blobs.poke();
    }
    let mut main = FramedRead::new(recv, codec(ctx.max_frame));
    let mut class_readers = ClassReaders {
        streams: Vec::new(),
        accepted: 0,
        version,
    };
    let mut inbox = Inbox {
        version,
        max_frame: ctx.max_frame,
        held: VecDeque::new(),
    };
    let mut batch = BatchClock::new(&ctx.classes, ctx.clock.clone());
    let mut next_class_stats = tokio::time::Instant::now();
    let mut catch_up = super::progress::CatchUp::default();
    let mut feed = ctx.store.subscribe();
    let mut early = Some(ctx.store.subscribe_early());
    let exec = Exec {
        store: &ctx.store,
        counters: &counters,
        replicas: Some(&ctx.replicas),
    };
    let mut writing: Writing = JoinSet::new();
    let mut log = LogLimit::new(Instant::now());
    let mut lists = ListExchange {
        ca: ctx.ca.clone(),
        peer_holds: 0,
        offers: 0,
        window: Instant::now(),
    };
    lists.pass_on(&ctx.revocations, &mut session);

    let mut seen_synced = 0;
    // The audit of the peer under way, if any: where its outcome goes.
    let mut auditing: Option<oneshot::Sender<Result<AuditReport, AuditError>>> = None;
    let mut audit_events = Vec::new();
    // When the audits running on this connection are given up.
    let mut audit_deadline: Option<tokio::time::Instant> = None;
    let result: Result<(), DriverError> = async {
        loop {
            if !inbox.held.is_empty() {
                inbox.deliver(&mut session)?;
                lists.take_offer(&ctx.revocations, &mut session)?;
            }
            for class in batch.due(Instant::now(), |c| session.holds_batch(c)) {
                session.flush_batch(class);
            }
            let mut outbox = Frames {
                queues: &mut queues,
                pacing: &pacing,
                classes: &ctx.classes,
                compress: ctx.compress && version >= CLASSES_PROTOCOL_VERSION,
                batch: (ctx.compress && version >= PROTOCOL_VERSION)
                    .then(|| (ClassId::Default, frames::Batch::default())),
                counters: &counters,
                peer: &peer_id,
                log: &mut log,
                audit_events: &mut audit_events,
            };
            exec.drain(
                &mut session,
                &mut outbox,
                &mut Writes::Spawned(&mut writing),
            )
            .await?;
            for event in audit_events.drain(..) {
                let outcome = match event {
                    Event::AuditDone(report) => {
                        super::audit::count(&counters, &report);
                        Ok(report)
                    }
                    Event::AuditFailed { reason } => Err(AuditError::Refused {
                        peer: peer_id.to_string(),
                        reason,
                    }),
                    _ => continue,
                };
                if let Some(reply) = auditing.take() {
                    let _ = reply.send(outcome);
                }
            }
            if auditing.as_ref().is_some_and(|r| r.is_closed()) {
                // Whoever asked stopped waiting (its timeout): the audit stops too.
                auditing = None;
                session.cancel_audit();
                continue;
            }
            audit_deadline = match (session.audit_running(), audit_deadline) {
                (true, None) => Some(tokio::time::Instant::now() + super::audit::MAX_AUDIT_RUN),
                (true, Some(d)) => Some(d),
                (false, _) => None,
            };
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
            // Also at once when a catch-up ends: no tick may follow on a quiet link.
            if tokio::time::Instant::now() >= next_class_stats
                || (session.lag() == 0 && catch_up.active())
            {
                next_class_stats = tokio::time::Instant::now() + CLASS_STATS_EVERY;
                counters.set_backlog(&ctx.classes, &session.backlog());
                catch_up.update(&ctx.store, session.lag(), &counters);
            }
            let reading = inbox.reads(&session);
            // The peer's class streams are read once its hello is in: they may arrive first.
            let reading_classes = reading && session.peer_hello().is_some();
            let batch_wake = batch.next_wake(Instant::now(), |c| session.holds_batch(c));
            tokio::select! {
                written = write_any(&mut queues, &pacing) => written?,
                frame = main.next(), if reading => {
                    let flow = on_frame(&mut session, &counters, &mut inbox, frame);
                    lists.take_offer(&ctx.revocations, &mut session)?;
                    if flow? == Flow::Closed {
                        return Ok(());
                    }
                    let flow = sweep(&exec, &mut session, (&mut main, &mut class_readers), &mut inbox, &mut writing, &mut lists, &ctx.revocations);
                    if flow? == Flow::Closed {
                        return Ok(());
                    }
                }
                frame = class_readers.next_frame(), if reading_classes && !class_readers.streams.is_empty() => {
                    if let Some(frame) = frame {
                        let flow = on_frame(&mut session, &counters, &mut inbox, Some(frame));
                        lists.take_offer(&ctx.revocations, &mut session)?;
                        flow?;
                        let flow = sweep(&exec, &mut session, (&mut main, &mut class_readers), &mut inbox, &mut writing, &mut lists, &ctx.revocations);
                        if flow? == Flow::Closed {
                            return Ok(());
                        }
                    }
                }
                stream = conn.accept_uni(), if class_readers.may_accept() => {
                    class_readers.accepted += 1;
                    class_readers.streams.push(FramedRead::new(stream?, codec(ctx.max_frame)));
                }
                () = tokio::time::sleep_until(batch_wake.map_or_else(tokio::time::Instant::now, Into::into)), if batch_wake.is_some() => {}
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
                    let flow = sweep(&exec, &mut session, (&mut main, &mut class_readers), &mut inbox, &mut writing, &mut lists, &ctx.revocations);
                    if flow? == Flow::Closed {
                        return Ok(());
                    }
                }
                notice = recv_early(&mut early) => {
                    for d in notice.iter().flat_map(|docs| docs.iter()) {
                        session.handle_early(d);
                    }
                }
                () = lists_changed(&mut revoked) => {
                    if ctx.revocations.refuses(peer.id, peer.serial) {
                        return Err(DriverError::Revoked);
                    }
                    lists.pass_on(&ctx.revocations, &mut session);
                }
                () = tokio::time::sleep_until(audit_deadline.unwrap_or_else(tokio::time::Instant::now)), if audit_deadline.is_some() => {
                    tracing::warn!(peer = %peer_id, "giving up an audit that ran too long");
                    audit_deadline = None;
                    session.abandon_audits();
                }
                Some(request) = audits.recv() => {
                    let busy = auditing.as_ref().is_some_and(|r| !r.is_closed());
                    if busy {
                        let _ = request.reply.send(Err(AuditError::Busy(peer_id.to_string())));
                    } else if session.start_audit(request.namespaces, super::audit::salt()).is_some() {
                        auditing = Some(request.reply);
                    } else {
                        // The hello is not exchanged yet, or an abandoned audit still runs.
                        let _ = request.reply.send(Err(AuditError::Busy(peer_id.to_string())));
                    }
                }
                () = ctx.shutdown.cancelled() => return Ok(()),
            }
        }
    }
    .await;

    match &result {
        Err(DriverError::Protocol(e)) => {
            counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %peer_id, error = %e, "closing connection: protocol error");
            cut_off(&ctx.store, &mut writing).await;
            let main = &mut queues[0];
            main.discard_unsent();
            let _ = main.push(Bytes::from(e.to_message().encode()), ClassId::Default);
            last_words(&conn, main).await;
            conn.close(CLOSE_PROTOCOL.into(), e.reason.as_bytes());
        }
        Err(DriverError::Revoked) => {
            tracing::warn!(peer = %peer_id, "closing connection: peer revoked");
            cut_off(&ctx.store, &mut writing).await;
            if tell_revoked(&mut queues[0], &ctx.revocations, lists.peer_holds) {
                last_words(&conn, &mut queues[0]).await;
            }
            conn.close(CLOSE_REVOKED.into(), b"revoked");
        }
        Err(e) => tracing::info!(peer = %peer_id, error = %e, "connection ended"),
        Ok(()) => tracing::info!(peer = %peer_id, "connection closed"),
    }
    if ctx.shutdown.is_cancelled() {
        conn.close(CLOSE_SHUTDOWN.into(), b"shutting down");
    }
    // A peer that went away (rather than being dropped) sent its messages in good faith:
    // writes already handed to the store finish there, before the connection's task ends,
    // so a node that has shut down holds its store no more.
    while writing.join_next().await.is_some() {}
    result
}

/// Before a revoked peer is cut off, hands it the list that revokes it (if it may not hold
/// it), and gives it a moment to read it: an honest node whose certificate was revoked
/// (a hub retired, or whose bundle leaked) passes the list on to its own peers, which
/// then drop it and fail over.
/// Returns whether there was a list to queue.
fn tell_revoked(queue: &mut SendQueue, revocations: &Revocations, peer_holds: u64) -> bool {
    queue.discard_unsent();
    let Some(crl) = revocations.crl().filter(|c| c.number() > peer_holds) else {
        return false;
    };
    let frame = Message::Revocations {
        crl: crl.der().to_vec(),
    }
    .encode();
    queue.push(Bytes::from(frame), ClassId::Default).is_ok()
}

/// Delivers the frames queued last (an error, a revocation list) before the connection is
/// closed: a close that overtakes them discards what the peer has not read yet. An honest
/// peer reads to the end of the stream and then closes the connection itself; one that
/// does not is given [`CLOSE_WRITE_TIMEOUT`].
async fn last_words(conn: &quinn::Connection, queue: &mut SendQueue) {
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        if queue.deliver().await.is_ok() {
            conn.closed().await;
        }
    })
    .await;
}

/// Abandons the dropped peer's writes still queued at the store, and waits until the
/// store has passed them: whatever of the peer was not committed by now never will be.
async fn cut_off(store: &Store, writing: &mut Writing) {
    writing.abort_all();
    // An aborted task drops its request's reply receiver, which the writer checks.
    while writing.join_next().await.is_some() {}
    if let Err(e) = store.barrier().await {
        tracing::debug!(error = %e, "store closed while cutting a peer off");
    }
}

/// Hands one frame (or the stream's end) to the session.
fn on_frame(
    session: &mut Session,
    counters: &PeerCounters,
    inbox: &mut Inbox,
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
    counters
        .bytes_received
        .fetch_add(frame.len() as u64 + 4, Ordering::Relaxed);
    let msgs = frames::decode(&frame, inbox.version, inbox.max_frame)?;
    counters
        .messages_received
        .fetch_add(msgs.len() as u64, Ordering::Relaxed);
    inbox.held.extend(msgs);
    inbox.deliver(session)?;
    Ok(Flow::Open)
}

/// Hands the session every frame already received and every apply already finished,
/// without waiting, so the replies to a burst go out in one flush (few packets) instead of
/// one flush each.
fn sweep(
    exec: &Exec<'_>,
    session: &mut Session,
    (main, class_readers): (&mut Reader, &mut ClassReaders),
    inbox: &mut Inbox,
    writing: &mut Writing,
    lists: &mut ListExchange,
    revocations: &Revocations,
) -> Result<Flow, DriverError> {
    for _ in 0..SWEEP_FRAMES {
        if !inbox.reads(session) {
            break;
        }
        let frame = if session.peer_hello().is_some() && !class_readers.streams.is_empty() {
            class_readers.next_frame().now_or_never().flatten()
        } else {
            None
        };
        let frame = match frame {
            Some(f) => Some(f),
            None => match main.next().now_or_never() {
                Some(None) => return Ok(Flow::Closed),
                Some(f) => f,
                None => break,
            },
        };
        let flow = on_frame(session, exec.counters, inbox, frame);
        lists.take_offer(revocations, session)?;
        if flow? == Flow::Closed {
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

/// The driver's outbox: frames into the send queue; events into the log.
struct Frames<'a> {
    /// The sync stream's queue first, then the class streams' (protocol 7).
    queues: &'a mut [SendQueue],
    pacing: &'a LinkPacing,
    classes: &'a Classes,
    compress: bool,
    /// Document messages of one class waiting to be compressed together (protocol 8),
    /// sent when another kind of message comes or the session is done for now.
    batch: Option<(ClassId, frames::Batch)>,
    counters: &'a PeerCounters,
    peer: &'a NodeId,
    /// The connection's budget of warning lines.
    log: &'a mut LogLimit,
    /// Audit outcomes, for the driver to hand to whoever asked.
    audit_events: &'a mut Vec<Event>,
}

impl Outbox for Frames<'_> {
    async fn send(&mut self, msg: Message) -> Result<(), ExecError> {
        let urgent = matches!(msg, Message::Revocations { .. });
        let class = match &msg {
            Message::Sync { ns, .. }
            | Message::SyncAhead { ns, .. }
            | Message::SetAside { ns, .. } => {
                Namespace::new(ns.as_str()).map_or(ClassId::Default, |n| self.classes.of(&n))
            }
            _ => ClassId::Default,
        };
        let document = frames::is_document(&msg);
        let plain = msg.encode();
        if self.batch.is_some() && document && frames::Batch::takes(plain.len()) {
            let joins = |(c, b): &(ClassId, frames::Batch)| *c == class && b.fits(plain.len());
            if !self.batch.as_ref().is_some_and(joins) {
                self.flush_batch()?;
            }
            if let Some((batch_class, batch)) = &mut self.batch {
                *batch_class = class;
                batch.push(plain);
            }
            return Ok(());
        }
        // Whatever comes next on a stream goes after the batch.
        self.flush_batch()?;
        let encoded = frames::encode_message(plain, self.compress && document);
        self.push(encoded, class, document, urgent)
    }

    fn flush(&mut self) -> Result<(), ExecError> {
        self.flush_batch()
    }

    fn has_room(&self, priority: Priority) -> bool {
        self.queues[queue_at(self.queues, priority)].has_room()
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
            // Counted by the executor (`Exec::drain`) before it reaches here.
            Event::PeerHolds { .. } => {}
            Event::AuditDone(_) | Event::AuditFailed { .. } => self.audit_events.push(event),
        }
    }
}

impl Frames<'_> {
    /// Queues what the batch holds.
    fn flush_batch(&mut self) -> Result<(), ExecError> {
        let Some((class, batch)) = &mut self.batch else {
            return Ok(());
        };
        if batch.is_empty() {
            return Ok(());
        }
        let class = *class;
        for encoded in batch.take() {
            self.push(encoded, class, true, false)?;
        }
        Ok(())
    }

    /// Counts a frame and queues it on its class's stream.
    fn push(
        &mut self,
        encoded: frames::Encoded,
        class: ClassId,
        document: bool,
        urgent: bool,
    ) -> Result<(), ExecError> {
        let wire = encoded.bytes.len() as u64 + 4;
        let messages = encoded.messages as u64;
        self.counters
            .messages_sent
            .fetch_add(messages, Ordering::Relaxed);
        self.counters.bytes_sent.fetch_add(wire, Ordering::Relaxed);
        if encoded.compressed {
            self.counters
                .compressed_messages
                .fetch_add(messages, Ordering::Relaxed);
            // What the messages' own plain frames would have taken.
            let plain_wire = encoded.plain_len as u64 + 4 * messages;
            self.counters
                .compression_saved_bytes
                .fetch_add(plain_wire.saturating_sub(wire), Ordering::Relaxed);
        }
        if document {
            self.counters
                .count_class_send(self.classes, class, messages, wire);
        }
        let priority = self.classes.priority(class);
        let queue = &mut self.queues[queue_at(self.queues, priority)];
        if urgent {
            queue.push_urgent(Bytes::from(encoded.bytes))?;
        } else {
            queue.push(Bytes::from(encoded.bytes), class)?;
        }
        if queue.bytes >= WRITE_DURING_DRAIN {
            queue
                .write_ready(self.pacing)
                .map_err(|e| ExecError::Stream(e.to_string()))?;
        }
        Ok(())
    }
}

/// Where the queue that carries a priority is: its own stream's, or the sync stream's
/// (the first) on a link of protocol 6.
fn queue_at(queues: &[SendQueue], priority: Priority) -> usize {
    queues
        .iter()
        .position(|q| q.priority() == priority)
        .unwrap_or(0)
}

/// Writes to whichever streams take data first. Pends while nothing is queued.
async fn write_any(queues: &mut [SendQueue], pacing: &LinkPacing) -> Result<(), DriverError> {
    let writes: Vec<_> = queues
        .iter_mut()
        .filter(|q| !q.is_empty())
        .map(|q| Box::pin(q.write_some(pacing)))
        .collect();
    if writes.is_empty() {
        return std::future::pending().await;
    }
    futures_util::future::select_all(writes).await.0
}

/// How frames of this connection decode, and the messages of a frame the session has not
/// taken yet.
#[derive(Debug)]
struct Inbox {
    version: u16,
    max_frame: usize,
    /// Messages of a compressed batch held back while the session takes no more (its
    /// inbound bounds, see `Session::wants_frames`, hold per message, not per frame).
    held: VecDeque<Message>,
}

impl Inbox {
    /// Whether a new frame may be read: nothing is held, and the session takes more.
    fn reads(&self, session: &Session) -> bool {
        self.held.is_empty() && session.wants_frames()
    }

    /// Hands the session the held messages it takes now.
    fn deliver(&mut self, session: &mut Session) -> Result<(), DriverError> {
        while session.wants_frames() {
            let Some(msg) = self.held.pop_front() else {
                break;
            };
            session.handle_message(msg)?;
            if session.feed_went_back() {
                return Err(DriverError::FeedWentBack);
            }
        }
        Ok(())
    }
}

/// The peer's class streams once accepted (protocol 7).
struct ClassReaders {
    /// Most urgent first, until each ends.
    streams: Vec<Reader>,
    /// Class streams accepted so far.
    accepted: usize,
    version: u16,
}

/// Class streams a peer opens: critical and bulk.
const CLASS_STREAMS: usize = 2;

impl ClassReaders {
    fn may_accept(&self) -> bool {
        self.version >= CLASSES_PROTOCOL_VERSION && self.accepted < CLASS_STREAMS
    }

    /// The next frame of any class stream, the most urgent first; a stream that ended is
    /// dropped (the connection's end shows on the sync stream).
    async fn next_frame(&mut self) -> Option<Result<bytes::BytesMut, std::io::Error>> {
        std::future::poll_fn(|cx| {
            let mut i = 0;
            while i < self.streams.len() {
                match self.streams[i].poll_next_unpin(cx) {
                    std::task::Poll::Ready(Some(frame)) => {
                        return std::task::Poll::Ready(Some(frame));
                    }
                    std::task::Poll::Ready(None) => {
                        self.streams.remove(i);
                    }
                    std::task::Poll::Pending => i += 1,
                }
            }
            if self.streams.is_empty() {
                std::task::Poll::Ready(None)
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FeedSeq, Grants, NsPattern};
    use crate::sync::{Hello, Identity, Role, SessionConfig};
    use automerge::sync::{State, SyncDoc};

    /// A hub's session that takes at most `max_inbound` peer messages at a time, past its
    /// hello.
    fn hub(max_inbound: usize) -> Session {
        let mut cfg = SessionConfig::new(NodeId::new("hub-1").expect("id"), Role::Hub, 1);
        cfg.max_inbound_messages = max_inbound;
        let peer = Identity {
            node_id: NodeId::new("edge-1").expect("id"),
            role: Role::Edge,
            grants: Grants::everything(),
        };
        let mut hub = Session::new(cfg, peer, None, FeedSeq(0));
        hub.handle_message(Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            node_id: "edge-1".into(),
            role: Role::Edge,
            feed_epoch: 2,
            feed_last: 0,
            resume: None,
            subscriptions: vec![NsPattern::all()],
        }))
        .expect("hello");
        while hub.poll_output().is_some() {}
        hub
    }

    /// A compressed batch of `n` peer messages, each for a document of its own.
    fn batch_frame(n: usize) -> bytes::BytesMut {
        let mut batch = frames::Batch::default();
        for i in 0..n {
            let data = automerge::Automerge::new()
                .generate_sync_message(&mut State::new())
                .expect("a first message")
                .encode();
            let msg = Message::Sync {
                ns: "cfg".into(),
                id: format!("doc-{i}"),
                data,
            };
            batch.push(msg.encode());
        }
        let encoded = batch.take();
        assert_eq!(encoded.len(), 1, "one frame");
        assert!(encoded[0].compressed);
        bytes::BytesMut::from(&encoded[0].bytes[..])
    }

    /// Regression: the session's inbound bounds hold per message, so a batch's messages
    /// beyond them wait in the driver, and no frame is read until all are taken. Handing
    /// the whole batch at once let one frame of 128 messages, each near the ops bound,
    /// put 128 times that bound in flight.
    #[test]
    fn a_batch_beyond_the_inbound_budget_waits_in_the_driver() {
        let mut session = hub(4);
        let counters = PeerCounters::default();
        let mut inbox = Inbox {
            version: PROTOCOL_VERSION,
            max_frame: 1 << 20,
            held: VecDeque::new(),
        };
        let flow = on_frame(
            &mut session,
            &counters,
            &mut inbox,
            Some(Ok(batch_frame(10))),
        );
        assert_eq!(flow.expect("a valid batch"), Flow::Open);
        assert!(!session.wants_frames(), "the budget is full");
        assert_eq!(inbox.held.len(), 6, "four taken, six held");
        assert!(!inbox.reads(&session), "no frame is read meanwhile");
        inbox.deliver(&mut session).expect("deliver");
        assert_eq!(inbox.held.len(), 6, "still no room");
        assert_eq!(
            counters.messages_received.load(Ordering::Relaxed),
            10,
            "every message of the frame counted"
        );
    }
}
