//! The messages two nodes exchange, and their encoding (postcard).
//!
//! On the wire each message is one length-delimited frame (see `net`); this module only
//! turns messages into bytes and back, refusing anything that does not decode.

use serde::{Deserialize, Serialize};

use crate::model::NsPattern;

/// Version of this message set. A peer with another version is refused at hello.
pub const PROTOCOL_VERSION: u16 = 1;

/// ALPN protocol name negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"tidesync/1";

/// What a node is; written in its certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A device. Reads and writes only what its certificate grants.
    Edge,
    /// A data-center node. Reads and writes everything; relays between edges and hubs.
    Hub,
}

impl Role {
    /// `edge` or `hub`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Hub => "hub",
        }
    }
}

/// A position in one database's feed: valid only while that database's epoch holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The feed epoch of the database the position refers to.
    pub epoch: u128,
    /// The feed seq.
    pub seq: u64,
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
}

impl Message {
    /// The bytes of one frame.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these plain types into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes one frame; anything else than exactly one message is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        match postcard::take_from_bytes(bytes)? {
            (msg, []) => Ok(msg),
            _ => Err(postcard::Error::DeserializeBadEncoding),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let msgs = [
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_id: "edge-1".into(),
                role: Role::Edge,
                feed_epoch: u128::MAX - 3,
                resume: Some(Cursor { epoch: 5, seq: 9 }),
                subscriptions: vec![NsPattern::all()],
            }),
            Message::Sync {
                ns: "models".into(),
                id: "a".into(),
                data: vec![0x42, 1, 2],
            },
            Message::Synced { seq: 77 },
            Message::Error {
                code: ErrorCode::Forbidden,
                reason: "no".into(),
            },
        ];
        for m in msgs {
            assert_eq!(Message::decode(&m.encode()).expect("decodes"), m);
        }
        assert!(Message::decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(Message::decode(&[]).is_err());
        let mut trailing = Message::Synced { seq: 1 }.encode();
        trailing.push(0);
        assert!(
            Message::decode(&trailing).is_err(),
            "trailing bytes are refused"
        );
    }
}
