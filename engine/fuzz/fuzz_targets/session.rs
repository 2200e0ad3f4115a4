//! One `Session` fed an arbitrary sequence of inputs, sans-IO, like quinn's `streams`
//! target: frames (arbitrary bytes that decode, or hellos), feed movements, early notices,
//! and every output answered as a driver would, with an in-memory document per id. The
//! session must never panic, and its outputs must keep its invariants: at most one apply
//! per document at a time, one cursor save at a time, `Synced` never going backwards, and
//! no sync message while the driver has said there is no room.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arbitrary::Arbitrary;
use automerge::sync::{State, SyncDoc};
use automerge::transaction::Transactable;
use automerge::Automerge;
use libfuzzer_sys::fuzz_target;
use tidesync_core::model::{
    DocId, FeedEntry, FeedSeq, Grant, Grants, Identity, Namespace, NodeId, NsPattern, Role,
};
use tidesync_core::sync::{
    Applied, EarlyDoc, Hello, Message, Output, Session, SessionConfig, PROTOCOL_VERSION,
};

#[derive(Arbitrary, Debug)]
enum Op {
    /// The peer's hello, possibly lying or repeated.
    Hello {
        honest: bool,
        resume: Option<u64>,
        feed_last: u64,
    },
    /// A frame of arbitrary bytes.
    Frame(Vec<u8>),
    /// A sync message for one of four documents, from arbitrary bytes.
    Sync {
        doc: u8,
        ro_ns: bool,
        data: Vec<u8>,
    },
    /// A well-formed sync message from the peer's copy of a document.
    PeerSync {
        doc: u8,
    },
    /// `Synced` or `Error` from the peer.
    Synced(u64),
    Error {
        fatal: bool,
        reason: String,
    },
    /// A local write to a document, committed: the feed moves.
    Write {
        doc: u8,
        early: bool,
    },
    /// The driver's send queue filled up or drained.
    Room(bool),
    /// The cursor save that is out, if any, committed.
    CursorSaved,
}

const IDS: [&str; 4] = ["a", "b", "c", "d"];

struct Harness {
    session: Session,
    /// This node's documents and feed.
    docs: HashMap<(String, String), Arc<Automerge>>,
    feed: Vec<FeedEntry>,
    /// The peer's copies, for well-formed messages.
    peer_docs: HashMap<String, (Automerge, State)>,
    applying: HashSet<(String, String)>,
    synced: u64,
    /// The local feed's last seq.
    last: u64,
    /// What the driver last told the session about room to send.
    room: bool,
    /// A cursor save is out.
    saving: bool,
}

fn key(ns: &Namespace, id: &DocId) -> (String, String) {
    (ns.to_string(), id.to_string())
}

impl Harness {
    /// Carries out the outputs; false when the session ended (the store refused an apply).
    fn drive(&mut self) -> bool {
        let mut steps = 0;
        while let Some(out) = self.session.poll_output() {
            steps += 1;
            assert!(steps < 100_000, "the session keeps asking");
            match out {
                Output::Send(Message::Synced { seq }) => {
                    assert!(
                        seq > self.synced,
                        "Synced went from {} to {seq}",
                        self.synced
                    );
                    self.synced = seq;
                }
                Output::Send(Message::Sync { .. } | Message::SyncAhead { .. }) => {
                    assert!(self.room, "a sync message without room");
                }
                Output::SaveCursor(_) => {
                    assert!(!self.saving, "two cursor saves at once");
                    self.saving = true;
                }
                // No audits are started here; one the peer starts is answered empty.
                Output::Send(_) | Output::Event(_) | Output::LoadAuditItems { .. } => {}
                Output::ReadFeed { after, limit } => {
                    let entries: Vec<FeedEntry> = self
                        .feed
                        .iter()
                        .filter(|e| e.seq > after)
                        .take(limit)
                        .cloned()
                        .collect();
                    self.session.handle_feed(entries, FeedSeq(self.last));
                }
                Output::Load { ns, id } => {
                    let loaded =
                        self.docs
                            .get(&key(&ns, &id))
                            .map(|d| tidesync_core::sync::LoadedDoc {
                                doc: d.clone(),
                                state: None,
                                stored_bytes: 100,
                            });
                    self.session.handle_loaded(ns, id, loaded);
                }
                Output::LoadSyncState { ns, id } => self.session.handle_sync_state(ns, id, None),
                Output::Apply(apply) => {
                    let k = key(&apply.ns, &apply.id);
                    assert!(self.applying.insert(k.clone()), "two applies for {k:?}");
                    let mut doc = self
                        .docs
                        .get(&k)
                        .map_or_else(Automerge::new, |d| (**d).clone());
                    let mut state = apply.state.unwrap_or_default();
                    state.read_only = apply.read_only;
                    let before = doc.get_heads();
                    if doc.receive_sync_message(&mut state, apply.message).is_err() {
                        // The store refuses it; the driver ends the session.
                        return false;
                    }
                    let changes_applied = doc.get_changes(&before).len() as u64;
                    let doc = Arc::new(doc);
                    self.docs.insert(k.clone(), doc.clone());
                    self.applying.remove(&k);
                    let applied = Applied {
                        state,
                        doc,
                        changes_applied,
                    };
                    self.session.handle_applied(apply.ns, apply.id, applied);
                }
            }
        }
        true
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let me = NodeId::new("hub-1").expect("id");
    let peer = Identity {
        node_id: NodeId::new("edge-1").expect("id"),
        role: Role::Edge,
        grants: Grants::new(vec![
            "rw=rw".parse::<Grant>().expect("grant"),
            "ro=ro".parse::<Grant>().expect("grant"),
        ]),
    };
    let mut cfg = SessionConfig::new(me, Role::Hub, 1);
    cfg.max_docs_in_flight = 2;
    cfg.feed_batch = 3;
    let mut h = Harness {
        session: Session::new(cfg, peer, None, FeedSeq(0)),
        docs: HashMap::new(),
        feed: Vec::new(),
        peer_docs: HashMap::new(),
        applying: HashSet::new(),
        synced: 0,
        last: 0,
        room: true,
        saving: false,
    };
    h.drive();
    for op in ops.into_iter().take(256) {
        let result = match op {
            Op::Hello {
                honest,
                resume,
                feed_last,
            } => h.session.handle_message(Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_id: if honest { "edge-1" } else { "edge-2" }.into(),
                role: Role::Edge,
                feed_epoch: 2,
                feed_last,
                resume: resume.map(|seq| tidesync_core::model::Cursor { epoch: 1, seq }),
                subscriptions: vec![NsPattern::all()],
            })),
            Op::Frame(bytes) => match Message::decode(&bytes) {
                Ok(m) => h.session.handle_message(m),
                Err(_) => Ok(()),
            },
            Op::Sync { doc, ro_ns, data } => h.session.handle_message(Message::Sync {
                ns: if ro_ns { "ro" } else { "rw" }.into(),
                id: IDS[usize::from(doc % 4)].into(),
                data,
            }),
            Op::PeerSync { doc } => {
                let id = IDS[usize::from(doc % 4)];
                let (d, s) = h
                    .peer_docs
                    .entry(id.to_owned())
                    .or_insert_with(|| (Automerge::new(), State::new()));
                let n = d.get_heads().len() as i64;
                let mut tx = d.transaction();
                let _ = tx.put(automerge::ROOT, "peer", n);
                tx.commit();
                match d.generate_sync_message(s) {
                    Some(m) => h.session.handle_message(Message::Sync {
                        ns: "rw".into(),
                        id: id.into(),
                        data: m.encode(),
                    }),
                    None => Ok(()),
                }
            }
            Op::Synced(seq) => h.session.handle_message(Message::Synced { seq }),
            Op::Room(room) => {
                h.room = room;
                h.session.set_can_send(room);
                Ok(())
            }
            Op::CursorSaved => {
                if h.saving {
                    h.saving = false;
                    h.session.handle_cursor_saved();
                }
                Ok(())
            }
            Op::Error { fatal, reason } => h.session.handle_message(Message::Error {
                code: if fatal {
                    tidesync_core::sync::ErrorCode::Protocol
                } else {
                    tidesync_core::sync::ErrorCode::Forbidden
                },
                reason,
            }),
            Op::Write { doc, early } => {
                let ns = Namespace::new("rw").expect("ns");
                let id = DocId::new(IDS[usize::from(doc % 4)]).expect("id");
                let k = key(&ns, &id);
                if h.applying.contains(&k) {
                    continue;
                }
                let mut d = h
                    .docs
                    .get(&k)
                    .map_or_else(Automerge::new, |d| (**d).clone());
                let mut tx = d.transaction();
                let _ = tx.put(automerge::ROOT, "local", h.feed.len() as i64);
                tx.commit();
                let d = Arc::new(d);
                if early {
                    h.session.handle_early(&EarlyDoc {
                        ns: ns.clone(),
                        id: id.clone(),
                        doc: d.clone(),
                        stored_bytes: 100,
                    });
                    if !h.drive() {
                        return;
                    }
                }
                h.docs.insert(k, d.clone());
                h.feed.retain(|e| !(e.ns == ns && e.id == id));
                h.last += 1;
                let seq = FeedSeq(h.last);
                h.feed.push(FeedEntry {
                    seq,
                    ns,
                    id,
                    heads: d.get_heads(),
                    deleted: false,
                });
                h.session.handle_feed_advanced(seq);
                Ok(())
            }
        };
        // A protocol error, or a refused apply, ends the session.
        if result.is_err() || !h.drive() {
            return;
        }
    }
});
