//! One sync session with one peer, as a deterministic state machine with no I/O.
//!
//! The driver (the node's `net::driver`, or a simulation) owns the connection and the
//! store; the session only decides. It never reads the store: everything it needs from
//! there it asks for with an [`Output`], and the driver answers with the matching input.
//! Method groups, as in quinn-proto:
//!
//! - inputs: [`Session::handle_message`] (a frame from the peer),
//!   [`Session::handle_feed_advanced`] (the local store committed something),
//!   [`Session::handle_early`] (a local batch is about to commit a document);
//! - answers: [`Session::handle_feed`] to [`Output::ReadFeed`],
//!   [`Session::handle_loaded`] to [`Output::Load`],
//!   [`Session::handle_sync_state`] to [`Output::LoadSyncState`],
//!   [`Session::handle_applied`] to [`Output::Apply`] (after the commit);
//! - output: [`Session::poll_output`], to be drained after every input;
//! - getters: [`Session::lag`], [`Session::is_caught_up`], [`Session::stats`], ….
//!
//! Sending: the session walks the local feed from where the peer said it has everything
//! (its hello's `resume`), and for each document the peer may read and subscribed to, runs
//! Automerge's sync protocol from the persisted per-peer state. Up to
//! `max_docs_in_flight` documents are in flight at once, so catch-up is bound by bandwidth
//! and CPU, not round trips. A document is done when the peer's acknowledged heads include
//! ours; the lowest unfinished feed position is then sent as [`Message::Synced`], and the
//! peer stores it as its resume cursor. A reconnect with nothing changed walks nothing.
//!
//! One path per write: a live document sent ahead of its commit (an early notice) stays in
//! memory, and when the feed walk reaches it, the walk finds it current and only waits for
//! the peer's answer; it is not loaded or sent again.
//!
//! Receiving: every sync message goes to the store ([`Output::Apply`]); the reply is
//! generated only from the committed result, so the peer never hears "I have it" before
//! it is on disk. Changes in a namespace the peer may not write are ignored (the state is
//! read-only, which also tells a well-behaved peer not to send them) and reported.
//!
//! Back-pressure: what the peer sent and the store has not yet committed is bounded
//! ([`SessionConfig::max_inbound_messages`], [`SessionConfig::max_inbound_bytes`], and
//! [`op_count::MAX_OPS`] ops, what the store's work grows with); over
//! it, [`Session::wants_frames`] turns false and the driver stops reading, so the
//! transport's flow control pushes back on the peer. That budget drains through the local
//! store alone, never through the peer. Sending is the other way round: while the driver
//! says it has no room ([`Session::set_can_send`]), replies are owed, one per document,
//! not queued, and go out once there is room; the owed set is bounded too
//! ([`SessionConfig::max_owed`]). So a peer that floods or stops reading costs a bounded
//! amount of memory, and two honest nodes never wait on each other: each keeps reading
//! while its own frames wait, and the replies it owes an honest peer stay far under the
//! bound (at most one per document that peer has in flight or sent early).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use automerge::sync::{State, SyncDoc};
use automerge::{Automerge, ChangeHash};

use super::input::{Applied, EarlyDoc, LoadedDoc};
use super::message::{ErrorCode, Hello, Message, PROTOCOL_VERSION};
use super::output::{Apply, Event, Output};
use super::state::{heads_known, start_state};
use super::validate::{self, peer_text};
use crate::error::{ModelError, ProtocolError};
use crate::model::automerge_bytes::{self, holds_all};
use crate::model::op_count;
use crate::model::{
    ClassId, Classes, Cursor, DocId, FeedEntry, FeedSeq, Identity, Namespace, NodeId, NsPattern,
    Priority, Role, SyncPeer,
};

/// Settings of a session, the same for every peer of a node.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// This node's role.
    pub role: Role,
    /// This node's feed epoch.
    pub feed_epoch: u128,
    /// Namespaces this node wants from the peer.
    pub subscriptions: Vec<NsPattern>,
    /// Documents being synced at once.
    pub max_docs_in_flight: usize,
    /// Feed entries asked for at a time.
    pub feed_batch: usize,
    /// Largest document (as stored) sent whole in the first message to a peer presumed to
    /// lack it; larger ones start with Automerge's announcement of heads.
    pub whole_doc_max_bytes: u64,
    /// Peer messages received and not yet committed (waiting or applying) past which the
    /// session stops taking frames.
    pub max_inbound_messages: usize,
    /// The same budget in bytes (the messages' encoded size).
    pub max_inbound_bytes: usize,
    /// Documents owed a reply past which the session stops taking frames. An honest peer
    /// stays under `2 * max_docs_in_flight` (its offers and early sends, each answered).
    pub max_owed: usize,
    /// Keys the audit that replaces walking the whole feed to a peer whose cursor names
    /// another epoch of this node's feed (see [`Session::auditing_instead_of_walking`]);
    /// `None` walks. The driver sets a random one.
    pub audit_salt: Option<u64>,
    /// Namespace classes: the priority each document is sent at, and which wait for
    /// [`Session::flush_batch`].
    pub classes: Arc<Classes>,
    /// Batch documents offered and held for their flush past which the feed walk pauses
    /// (their entries are kept in memory until then).
    pub max_held: usize,
    /// The protocol version this connection speaks (chosen by ALPN): sent in the hello and
    /// required of the peer's.
    pub version: u16,
    /// Whether documents sent whole go without Automerge's deflate (see [`super::raw`]):
    /// set by the driver on links that compress batches of messages.
    pub raw_payloads: bool,
}

impl SessionConfig {
    /// Defaults for a node.
    pub fn new(node_id: NodeId, role: Role, feed_epoch: u128) -> Self {
        Self {
            node_id,
            role,
            feed_epoch,
            subscriptions: vec![NsPattern::all()],
            max_docs_in_flight: 512,
            feed_batch: 1024,
            whole_doc_max_bytes: 4096,
            max_inbound_messages: 256,
            max_inbound_bytes: 32 << 20,
            max_owed: 8192,
            audit_salt: None,
            classes: Arc::default(),
            max_held: 65_536,
            version: PROTOCOL_VERSION,
            raw_payloads: false,
        }
    }
}

/// Counters of one session, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Sync messages sent.
    pub sync_sent: u64,
    /// Sync messages sent ahead of their commit, from early notices.
    pub early_sent: u64,
    /// Sync messages received.
    pub sync_received: u64,
    /// Automerge changes received from the peer and applied.
    pub changes_received: u64,
    /// Messages or changes refused because of grants.
    pub rejected: u64,
    /// Documents whose sync with the peer completed.
    pub docs_synced: u64,
}

/// Where one document's sync with the peer stands.
#[derive(Debug, Default)]
struct DocSync {
    /// What the driver is doing for it: one thing at a time.
    phase: Phase,
    /// Why the document is being sent, if it is.
    offer: Offer,
    /// The version the peer is being brought to, once known.
    doc: Option<Arc<Automerge>>,
    /// The peer's sync state, once loaded or built.
    state: Option<State>,
    /// Peer messages waiting for the one being applied, with their encoded sizes.
    inbox: VecDeque<(automerge::sync::Message, Cost)>,
    /// What the message being applied counts against the inbound budget.
    applying: Cost,
    /// A message to the peer was due while there was no room to send: `Some(early)`.
    owed: Option<bool>,
    /// `doc` came from an early notice and may not be committed yet: what is generated
    /// from it goes out as [`Message::SyncAhead`].
    uncommitted: bool,
    /// `state` holds heads of a peer's [`Message::SyncAhead`] that the store did not
    /// persist, and the feed walk is about to offer the document back (the apply changed
    /// it): the entry stays until then, so the walk judges it from memory instead of from
    /// the older stored state, which would send the peer its own change back.
    unstored: bool,
    /// The peer is owed [`Message::SetAside`] for this document: it fell due without room.
    tell_set_aside: bool,
    /// An audit found the document differing: its next exchange starts from a fresh sync
    /// state, not the stored one (which claims the peer holds what it may not).
    fresh: bool,
    /// A message about it went to the peer in this session: the peer knows this node's
    /// heads, so its acknowledgement of them expects no answer.
    sent: bool,
}

/// What one peer message counts against the inbound budget until it is committed.
#[derive(Clone, Copy, Debug, Default)]
struct Cost {
    /// Its encoded size.
    bytes: usize,
    /// The ops its changes hold ([`op_count::count_ops`]).
    ops: u64,
    /// Sent from a version the peer had not committed ([`Message::SyncAhead`]).
    provisional: bool,
}

/// The driver's work under way for one document.
#[derive(Debug, Default, PartialEq, Eq)]
enum Phase {
    /// Nothing: the session may act on it.
    #[default]
    Idle,
    /// [`Output::Load`] is out.
    Loading,
    /// [`Output::LoadSyncState`] is out, for an early notice; whether the peer lacks the
    /// document decides the state to start from.
    LoadingState { peer_lacks: bool },
    /// [`Output::Apply`] is out.
    Applying,
}

/// Why a document is being sent to the peer.
#[derive(Debug, Default)]
enum Offer {
    /// It is not: the entry is kept only while the driver works on it or messages wait.
    #[default]
    None,
    /// Sent from an early notice, ahead of the feed walk; kept in memory (with the sync
    /// state that records what was sent) until the peer has it or the walk offers it.
    Early,
    /// The feed walk offers it at `seq`, and it waits for room in flight.
    Queued {
        seq: FeedSeq,
        heads: Vec<ChangeHash>,
    },
    /// The feed walk offers it at `seq`, and it is in flight.
    Sending {
        seq: FeedSeq,
        heads: Vec<ChangeHash>,
    },
    /// An audit found it differing: kept until the peer holds this node's version.
    Repair,
}

impl DocSync {
    /// Whether the version in memory already holds the heads the feed offers: it can be
    /// sent (or was, early) without reading the store.
    fn is_current(&self) -> bool {
        self.state.is_some() && self.doc.is_some() && self.holds_offered()
    }

    /// Whether the version in memory holds every head the feed offered (true when the feed
    /// offers nothing): only then can the peer's acknowledgement of it finish the offer.
    fn holds_offered(&self) -> bool {
        let (Offer::Queued { heads, .. } | Offer::Sending { heads, .. }) = &self.offer else {
            return true;
        };
        self.doc.as_ref().is_some_and(|d| holds_all(d, heads))
    }
}

type DocKey = (Namespace, DocId);

mod audit_run;
pub use audit_run::{AuditReport, AuditScope, MAX_AUDIT_PATTERNS};

/// Owed messages generated per call of [`Session::set_can_send`] with room.
const OWED_PER_ROOM: usize = 16;

/// One peer's sync session. See the module documentation.
///
/// Driving two sessions by hand, with no network and no store (both feeds are empty): the
/// driver's whole job is to carry out outputs and feed back their results.
///
/// ```
/// use tidesync_core::model::{FeedSeq, Grants, Identity, NodeId, Role};
/// use tidesync_core::sync::{Message, Output, Session, SessionConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let side = |me: &str, role, peer: &str, peer_role| -> Result<Session, Box<dyn std::error::Error>> {
///     let cfg = SessionConfig::new(NodeId::new(me)?, role, 7);
///     let peer = Identity { node_id: NodeId::new(peer)?, role: peer_role, grants: Grants::everything() };
///     Ok(Session::new(cfg, peer, None, FeedSeq(0)))
/// };
/// let mut edge = side("edge-1", Role::Edge, "hub-1", Role::Hub)?;
/// let mut hub = side("hub-1", Role::Hub, "edge-1", Role::Edge)?;
/// // Carries out one session's outputs; returns the messages for the other side.
/// fn drive(s: &mut Session) -> Vec<Message> {
///     let mut out = Vec::new();
///     while let Some(o) = s.poll_output() {
///         match o {
///             Output::Send(m) => out.push(m),
///             Output::ReadFeed { .. } => s.handle_feed(Vec::new(), FeedSeq(0)),
///             _ => {}
///         }
///     }
///     out
/// }
/// loop {
///     let (to_hub, to_edge) = (drive(&mut edge), drive(&mut hub));
///     if to_hub.is_empty() && to_edge.is_empty() { break; }
///     for m in to_hub { hub.handle_message(m)?; }
///     for m in to_edge { edge.handle_message(m)?; }
/// }
/// assert!(edge.is_caught_up() && hub.is_caught_up());
/// # Ok(()) }
/// ```
pub struct Session {
    cfg: SessionConfig,
    peer: Identity,
    /// How far this node has durably received the peer's feed.
    record: Option<Cursor>,
    peer_hello: Option<Hello>,
    /// Every document the peer has, it got from or gave to this node: a document with no
    /// sync state stored for the peer is one it lacks (see [`Session::peer_lacks`]).
    peer_lacks_unshared: bool,
    /// This node's feed went back (see [`Session::feed_went_back`]).
    feed_went_back: bool,
    /// The peer's feed epoch is not the one of the stored cursor: the sync states stored
    /// for it may claim changes it no longer has (the store drops them with the cursor
    /// save; until then, and for this session, none is used).
    states_set_aside: bool,
    outputs: VecDeque<Output>,
    /// The local feed has been read up to here.
    walked: FeedSeq,
    /// The local feed's last seq, as last told by the driver.
    local_last: FeedSeq,
    reading: bool,
    /// Documents offered by the walk, waiting for room in flight, one queue per priority
    /// (a key whose offer has ended meanwhile is skipped).
    queues: [VecDeque<DocKey>; 3],
    /// Offers of batch classes, held until the driver flushes their class.
    held: BTreeMap<ClassId, VecDeque<DocKey>>,
    held_len: usize,
    docs: HashMap<DocKey, DocSync>,
    /// Unfinished offers by feed position; the lowest bounds what `Synced` can say.
    unfinished: BTreeMap<FeedSeq, DocKey>,
    /// Offers in the [`Offer::Sending`] state, per priority: each has its own window, so
    /// a critical document never waits for room behind bulk ones.
    in_flight: [usize; 3],
    synced_sent: FeedSeq,
    caught_up: bool,
    stats: SessionStats,
    /// Peer messages waiting or applying, and their encoded bytes.
    inbound: usize,
    inbound_bytes: usize,
    inbound_ops: u64,
    /// Whether the driver has room for more frames to the peer, per priority (each has
    /// its own stream and queue).
    room: [bool; 3],
    /// Documents owed a message, per priority, in the order they became due.
    owed: [VecDeque<DocKey>; 3],
    /// A cursor save is out; the newest cursor received meanwhile waits here.
    saving_cursor: bool,
    next_cursor: Option<Cursor>,
    /// The revocation list the peer last offered, until the driver takes it.
    offered_revocations: Option<Vec<u8>>,
    /// The audit this node started with the peer, and the one it answers.
    audits: audit_run::Audits,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer.node_id)
            .field("walked", &self.walked)
            .field("in_flight", &self.in_flight)
            .field("queued", &self.queued())
            .field("held", &self.held_len)
            .finish()
    }
}

impl Session {
    /// Starts a session with a peer whose certificate was verified as `peer`. `record` is
    /// what the store knows of the peer's feed; `local_last` the local feed's last seq.
    pub fn new(
        cfg: SessionConfig,
        peer: Identity,
        record: Option<Cursor>,
        local_last: FeedSeq,
    ) -> Self {
        let hello = Hello {
            version: cfg.version,
            node_id: cfg.node_id.to_string(),
            role: cfg.role,
            feed_epoch: cfg.feed_epoch,
            feed_last: local_last.0,
            resume: record,
            subscriptions: cfg.subscriptions.clone(),
        };
        let mut s = Self {
            cfg,
            peer,
            record,
            peer_hello: None,
            peer_lacks_unshared: false,
            feed_went_back: false,
            states_set_aside: false,
            outputs: VecDeque::new(),
            walked: FeedSeq(0),
            local_last,
            reading: false,
            queues: Default::default(),
            held: BTreeMap::new(),
            held_len: 0,
            docs: HashMap::new(),
            unfinished: BTreeMap::new(),
            in_flight: [0; 3],
            synced_sent: FeedSeq(0),
            caught_up: false,
            stats: SessionStats::default(),
            inbound: 0,
            inbound_bytes: 0,
            inbound_ops: 0,
            room: [true; 3],
            owed: Default::default(),
            saving_cursor: false,
            next_cursor: None,
            offered_revocations: None,
            audits: audit_run::Audits::default(),
        };
        s.outputs.push_back(Output::Send(Message::Hello(hello)));
        s
    }

    /// Offers the peer this node's revocation list (a CRL, DER). The list is small and
    /// rare, and a revocation must not wait behind documents, so it is queued at once,
    /// room or not.
    pub fn send_revocations(&mut self, crl: Vec<u8>) {
        self.outputs
            .push_back(Output::Send(Message::Revocations { crl }));
    }

    /// The revocation list the peer offered since the last call, for the driver to check
    /// (its signature, its number) and perhaps take up. The session only bounds its size:
    /// checking a signature is I/O-side work, and so is keeping the list.
    pub fn take_offered_revocations(&mut self) -> Option<Vec<u8>> {
        self.offered_revocations.take()
    }

    /// The next thing to do, if any. Call until `None` after every input.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The peer's identity.
    pub fn peer(&self) -> &Identity {
        &self.peer
    }

    /// The peer as the store keys its sync state: node id and feed epoch (0 before the
    /// hello).
    pub fn sync_peer(&self) -> SyncPeer {
        SyncPeer {
            id: self.peer.node_id.clone(),
            epoch: self.peer_epoch(),
        }
    }

    /// The protocol version this session speaks.
    pub fn protocol_version(&self) -> u16 {
        self.cfg.version
    }

    /// The peer's hello, once received.
    pub fn peer_hello(&self) -> Option<&Hello> {
        self.peer_hello.as_ref()
    }

    /// Counters so far.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// How many local feed positions the peer is behind (0 when caught up).
    pub fn lag(&self) -> u64 {
        self.local_last.0.saturating_sub(self.synced_through().0)
    }

    /// Whether this node's feed went back, as the peer sees it: the peer holds a cursor
    /// into it, in the same epoch, past its end (it was restored from an old copy or an
    /// image). Every peer's cursor may then skip the writes made since under reused feed
    /// positions, and peers' stored sync states may claim changes this node lost, so the
    /// node must move to a new feed epoch (and reconnect) before it goes on.
    pub fn feed_went_back(&self) -> bool {
        self.feed_went_back
    }

    /// Whether the local feed was sent and acknowledged up to what was last known.
    pub fn is_caught_up(&self) -> bool {
        self.peer_hello.is_some() && self.lag() == 0
    }

    /// Whether the session takes another frame now. False while the peer's uncommitted
    /// messages or the replies owed to it are over budget: stop reading until it turns
    /// true again (after applies finish, or after sending), so flow control holds the peer.
    pub fn wants_frames(&self) -> bool {
        self.inbound < self.cfg.max_inbound_messages
            && self.inbound_bytes < self.cfg.max_inbound_bytes
            && self.inbound_ops < op_count::MAX_OPS
            && self.owed.iter().map(VecDeque::len).sum::<usize>() < self.cfg.max_owed
    }

    /// Whether the driver has room for more frames to the peer. Without room, messages
    /// that fall due are owed (one per document, however many fall due) and refusals are
    /// counted but not sent; once there is room again, the owed messages are generated.
    /// Call again after each frame sent: owed messages go out a few at a time, so room is
    /// checked between them.
    pub fn set_can_send(&mut self, can_send: bool) {
        for p in Priority::ALL {
            self.set_room(p, can_send);
        }
    }

    /// [`Session::set_can_send`] for the documents of one priority, which the driver
    /// carries on their own stream and queue: a full bulk queue holds back bulk documents
    /// only. Messages that concern no document (acknowledgements, refusals, audits) go
    /// with `normal`.
    pub fn set_room(&mut self, priority: Priority, room: bool) {
        let p = priority.index();
        self.room[p] = room;
        if !room || self.owed[p].is_empty() {
            return;
        }
        for _ in 0..OWED_PER_ROOM {
            let Some(key) = self.owed[p].pop_front() else {
                break;
            };
            let Some(entry) = self.docs.get_mut(&key) else {
                continue;
            };
            let Some(early) = entry.owed.take() else {
                continue;
            };
            if std::mem::take(&mut entry.tell_set_aside) {
                self.send_set_aside(&key);
            }
            self.generate(&key, early);
        }
        self.progress();
    }

    /// The answer to [`Output::SaveCursor`]: the cursor is stored (a failure ends the
    /// session instead). Cursors that came meanwhile were coalesced; the newest goes next.
    pub fn handle_cursor_saved(&mut self) {
        self.saving_cursor = false;
        if let Some(cursor) = self.next_cursor.take() {
            self.save_cursor(cursor);
        }
    }

    /// One cursor save out at a time, whatever the peer sends.
    fn save_cursor(&mut self, cursor: Cursor) {
        if self.saving_cursor {
            self.next_cursor = Some(cursor);
        } else {
            self.saving_cursor = true;
            self.outputs.push_back(Output::SaveCursor(cursor));
        }
    }

    /// A frame from the peer. An error is fatal: send it to the peer and close.
    pub fn handle_message(&mut self, msg: Message) -> Result<(), ProtocolError> {
        self.on_message(msg)?;
        self.progress();
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> Result<(), ProtocolError> {
        // What an audit counts of the peer's messages, read before they are taken apart.
        let audit_len = matches!(msg, Message::AuditStep { .. } | Message::AuditEnd { .. })
            .then(|| msg.wire_len())
            .unwrap_or_default();
        match msg {
            Message::Hello(hello) => self.on_hello(hello),
            _ if self.peer_hello.is_none() => {
                Err(ProtocolError::protocol("the first message must be a hello"))
            }
            Message::Sync { ns, id, data } => self.on_sync(ns, id, &data, false),
            Message::SyncAhead { ns, id, data } => self.on_sync(ns, id, &data, true),
            Message::AuditStart {
                audit,
                namespaces,
                salt,
                root,
            } => self.on_audit_start(audit, namespaces, salt, root),
            Message::AuditStep {
                audit,
                from_starter,
                step,
            } => self.on_audit_step(audit, from_starter, step, audit_len),
            Message::AuditEnd {
                audit,
                from_starter,
                found,
                repaired,
                refused,
            } => {
                self.on_audit_end(audit, from_starter, found, repaired, refused, audit_len);
                Ok(())
            }
            Message::SetAside { ns, id } => {
                let (Ok(n), Ok(d)) = (Namespace::new(ns.as_str()), DocId::new(id.as_str())) else {
                    return Err(ProtocolError::protocol(format!(
                        "invalid document name {}/{}",
                        peer_text(&ns),
                        peer_text(&id)
                    )));
                };
                self.on_peer_set_aside((n, d));
                Ok(())
            }
            Message::Synced { seq } => {
                let epoch = self.peer_epoch();
                if self.record.is_none_or(|r| r.epoch != epoch || r.seq < seq) {
                    let record = Cursor { epoch, seq };
                    self.record = Some(record);
                    self.save_cursor(record);
                }
                Ok(())
            }
            // The driver unwraps these before the session sees a frame.
            Message::Compressed { .. } | Message::CompressedBatch { .. } => Err(
                ProtocolError::protocol("a compressed frame inside a compressed frame"),
            ),
            Message::Revocations { crl } => {
                if crl.len() > validate::MAX_REVOCATION_LIST {
                    return Err(ProtocolError::protocol(format!(
                        "a revocation list of {} bytes (at most {})",
                        crl.len(),
                        validate::MAX_REVOCATION_LIST
                    )));
                }
                // The newest offer is all that matters; the driver checks it.
                self.offered_revocations = Some(crl);
                Ok(())
            }
            Message::Error { code, reason } => {
                let reason = peer_text(&reason);
                self.event(Event::PeerError {
                    code,
                    reason: reason.clone(),
                });
                match code {
                    ErrorCode::Forbidden => Ok(()),
                    ErrorCode::FeedBehind => {
                        self.feed_went_back = true;
                        Ok(())
                    }
                    _ => Err(ProtocolError::new(code, format!("peer closed: {reason}"))),
                }
            }
        }
    }

    fn on_hello(&mut self, hello: Hello) -> Result<(), ProtocolError> {
        if self.peer_hello.is_some() {
            return Err(ProtocolError::new(ErrorCode::Protocol, "a second hello"));
        }
        if hello.version != self.cfg.version {
            return Err(ProtocolError::version(hello.version, self.cfg.version));
        }
        validate::check_hello(&hello)?;
        if hello.node_id != self.peer.node_id.as_str() || hello.role != self.peer.role {
            return Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!(
                    "hello says {} ({}), the certificate says {} ({})",
                    peer_text(&hello.node_id),
                    hello.role.as_str(),
                    self.peer.node_id,
                    self.peer.role.as_str()
                ),
            ));
        }
        // Where the peer has everything of our feed; a cursor from another epoch of this
        // database, or beyond its end (a restored backup), means start over.
        let start = hello
            .resume
            .filter(|c| c.epoch == self.cfg.feed_epoch && c.seq <= self.local_last.0)
            .map_or(FeedSeq(0), |c| FeedSeq(c.seq));
        // Past the end in this epoch: this node's feed went back, and other peers' cursors
        // are stale too (see [`Session::feed_went_back`]).
        if hello
            .resume
            .is_some_and(|c| c.epoch == self.cfg.feed_epoch && c.seq > self.local_last.0)
        {
            self.feed_went_back = true;
        }
        // The peer's feed went back: tell it, so that it moves to a new epoch.
        if let Some(r) = self
            .record
            .filter(|r| r.epoch == hello.feed_epoch && r.seq > hello.feed_last)
        {
            return Err(ProtocolError::new(
                ErrorCode::FeedBehind,
                format!(
                    "your feed went back: it ends at {} and this node has received it up \
                     to {} in the same epoch; restored from an old copy?",
                    hello.feed_last, r.seq
                ),
            ));
        }
        self.peer_lacks_unshared = self.knows_everything_of(&hello);
        // A cursor into another epoch of this feed: the peer received this node's
        // documents before (this node was restored, or its feed renewed), so it holds most
        // of them. Reconciling costs the differences; walking costs every document.
        let stale = hello.resume.is_some_and(|c| c.epoch != self.cfg.feed_epoch);
        let cover = self
            .cfg
            .audit_salt
            .filter(|_| stale && self.local_last.0 > 0);
        self.walked = if cover.is_some() {
            self.local_last
        } else {
            start
        };
        // While an audit stands in for the walk, the peer's cursor (reset to this
        // epoch's start at its end) moves once the audit is done.
        self.synced_sent = if cover.is_some() { FeedSeq(0) } else { start };
        if self.record.is_some_and(|r| r.epoch != hello.feed_epoch) {
            self.states_set_aside = true;
            let record = Cursor {
                epoch: hello.feed_epoch,
                seq: 0,
            };
            self.record = Some(record);
            self.save_cursor(record);
        }
        let peer_epoch = hello.feed_epoch;
        self.peer_hello = Some(hello);
        self.event(Event::Connected { peer_epoch });
        if let Some(salt) = cover {
            self.audit_instead_of_walking(salt);
        }
        Ok(())
    }

    fn on_sync(
        &mut self,
        ns: String,
        id: String,
        data: &[u8],
        provisional: bool,
    ) -> Result<(), ProtocolError> {
        self.stats.sync_received += 1;
        let (Ok(n), Ok(d)) = (Namespace::new(ns.as_str()), DocId::new(id.as_str())) else {
            return Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!(
                    "invalid document name {}/{}",
                    peer_text(&ns),
                    peer_text(&id)
                ),
            ));
        };
        let mut message = automerge::sync::Message::decode(data).map_err(|e| {
            ProtocolError::new(
                ErrorCode::Protocol,
                format!("invalid sync message for {ns}/{id}: {e}"),
            )
        })?;
        validate::check_sync_message(&message).map_err(|e| {
            ProtocolError::protocol(format!("sync message for {ns}/{id}: {}", e.reason))
        })?;
        if !self.peer.grants.can_read(&n) {
            self.reject(&ns, &id, "namespace not granted");
            return Ok(());
        }
        if !self.peer.grants.can_write(&n) && !message.changes.is_empty() {
            // Applied read-only below: the state advances, the changes are dropped (here,
            // so they take no memory while the message waits).
            message.changes = Vec::<Vec<u8>>::new().into();
            self.reject(&ns, &id, "namespace granted read-only; changes refused");
        }
        let mut ops = 0u64;
        if self.peer.grants.can_write(&n) {
            // Checked here, on the peer's own connection task, so the store's single
            // writer never spends its time on bytes it would refuse.
            for chunk in message.changes.iter() {
                ops += automerge_bytes::check_peer_chunk(chunk)
                    .map_err(|e| ProtocolError::protocol(format!("{ns}/{id}: {e}")))?;
            }
            if ops > op_count::MAX_OPS {
                return Err(ProtocolError::protocol(format!(
                    "{ns}/{id}: {}",
                    ModelError::TooManyOps {
                        ops,
                        limit: op_count::MAX_OPS
                    }
                )));
            }
        }
        if !provisional {
            // The peer generated this from a committed version: it durably holds these
            // heads now, before this node has applied anything.
            self.outputs.push_back(Output::Event(Event::PeerHolds {
                ns: n.clone(),
                id: d.clone(),
                heads: message.heads.clone(),
            }));
        }
        let key = (n, d);
        let cost = Cost {
            bytes: data.len(),
            ops,
            provisional,
        };
        self.inbound += 1;
        self.inbound_bytes += cost.bytes;
        self.inbound_ops += cost.ops;
        let entry = self.docs.entry(key.clone()).or_default();
        entry.inbox.push_back((message, cost));
        if entry.phase == Phase::Idle {
            self.apply_next(&key);
        }
        Ok(())
    }

    fn reject(&mut self, ns: &str, id: &str, reason: &str) {
        self.stats.rejected += 1;
        // A refusal only informs; a peer that does not read its refusals gets no more.
        if self.room[Priority::Normal.index()] {
            self.outputs.push_back(Output::Send(Message::Error {
                code: ErrorCode::Forbidden,
                reason: format!("{ns}/{id}: {reason}"),
            }));
        }
        self.event(Event::Rejected {
            ns: ns.to_owned(),
            id: id.to_owned(),
            reason: reason.to_owned(),
        });
    }

    fn apply_next(&mut self, key: &DocKey) {
        let read_only = !self.peer.grants.can_write(&key.0);
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        let Some((message, cost)) = entry.inbox.pop_front() else {
            return;
        };
        entry.phase = Phase::Applying;
        entry.applying = cost;
        // Without a state in memory the store uses the stored one, of the peer's current
        // epoch only; the states of another epoch are dropped by the cursor save queued at
        // the hello, before any apply. (A fresh state here would answer every message anew:
        // two nodes doing so would never stop.)
        let state = entry.state.take();
        self.outputs.push_back(Output::Apply(Box::new(Apply {
            ns: key.0.clone(),
            id: key.1.clone(),
            state,
            read_only,
            message,
            provisional: cost.provisional,
        })));
    }

    /// The answer to [`Output::Apply`]: the store committed the peer's message. (A store
    /// that refused it ends the session instead: the driver sends the error and closes.)
    pub fn handle_applied(&mut self, ns: Namespace, id: DocId, applied: Applied) {
        let key = (ns, id);
        self.stats.changes_received += applied.changes_applied;
        let wanted = self.wants(&key.0);
        let entry = self.docs.entry(key.clone()).or_default();
        if entry.phase == Phase::Applying {
            self.inbound = self.inbound.saturating_sub(1);
            let cost = std::mem::take(&mut entry.applying);
            self.inbound_bytes = self.inbound_bytes.saturating_sub(cost.bytes);
            self.inbound_ops = self.inbound_ops.saturating_sub(cost.ops);
            entry.unstored = cost.provisional && applied.changes_applied > 0 && wanted;
        }
        entry.phase = Phase::Idle;
        // A batch document's changes wait for its class's flush: an acknowledgement that
        // brought nothing and asks for nothing is not answered with what was written
        // since (the walk holds that for the next flush). Only a pure acknowledgement of
        // an offer is held: the peer names exactly the heads last sent to it. A peer that
        // sends changes, names changes it needs, or starts an exchange of its own (it
        // waits for an answer to its heads) is answered at once.
        let acknowledges =
            applied.state.their_heads.as_ref().is_some_and(|theirs| {
                crate::model::same_heads(theirs, &applied.state.last_sent_heads)
            });
        let hold = self.cfg.classes.is_batch(self.cfg.classes.of(&key.0))
            && matches!(entry.offer, Offer::Sending { .. } | Offer::Queued { .. })
            && entry.sent
            && acknowledges
            && applied.changes_applied == 0
            && applied.state.their_need.as_ref().is_none_or(Vec::is_empty)
            && entry.inbox.is_empty()
            && !entry.fresh;
        entry.doc = Some(applied.doc);
        entry.uncommitted = false;
        entry.state = Some(applied.state);
        if hold {
            self.check_done(&key);
        } else {
            self.resume(&key, false);
        }
        self.progress();
    }

    /// The answer to [`Output::Apply`] when the store has set the document aside (its
    /// stored bytes do not load): the message and any queued behind it are dropped, and
    /// the document is left alone; every other document goes on. The peer keeps its copy,
    /// and its later messages for this document are dropped the same way.
    pub fn handle_set_aside(&mut self, ns: Namespace, id: DocId) {
        let key = (ns, id);
        let Some(entry) = self.docs.get_mut(&key) else {
            return;
        };
        let mut released = entry
            .inbox
            .drain(..)
            .map(|(_, cost)| cost)
            .collect::<Vec<_>>();
        if entry.phase == Phase::Applying {
            released.push(std::mem::take(&mut entry.applying));
        }
        for cost in released {
            self.inbound = self.inbound.saturating_sub(1);
            self.inbound_bytes = self.inbound_bytes.saturating_sub(cost.bytes);
            self.inbound_ops = self.inbound_ops.saturating_sub(cost.ops);
        }
        entry.phase = Phase::Idle;
        entry.doc = None;
        entry.state = None;
        entry.uncommitted = false;
        entry.unstored = false;
        let p = self.cfg.classes.priority_of(&key.0).index();
        if self.room[p] {
            self.send_set_aside(&key);
        } else {
            // Owed once, however many of the peer's messages it answers.
            entry.tell_set_aside = true;
            if entry.owed.is_none() {
                entry.owed = Some(false);
                self.owed[p].push_back(key.clone());
            }
        }
        self.check_done(&key);
        self.progress();
    }

    fn send_set_aside(&mut self, key: &DocKey) {
        self.outputs.push_back(Output::Send(Message::SetAside {
            ns: key.0.to_string(),
            id: key.1.to_string(),
        }));
    }

    /// The peer cannot take a document (its copy is set aside): its offer ends here
    /// unacknowledged, so the peer's cursor into this feed can move past it. The peer
    /// gets it again when it changes; this only hurts the peer that says so.
    fn on_peer_set_aside(&mut self, key: DocKey) {
        let Some(entry) = self.docs.get_mut(&key) else {
            return;
        };
        let p = self.cfg.classes.priority_of(&key.0).index();
        match std::mem::take(&mut entry.offer) {
            Offer::Sending { seq, .. } => {
                self.unfinished.remove(&seq);
                self.in_flight[p] = self.in_flight[p].saturating_sub(1);
            }
            Offer::Queued { seq, .. } => {
                self.unfinished.remove(&seq);
            }
            Offer::None | Offer::Early | Offer::Repair => {}
        }
        entry.unstored = false;
        if entry.phase == Phase::Idle {
            // What was sent is not in the peer's store: a later offer starts afresh from
            // the stored version and state instead of a state that counts it as sent.
            entry.doc = None;
            entry.state = None;
            entry.uncommitted = false;
        }
        // A repair of it cannot finish.
        self.audit_sent(&key, false);
        self.check_done(&key);
    }

    /// The answer to [`Output::ReadFeed`]: entries after the asked position, and the local
    /// feed's last seq read before them.
    pub fn handle_feed(&mut self, entries: Vec<FeedEntry>, last: FeedSeq) {
        self.reading = false;
        self.local_last = self.local_last.max(last);
        if self.take_rewind() {
            self.walked = FeedSeq(0);
            self.progress();
            return;
        }
        let full = entries.len() >= self.cfg.feed_batch;
        for e in entries {
            self.walked = self.walked.max(e.seq);
            if !self.wants(&e.ns) {
                continue;
            }
            let class = self.cfg.classes.of(&e.ns);
            let batch = self.cfg.classes.is_batch(class);
            let p = self.cfg.classes.priority(class).index();
            let key = (e.ns, e.id);
            let entry = self.docs.entry(key.clone()).or_default();
            let (seq, heads) = (e.seq, e.heads);
            let resend = match std::mem::take(&mut entry.offer) {
                Offer::Sending { seq: old, .. } if batch => {
                    // The newer version waits for the next flush; the exchange under way
                    // goes on with the version it started with.
                    self.unfinished.remove(&old);
                    self.in_flight[p] = self.in_flight[p].saturating_sub(1);
                    entry.offer = Offer::Queued { seq, heads };
                    self.held.entry(class).or_default().push_back(key.clone());
                    self.held_len += 1;
                    false
                }
                Offer::Sending { seq: old, .. } => {
                    self.unfinished.remove(&old);
                    entry.offer = Offer::Sending { seq, heads };
                    true
                }
                Offer::Queued { seq: old, .. } => {
                    self.unfinished.remove(&old);
                    entry.offer = Offer::Queued { seq, heads };
                    false
                }
                Offer::None | Offer::Early | Offer::Repair => {
                    entry.offer = Offer::Queued { seq, heads };
                    if batch {
                        self.held.entry(class).or_default().push_back(key.clone());
                        self.held_len += 1;
                    } else {
                        self.queues[p].push_back(key.clone());
                    }
                    false
                }
            };
            self.unfinished.insert(seq, key.clone());
            if resend {
                // Already in flight: send the newer version too.
                self.start(&key);
            }
        }
        if !full {
            self.walked = self.walked.max(last);
        }
        self.progress();
    }

    /// The local store committed up to `last`.
    pub fn handle_feed_advanced(&mut self, last: FeedSeq) {
        if last > self.local_last {
            self.local_last = last;
            self.caught_up = false;
            self.read_more();
        }
    }

    /// A local batch changed this document and is committing it now (the store's early
    /// notice). When the peer is live on this document, its change goes out at once,
    /// overlapping the local fsync instead of following it; the session asks for the
    /// peer's persisted sync state first ([`Output::LoadSyncState`]) if it holds none. It
    /// is only a hint: the feed walk after the commit still offers the document and decides
    /// what the peer has, so nothing here moves a cursor, and a commit that fails only
    /// means the peer got a change this node will get back from it.
    pub fn handle_early(&mut self, early: &EarlyDoc) {
        let class = self.cfg.classes.of(&early.ns);
        let priority = self.cfg.classes.priority(class);
        let p = priority.index();
        // During catch-up the feed walk is about to send it anyway, unless it is critical:
        // a critical document goes out at once, ahead of any backlog. A batch document
        // waits for its class's flush.
        let live = self.peer_hello.is_some()
            && self.room[p]
            && !self.cfg.classes.is_batch(class)
            && (priority == Priority::Critical
                || (self.queued() == 0 && self.in_flight[p] < self.cfg.max_docs_in_flight));
        if !live || !self.wants(&early.ns) {
            return;
        }
        let peer_lacks = self.peer_lacks(early.stored_bytes);
        let key = (early.ns.clone(), early.id.clone());
        let entry = self.docs.entry(key.clone()).or_default();
        // Only move forward: an offer's doneness is judged against `entry.doc`, so it
        // must never be replaced by an older version.
        let newer = entry
            .doc
            .as_ref()
            .is_none_or(|cur| holds_all(&early.doc, &cur.get_heads()));
        if entry.phase != Phase::Idle || !newer {
            return;
        }
        entry.doc = Some(early.doc.clone());
        entry.uncommitted = true;
        if entry.state.is_none() {
            entry.phase = Phase::LoadingState { peer_lacks };
            self.outputs.push_back(Output::LoadSyncState {
                ns: key.0,
                id: key.1,
            });
            return;
        }
        self.generate(&key, true);
        self.progress();
    }

    /// The answer to [`Output::LoadSyncState`]: the peer's persisted sync state of the
    /// document (warm-started), `None` if there is none.
    pub fn handle_sync_state(&mut self, ns: Namespace, id: DocId, persisted: Option<State>) {
        let read_only = !self.peer.grants.can_write(&ns);
        let key = (ns, id);
        let Some(entry) = self.docs.get_mut(&key) else {
            return;
        };
        let Phase::LoadingState { peer_lacks } = entry.phase else {
            return;
        };
        entry.phase = Phase::Idle;
        if entry.state.is_none() {
            let persisted = persisted.filter(|_| !self.states_set_aside);
            entry.state = Some(start_state(persisted, peer_lacks, read_only));
        }
        self.resume(&key, true);
        self.progress();
    }

    /// The answer to [`Output::Load`]. `None` if the document does not exist.
    pub fn handle_loaded(&mut self, ns: Namespace, id: DocId, loaded: Option<LoadedDoc>) {
        let read_only = !self.peer.grants.can_write(&ns);
        let lacks = loaded
            .as_ref()
            .is_some_and(|l| self.peer_lacks(l.stored_bytes));
        let key = (ns, id);
        let entry = self.docs.entry(key.clone()).or_default();
        entry.phase = Phase::Idle;
        entry.uncommitted = false;
        // Answered: a fresh start asked for is made now, or the document is gone.
        let fresh = std::mem::take(&mut entry.fresh);
        match loaded {
            Some(l) => {
                entry.doc = Some(l.doc);
                if entry.state.is_none() || fresh {
                    let persisted = l.state.filter(|_| !self.states_set_aside && !fresh);
                    entry.state = Some(start_state(persisted, lacks, read_only));
                }
            }
            // Absent: nothing to send, and its offer is done.
            None => entry.doc = None,
        }
        self.resume(&key, false);
        self.progress();
    }

    /// Whether, at the hello, every document the peer has is known here: its feed lists
    /// each of its documents, and this node has durably received all of it (or it is
    /// empty), having stored a sync state for each document it received. Only on an edge's
    /// link to a hub: an edge talks to one hub at a time, so during the session it gets
    /// documents from this node only, while a hub also hears from other hubs.
    fn knows_everything_of(&self, hello: &Hello) -> bool {
        let edge_link = self.cfg.role == Role::Edge || self.peer.role == Role::Edge;
        let all_received = hello.feed_last == 0
            || self
                .record
                .is_some_and(|r| r.epoch == hello.feed_epoch && r.seq >= hello.feed_last);
        edge_link && all_received
    }

    /// Whether a document of this size with no state stored for the peer should go out
    /// whole in the first message: the peer lacks such documents (see
    /// [`Session::knows_everything_of`]) and it is small.
    fn peer_lacks(&self, stored_bytes: u64) -> bool {
        self.peer_lacks_unshared && stored_bytes <= self.cfg.whole_doc_max_bytes
    }

    fn wants(&self, ns: &Namespace) -> bool {
        let subscribed = self
            .peer_hello
            .as_ref()
            .is_some_and(|h| h.subscriptions.iter().any(|p| p.matches(ns)));
        subscribed && self.peer.grants.can_read(ns)
    }

    fn peer_epoch(&self) -> u128 {
        self.peer_hello.as_ref().map_or(0, |h| h.feed_epoch)
    }

    /// What follows every input: more offers while there is room, more of the feed while
    /// the queue is short, and `Synced` when the lowest unfinished offer moved.
    fn progress(&mut self) {
        self.pump();
        self.pump_repairs();
        self.read_more();
        self.advance_synced();
    }

    fn read_more(&mut self) {
        if self.peer_hello.is_some()
            && !self.reading
            && self.walked < self.local_last
            && self.queued() < self.cfg.feed_batch
            && self.held_len < self.cfg.max_held
        {
            self.reading = true;
            self.outputs.push_back(Output::ReadFeed {
                after: self.walked,
                limit: self.cfg.feed_batch,
            });
        }
    }

    /// Starts queued offers while there is room in flight. A loop, not a recursion: a
    /// document found current in memory finishes at once and makes room for the next.
    fn pump(&mut self) {
        for p in Priority::ALL.map(Priority::index) {
            while self.in_flight[p] < self.cfg.max_docs_in_flight {
                let Some(key) = self.queues[p].pop_front() else {
                    break;
                };
                let Some(entry) = self.docs.get_mut(&key) else {
                    continue;
                };
                // A key stays queued after its offer ended early, and may be queued again.
                if !matches!(entry.offer, Offer::Queued { .. }) {
                    continue;
                }
                if let Offer::Queued { seq, heads } = std::mem::take(&mut entry.offer) {
                    entry.offer = Offer::Sending { seq, heads };
                }
                self.in_flight[p] += 1;
                self.start(&key);
            }
        }
    }

    /// Documents waiting for room in flight, all priorities.
    fn queued(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Sends what a batch class has held since its last flush: the driver calls it on the
    /// class's schedule (at most once per `every`, inside its window).
    pub fn flush_batch(&mut self, class: ClassId) {
        let Some(held) = self.held.remove(&class) else {
            return;
        };
        self.held_len = self.held_len.saturating_sub(held.len());
        let p = self.cfg.classes.priority(class).index();
        self.queues[p].extend(held);
        self.progress();
    }

    /// Documents offered and not yet acknowledged, per class (classes with none left
    /// out): what status shows as each class's backlog to this peer. The feed not yet
    /// walked is not in it (see [`Session::lag`]).
    pub fn backlog(&self) -> BTreeMap<ClassId, u64> {
        let mut counts = BTreeMap::new();
        for (ns, _) in self.unfinished.values() {
            *counts.entry(self.cfg.classes.of(ns)).or_default() += 1;
        }
        counts
    }

    /// Whether a batch class holds documents for its next flush.
    pub fn holds_batch(&self, class: ClassId) -> bool {
        self.held.get(&class).is_some_and(|h| !h.is_empty())
    }

    /// Sends the offered version: from memory when it is there (typically sent early: the
    /// peer's state records that, so nothing goes out twice), else after loading it. A
    /// document the driver is working on continues when that work is answered.
    fn start(&mut self, key: &DocKey) {
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        if entry.phase != Phase::Idle {
            return;
        }
        if entry.is_current() {
            self.generate(key, false);
        } else {
            entry.phase = Phase::Loading;
            self.outputs.push_back(Output::Load {
                ns: key.0.clone(),
                id: key.1.clone(),
            });
        }
    }

    /// A document's next step once the driver's work on it is answered: the peer's queued
    /// messages first, then a load if the offer names a version newer than the one in
    /// memory, else a message to the peer (`early`: ahead of the feed walk).
    fn resume(&mut self, key: &DocKey, early: bool) {
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        if entry.fresh && entry.inbox.is_empty() {
            self.restart_fresh(key);
            return;
        }
        let sending = matches!(entry.offer, Offer::Sending { .. });
        if !entry.inbox.is_empty() {
            self.apply_next(key);
        } else if sending && entry.doc.is_some() && !entry.is_current() {
            entry.phase = Phase::Loading;
            self.outputs.push_back(Output::Load {
                ns: key.0.clone(),
                id: key.1.clone(),
            });
        } else {
            self.generate(key, early);
        }
    }

    /// Sends what the peer lacks of a document, then checks whether its offer is done. An
    /// `early` message (from an early notice) makes the document an early offer, kept in
    /// memory until the peer has it, unless the feed offers it already.
    fn generate(&mut self, key: &DocKey, early: bool) {
        let p = self.cfg.classes.priority_of(&key.0).index();
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        if !self.room[p] {
            if entry.owed.is_none() {
                self.owed[p].push_back(key.clone());
            }
            // Early only if every message that fell due was.
            entry.owed = Some(entry.owed.unwrap_or(true) && early);
            return;
        }
        if let (Some(doc), Some(state)) = (&entry.doc, &mut entry.state) {
            if let Some(msg) = doc.generate_sync_message(state) {
                self.stats.sync_sent += 1;
                entry.sent = true;
                if early {
                    self.stats.early_sent += 1;
                    if matches!(entry.offer, Offer::None) {
                        entry.offer = Offer::Early;
                    }
                }
                let msg = if self.cfg.raw_payloads {
                    super::raw::without_deflate(doc, msg)
                } else {
                    msg
                };
                let (ns, id, data) = (key.0.to_string(), key.1.to_string(), msg.encode());
                self.outputs.push_back(Output::Send(if entry.uncommitted {
                    Message::SyncAhead { ns, id, data }
                } else {
                    Message::Sync { ns, id, data }
                }));
            }
        }
        self.check_done(key);
    }

    /// An offer is done once the peer's acknowledged heads include ours; a document with
    /// no offer, no work under way and no waiting message is forgotten (the persisted
    /// state is enough to resume).
    fn check_done(&mut self, key: &DocKey) {
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        if entry.phase != Phase::Idle {
            return;
        }
        // Judged against the version in memory, and only once that holds what the feed
        // offered: an acknowledgement of an older version finishes nothing.
        let done = match (&entry.doc, &entry.state) {
            (Some(doc), Some(state)) => {
                entry.holds_offered() && heads_known(&doc.get_heads(), state)
            }
            (doc, _) => doc.is_none(),
        };
        if done {
            if matches!(entry.offer, Offer::Sending { .. } | Offer::Queued { .. }) {
                entry.unstored = false;
            }
            match std::mem::take(&mut entry.offer) {
                Offer::Sending { seq, .. } => {
                    self.unfinished.remove(&seq);
                    let p = self.cfg.classes.priority_of(&key.0).index();
                    self.in_flight[p] = self.in_flight[p].saturating_sub(1);
                    self.stats.docs_synced += 1;
                }
                Offer::Queued { seq, .. } => {
                    // Its queue slot is skipped when reached.
                    self.unfinished.remove(&seq);
                    self.stats.docs_synced += 1;
                }
                Offer::None | Offer::Early | Offer::Repair => {}
            }
            let held = entry.doc.is_some();
            self.audit_sent(key, held);
        }
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        if matches!(entry.offer, Offer::None)
            && entry.inbox.is_empty()
            && entry.owed.is_none()
            && !entry.unstored
        {
            self.docs.remove(key);
        }
    }

    fn synced_through(&self) -> FeedSeq {
        // Nothing is confirmed until the audit standing in for the walk is done.
        if self.auditing_instead_of_walking() {
            return FeedSeq(0);
        }
        match self.unfinished.keys().next() {
            Some(first) => FeedSeq(first.0 - 1),
            None => self.walked,
        }
    }

    fn advance_synced(&mut self) {
        let through = self.synced_through();
        if through > self.synced_sent {
            self.synced_sent = through;
            self.outputs
                .push_back(Output::Send(Message::Synced { seq: through.0 }));
        }
        self.check_caught_up();
    }

    fn check_caught_up(&mut self) {
        if !self.caught_up && self.is_caught_up() {
            self.caught_up = true;
            self.event(Event::CaughtUp);
        }
    }

    fn event(&mut self, e: Event) {
        self.outputs.push_back(Output::Event(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Grants;
    use crate::sync::audit::Reconciler;
    use automerge::transaction::Transactable;

    fn session(me: &str, role: Role, peer: &str, peer_role: Role) -> Session {
        let cfg = SessionConfig::new(NodeId::new(me).expect("id"), role, 1);
        let peer = Identity {
            node_id: NodeId::new(peer).expect("id"),
            role: peer_role,
            grants: Grants::everything(),
        };
        Session::new(cfg, peer, None, FeedSeq(0))
    }

    fn outputs(s: &mut Session) -> Vec<Output> {
        std::iter::from_fn(|| s.poll_output()).collect()
    }

    fn hello(me: &str, role: Role) -> Message {
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            node_id: me.into(),
            role,
            feed_epoch: 2,
            feed_last: 0,
            resume: None,
            subscriptions: vec![NsPattern::all()],
        })
    }

    /// A revocation list is taken only after the hello and only within its bound; the
    /// newest offer waits for the driver, and an own list goes out after the hello.
    #[test]
    fn revocation_lists_are_bounded_and_handed_to_the_driver() {
        let list = Message::Revocations {
            crl: vec![0x30; 16],
        };
        let mut hub = session("hub-1", Role::Hub, "edge-1", Role::Edge);
        assert!(
            hub.handle_message(list.clone()).is_err(),
            "before the hello"
        );

        let mut hub = session("hub-1", Role::Hub, "edge-1", Role::Edge);
        hub.send_revocations(vec![1, 2, 3]);
        let out = outputs(&mut hub);
        assert!(
            matches!(&out[..], [Output::Send(Message::Hello(_)), Output::Send(Message::Revocations { crl })] if crl == &[1, 2, 3]),
            "{out:?}"
        );
        hub.handle_message(hello("edge-1", Role::Edge))
            .expect("hello");
        hub.handle_message(list).expect("a small list");
        hub.handle_message(Message::Revocations {
            crl: vec![0x30; 17],
        })
        .expect("a newer offer");
        assert_eq!(hub.take_offered_revocations().map(|c| c.len()), Some(17));
        assert_eq!(hub.take_offered_revocations(), None);
        let huge = Message::Revocations {
            crl: vec![0; validate::MAX_REVOCATION_LIST + 1],
        };
        assert!(hub.handle_message(huge).is_err(), "over the bound");
        assert_eq!(hub.take_offered_revocations(), None);
    }

    /// One path per write: a live document sent ahead of its commit is, when the feed walk
    /// reaches it, neither loaded nor sent again; the peer's answer completes it.
    #[test]
    fn an_early_send_is_not_loaded_or_sent_again_by_the_feed_walk() {
        let mut hub = session("hub-1", Role::Hub, "edge-1", Role::Edge);
        hub.handle_message(hello("edge-1", Role::Edge))
            .expect("hello");
        outputs(&mut hub);
        assert!(hub.is_caught_up());

        let (ns, id) = (
            Namespace::new("cfg").expect("ns"),
            DocId::new("a").expect("id"),
        );
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "v", 1).expect("put");
        tx.commit();
        let doc = Arc::new(doc);
        let early = EarlyDoc {
            ns: ns.clone(),
            id: id.clone(),
            doc: doc.clone(),
            stored_bytes: 0,
        };
        hub.handle_early(&early);
        let out = outputs(&mut hub);
        assert!(
            matches!(&out[..], [Output::LoadSyncState { .. }]),
            "the session asks for the stored state: {out:?}"
        );
        hub.handle_sync_state(ns.clone(), id.clone(), None);
        let out = outputs(&mut hub);
        // Marked as a version not committed yet.
        let [Output::Send(Message::SyncAhead { data, .. })] = &out[..] else {
            panic!("one early frame: {out:?}");
        };
        let first = automerge::sync::Message::decode(data).expect("decodes");
        assert_eq!(hub.stats().early_sent, 1);

        // The commit lands and the walk reaches the document: no load, no second frame.
        hub.handle_feed_advanced(FeedSeq(1));
        let out = outputs(&mut hub);
        assert!(matches!(&out[..], [Output::ReadFeed { .. }]), "{out:?}");
        let entry = FeedEntry {
            seq: FeedSeq(1),
            ns: ns.clone(),
            id: id.clone(),
            heads: doc.get_heads(),
            deleted: false,
        };
        hub.handle_feed(vec![entry], FeedSeq(1));
        let out = outputs(&mut hub);
        assert!(
            out.iter().all(|o| !matches!(
                o,
                Output::Load { .. }
                    | Output::Send(Message::Sync { .. } | Message::SyncAhead { .. })
            )),
            "the walk loaded or resent it: {out:?}"
        );
        assert!(!hub.is_caught_up(), "not yet acknowledged");

        // The edge takes the change and answers; once that is applied, the offer is done.
        let mut edge_doc = Automerge::new();
        let mut edge_state = State::new();
        edge_doc
            .receive_sync_message(&mut edge_state, first)
            .expect("edge receives");
        let reply = edge_doc
            .generate_sync_message(&mut edge_state)
            .expect("an answer");
        hub.handle_message(Message::Sync {
            ns: ns.to_string(),
            id: id.to_string(),
            data: reply.encode(),
        })
        .expect("sync");
        let out = outputs(&mut hub);
        // The edge answered from a committed version: it holds those heads.
        assert!(
            matches!(&out[0], Output::Event(Event::PeerHolds { heads, .. }) if *heads == doc.get_heads()),
            "{out:?}"
        );
        let [_, Output::Apply(apply)] = &out[..] else {
            panic!("the answer goes to the store: {out:?}");
        };
        let mut state = apply.state.clone().expect("the in-memory state");
        let mut committed = (*doc).clone();
        committed
            .receive_sync_message(&mut state, apply.message.clone())
            .expect("applies");
        hub.handle_applied(
            ns,
            id,
            Applied {
                state,
                doc: Arc::new(committed),
                changes_applied: 0,
            },
        );
        let out = outputs(&mut hub);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Send(Message::Synced { seq: 1 }))),
            "{out:?}"
        );
        assert!(hub.is_caught_up());
        assert_eq!(hub.stats().docs_synced, 1);
    }

    fn names(id: &str) -> (Namespace, DocId) {
        (
            Namespace::new("cfg").expect("ns"),
            DocId::new(id).expect("id"),
        )
    }

    fn entry(seq: u64, id: &str, heads: Vec<ChangeHash>) -> FeedEntry {
        let (ns, id) = names(id);
        FeedEntry {
            seq: FeedSeq(seq),
            ns,
            id,
            heads,
            deleted: false,
        }
    }

    /// A document with `n` changes, and the sync state of a peer that has all of them.
    fn acknowledged(n: i64) -> Applied {
        let mut doc = Automerge::new();
        for i in 0..n {
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, "v", i).expect("put");
            tx.commit();
        }
        let mut state = State::new();
        state.their_heads = Some(doc.get_heads());
        Applied {
            state,
            doc: Arc::new(doc),
            changes_applied: 0,
        }
    }

    /// A hub whose edge said hello, with room for `window` documents in flight and a feed
    /// ending at `last`.
    /// With every window of bulk documents full, a normal and a critical document offered
    /// later still start at once (critical first): bulk never holds up the others.
    #[test]
    fn a_bulk_backlog_never_holds_up_normal_or_critical_documents() {
        let mut cfg = SessionConfig::new(NodeId::new("hub-1").expect("id"), Role::Hub, 1);
        cfg.max_docs_in_flight = 2;
        let class = |name: &str, priority| crate::model::Class {
            name: name.into(),
            namespaces: vec![NsPattern::new(name).expect("pattern")],
            priority,
            mode: crate::model::Mode::Live,
            max_rate: None,
        };
        cfg.classes = Arc::new(
            Classes::new(vec![
                class("alerts", Priority::Critical),
                class("bulk", Priority::Bulk),
            ])
            .expect("classes"),
        );
        let peer = Identity {
            node_id: NodeId::new("edge-1").expect("id"),
            role: Role::Edge,
            grants: Grants::everything(),
        };
        let mut hub = Session::new(cfg, peer, None, FeedSeq(12));
        hub.handle_message(hello("edge-1", Role::Edge))
            .expect("hello");
        outputs(&mut hub);
        let at = |seq: u64, ns: &str, id: &str| FeedEntry {
            seq: FeedSeq(seq),
            ns: Namespace::new(ns).expect("ns"),
            id: DocId::new(id).expect("id"),
            heads: Vec::new(),
            deleted: false,
        };
        let mut feed: Vec<FeedEntry> = (1..=10).map(|i| at(i, "bulk", &format!("b{i}"))).collect();
        feed.push(at(11, "models", "n"));
        feed.push(at(12, "alerts", "fire"));
        hub.handle_feed(feed, FeedSeq(12));
        let loads: Vec<String> = outputs(&mut hub)
            .into_iter()
            .filter_map(|o| match o {
                Output::Load { ns, id } => Some(format!("{ns}/{id}")),
                _ => None,
            })
            .collect();
        assert_eq!(loads, ["alerts/fire", "models/n", "bulk/b1", "bulk/b2"]);
    }

    fn connected_hub(window: usize, last: u64) -> Session {
        let mut cfg = SessionConfig::new(NodeId::new("hub-1").expect("id"), Role::Hub, 1);
        cfg.max_docs_in_flight = window;
        let peer = Identity {
            node_id: NodeId::new("edge-1").expect("id"),
            role: Role::Edge,
            grants: Grants::everything(),
        };
        let mut hub = Session::new(cfg, peer, None, FeedSeq(last));
        hub.handle_message(hello("edge-1", Role::Edge))
            .expect("hello");
        outputs(&mut hub);
        hub
    }

    fn peer_sync(id: &str) -> Message {
        Message::Sync {
            ns: "cfg".into(),
            id: id.into(),
            data: Automerge::new()
                .generate_sync_message(&mut State::new())
                .expect("a first message")
                .encode(),
        }
    }

    /// Regression: a key queued twice (its first offer finished by the peer's own message,
    /// then a newer commit) must not lose its live offer when popped the second time, or
    /// the window shrinks for good and `Synced` never passes that position.
    #[test]
    fn a_key_queued_twice_keeps_its_offer_and_the_session_catches_up() {
        let mut hub = connected_hub(2, 5);
        let k = acknowledged(1);
        let k_heads = k.doc.get_heads();
        hub.handle_feed(
            vec![
                entry(1, "a", vec![ChangeHash([1; 32])]),
                entry(2, "b", vec![ChangeHash([2; 32])]),
                entry(3, "k", k_heads.clone()),
            ],
            FeedSeq(3),
        );
        outputs(&mut hub); // loads of a and b; k waits for room
        hub.handle_message(peer_sync("k")).expect("sync");
        outputs(&mut hub);
        let (ns, id) = names("k");
        hub.handle_applied(ns.clone(), id.clone(), k);
        outputs(&mut hub);
        hub.handle_feed(vec![entry(5, "k", k_heads)], FeedSeq(5));
        outputs(&mut hub);
        for d in ["a", "b"] {
            let (ns, id) = names(d);
            hub.handle_loaded(ns, id, None);
        }
        let out = outputs(&mut hub);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Load { id, .. } if id.as_str() == "k")),
            "k is sent once there is room: {out:?}"
        );
        hub.handle_loaded(ns, id, None);
        outputs(&mut hub);
        assert!(hub.is_caught_up(), "lag {}", hub.lag());
    }

    /// Regression: the peer acknowledging an older version of a document must not finish
    /// the feed's offer of a newer one, or `Synced` passes a change the peer never got.
    #[test]
    fn an_acknowledged_older_version_does_not_finish_a_newer_offer() {
        let mut hub = connected_hub(1, 2);
        hub.handle_feed(vec![entry(1, "a", vec![ChangeHash([1; 32])])], FeedSeq(1));
        outputs(&mut hub); // a is in flight: the window is full
        hub.handle_message(peer_sync("k")).expect("sync");
        outputs(&mut hub); // the peer's message for k is being applied
        let older = acknowledged(1);
        let newer = acknowledged(2);
        hub.handle_feed(vec![entry(2, "k", newer.doc.get_heads())], FeedSeq(2));
        outputs(&mut hub);
        let (ns, id) = names("k");
        hub.handle_applied(ns, id, older);
        outputs(&mut hub);
        let (ns, id) = names("a");
        hub.handle_loaded(ns, id, None);
        let out = outputs(&mut hub);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Load { id, .. } if id.as_str() == "k")),
            "the newer version of k is loaded and sent: {out:?}"
        );
        assert!(!out
            .iter()
            .any(|o| matches!(o, Output::Send(Message::Synced { seq: 2 }))));
        assert!(!hub.is_caught_up());
    }

    /// A peer that sends faster than the store commits fills the inbound budget: the
    /// session stops taking frames, and takes them again once applies are answered.
    #[test]
    fn the_inbound_budget_stops_and_resumes_reading() {
        let mut cfg = SessionConfig::new(NodeId::new("hub-1").expect("id"), Role::Hub, 1);
        cfg.max_inbound_messages = 4;
        let peer = Identity {
            node_id: NodeId::new("edge-1").expect("id"),
            role: Role::Edge,
            grants: Grants::everything(),
        };
        let mut hub = Session::new(cfg, peer, None, FeedSeq(0));
        hub.handle_message(hello("edge-1", Role::Edge))
            .expect("hello");
        outputs(&mut hub);
        for i in 0..4 {
            assert!(hub.wants_frames(), "frame {i} is within the budget");
            hub.handle_message(peer_sync("a")).expect("sync");
        }
        assert!(!hub.wants_frames(), "four messages waiting or applying");
        let applies: Vec<_> = outputs(&mut hub)
            .into_iter()
            .filter(|o| matches!(o, Output::Apply(_)))
            .collect();
        assert_eq!(applies.len(), 1, "one apply per document at a time");
        let (ns, id) = names("a");
        hub.handle_applied(ns, id, acknowledged(1));
        assert!(hub.wants_frames(), "an answered apply frees its share");
    }

    /// Three peer messages for document `a` reach a hub with no room to send, each
    /// answered by the driver with `answer`; nothing may go out meanwhile, the document is
    /// owed once, and nothing is owed after room comes back. Returns what went out then.
    fn owed_while_no_room(answer: impl Fn(&mut Session, Namespace, DocId)) -> Vec<Output> {
        let mut hub = connected_hub(8, 0);
        hub.set_can_send(false);
        let (ns, id) = names("a");
        for _ in 0..3 {
            hub.handle_message(peer_sync("a")).expect("sync");
            outputs(&mut hub);
            answer(&mut hub, ns.clone(), id.clone());
            let out = outputs(&mut hub);
            assert!(
                !out.iter().any(|o| matches!(o, Output::Send(_))),
                "sent without room: {out:?}"
            );
        }
        assert_eq!(
            hub.owed.iter().map(VecDeque::len).sum::<usize>(),
            1,
            "owed once"
        );
        hub.set_can_send(true);
        let out = outputs(&mut hub);
        assert!(hub.owed.iter().all(VecDeque::is_empty));
        out
    }

    /// Without room to send, the messages that fall due are owed, one per document however
    /// many fall due, and nothing is queued; with room again they go out.
    #[test]
    fn replies_without_room_are_owed_once_per_document() {
        let out = owed_while_no_room(|hub, ns, id| {
            let mut doc = Automerge::new();
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, "v", 1).expect("put");
            tx.commit();
            let applied = Applied {
                state: State::new(),
                doc: Arc::new(doc),
                changes_applied: 1,
            };
            hub.handle_applied(ns, id, applied);
        });
        let sent = out
            .iter()
            .filter(|o| matches!(o, Output::Send(Message::Sync { .. })))
            .count();
        assert_eq!(sent, 1, "the owed reply goes out once: {out:?}");
    }

    /// A peer that sends `Synced` in a flood gets one cursor save at a time, the newest
    /// next: never one write per frame.
    #[test]
    fn cursor_saves_are_coalesced() {
        let mut hub = connected_hub(8, 0);
        for seq in 1..=100 {
            hub.handle_message(Message::Synced { seq }).expect("synced");
        }
        let saves = |hub: &mut Session| -> Vec<u64> {
            outputs(hub)
                .into_iter()
                .filter_map(|o| match o {
                    Output::SaveCursor(c) => Some(c.seq),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(saves(&mut hub), vec![1]);
        hub.handle_cursor_saved();
        assert_eq!(saves(&mut hub), vec![100], "the newest, once");
        hub.handle_cursor_saved();
        assert!(outputs(&mut hub).is_empty());
    }

    fn set_aside(id: &str) -> Message {
        Message::SetAside {
            ns: "cfg".into(),
            id: id.into(),
        }
    }

    /// A peer that set aside a document sent early, then offered again by the feed walk,
    /// gets the walk's version and can end that offer too: the session catches up.
    #[test]
    fn a_document_the_peer_set_aside_after_an_early_send_does_not_hold_the_walk() {
        let mut hub = connected_hub(8, 0);
        let a = acknowledged(1).doc;
        let (ns, id) = names("a");
        hub.handle_early(&EarlyDoc {
            ns: ns.clone(),
            id: id.clone(),
            doc: a.clone(),
            stored_bytes: 0,
        });
        assert!(matches!(
            outputs(&mut hub).as_slice(),
            [Output::LoadSyncState { .. }]
        ));
        hub.handle_sync_state(ns.clone(), id.clone(), None);
        let out = outputs(&mut hub);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Send(Message::SyncAhead { .. }))),
            "sent early: {out:?}"
        );
        hub.handle_message(set_aside("a")).expect("set aside");
        outputs(&mut hub);
        hub.handle_feed(vec![entry(1, "a", a.get_heads())], FeedSeq(1));
        let mut out = outputs(&mut hub);
        if out.iter().any(|o| matches!(o, Output::Load { .. })) {
            hub.handle_loaded(
                ns.clone(),
                id.clone(),
                Some(LoadedDoc {
                    doc: a.clone(),
                    state: None,
                    stored_bytes: 10,
                }),
            );
            out = outputs(&mut hub);
        }
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Send(Message::Sync { .. }))),
            "the walk's offer is sent: {out:?}"
        );
        hub.handle_message(set_aside("a")).expect("set aside");
        outputs(&mut hub);
        assert!(hub.is_caught_up(), "lag {}", hub.lag());
    }

    /// Set-aside answers to a peer that does not read are owed once per document, like
    /// every other reply: a flood of messages for a damaged document queues nothing.
    #[test]
    fn set_aside_answers_without_room_are_owed_once_per_document() {
        let out = owed_while_no_room(|hub, ns, id| hub.handle_set_aside(ns, id));
        let told = out
            .iter()
            .filter(|o| matches!(o, Output::Send(Message::SetAside { .. })))
            .count();
        assert_eq!(told, 1, "told once: {out:?}");
    }

    /// Drives two connected sessions' audits with no store: each side's documents are
    /// given, and every document load answers "gone" (a copy set aside, say), so no repair
    /// can send anything. Returns the starter's events.
    fn audit_between(
        a_docs: Vec<(Namespace, DocId, Vec<ChangeHash>)>,
        b_docs: Vec<(Namespace, DocId, Vec<ChangeHash>)>,
    ) -> Vec<Event> {
        let mut a = session("hub-a", Role::Hub, "hub-b", Role::Hub);
        let mut b = session("hub-b", Role::Hub, "hub-a", Role::Hub);
        a.handle_message(hello("hub-b", Role::Hub)).expect("hello");
        b.handle_message(hello("hub-a", Role::Hub)).expect("hello");
        assert!(a.start_audit(Vec::new(), 9).is_some());
        let mut events = Vec::new();
        let mut budget = 100_000usize;
        for _ in 0..10_000 {
            let mut moved = false;
            for starter in [true, false] {
                let (me, other, docs) = if starter {
                    (&mut a, &mut b, &a_docs)
                } else {
                    (&mut b, &mut a, &b_docs)
                };
                while let Some(out) = me.poll_output() {
                    moved = true;
                    budget = budget
                        .checked_sub(1)
                        .expect("the sessions never went quiet: a repair that cannot load loops");
                    match out {
                        Output::Send(Message::Hello(_)) => {}
                        Output::Send(m) => other.handle_message(m).expect("valid"),
                        Output::LoadAuditItems { starter: s, scope } => {
                            let items = docs
                                .iter()
                                .filter(|d| scope.includes(&d.0))
                                .cloned()
                                .collect();
                            me.handle_audit_items(s, Reconciler::new(items, scope.salt));
                        }
                        Output::Load { ns, id } => me.handle_loaded(ns, id, None),
                        Output::ReadFeed { .. } => me.handle_feed(Vec::new(), FeedSeq(0)),
                        Output::Event(e) if starter => events.push(e),
                        _ => {}
                    }
                }
            }
            if !moved {
                return events;
            }
        }
        panic!("the sessions never went quiet: a repair that cannot load loops");
    }

    /// Regression: a document found differing that cannot be loaded any more (set aside,
    /// or deleted meanwhile) once made the session ask for it again and again without end,
    /// pinning its thread. Now its repair ends unrepaired and the audit completes.
    #[test]
    fn a_repair_whose_document_cannot_load_ends_and_the_audit_completes() {
        let doc = |i: u32, v: u8| {
            (
                Namespace::new("cfg").expect("ns"),
                DocId::new(format!("d{i}")).expect("id"),
                vec![ChangeHash([v; 32])],
            )
        };
        let a: Vec<_> = (0..50).map(|i| doc(i, 1)).collect();
        let mut b = a.clone();
        b[3] = doc(3, 2);
        b.push(doc(99, 1));
        let events = audit_between(a, b);
        let done = events.iter().find_map(|e| match e {
            Event::AuditDone(r) => Some(r.clone()),
            _ => None,
        });
        let report = done.expect("the audit completes");
        assert_eq!(report.differing, 2, "{report:?}");
        assert_eq!(report.repaired, 0, "nothing could be sent: {report:?}");
    }
}
