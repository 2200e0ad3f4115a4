//! Persisted per-(peer, document) Automerge sync state: `epoch` (16 bytes LE) of the peer's
//! feed, then `automerge::sync::State::encode()`, which keeps only the shared heads. It is
//! read back warm-started (see `tidesync_core::sync::state`).

use automerge::sync::State;

use crate::sync::warm_sync_state;

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
    State::decode(rest).ok().map(warm_sync_state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::ChangeHash;

    #[test]
    fn a_state_of_another_epoch_is_not_used() {
        let mut state = State::new();
        state.shared_heads = vec![ChangeHash([7; 32])];
        let stored = encode(7, &state);
        assert!(decode(&stored, 8).is_none(), "another epoch starts over");
        let warm = decode(&stored, 7).expect("decodes");
        assert_eq!(warm.shared_heads, state.shared_heads);
        assert_eq!(
            warm.their_heads,
            Some(state.shared_heads),
            "read back warm-started"
        );
        assert!(decode(&stored[..10], 7).is_none(), "truncated");
    }
}
