//! Persisted per-(peer, document) Automerge sync state, and its warm start.
//!
//! Automerge's `sync::State::encode()` keeps only the shared heads. Reloaded as is, the next
//! exchange would spend a round trip re-learning what the peer has. A warm start instead
//! takes the shared heads as the peer's last known heads and last "have": the first
//! message then carries every change made since, and a document both sides already share
//! produces no message at all.

use automerge::sync::{Capability, Have, State};

/// `epoch` (16 bytes LE) followed by the encoded state.
pub(crate) fn encode(peer_epoch: u128, state: &State) -> Vec<u8> {
    let mut out = peer_epoch.to_le_bytes().to_vec();
    out.extend_from_slice(&state.encode());
    out
}

/// The state stored for a peer whose feed epoch is `peer_epoch`, warm-started. `None` if
/// nothing usable is stored (another epoch means the peer's database was recreated).
pub(crate) fn decode(bytes: &[u8], peer_epoch: u128) -> Option<State> {
    let (epoch, rest) = bytes.split_at_checked(16)?;
    if u128::from_le_bytes(epoch.try_into().ok()?) != peer_epoch {
        return None;
    }
    State::decode(rest).ok().map(warm)
}

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
        let stored = encode(7, &sa);
        assert!(decode(&stored, 8).is_none(), "another epoch starts over");
        let mut warm = decode(&stored, 7).expect("decodes");
        assert!(
            a.generate_sync_message(&mut warm).is_none(),
            "in sync: no message"
        );

        let mut tx = a.transaction();
        tx.put(ROOT, "y", 2).expect("put");
        tx.commit();
        let mut warm = decode(&stored, 7).expect("decodes");
        let msg = a
            .generate_sync_message(&mut warm)
            .expect("a change to send");
        assert_eq!(msg.changes.len(), 1, "the first message carries the change");
        b.receive_sync_message(&mut State::new(), msg)
            .expect("b receives");
        assert_eq!(a.get_heads(), b.get_heads());
    }
}
