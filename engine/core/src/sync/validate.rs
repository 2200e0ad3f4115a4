//! The one door for what a peer sends: every field of a message that Automerge or the
//! session would trust is checked here, against a named bound, before any state or library
//! sees it. Each bound is listed in `docs/SECURITY.md`.

use automerge::sync::{Have, Message as SyncMessage};

use super::message::Hello;
use crate::error::ProtocolError;

/// Largest hello frame, in bytes, checked before it is decoded: a hello's size is its
/// subscriptions, and decoding millions of tiny patterns would cost far more memory than
/// their bytes.
pub const MAX_HELLO_BYTES: usize = 128 * 1024;

/// Most namespace patterns a peer may subscribe to. Every feed entry is matched against
/// each of them.
pub const MAX_SUBSCRIPTIONS: usize = 1024;

/// Most `have` entries in one Automerge sync message (Automerge sends one).
pub const MAX_HAVES: usize = 8;

/// Most change hashes in each list of one sync message: `heads`, `need`, and each have's
/// `last_sync`.
pub const MAX_HASHES: usize = 16 * 1024;

/// Most probes per hash a peer's Bloom filter may ask for (Automerge uses 7). Each probe
/// is computed, and allocated, for every change checked against the filter.
pub const MAX_BLOOM_PROBES: u64 = 32;

/// Most bits per entry of a peer's Bloom filter (Automerge uses 10). Zero would make the
/// filter empty and Automerge divide by zero while it reads it.
pub const MAX_BLOOM_BITS_PER_ENTRY: u64 = 64;

/// Largest revocation list a peer may send, in bytes: room for some 25,000 revoked
/// certificates. A node keeps one list, the newest.
pub const MAX_REVOCATION_LIST: usize = 1 << 20;

/// Longest piece of peer text (an error's reason) that is kept, in characters; the rest is
/// cut, and what is kept is escaped, so a peer cannot flood or forge log lines.
pub const MAX_PEER_TEXT: usize = 256;

/// Message variants (the frame's first byte) of the audit messages, `AuditStart`,
/// `AuditStep` and `AuditEnd`.
const AUDIT_VARIANTS: std::ops::RangeInclusive<u8> = 7..=9;

/// Checks a frame before it is decoded: a hello (message variant 0, the first byte) may
/// not exceed [`MAX_HELLO_BYTES`], nor an audit message
/// [`super::audit::MAX_AUDIT_FRAME`] (decoded, its small items take many times their
/// wire size).
pub fn check_frame(frame: &[u8]) -> Result<(), ProtocolError> {
    let (what, limit) = match frame.first() {
        Some(0) => ("a hello", MAX_HELLO_BYTES),
        Some(v) if AUDIT_VARIANTS.contains(v) => {
            ("an audit message", super::audit::MAX_AUDIT_FRAME)
        }
        _ => return Ok(()),
    };
    if frame.len() > limit {
        return Err(ProtocolError::protocol(format!(
            "{what} of {} bytes (at most {limit})",
            frame.len()
        )));
    }
    Ok(())
}

/// Checks a peer's hello.
pub fn check_hello(hello: &Hello) -> Result<(), ProtocolError> {
    if hello.subscriptions.len() > MAX_SUBSCRIPTIONS {
        return Err(ProtocolError::protocol(format!(
            "{} subscriptions (at most {MAX_SUBSCRIPTIONS})",
            hello.subscriptions.len()
        )));
    }
    Ok(())
}

/// Checks every field of a peer's Automerge sync message that Automerge trusts.
pub fn check_sync_message(msg: &SyncMessage) -> Result<(), ProtocolError> {
    if msg.have.len() > MAX_HAVES {
        return Err(ProtocolError::protocol(format!(
            "{} have entries (at most {MAX_HAVES})",
            msg.have.len()
        )));
    }
    check_hashes("heads", msg.heads.len())?;
    check_hashes("need", msg.need.len())?;
    for have in &msg.have {
        check_hashes("last_sync", have.last_sync.len())?;
        check_bloom(have)?;
    }
    Ok(())
}

fn check_hashes(what: &str, n: usize) -> Result<(), ProtocolError> {
    if n > MAX_HASHES {
        return Err(ProtocolError::protocol(format!(
            "{n} hashes in {what} (at most {MAX_HASHES})"
        )));
    }
    Ok(())
}

/// A Bloom filter's parameters, as Automerge encodes them: nothing for an empty filter,
/// else LEB128 entries, bits per entry and probes, then the bits.
fn check_bloom(have: &Have) -> Result<(), ProtocolError> {
    let bytes = have.bloom.to_bytes();
    let mut rest = bytes.as_slice();
    if rest.is_empty() {
        return Ok(());
    }
    let bad = |what: String| ProtocolError::protocol(format!("Bloom filter: {what}"));
    let mut field =
        |name: &str| leb128::read::unsigned(&mut rest).map_err(|e| bad(format!("{name}: {e}")));
    let _entries = field("entries")?;
    let bits_per_entry = field("bits per entry")?;
    let probes = field("probes")?;
    if !(1..=MAX_BLOOM_BITS_PER_ENTRY).contains(&bits_per_entry) {
        return Err(bad(format!(
            "{bits_per_entry} bits per entry (1 to {MAX_BLOOM_BITS_PER_ENTRY})"
        )));
    }
    if !(1..=MAX_BLOOM_PROBES).contains(&probes) {
        return Err(bad(format!("{probes} probes (1 to {MAX_BLOOM_PROBES})")));
    }
    if rest.is_empty() {
        return Err(bad("no bits".into()));
    }
    Ok(())
}

/// Peer text fit for a log line: at most [`MAX_PEER_TEXT`] characters, control characters
/// and quotes escaped.
pub fn peer_text(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_PEER_TEXT)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(MAX_PEER_TEXT).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::{BloomFilter, State, SyncDoc};
    use automerge::transaction::Transactable;
    use automerge::Automerge;

    /// A real first message of a document with one change: it carries one have.
    fn first_message() -> SyncMessage {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "v", 1).expect("put");
        tx.commit();
        let mut state = State::new();
        doc.generate_sync_message(&mut state).expect("a message")
    }

    fn bloom(entries: u8, bits_per_entry: u8, probes: &[u8], bits: usize) -> BloomFilter {
        let mut bytes = vec![entries, bits_per_entry];
        bytes.extend_from_slice(probes);
        bytes.extend(std::iter::repeat_n(0xff, bits));
        BloomFilter::try_from(bytes.as_slice()).expect("parses")
    }

    #[test]
    fn bloom_parameters_from_the_wire_are_bounded() {
        let mut msg = first_message();
        assert!(check_sync_message(&msg).is_ok(), "Automerge's own message");
        msg.have = vec![Have {
            last_sync: Vec::new(),
            bloom: bloom(1, 10, &[7], 2),
        }];
        assert!(check_sync_message(&msg).is_ok());
        for (bad, why) in [
            (bloom(1, 0, &[7], 0), "zero bits per entry"),
            (
                bloom(1, 10, &[0x80, 0x80, 0x80, 0x80, 0x04], 2),
                "2^30 probes",
            ),
            (bloom(1, 10, &[0], 2), "zero probes"),
            (bloom(1, 65, &[7], 9), "65 bits per entry"),
        ] {
            msg.have = vec![Have {
                last_sync: Vec::new(),
                bloom: bad,
            }];
            assert!(check_sync_message(&msg).is_err(), "{why} passed");
        }
        msg.have = (0..=MAX_HAVES)
            .map(|_| Have {
                last_sync: Vec::new(),
                bloom: BloomFilter::default(),
            })
            .collect();
        assert!(check_sync_message(&msg).is_err(), "too many haves");
    }

    #[test]
    fn peer_text_is_cut_and_escaped() {
        assert_eq!(peer_text("plain"), "plain");
        assert_eq!(peer_text("two\nlines"), "two\\nlines");
        let long = "x".repeat(10_000);
        let cut = peer_text(&long);
        assert_eq!(cut.chars().count(), MAX_PEER_TEXT + 1);
    }

    /// Audit messages are refused by size before they are decoded: decoded, their small
    /// items take many times their wire size. Their kinds are the bytes the check reads.
    #[test]
    fn audit_frames_are_bounded_before_decoding() {
        use crate::sync::audit::{Answer, Step, MAX_AUDIT_FRAME};
        use crate::sync::Message;
        let start = Message::AuditStart {
            audit: 1,
            namespaces: Vec::new(),
            salt: 0,
            root: [0; 4],
        };
        let end = Message::AuditEnd {
            audit: 1,
            from_starter: false,
            found: 0,
            repaired: 0,
            refused: None,
        };
        let flood = Message::AuditStep {
            audit: 1,
            from_starter: true,
            step: Step {
                differ: Vec::new(),
                answers: vec![Answer::Items(Vec::new()); MAX_AUDIT_FRAME / 2 + 1],
                lacking: Vec::new(),
            },
        };
        let flood = flood.encode();
        assert_eq!(start.encode()[0], 7);
        assert_eq!(flood[0], 8);
        assert_eq!(end.encode()[0], 9);
        assert!(check_frame(&flood).is_err());
        assert!(check_frame(&start.encode()).is_ok());
    }
}
