//! Two sessions linked by hand over real stores: the driver's job done step by step, so a
//! test can count, drop, delay or replay frames. Outputs are carried out by the node's own
//! executor (`tidesync::net::exec`), with writes awaited in turn.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::sync::Arc;

use tidesync::model::{Grants, Identity, NodeId, Role};
use tidesync::net::exec::{Exec, ExecError, Outbox, Writes};
use tidesync::net::PeerCounters;
use tidesync::store::{Store, StoreConfig};
use tidesync::sync::{EarlyDoc, Message, Session, SessionConfig};
use tokio::sync::broadcast;

use super::temp_store;

/// One end of a link: a store, its session with the other end, and its early notices.
pub struct End {
    pub peer: &'static str,
    pub peer_role: Role,
    pub store: Store,
    pub session: Session,
    pub early: broadcast::Receiver<Arc<[EarlyDoc]>>,
    /// Frames the session produced and the test has not taken yet.
    outbox: Vec<Message>,
    counters: PeerCounters,
    cfg: SessionConfig,
    _dir: tempfile::TempDir,
}

fn identity((peer, role): (&'static str, Role)) -> Identity {
    Identity {
        node_id: NodeId::new(peer).unwrap(),
        role,
        grants: Grants::everything(),
    }
}

impl End {
    /// `name`, a hub, linked to the hub `peer`.
    pub fn new(name: &'static str, peer: &'static str) -> Self {
        Self::with_roles((name, Role::Hub), (peer, Role::Hub))
    }

    /// `me` linked to `peer`, each a name and a role.
    pub fn with_roles(me: (&'static str, Role), peer: (&'static str, Role)) -> Self {
        let (store, dir) = temp_store(StoreConfig::default());
        let cfg = SessionConfig::new(NodeId::new(me.0).unwrap(), me.1, store.feed_epoch());
        Self {
            peer: peer.0,
            peer_role: peer.1,
            session: Session::new(cfg.clone(), identity(peer), None, store.last_seq()),
            early: store.subscribe_early(),
            store,
            outbox: Vec::new(),
            counters: PeerCounters::default(),
            cfg,
            _dir: dir,
        }
    }

    /// A new session with the same peer, as after a reconnect, from what the store keeps;
    /// `tune` adjusts its settings.
    pub fn reconnect(&mut self, tune: impl FnOnce(&mut SessionConfig)) {
        let mut cfg = self.cfg.clone();
        tune(&mut cfg);
        let peer = NodeId::new(self.peer).unwrap();
        let record = self.store.peer_cursor(&peer).unwrap();
        self.session = Session::new(
            cfg,
            identity((self.peer, self.peer_role)),
            record,
            self.store.last_seq(),
        );
    }

    /// Carries out the session's outputs; returns the frames for the peer.
    pub async fn drive(&mut self) -> Vec<Message> {
        self.execute().await;
        std::mem::take(&mut self.outbox)
    }

    /// Carries out the session's outputs, keeping the frames for [`End::drive`].
    async fn execute(&mut self) {
        let exec = Exec {
            store: &self.store,
            counters: &self.counters,
            replicas: None,
        };
        let mut frames = Frames(&mut self.outbox);
        exec.drain(&mut self.session, &mut frames, &mut Writes::Inline)
            .await
            .unwrap();
    }

    /// Every early notice received so far.
    pub fn early_notices(&mut self) -> Vec<Arc<[EarlyDoc]>> {
        let mut all = Vec::new();
        while let Ok(docs) = self.early.try_recv() {
            all.push(docs);
        }
        all
    }

    /// Hands a notice to the session, as the driver does, and carries out what it asks
    /// (the peers' sync states); returns how many documents went out early. Their frames
    /// wait for [`End::drive`].
    pub async fn push_early(&mut self, docs: &[EarlyDoc]) -> usize {
        let before = self.session.stats().early_sent;
        for d in docs {
            self.session.handle_early(d);
        }
        self.execute().await;
        (self.session.stats().early_sent - before) as usize
    }

    /// Takes a frame from the peer, as the driver does; returns the frames in reply.
    pub async fn receive(&mut self, m: Message) -> Vec<Message> {
        self.session.handle_message(m).unwrap();
        let mut replies = self.drive().await;
        self.feed_moved();
        replies.extend(self.drive().await);
        replies
    }

    pub fn feed_moved(&mut self) {
        let last = self.store.last_seq();
        self.session.handle_feed_advanced(last);
    }
}

/// The test's outbox: frames kept in order.
struct Frames<'a>(&'a mut Vec<Message>);

impl Outbox for Frames<'_> {
    async fn send(&mut self, msg: Message) -> Result<(), ExecError> {
        self.0.push(msg);
        Ok(())
    }
}

/// One `Sync` frame as it crossed: the document and whether it carried changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncFrame {
    pub id: String,
    pub changes: bool,
}

/// The `Sync` frames each side sent during an exchange, in order.
#[derive(Debug, Default)]
pub struct Traffic {
    pub from_a: Vec<SyncFrame>,
    pub from_b: Vec<SyncFrame>,
}

impl Traffic {
    /// The frames `from` sent for one document.
    pub fn for_doc<'t>(from: &'t [SyncFrame], id: &str) -> Vec<&'t SyncFrame> {
        from.iter().filter(|f| f.id == id).collect()
    }
}

fn sync_frame(m: &Message) -> Option<SyncFrame> {
    match m {
        Message::Sync { id, data, .. } | Message::SyncAhead { id, data, .. } => Some(SyncFrame {
            id: id.clone(),
            changes: !automerge::sync::Message::decode(data)
                .unwrap()
                .changes
                .is_empty(),
        }),
        _ => None,
    }
}

/// Delivers frames both ways until both sides are quiet; returns the `Sync` frames that
/// carried changes, by sender.
pub async fn exchange(a: &mut End, b: &mut End, to_b: VecDeque<Message>) -> (usize, usize) {
    let t = exchange_traffic(a, b, to_b).await;
    let carried = |fs: &[SyncFrame]| fs.iter().filter(|f| f.changes).count();
    (carried(&t.from_a), carried(&t.from_b))
}

/// Delivers frames both ways, starting with `to_b` and whatever `a` has to send, until
/// both sides are quiet; returns every `Sync` frame by sender.
pub async fn exchange_traffic(a: &mut End, b: &mut End, mut to_b: VecDeque<Message>) -> Traffic {
    let mut traffic = Traffic::default();
    let mut to_a: VecDeque<Message> = VecDeque::new();
    to_b.extend(a.drive().await);
    loop {
        if let Some(m) = to_b.pop_front() {
            traffic.from_a.extend(sync_frame(&m));
            to_a.extend(b.receive(m).await);
        } else if let Some(m) = to_a.pop_front() {
            traffic.from_b.extend(sync_frame(&m));
            to_b.extend(a.receive(m).await);
        } else {
            return traffic;
        }
    }
}

pub async fn connected() -> (End, End) {
    let (mut a, mut b) = (End::new("a", "b"), End::new("b", "a"));
    exchange(&mut a, &mut b, VecDeque::new()).await;
    let (to_a, to_b) = (b.drive().await, a.drive().await);
    assert!(to_a.is_empty() && to_b.is_empty());
    assert!(a.session.is_caught_up() && b.session.is_caught_up());
    (a, b)
}
