//! Documents sent whole without Automerge's deflate, for links that compress frames
//! (protocol 8).
//!
//! Automerge sends a document a peer lacks (or mostly lacks) whole, as its saved form,
//! where every column over 256 bytes is deflated on its own. A link that compresses
//! batches of messages with zstd (`net::frames`) does better with the plain columns: it
//! sees many documents at once and sends what they share (keys, actors, the words of their
//! text) once, where per-column deflate hides it. Changes are already sent plain.
//!
//! Only documents that stay small go plain, small enough to join a batch (the driver's
//! `net::frames::BATCH_ITEM_MAX`, which a compile-time check keeps above this bound): a
//! larger one keeps Automerge's deflate, so it is never sent plain and large.

use automerge::sync::{ChunkList, Message};
use automerge::Automerge;

/// Largest plain document put in place of the deflated one.
pub const RAW_DOC_MAX: usize = 48 << 10;

/// Deflated documents over this are not saved again plain: text deflates to about a
/// third, so the plain form would exceed [`RAW_DOC_MAX`] (and the save would be wasted).
const DEFLATED_MAX: usize = RAW_DOC_MAX / 2;

/// Bytes of an Automerge chunk's header before its type: magic and checksum.
const TYPE_AT: usize = 8;
/// Automerge's magic bytes, at the start of every chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// The chunk type of a saved document.
const DOCUMENT_CHUNK: u8 = 0;

/// Whether `chunk` is a saved document (not a run of changes).
fn is_document(chunk: &[u8]) -> bool {
    chunk.len() > TYPE_AT && chunk[..4] == MAGIC && chunk[TYPE_AT] == DOCUMENT_CHUNK
}

/// `msg`, generated from `doc` just now, with the whole document it carries (if any) saved
/// again without deflate, when that stays within [`RAW_DOC_MAX`].
pub fn without_deflate(doc: &Automerge, mut msg: Message) -> Message {
    let whole_doc = {
        let mut chunks = msg.changes.iter();
        match (chunks.next(), chunks.next()) {
            (Some(only), None) => is_document(only) && only.len() <= DEFLATED_MAX,
            _ => false,
        }
    };
    if !whole_doc {
        return msg;
    }
    let plain = doc.save_nocompress();
    if plain.len() <= RAW_DOC_MAX {
        msg.changes = ChunkList::from(plain);
    }
    msg
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use automerge::sync::{State, SyncDoc};
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ReadDoc, ROOT};

    fn text(words: usize) -> String {
        let vocabulary = ["model", "edge", "rollout", "latency", "sensor", "night"];
        (0..words)
            .map(|i| vocabulary[(i * 7 + i / 3) % vocabulary.len()])
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn doc_with(words: usize) -> Automerge {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "notes", text(words)).unwrap();
        doc.put(ROOT, "title", "night shift").unwrap();
        doc.document().clone()
    }

    /// The first message to a peer that has nothing: the whole document.
    fn first_message(doc: &Automerge) -> Message {
        let mut peer = State::new();
        let mut ours = State::new();
        let empty = Automerge::new();
        let hello = empty.generate_sync_message(&mut peer).unwrap();
        doc.clone().receive_sync_message(&mut ours, hello).unwrap();
        doc.generate_sync_message(&mut ours).unwrap()
    }

    #[test]
    fn a_document_sent_whole_goes_plain_and_loads_the_same() {
        let doc = doc_with(600);
        let msg = first_message(&doc);
        let deflated = msg.changes.iter().next().unwrap().len();
        let plain = without_deflate(&doc, msg.clone());
        let chunk = plain.changes.iter().next().unwrap().to_vec();
        assert!(is_document(&chunk));
        assert!(
            chunk.len() > 2 * deflated,
            "{} plain, {deflated} deflated",
            chunk.len()
        );
        assert_eq!(plain.heads, msg.heads);
        // The peer takes it through the sync protocol as it would the deflated one.
        let mut peer = Automerge::new();
        let mut state = State::new();
        peer.receive_sync_message(&mut state, Message::decode(&plain.encode()).unwrap())
            .unwrap();
        assert_eq!(peer.get_heads(), doc.get_heads());
        assert_eq!(
            peer.get(ROOT, "notes")
                .unwrap()
                .unwrap()
                .0
                .into_string()
                .unwrap(),
            text(600)
        );
    }

    #[test]
    fn changes_and_large_documents_are_left_as_they_are() {
        // A document whose plain form exceeds the bound keeps its deflate.
        let big = doc_with(80_000);
        let msg = first_message(&big);
        assert!(big.save_nocompress().len() > RAW_DOC_MAX);
        assert_eq!(without_deflate(&big, msg.clone()), msg);
        // A message of changes (the peer has most of the document) is already plain.
        let mut edits = AutoCommit::new();
        for i in 0..6 {
            edits.put(ROOT, "notes", text(100 + i)).unwrap();
            edits.commit();
        }
        let mut peer = edits.document().clone();
        edits.put(ROOT, "status", text(200)).unwrap();
        let more = edits.document().clone();
        let (mut ours, mut theirs) = (State::new(), State::new());
        for _ in 0..4 {
            if let Some(m) = more.generate_sync_message(&mut ours) {
                assert!(m.changes.iter().all(|c| !is_document(c)), "{m:?}");
                let rewritten = without_deflate(&more, m.clone());
                assert_eq!(rewritten, m);
                peer.receive_sync_message(&mut theirs, m).unwrap();
            }
            if let Some(m) = peer.generate_sync_message(&mut theirs) {
                more.clone().receive_sync_message(&mut ours, m).unwrap();
            }
        }
        assert_eq!(peer.get_heads(), more.get_heads());
    }
}
