//! The messages two nodes exchange, and their encoding (postcard).
//!
//! On the wire each message is one length-delimited frame (the node's `net` driver); this
//! module only turns messages into bytes and back, refusing anything that does not decode.

use serde::{Deserialize, Serialize};

use super::audit::{RangePrint, Step};
use crate::model::{Cursor, NsPattern, Role};

/// Version of this message set. A peer with another version is refused at hello (see
/// [`Message::hello_version`]). 2 added [`Hello::feed_last`]; 3 added
/// [`Message::Revocations`]; 4 added [`Message::SyncAhead`]; 5 added
/// [`Message::SetAside`]; 6 added the audit messages ([`Message::AuditStart`],
/// [`Message::AuditStep`], [`Message::AuditEnd`]); 7 added [`Message::Compressed`] and
/// the class streams beside the sync stream, and is spoken only on connections that
/// negotiated [`ALPN_CLASSES`]; 8 added [`Message::CompressedBatch`] and documents sent
/// whole without Automerge's deflate (see [`super::raw`]), on connections that negotiated
/// [`ALPN_BATCHES`].
pub const PROTOCOL_VERSION: u16 = 8;

/// The first version with class streams and [`Message::Compressed`].
pub const CLASSES_PROTOCOL_VERSION: u16 = 7;

/// The version spoken on connections that negotiated [`ALPN`]: nodes from before classes
/// and compression.
pub const LEGACY_PROTOCOL_VERSION: u16 = 6;

/// ALPN protocol name of protocol version 6 and before.
pub const ALPN: &[u8] = b"tidesync/1";

/// ALPN protocol name of [`CLASSES_PROTOCOL_VERSION`]: what both sides support is settled
/// in the TLS handshake, before the first frame, so a node offers every version it speaks
/// and an older peer picks the one it knows.
pub const ALPN_CLASSES: &[u8] = b"tidesync/2";

/// ALPN protocol name of [`PROTOCOL_VERSION`] (compressed batches).
pub const ALPN_BATCHES: &[u8] = b"tidesync/3";

/// The protocol version a connection speaks, from the ALPN protocol its handshake chose.
pub fn version_for_alpn(alpn: Option<&[u8]>) -> u16 {
    match alpn {
        Some(ALPN_BATCHES) => PROTOCOL_VERSION,
        Some(ALPN_CLASSES) => CLASSES_PROTOCOL_VERSION,
        _ => LEGACY_PROTOCOL_VERSION,
    }
}

/// The ALPN protocols a node speaking at most `max_protocol` offers, the newest first.
pub fn alpn_protocols(max_protocol: u16) -> Vec<Vec<u8>> {
    let mut offered = Vec::with_capacity(3);
    if max_protocol >= PROTOCOL_VERSION {
        offered.push(ALPN_BATCHES.to_vec());
    }
    if max_protocol >= CLASSES_PROTOCOL_VERSION {
        offered.push(ALPN_CLASSES.to_vec());
    }
    offered.push(ALPN.to_vec());
    offered
}

/// The first message each side sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u16,
    /// The sender's node id (must match its certificate).
    pub node_id: String,
    /// The sender's role (must match its certificate).
    pub role: Role,
    /// The sender's feed epoch.
    pub feed_epoch: u128,
    /// The last seq of the sender's feed. A receiver that holds all of it knows every
    /// document the sender has.
    pub feed_last: u64,
    /// How far the sender has durably received the receiver's feed.
    pub resume: Option<Cursor>,
    /// Namespaces the sender wants; the receiver intersects them with the sender's grants.
    pub subscriptions: Vec<NsPattern>,
}

/// Why a peer is refused or told off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A malformed frame, an unexpected message, or invalid Automerge data. Fatal.
    Protocol,
    /// Another protocol version. Fatal.
    Version,
    /// Changes or reads outside the peer's grants; refused, the connection stays.
    Forbidden,
    /// The node failed to store what it received. Fatal.
    Internal,
    /// The receiver's feed went back: the sender's cursor into it, in the same epoch, is
    /// past its end (the receiver was restored from an old copy). The receiver moves to a
    /// new feed epoch, so every peer walks its feed again. Fatal.
    FeedBehind,
}

/// Everything that travels between two nodes after the TLS handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Who the sender is and where to resume.
    Hello(Hello),
    /// An Automerge sync message (`automerge::sync::Message::encode`) for one document.
    Sync {
        /// The document's namespace.
        ns: String,
        /// The document's id.
        id: String,
        /// The encoded Automerge sync message.
        data: Vec<u8>,
    },
    /// Every document of the sender's feed up to `seq` is durably at the receiver, which
    /// keeps `seq` as its cursor to resume from.
    Synced {
        /// The sender's feed seq.
        seq: u64,
    },
    /// A refusal. Fatal codes are followed by closing the connection.
    Error {
        /// What kind of refusal.
        code: ErrorCode,
        /// For people reading logs.
        reason: String,
    },
    /// The deployment's certificate revocation list as the sender holds it: an X.509 CRL
    /// (DER) signed by the deployment CA. Sent after the hello and whenever the sender
    /// takes up a newer one; the receiver checks the signature and keeps the newest, so
    /// a revocation made anywhere reaches every node, and nobody can forge or drop an
    /// entry.
    Revocations {
        /// The CRL, DER, at most `validate::MAX_REVOCATION_LIST` bytes.
        crl: Vec<u8>,
    },
    /// A [`Message::Sync`] generated from a version the sender has not committed yet: sent
    /// from an early notice, while the sender's fsync runs. The receiver applies it as
    /// usual but does not persist that the two share its heads: a sender killed before its
    /// commit lacks them, and a receiver whose stored state said otherwise would never send
    /// them back (both sides would think the document in sync).
    SyncAhead {
        /// The document's namespace.
        ns: String,
        /// The document's id.
        id: String,
        /// The encoded Automerge sync message.
        data: Vec<u8>,
    },
    /// The sender cannot take this document: its own copy is set aside (its stored bytes
    /// do not load), so it drops what it gets of it. The receiver stops waiting for an
    /// acknowledgement of it, so one damaged copy does not hold back the sender's cursor.
    SetAside {
        /// The document's namespace.
        ns: String,
        /// The document's id.
        id: String,
    },
    /// Starts a consistency audit of the documents both sides share in `namespaces` (see
    /// [`crate::sync::audit`]): the fingerprint of everything the sender holds there.
    AuditStart {
        /// Chosen by the sender; names the audit in the messages that follow.
        audit: u32,
        /// Namespaces compared (within what the two sides share).
        namespaces: Vec<NsPattern>,
        /// Random, chosen by the sender: keys every hash of this audit on both sides.
        salt: u64,
        /// The sender's fingerprint of all of it.
        root: RangePrint,
    },
    /// The answer to the other side's last audit message.
    AuditStep {
        /// The audit.
        audit: u32,
        /// Whether the sender started the audit.
        from_starter: bool,
        /// The answer.
        step: Step,
    },
    /// The answering side's last word on an audit: what it found and repaired, or why it
    /// will not take part; or the starter giving up on it.
    AuditEnd {
        /// The audit.
        audit: u32,
        /// Whether the starter sends it (it gives up), else the answering side.
        from_starter: bool,
        /// Differences the sender found.
        found: u64,
        /// Of the documents the sender had to send, those the receiver now holds.
        repaired: u64,
        /// Set when the sender refuses the audit (one is already running, or too soon).
        refused: Option<String>,
    },
    /// Another message, encoded and then compressed with zstd (one frame, no dictionary):
    /// sent instead of it when that is smaller. Never nested. Protocol version 7 only.
    Compressed {
        /// The zstd frame.
        data: Vec<u8>,
    },
    /// Consecutive document messages ([`Message::Sync`], [`Message::SyncAhead`]) of one
    /// stream, compressed together with zstd (one frame, no dictionary), so that what
    /// documents share (keys, actors, the words of their text) is sent once. The content
    /// is each message's encoding after its length (u32, little-endian). Protocol version
    /// 8 only; bounds in `net::frames`.
    CompressedBatch {
        /// The zstd frame.
        data: Vec<u8>,
    },
}

impl Message {
    /// The bytes of one frame.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these plain types into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// The size of its frame on the wire: the encoding and its 4-byte length, counted
    /// without encoding it.
    pub fn wire_len(&self) -> u64 {
        postcard::experimental::serialized_size(self).unwrap_or_default() as u64 + 4
    }

    /// Decodes one frame; anything else than exactly one message is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        match postcard::take_from_bytes(bytes)? {
            (msg, []) => Ok(msg),
            _ => Err(postcard::Error::DeserializeBadEncoding),
        }
    }

    /// The version a frame that starts like a hello claims, whatever follows it, so that a
    /// peer of another protocol version is told so instead of "undecodable".
    pub fn hello_version(bytes: &[u8]) -> Option<u16> {
        // A postcard enum is its variant index, then its fields; `Hello` is variant 0 and
        // `version` its first field.
        match postcard::take_from_bytes::<(u32, u16)>(bytes) {
            Ok(((0, version), _)) => Some(version),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hello as protocol version 1 encoded it (no `feed_last`).
    fn hello_v1() -> Vec<u8> {
        #[derive(Serialize)]
        enum OldMessage {
            Hello {
                version: u16,
                node_id: String,
                role: Role,
                feed_epoch: u128,
                resume: Option<Cursor>,
                subscriptions: Vec<NsPattern>,
            },
        }
        postcard::to_stdvec(&OldMessage::Hello {
            version: 1,
            node_id: "edge-1".into(),
            role: Role::Edge,
            feed_epoch: 5,
            resume: None,
            subscriptions: vec![NsPattern::all()],
        })
        .expect("encodes")
    }

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let msgs = [
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_id: "edge-1".into(),
                role: Role::Edge,
                feed_epoch: u128::MAX - 3,
                feed_last: 12,
                resume: Some(Cursor { epoch: 5, seq: 9 }),
                subscriptions: vec![NsPattern::all()],
            }),
            Message::Sync {
                ns: "models".into(),
                id: "a".into(),
                data: vec![0x42, 1, 2],
            },
            Message::Synced { seq: 77 },
            Message::Revocations {
                crl: vec![0x30, 0x82, 1, 2],
            },
            Message::SyncAhead {
                ns: "models".into(),
                id: "b".into(),
                data: vec![0x42, 3],
            },
            Message::Error {
                code: ErrorCode::Forbidden,
                reason: "no".into(),
            },
            Message::AuditStep {
                audit: 300,
                from_starter: true,
                step: crate::sync::audit::Step {
                    differ: vec![5],
                    answers: vec![crate::sync::audit::Answer::Split([[1; 4]; 4])],
                    lacking: vec![[7; 8]],
                },
            },
        ];
        for m in msgs {
            let bytes = m.encode();
            assert_eq!(m.wire_len(), bytes.len() as u64 + 4, "{m:?}");
            assert_eq!(Message::decode(&bytes).expect("decodes"), m);
        }
        assert!(Message::decode(&[0xff, 0xff, 0xff]).is_err());
        assert_eq!(
            Message::hello_version(&hello_v1()),
            Some(1),
            "an older hello tells its version, whether or not the rest decodes"
        );
        assert_eq!(
            Message::hello_version(&Message::Synced { seq: 1 }.encode()),
            None
        );
        assert!(Message::decode(&[]).is_err());
        let mut trailing = Message::Synced { seq: 1 }.encode();
        trailing.push(0);
        assert!(
            Message::decode(&trailing).is_err(),
            "trailing bytes are refused"
        );
    }
}
