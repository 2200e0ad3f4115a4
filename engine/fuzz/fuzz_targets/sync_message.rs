//! A peer's Automerge sync message, as a session receives it: decoded, validated, and if
//! valid received into a document that then generates its reply. Nothing may panic, hang
//! or allocate without bound past the validator.
#![no_main]

use automerge::sync::{Message as SyncMessage, State, SyncDoc};
use automerge::transaction::Transactable;
use automerge::Automerge;
use libfuzzer_sys::fuzz_target;
use tidesync_core::model::automerge_bytes::{check_new_depth, check_peer_chunk};
use tidesync_core::sync::validate;

fuzz_target!(|data: &[u8]| {
    tidesync_fuzz::contain_panics();
    let Ok(msg) = SyncMessage::decode(data) else {
        return;
    };
    if validate::check_sync_message(&msg).is_err() {
        return;
    }
    if msg.changes.iter().any(|c| check_peer_chunk(c).is_err()) {
        return;
    }
    // A document with some history, so the peer's Bloom filter is consulted.
    let mut doc = Automerge::new();
    for i in 0..3 {
        let mut tx = doc.transaction();
        let _ = tx.put(automerge::ROOT, "x", i);
        tx.commit();
    }
    let before = doc.get_heads();
    let mut state = State::new();
    if doc.receive_sync_message(&mut state, msg).is_ok() {
        let _ = check_new_depth(&doc, &before);
        let _ = doc.generate_sync_message(&mut state);
    }
});
