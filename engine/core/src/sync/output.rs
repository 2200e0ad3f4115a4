//! What a session asks of its driver. Every output that needs an answer names the input
//! that takes it; nothing is answered inside the session.

use automerge::sync::State;

use super::message::{ErrorCode, Message};
use crate::model::{Cursor, DocId, FeedSeq, Namespace};

/// Something the driver must do for the session.
#[derive(Debug)]
pub enum Output {
    /// Send this message to the peer.
    Send(Message),
    /// Answer with `Session::handle_feed`: up to `limit` local feed entries after `after`.
    ReadFeed {
        /// Read entries after this seq.
        after: FeedSeq,
        /// At most this many.
        limit: usize,
    },
    /// Answer with `Session::handle_loaded`: the committed document and the peer's
    /// persisted sync state.
    Load {
        /// Namespace.
        ns: Namespace,
        /// Document id.
        id: DocId,
    },
    /// Answer with `Session::handle_sync_state`: the peer's persisted sync state only, for
    /// a document an early notice brought (its new version is not committed yet).
    LoadSyncState {
        /// Namespace.
        ns: Namespace,
        /// Document id.
        id: DocId,
    },
    /// Apply the peer's message in the store and commit it, then answer with
    /// `Session::handle_applied`.
    Apply(Box<Apply>),
    /// Persist how far this node has durably received the peer's feed.
    SaveCursor(Cursor),
    /// Answer with `Session::handle_audit_items`: a `sync::audit::Reconciler` over every
    /// document this node holds in the scope, with its heads, for an audit.
    LoadAuditItems {
        /// Whether the audit is the one this node started (else the peer's).
        starter: bool,
        /// Which documents, and the salt of their hashes.
        scope: crate::sync::session::AuditScope,
    },
    /// Something worth telling the node.
    Event(Event),
}

/// A peer's sync message to apply to one document and commit, with the sync state that
/// results (see [`Output::Apply`]).
#[derive(Debug)]
pub struct Apply {
    /// Namespace.
    pub ns: Namespace,
    /// Document id.
    pub id: DocId,
    /// The in-memory sync state, if any (else the persisted one is used).
    pub state: Option<State>,
    /// Ignore changes in the message: the peer may only read this namespace.
    pub read_only: bool,
    /// The peer's message.
    pub message: automerge::sync::Message,
    /// The peer had not committed the version it sent ([`crate::sync::Message::SyncAhead`]):
    /// keep the persisted sync state as it was, so that a restart never takes the heads
    /// for shared before the peer has them for sure.
    pub provisional: bool,
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
    /// The peer's message named heads of a version it has committed (not a
    /// [`crate::sync::Message::SyncAhead`]): it durably holds them. What writes waiting
    /// for replicas count.
    PeerHolds {
        /// Namespace.
        ns: Namespace,
        /// Document id.
        id: DocId,
        /// The peer's heads.
        heads: Vec<automerge::ChangeHash>,
    },
    /// An audit this node started is over: what it found and repaired.
    AuditDone(crate::sync::session::AuditReport),
    /// An audit this node started could not run (the peer refused it).
    AuditFailed {
        /// Why.
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
