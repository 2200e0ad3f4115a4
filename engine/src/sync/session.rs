//! One sync session with one peer, as a deterministic state machine with no I/O.
//!
//! The driver (see `net::driver`) owns the connection and the store; the session only
//! decides. Method groups, as in quinn-proto:
//!
//! - inputs: [`Session::handle_message`] (a frame from the peer),
//!   [`Session::handle_feed`] (the answer to [`Output::ReadFeed`]),
//!   [`Session::handle_loaded`] (the answer to [`Output::Load`]),
//!   [`Session::handle_applied`] (the answer to [`Output::Apply`], after the commit),
//!   [`Session::handle_feed_advanced`] (the local store committed something);
//! - output: [`Session::poll_output`], to be drained after every input.
//!
//! Sending: the session walks the local feed from where the peer said it has everything
//! (its hello's `resume`), and for each document the peer may read and subscribed to, runs
//! Automerge's sync protocol from the persisted per-peer state. Up to
//! `max_docs_in_flight` documents are in flight at once, so catch-up is bound by bandwidth
//! and CPU, not round trips. A document is done when the peer's acknowledged heads include
//! ours; the lowest unfinished feed position is then sent as [`Message::Synced`], and the
//! peer stores it as its resume cursor. A reconnect with nothing changed walks nothing.
//!
//! Receiving: every sync message goes to the store ([`Output::Apply`]); the reply is
//! generated only from the committed result, so the peer never hears "I have it" before
//! it is on disk. Changes in a namespace the peer may not write are ignored (the state is
//! read-only, which also tells a well-behaved peer not to send them) and reported.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use automerge::sync::{State, SyncDoc};
use automerge::{Automerge, ChangeHash, ReadDoc};

use super::message::{Cursor, ErrorCode, Hello, Message, Role, PROTOCOL_VERSION};
use crate::model::{same_heads, DocId, Grants, Namespace, NodeId, NsPattern};
use crate::store::{
    warm_sync_state, EarlyDoc, FeedEntry, FeedSeq, PeerRecord, SyncApplied, SyncDoc as LoadedDoc,
    SyncPeer,
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
        }
    }
}

/// Who the peer is, from its verified certificate.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    /// The node id in the certificate.
    pub node_id: NodeId,
    /// The role in the certificate.
    pub role: Role,
    /// What the peer may read and write. Hubs hold everything.
    pub grants: Grants,
}

/// A protocol violation: the driver sends it to the peer and closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[error("{code:?}: {reason}")]
pub struct ProtocolError {
    /// The code sent to the peer.
    pub code: ErrorCode,
    /// The reason sent to the peer and logged.
    pub reason: String,
}

impl ProtocolError {
    fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }

    /// A malformed frame or unexpected message.
    pub fn protocol(reason: impl Into<String>) -> Self {
        Self::new(ErrorCode::Protocol, reason)
    }

    /// A peer speaking another protocol version.
    pub fn version(theirs: u16) -> Self {
        Self::new(
            ErrorCode::Version,
            format!("protocol version {theirs} is not {PROTOCOL_VERSION}"),
        )
    }

    /// A frame the codec refused (over the size limit, or a broken length prefix).
    pub fn from_frame_error(e: &std::io::Error) -> Self {
        Self::new(ErrorCode::Protocol, format!("bad frame: {e}"))
    }

    /// The message that tells the peer.
    pub fn to_message(&self) -> Message {
        Message::Error {
            code: self.code,
            reason: self.reason.clone(),
        }
    }
}

/// Something the driver must do for the session.
#[derive(Debug)]
pub enum Output {
    /// Send this message to the peer.
    Send(Message),
    /// Answer with [`Session::handle_feed`]: up to `limit` local feed entries after `after`.
    ReadFeed {
        /// Read entries after this seq.
        after: FeedSeq,
        /// At most this many.
        limit: usize,
    },
    /// Answer with [`Session::handle_loaded`]: the document and the peer's sync state.
    Load {
        /// Namespace.
        ns: Namespace,
        /// Document id.
        id: DocId,
    },
    /// Apply the peer's message in the store, then answer with [`Session::handle_applied`].
    Apply(Box<Apply>),
    /// Persist this record of how far the peer's feed is here.
    SaveCursor(PeerRecord),
    /// Something worth telling the node.
    Event(Event),
}

/// A peer's sync message to apply to one document (see [`Output::Apply`]).
#[derive(Debug)]
pub struct Apply {
    /// Namespace.
    pub ns: Namespace,
    /// Document id.
    pub id: DocId,
    /// The in-memory sync state, if any (else the persisted one is used).
    pub state: Option<State>,
    /// Ignore changes in the message.
    pub read_only: bool,
    /// The peer's message.
    pub message: automerge::sync::Message,
}

impl Apply {
    /// Carries it out in `store` for `peer`, as a driver does; the result goes to
    /// [`Session::handle_applied`].
    pub async fn run(
        self,
        store: &crate::store::Store,
        peer: &SyncPeer,
    ) -> (Namespace, DocId, Result<SyncApplied, crate::StoreError>) {
        let result = store
            .apply_sync(
                &self.ns,
                &self.id,
                peer,
                self.state,
                self.read_only,
                self.message,
            )
            .await;
        (self.ns, self.id, result)
    }
}

/// Notable things that happened in a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The hellos were exchanged.
    Connected {
        /// The peer's feed epoch.
        peer_epoch: u128,
    },
    /// Everything in the local feed at the time was sent and acknowledged.
    CaughtUp,
    /// The peer sent changes it may not make, or asked for a document it may not read.
    Rejected {
        /// Namespace.
        ns: String,
        /// Document id.
        id: String,
        /// What was refused.
        reason: String,
    },
    /// The peer reported a refusal of ours.
    PeerError {
        /// Its code.
        code: ErrorCode,
        /// Its reason.
        reason: String,
    },
}

/// Counters of one session, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Sync messages sent.
    pub sync_sent: u64,
    /// Sync messages received.
    pub sync_received: u64,
    /// Automerge changes received from the peer and applied.
    pub changes_received: u64,
    /// Messages or changes refused because of grants.
    pub rejected: u64,
    /// Documents whose sync with the peer completed.
    pub docs_synced: u64,
}

#[derive(Default)]
struct DocSync {
    doc: Option<Arc<Automerge>>,
    state: Option<State>,
    loading: bool,
    applying: bool,
    /// A newer local version exists than the one loaded.
    stale: bool,
    inbox: VecDeque<automerge::sync::Message>,
    /// The feed position this document is being offered for.
    offered: Option<FeedSeq>,
    /// Waiting in the queue for room in flight.
    queued: bool,
    /// Sent ahead of its commit ([`Session::handle_early`]); kept until the peer answers.
    early: bool,
    /// The heads of the version being offered, from the feed.
    offered_heads: Vec<ChangeHash>,
}

impl DocSync {
    fn busy(&self) -> bool {
        self.loading || self.applying
    }
}

type DocKey = (Namespace, DocId);

/// One peer's sync session. See the module documentation.
///
/// Driving two sessions by hand, with no network and no store (both feeds are empty): the
/// driver's whole job is to carry out outputs and feed back their results.
///
/// ```
/// use tidesync::model::{Grants, NodeId};
/// use tidesync::store::FeedSeq;
/// use tidesync::sync::{Message, Output, PeerIdentity, Role, Session, SessionConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let side = |me: &str, role, peer: &str, peer_role| -> Result<Session, Box<dyn std::error::Error>> {
///     let cfg = SessionConfig::new(NodeId::new(me)?, role, 7);
///     let peer = PeerIdentity { node_id: NodeId::new(peer)?, role: peer_role, grants: Grants::everything() };
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
    peer: PeerIdentity,
    /// How far this node has durably received the peer's feed.
    record: Option<PeerRecord>,
    peer_hello: Option<Hello>,
    /// Every document the peer has, it got from or gave to this node: a document with no
    /// sync state stored for the peer is one it lacks (see [`Session::peer_lacks`]).
    peer_lacks_unshared: bool,
    outputs: VecDeque<Output>,
    /// The local feed has been read up to here.
    walked: FeedSeq,
    /// The local feed's last seq, as last told by the driver.
    local_last: FeedSeq,
    reading: bool,
    /// Documents to offer, waiting for room in flight.
    queue: VecDeque<DocKey>,
    docs: HashMap<DocKey, DocSync>,
    /// Unfinished offers by feed position; the lowest bounds what `Synced` can say.
    unfinished: BTreeMap<FeedSeq, DocKey>,
    in_flight: usize,
    /// Offered documents already current in memory, to continue without a load.
    ready: VecDeque<DocKey>,
    synced_sent: FeedSeq,
    caught_up: bool,
    stats: SessionStats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer.node_id)
            .field("walked", &self.walked)
            .field("in_flight", &self.in_flight)
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl Session {
    /// Starts a session with a peer whose certificate was verified as `peer`. `record` is
    /// what the store knows of the peer's feed; `local_last` the local feed's last seq.
    pub fn new(
        cfg: SessionConfig,
        peer: PeerIdentity,
        record: Option<PeerRecord>,
        local_last: FeedSeq,
    ) -> Self {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            node_id: cfg.node_id.to_string(),
            role: cfg.role,
            feed_epoch: cfg.feed_epoch,
            feed_last: local_last.0,
            resume: record.map(|r| Cursor {
                epoch: r.epoch,
                seq: r.cursor,
            }),
            subscriptions: cfg.subscriptions.clone(),
        };
        let mut s = Self {
            cfg,
            peer,
            record,
            peer_hello: None,
            peer_lacks_unshared: false,
            outputs: VecDeque::new(),
            walked: FeedSeq(0),
            local_last,
            reading: false,
            queue: VecDeque::new(),
            docs: HashMap::new(),
            unfinished: BTreeMap::new(),
            in_flight: 0,
            ready: VecDeque::new(),
            synced_sent: FeedSeq(0),
            caught_up: false,
            stats: SessionStats::default(),
        };
        s.outputs.push_back(Output::Send(Message::Hello(hello)));
        s
    }

    /// The next thing to do, if any. Call until `None` after every input.
    pub fn poll_output(&mut self) -> Option<Output> {
        if self.outputs.is_empty() {
            self.run_ready();
        }
        self.outputs.pop_front()
    }

    /// The peer's identity.
    pub fn peer(&self) -> &PeerIdentity {
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

    /// Whether the local feed was sent and acknowledged up to what was last known.
    pub fn is_caught_up(&self) -> bool {
        self.peer_hello.is_some() && self.lag() == 0
    }

    /// A frame from the peer. An error is fatal: send it to the peer and close.
    pub fn handle_message(&mut self, msg: Message) -> Result<(), ProtocolError> {
        match msg {
            Message::Hello(hello) => self.on_hello(hello),
            _ if self.peer_hello.is_none() => Err(ProtocolError::new(
                ErrorCode::Protocol,
                "the first message must be a hello",
            )),
            Message::Sync { ns, id, data } => self.on_sync(ns, id, &data),
            Message::Synced { seq } => {
                let epoch = self.peer_epoch();
                if self
                    .record
                    .is_none_or(|r| r.epoch != epoch || r.cursor < seq)
                {
                    let record = PeerRecord { epoch, cursor: seq };
                    self.record = Some(record);
                    self.outputs.push_back(Output::SaveCursor(record));
                }
                Ok(())
            }
            Message::Error { code, reason } => {
                self.event(Event::PeerError {
                    code,
                    reason: reason.clone(),
                });
                match code {
                    ErrorCode::Forbidden => Ok(()),
                    _ => Err(ProtocolError::new(code, format!("peer closed: {reason}"))),
                }
            }
        }
    }

    fn on_hello(&mut self, hello: Hello) -> Result<(), ProtocolError> {
        if self.peer_hello.is_some() {
            return Err(ProtocolError::new(ErrorCode::Protocol, "a second hello"));
        }
        if hello.version != PROTOCOL_VERSION {
            return Err(ProtocolError::version(hello.version));
        }
        if hello.node_id != self.peer.node_id.as_str() || hello.role != self.peer.role {
            return Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!(
                    "hello says {} ({}), the certificate says {} ({})",
                    hello.node_id,
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
        self.peer_lacks_unshared = self.knows_everything_of(&hello);
        self.walked = start;
        self.synced_sent = start;
        if self.record.is_some_and(|r| r.epoch != hello.feed_epoch) {
            let record = PeerRecord {
                epoch: hello.feed_epoch,
                cursor: 0,
            };
            self.record = Some(record);
            self.outputs.push_back(Output::SaveCursor(record));
        }
        let peer_epoch = hello.feed_epoch;
        self.peer_hello = Some(hello);
        self.event(Event::Connected { peer_epoch });
        self.read_more();
        self.check_caught_up();
        Ok(())
    }

    fn on_sync(&mut self, ns: String, id: String, data: &[u8]) -> Result<(), ProtocolError> {
        self.stats.sync_received += 1;
        let (Ok(n), Ok(d)) = (Namespace::new(ns.as_str()), DocId::new(id.as_str())) else {
            return Err(ProtocolError::new(
                ErrorCode::Protocol,
                format!("invalid document name {ns:?}/{id:?}"),
            ));
        };
        let message = automerge::sync::Message::decode(data).map_err(|e| {
            ProtocolError::new(
                ErrorCode::Protocol,
                format!("invalid sync message for {ns}/{id}: {e}"),
            )
        })?;
        if !self.peer.grants.can_read(&n) {
            self.reject(&ns, &id, "namespace not granted");
            return Ok(());
        }
        if !self.peer.grants.can_write(&n) && !message.changes.is_empty() {
            // Applied read-only below: the state advances, the changes are dropped.
            self.reject(&ns, &id, "namespace granted read-only; changes refused");
        }
        let key = (n, d);
        let entry = self.docs.entry(key.clone()).or_default();
        entry.inbox.push_back(message);
        if !entry.busy() {
            self.apply_next(&key);
        }
        Ok(())
    }

    fn reject(&mut self, ns: &str, id: &str, reason: &str) {
        self.stats.rejected += 1;
        self.outputs.push_back(Output::Send(Message::Error {
            code: ErrorCode::Forbidden,
            reason: format!("{ns}/{id}: {reason}"),
        }));
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
        let Some(message) = entry.inbox.pop_front() else {
            return;
        };
        entry.applying = true;
        self.outputs.push_back(Output::Apply(Box::new(Apply {
            ns: key.0.clone(),
            id: key.1.clone(),
            state: entry.state.take(),
            read_only,
            message,
        })));
    }

    /// The store committed the peer's message (or refused it: invalid Automerge data is a
    /// protocol error; other failures are internal errors, fatal to the session).
    pub fn handle_applied(
        &mut self,
        ns: Namespace,
        id: DocId,
        result: Result<SyncApplied, crate::StoreError>,
    ) -> Result<(), ProtocolError> {
        let key = (ns, id);
        let applied = match result {
            Ok(a) => a,
            Err(crate::StoreError::Model(e)) => {
                return Err(ProtocolError::new(
                    ErrorCode::Protocol,
                    format!("{}/{}: {e}", key.0, key.1),
                ))
            }
            Err(e) => return Err(ProtocolError::new(ErrorCode::Internal, e.to_string())),
        };
        let entry = self.docs.entry(key.clone()).or_default();
        entry.applying = false;
        entry.doc = Some(applied.doc);
        entry.state = Some(applied.state);
        self.resume(&key);
        Ok(())
    }

    /// The answer to [`Output::ReadFeed`]: entries after the asked position, and the local
    /// feed's last seq read before them.
    pub fn handle_feed(&mut self, entries: Vec<FeedEntry>, last: FeedSeq) {
        self.reading = false;
        self.local_last = self.local_last.max(last);
        let full = entries.len() >= self.cfg.feed_batch;
        for e in entries {
            self.walked = self.walked.max(e.seq);
            if self.wants(&e.ns) {
                let key = (e.ns, e.id);
                let entry = self.docs.entry(key.clone()).or_default();
                let in_flight = entry.offered.is_some() && !entry.queued;
                entry.offered_heads = e.heads;
                if let Some(old) = entry.offered.replace(e.seq) {
                    self.unfinished.remove(&old);
                } else {
                    entry.queued = true;
                    self.queue.push_back(key.clone());
                }
                self.unfinished.insert(e.seq, key.clone());
                if in_flight {
                    // Already offered: send the newer version too.
                    self.load(&key);
                }
            }
        }
        if !full {
            self.walked = self.walked.max(last);
        }
        self.pump();
        self.read_more();
        self.advance_synced();
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
    /// overlapping the local fsync instead of following it. It is only a hint: the feed
    /// walk after the commit still offers the document and decides what the peer has, so
    /// nothing here moves a cursor, and a commit that fails only means the peer got a
    /// change this node will get back from it. `persisted` reads the stored sync state
    /// when the session holds none. Returns whether a message was sent.
    pub fn handle_early<E>(
        &mut self,
        early: &EarlyDoc,
        persisted: impl FnOnce() -> Result<Option<State>, E>,
    ) -> bool {
        let (ns, doc) = (&early.ns, &early.doc);
        // During catch-up the feed walk is about to send it anyway.
        let live = self.peer_hello.is_some()
            && self.queue.is_empty()
            && self.in_flight < self.cfg.max_docs_in_flight;
        if !live || !self.wants(ns) {
            return false;
        }
        let read_only = !self.peer.grants.can_write(ns);
        let lacks = self.peer_lacks(early.stored_bytes);
        let key = (early.ns.clone(), early.id.clone());
        let entry = self.docs.entry(key.clone()).or_default();
        // Only move forward: an offer's doneness is judged against `entry.doc`, so it
        // must never be replaced by an older version.
        let newer = entry.doc.as_ref().is_none_or(|cur| {
            cur.get_heads()
                .iter()
                .all(|h| doc.get_change_by_hash(h).is_some())
        });
        if entry.busy() || !newer {
            return false;
        }
        if entry.state.is_none() {
            match persisted() {
                Ok(state) => entry.state = Some(start_state(state, lacks, read_only)),
                Err(_) => {
                    if entry.offered.is_none() && entry.inbox.is_empty() && !entry.early {
                        self.docs.remove(&key);
                    }
                    return false;
                }
            }
        }
        entry.doc = Some(doc.clone());
        let (Some(doc), Some(state)) = (&entry.doc, &mut entry.state) else {
            return false;
        };
        let Some(msg) = doc.generate_sync_message(state) else {
            return false;
        };
        entry.early = true;
        self.stats.sync_sent += 1;
        self.outputs.push_back(Output::Send(Message::Sync {
            ns: key.0.to_string(),
            id: key.1.to_string(),
            data: msg.encode(),
        }));
        true
    }

    /// The answer to [`Output::Load`]. `None` if the document does not exist.
    pub fn handle_loaded(&mut self, ns: Namespace, id: DocId, loaded: Option<LoadedDoc>) {
        let read_only = !self.peer.grants.can_write(&ns);
        let lacks = loaded
            .as_ref()
            .is_some_and(|l| self.peer_lacks(l.stored_bytes));
        let key = (ns, id);
        let entry = self.docs.entry(key.clone()).or_default();
        entry.loading = false;
        entry.stale = false;
        if let Some(l) = loaded {
            entry.doc = Some(l.doc);
            if entry.state.is_none() {
                entry.state = Some(start_state(l.state, lacks, read_only));
            }
        }
        self.resume(&key);
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
                .is_some_and(|r| r.epoch == hello.feed_epoch && r.cursor >= hello.feed_last);
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

    fn read_more(&mut self) {
        if self.peer_hello.is_some()
            && !self.reading
            && self.walked < self.local_last
            && self.queue.len() < self.cfg.feed_batch
        {
            self.reading = true;
            self.outputs.push_back(Output::ReadFeed {
                after: self.walked,
                limit: self.cfg.feed_batch,
            });
        }
    }

    /// Starts offers while there is room in flight.
    fn pump(&mut self) {
        while self.in_flight < self.cfg.max_docs_in_flight {
            let Some(key) = self.queue.pop_front() else {
                break;
            };
            if let Some(entry) = self.docs.get_mut(&key) {
                entry.queued = false;
            }
            self.in_flight += 1;
            self.load(&key);
        }
    }

    fn load(&mut self, key: &DocKey) {
        let entry = self.docs.entry(key.clone()).or_default();
        if entry.busy() {
            entry.stale = true;
            return;
        }
        entry.loading = true;
        // Already in memory at the offered version (typically sent early): no store read.
        let current = entry.state.is_some()
            && entry
                .doc
                .as_ref()
                .is_some_and(|d| same_heads(&d.get_heads(), &entry.offered_heads));
        if current {
            self.ready.push_back(key.clone());
        } else {
            self.outputs.push_back(Output::Load {
                ns: key.0.clone(),
                id: key.1.clone(),
            });
        }
    }

    /// Continues offers of documents found current in memory, as `handle_loaded` would.
    /// Run from `poll_output`, so a long queue is a loop, not a recursion.
    fn run_ready(&mut self) {
        while self.outputs.is_empty() {
            let Some(key) = self.ready.pop_front() else {
                return;
            };
            let Some(entry) = self.docs.get_mut(&key) else {
                continue;
            };
            entry.loading = false;
            self.resume(&key);
        }
    }

    /// A document's next step once it is neither loading nor applying: the peer's queued
    /// messages first, then a reload if a newer local version came meanwhile, else an offer.
    fn resume(&mut self, key: &DocKey) {
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        if !entry.inbox.is_empty() {
            self.apply_next(key);
        } else if entry.stale {
            entry.stale = false;
            self.load(key);
        } else {
            self.generate(key);
        }
    }

    /// Sends what the peer lacks of a document, then checks whether its offer is done.
    fn generate(&mut self, key: &DocKey) {
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        if let (Some(doc), Some(state)) = (&entry.doc, &mut entry.state) {
            if let Some(msg) = doc.generate_sync_message(state) {
                self.stats.sync_sent += 1;
                self.outputs.push_back(Output::Send(Message::Sync {
                    ns: key.0.to_string(),
                    id: key.1.to_string(),
                    data: msg.encode(),
                }));
            }
        }
        self.check_done(key);
    }

    /// An offer is done once the peer's acknowledged heads include ours.
    fn check_done(&mut self, key: &DocKey) {
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        let done = match (&entry.doc, &entry.state) {
            (Some(doc), Some(state)) => heads_known(&doc.get_heads(), state),
            _ => entry.doc.is_none() && !entry.busy(),
        };
        if done && !entry.busy() {
            if let Some(seq) = entry.offered.take() {
                self.unfinished.remove(&seq);
                self.in_flight = self.in_flight.saturating_sub(1);
                self.stats.docs_synced += 1;
            }
        }
        if done {
            entry.early = false;
        }
        if entry.offered.is_none() && !entry.busy() && entry.inbox.is_empty() && !entry.early {
            // Forget it; the persisted state is enough to resume.
            self.docs.remove(key);
        }
        self.pump();
        self.read_more();
        self.advance_synced();
    }

    fn synced_through(&self) -> FeedSeq {
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

/// The state a document's sync with the peer starts from: the persisted one; else, when
/// the peer lacks the document, "the peer has nothing", so that Automerge's first message
/// carries the whole document (a round trip and two messages saved), or else a fresh state,
/// whose first message announces our heads and asks what the peer has. Read-only where the
/// peer may not write: we neither apply nor ask for its changes, and tell it so.
fn start_state(persisted: Option<State>, peer_lacks: bool, read_only: bool) -> State {
    let mut state = persisted.unwrap_or_else(|| {
        if peer_lacks {
            warm_sync_state(State::new())
        } else {
            State::new()
        }
    });
    state.read_only = read_only;
    state
}

/// Whether every one of `ours` is among the heads the peer last acknowledged.
fn heads_known(ours: &[ChangeHash], state: &State) -> bool {
    state
        .their_heads
        .as_ref()
        .is_some_and(|theirs| ours.iter().all(|h| theirs.contains(h)))
}
