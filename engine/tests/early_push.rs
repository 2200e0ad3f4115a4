//! Early push: a session sends a local change while its batch is still committing, using
//! the store's early notice. It must save the commit's worth of latency without costing
//! bandwidth twice, and a late (stale) notice must never let the session believe the peer
//! has a version it lacks.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;
use std::sync::Arc;

use common::{id, ns, temp_store};
use serde_json::json;
use tidesync::model::{Grants, NodeId};
use tidesync::store::{EarlyDoc, Store, StoreConfig};
use tidesync::sync::{Apply, Message, Output, PeerIdentity, Role, Session, SessionConfig};
use tokio::sync::broadcast;

/// One end of a link: a store, its session with the other end, and its early notices.
struct End {
    peer: &'static str,
    store: Store,
    session: Session,
    early: broadcast::Receiver<Arc<[EarlyDoc]>>,
    _dir: tempfile::TempDir,
}

impl End {
    fn new(name: &'static str, peer: &'static str) -> Self {
        let (store, dir) = temp_store(StoreConfig::default());
        let cfg = SessionConfig::new(NodeId::new(name).unwrap(), Role::Hub, store.feed_epoch());
        let identity = PeerIdentity {
            node_id: NodeId::new(peer).unwrap(),
            role: Role::Hub,
            grants: Grants::everything(),
        };
        let session = Session::new(cfg, identity, None, store.last_seq());
        let early = store.subscribe_early();
        Self {
            peer,
            store,
            session,
            early,
            _dir: dir,
        }
    }

    /// Carries out the session's outputs; returns the frames for the peer.
    async fn drive(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(o) = self.session.poll_output() {
            let peer = self.session.sync_peer();
            match o {
                Output::Send(m) => out.push(m),
                Output::ReadFeed { after, limit } => {
                    let last = self.store.last_seq();
                    let entries = self.store.changes_since(after, limit).unwrap();
                    self.session.handle_feed(entries, last);
                }
                Output::Load { ns, id } => {
                    let loaded = self.store.load_for_sync(&ns, &id, &peer).unwrap();
                    self.session.handle_loaded(ns, id, loaded);
                }
                Output::Apply(apply) => {
                    let Apply {
                        ns,
                        id,
                        state,
                        read_only,
                        message,
                    } = *apply;
                    let r = self
                        .store
                        .apply_sync(&ns, &id, &peer, state, read_only, message)
                        .await;
                    self.session.handle_applied(ns, id, r).unwrap();
                }
                Output::SaveCursor(record) => {
                    let peer = NodeId::new(self.peer).unwrap();
                    self.store.set_peer_record(&peer, record).await.unwrap();
                }
                Output::Event(_) => {}
            }
        }
        out
    }

    /// Every early notice received so far.
    fn early_notices(&mut self) -> Vec<Arc<[EarlyDoc]>> {
        let mut all = Vec::new();
        while let Ok(docs) = self.early.try_recv() {
            all.push(docs);
        }
        all
    }

    /// Hands a notice to the session; returns how many documents went out early.
    fn push_early(&mut self, docs: &[EarlyDoc]) -> usize {
        let peer = self.session.sync_peer();
        let store = self.store.clone();
        docs.iter()
            .filter(|d| {
                self.session
                    .handle_early(d.ns.clone(), d.id.clone(), d.doc.clone(), || {
                        store.sync_state(&peer, d.key)
                    })
            })
            .count()
    }

    /// Takes a frame from the peer, as the driver does; returns the frames in reply.
    async fn receive(&mut self, m: Message) -> Vec<Message> {
        self.session.handle_message(m).unwrap();
        let mut replies = self.drive().await;
        self.feed_moved();
        replies.extend(self.drive().await);
        replies
    }

    fn feed_moved(&mut self) {
        let last = self.store.last_seq();
        self.session.handle_feed_advanced(last);
    }
}

/// Delivers frames both ways until both sides are quiet; returns the `Sync` frames that
/// carried changes, by sender.
async fn exchange(a: &mut End, b: &mut End, mut to_b: VecDeque<Message>) -> (usize, usize) {
    let (mut from_a, mut from_b) = (0, 0);
    let mut to_a: VecDeque<Message> = VecDeque::new();
    let carries = |m: &Message| match m {
        Message::Sync { data, .. } => !automerge::sync::Message::decode(data)
            .unwrap()
            .changes
            .is_empty(),
        _ => false,
    };
    to_b.extend(a.drive().await);
    loop {
        if let Some(m) = to_b.pop_front() {
            from_a += usize::from(carries(&m));
            to_a.extend(b.receive(m).await);
        } else if let Some(m) = to_a.pop_front() {
            from_b += usize::from(carries(&m));
            to_b.extend(a.receive(m).await);
        } else {
            return (from_a, from_b);
        }
    }
}

async fn connected() -> (End, End) {
    let (mut a, mut b) = (End::new("a", "b"), End::new("b", "a"));
    exchange(&mut a, &mut b, VecDeque::new()).await;
    let (to_a, to_b) = (b.drive().await, a.drive().await);
    assert!(to_a.is_empty() && to_b.is_empty());
    assert!(a.session.is_caught_up() && b.session.is_caught_up());
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_push_arrives_once_and_the_feed_walk_adds_no_bytes() {
    let (mut a, mut b) = connected().await;
    let (n, d) = (ns("cfg"), id("site"));
    a.store.put(&n, &d, json!({"v": 1}), None).await.unwrap();
    // Let it settle so the document is shared, then write again: the live case.
    a.feed_moved();
    exchange(&mut a, &mut b, VecDeque::new()).await;
    a.early_notices();
    assert_eq!(b.store.get(&n, &d).unwrap().unwrap().content["v"], 1);

    a.store.patch(&n, &d, json!({"v": 2}), None).await.unwrap();
    let notices = a.early_notices();
    assert_eq!(notices.len(), 1);
    assert_eq!(
        a.push_early(&notices[0]),
        1,
        "the live document goes out early"
    );
    // The early frame is delivered before A's session even hears of the commit.
    let early_frames: VecDeque<Message> = a.drive().await.into();
    a.feed_moved();
    let (from_a, _) = exchange(&mut a, &mut b, early_frames).await;
    assert_eq!(
        from_a, 1,
        "the change crossed once: the feed walk did not resend it"
    );
    assert_eq!(b.store.get(&n, &d).unwrap().unwrap().content["v"], 2);
    assert!(a.session.is_caught_up(), "lag {}", a.session.lag());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_early_notice_never_marks_a_newer_version_as_delivered() {
    let (mut a, mut b) = connected().await;
    let (n, d) = (ns("cfg"), id("site"));
    a.store.put(&n, &d, json!({"v": 1}), None).await.unwrap();
    let v1 = a.early_notices();
    a.feed_moved();
    exchange(&mut a, &mut b, VecDeque::new()).await;

    // v2 is offered by the feed walk, and its frame is lost on the way.
    a.store.patch(&n, &d, json!({"v": 2}), None).await.unwrap();
    a.early_notices();
    a.feed_moved();
    let lost = a.drive().await;
    assert!(!lost.is_empty());
    assert!(!a.session.is_caught_up());

    // A late notice of v1 must not replace v2 as what the peer has to acknowledge.
    assert_eq!(a.push_early(&v1[0]), 0);
    let (_, _) = exchange(&mut a, &mut b, VecDeque::new()).await;
    assert!(
        !a.session.is_caught_up(),
        "the session claims B has v2, which B never received"
    );
    assert_eq!(b.store.get(&n, &d).unwrap().unwrap().content["v"], 1);
}
