//! The Automerge sync state a document's exchange with a peer starts from.
//!
//! Automerge's `sync::State::encode()` keeps only the shared heads. Reloaded as is, the
//! next exchange would spend a round trip re-learning what the peer has. A warm start
//! instead takes the shared heads as the peer's last known heads and last "have": the
//! first message then carries every change made since, and a document both sides already
//! share produces no message at all.

use automerge::sync::{Capability, Have, State};
use automerge::ChangeHash;

/// Treats the shared heads as what the peer last said it had (see the module doc); from
/// an empty state, a peer that has nothing.
pub fn warm(mut state: State) -> State {
    let shared = state.shared_heads.clone();
    state.their_heads = Some(shared.clone());
    state.their_need = Some(Vec::new());
    state.their_have = Some(vec![Have {
        last_sync: shared.clone(),
        bloom: Default::default(),
    }]);
    state.last_sent_heads = shared;
    state.have_responded = true;
    // Every peer speaks this protocol version, hence this Automerge: it takes whole
    // documents in one compressed message and understands sync resets. Automerge would
    // otherwise learn it from the peer's first message, and until then send changes one by
    // one, uncompressed.
    state.their_capabilities = Some(vec![Capability::MessageV2, Capability::SyncReset]);
    state
}

/// The state a document's sync with the peer starts from: the persisted one (already
/// warm-started by the store); else, when the peer lacks the document, "the peer has
/// nothing", so that Automerge's first message carries the whole document (a round trip
/// and two messages saved), or else a fresh state, whose first message announces our heads
/// and asks what the peer has. Read-only where the peer may not write: we neither apply
/// nor ask for its changes, and tell it so.
pub(crate) fn start_state(persisted: Option<State>, peer_lacks: bool, read_only: bool) -> State {
    let mut state = persisted.unwrap_or_else(|| {
        if peer_lacks {
            warm(State::new())
        } else {
            State::new()
        }
    });
    state.read_only = read_only;
    state
}

/// Whether every one of `ours` is among the heads the peer last acknowledged.
pub(crate) fn heads_known(ours: &[ChangeHash], state: &State) -> bool {
    state
        .their_heads
        .as_ref()
        .is_some_and(|theirs| ours.iter().all(|h| theirs.contains(h)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ROOT};

    fn synced_pair() -> (Automerge, Automerge, State) {
        let mut a = Automerge::new();
        let mut tx = a.transaction();
        tx.put(ROOT, "x", 1).expect("put");
        tx.commit();
        let mut b = Automerge::new();
        let (mut sa, mut sb) = (State::new(), State::new());
        for _ in 0..10 {
            if let Some(m) = a.generate_sync_message(&mut sa) {
                b.receive_sync_message(&mut sb, m).expect("b receives");
            }
            if let Some(m) = b.generate_sync_message(&mut sb) {
                a.receive_sync_message(&mut sa, m).expect("a receives");
            }
        }
        assert_eq!(a.get_heads(), b.get_heads());
        (a, b, sa)
    }

    #[test]
    fn warm_state_sends_nothing_when_in_sync_and_changes_at_once_otherwise() {
        let (mut a, mut b, sa) = synced_pair();
        let stored = sa.encode();
        let mut warm_state = warm(State::decode(&stored).expect("decodes"));
        assert!(
            a.generate_sync_message(&mut warm_state).is_none(),
            "in sync: no message"
        );

        let mut tx = a.transaction();
        tx.put(ROOT, "y", 2).expect("put");
        tx.commit();
        let mut warm_state = warm(State::decode(&stored).expect("decodes"));
        let msg = a
            .generate_sync_message(&mut warm_state)
            .expect("a change to send");
        assert_eq!(msg.changes.len(), 1, "the first message carries the change");
        b.receive_sync_message(&mut State::new(), msg)
            .expect("b receives");
        assert_eq!(a.get_heads(), b.get_heads());
    }
}
