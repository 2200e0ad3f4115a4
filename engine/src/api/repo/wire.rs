//! The automerge-repo network protocol's messages, as its WebSocket adapter sends them: one
//! CBOR map per binary WebSocket message, with text keys and a `type`. Decoding takes
//! anything a hostile client may send: the size is bounded by the WebSocket's message
//! limit, nesting by a recursion limit, and every field is checked for its type.

use ciborium::value::{Integer, Value};
use serde::Deserialize;

/// The protocol version this node speaks.
pub const PROTOCOL_VERSION: &str = "1";

/// Deepest CBOR nesting decoded: the protocol's messages are two levels deep.
const RECURSION_LIMIT: usize = 16;

/// Longest peer id or session id accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// A message from a client.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// The client's first message.
    Join {
        /// Its peer id.
        sender: String,
        /// Protocol versions it speaks.
        versions: Vec<String>,
    },
    /// The client is going away.
    Leave,
    /// `request` (the client lacks the document) or `sync`: an Automerge sync message.
    Sync {
        /// Whether it was a `request`.
        request: bool,
        /// The automerge-repo document id.
        document: String,
        /// The Automerge sync message.
        data: Vec<u8>,
    },
    /// Data for the other clients of the document, not stored.
    Ephemeral {
        /// The peer it comes from: a client passes on what it received from others, and
        /// those echoes are dropped.
        sender: String,
        /// The client's session, with `count`, what receivers deduplicate by.
        session: String,
        /// Grows with each ephemeral message of the session.
        count: u64,
        /// The document it is about.
        document: String,
        /// The payload, opaque.
        data: Vec<u8>,
    },
    /// A message this node reads and ignores (subscriptions to remote heads, a peer's
    /// `doc-unavailable`, types of later versions).
    Ignored(String),
}

/// Why a client's message is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not an automerge-repo message: {0}")]
pub struct WireError(pub String);

fn err(s: impl Into<String>) -> WireError {
    WireError(s.into())
}

/// The fields this node reads, decoded straight from the CBOR: everything else (peer
/// metadata, remote heads, fields of later versions) is skipped without being built, so
/// a message of many tiny items costs no more memory than its bytes.
#[derive(Debug, Deserialize)]
struct Fields {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "senderId", default)]
    sender: Option<String>,
    #[serde(rename = "documentId", default)]
    document: Option<String>,
    #[serde(rename = "sessionId", default)]
    session: Option<String>,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    data: Option<Bytes>,
    #[serde(rename = "supportedProtocolVersions", default)]
    versions: Option<Versions>,
}

/// A CBOR byte string.
#[derive(Debug)]
struct Bytes(Vec<u8>);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
        }
        d.deserialize_bytes(Visit)
    }
}

/// The first 16 protocol versions a client lists; the rest are skipped unbuilt.
#[derive(Debug)]
struct Versions(Vec<String>);

impl<'de> Deserialize<'de> for Versions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Versions;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of versions")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Versions, A::Error> {
                let mut out = Vec::new();
                while out.len() < 16 {
                    match seq.next_element::<String>()? {
                        Some(v) if v.len() <= MAX_ID_LEN => out.push(v),
                        Some(_) => {}
                        None => return Ok(Versions(out)),
                    }
                }
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Versions(out))
            }
        }
        d.deserialize_seq(Visit)
    }
}

/// Decodes one client message.
pub fn decode(bytes: &[u8]) -> Result<Incoming, WireError> {
    let f: Fields = ciborium::de::from_reader_with_recursion_limit(bytes, RECURSION_LIMIT)
        .map_err(|e| err(format!("CBOR: {e}")))?;
    let text = |key: &str, v: Option<String>| -> Result<String, WireError> {
        match v {
            Some(s) if s.len() <= MAX_ID_LEN => Ok(s),
            Some(_) => Err(err(format!("{key} is too long"))),
            None => Err(err(format!("{key} is missing or not text"))),
        }
    };
    let data = |v: Option<Bytes>| {
        v.map(|b| b.0)
            .ok_or_else(|| err("data is missing or not bytes"))
    };
    if f.kind.len() > MAX_ID_LEN {
        return Err(err("type is too long"));
    }
    Ok(match f.kind.as_str() {
        "join" => Incoming::Join {
            sender: text("senderId", f.sender)?,
            // Clients from before versions were negotiated speak version 1.
            versions: f
                .versions
                .map_or_else(|| vec![PROTOCOL_VERSION.to_owned()], |v| v.0),
        },
        "leave" => Incoming::Leave,
        "request" | "sync" => Incoming::Sync {
            request: f.kind == "request",
            document: text("documentId", f.document)?,
            data: data(f.data)?,
        },
        "ephemeral" => Incoming::Ephemeral {
            sender: text("senderId", f.sender)?,
            session: text("sessionId", f.session)?,
            count: f
                .count
                .ok_or_else(|| err("count is missing or not an integer"))?,
            document: text("documentId", f.document)?,
            data: data(f.data)?,
        },
        _ => Incoming::Ignored(f.kind),
    })
}

impl Incoming {
    /// The message's `type`, for errors that must not echo the message.
    pub fn kind(&self) -> &str {
        match self {
            Incoming::Join { .. } => "join",
            Incoming::Leave => "leave",
            Incoming::Sync { request: true, .. } => "request",
            Incoming::Sync { .. } => "sync",
            Incoming::Ephemeral { .. } => "ephemeral",
            Incoming::Ignored(kind) => kind,
        }
    }
}

/// Whether `id` is an automerge-repo document id: the base58check encoding of 16 bytes
/// (4 bytes of checksum: the start of SHA-256 applied twice).
pub fn is_document_id(id: &str) -> bool {
    const ALPHABET: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    if id.is_empty() || id.len() > 40 {
        return false;
    }
    // Big-endian base 256 digits of the number the id spells in base 58.
    let mut bytes: Vec<u8> = Vec::with_capacity(24);
    for c in id.bytes() {
        let Some(digit) = ALPHABET.iter().position(|&a| a == c) else {
            return false;
        };
        let mut carry = digit as u32;
        for b in bytes.iter_mut().rev() {
            carry += u32::from(*b) * 58;
            *b = (carry & 0xff) as u8;
            carry >>= 8;
        }
        while carry > 0 {
            bytes.insert(0, (carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    let zeros = id.bytes().take_while(|&c| c == b'1').count();
    let mut full = vec![0u8; zeros];
    full.extend(bytes);
    if full.len() != 20 {
        return false;
    }
    let (payload, check) = full.split_at(16);
    let once = ring::digest::digest(&ring::digest::SHA256, payload);
    let twice = ring::digest::digest(&ring::digest::SHA256, once.as_ref());
    &twice.as_ref()[..4] == check
}

/// Encodes a message as a CBOR map with the fields in the given order.
fn encode(fields: Vec<(&str, Value)>) -> Vec<u8> {
    let map = Value::Map(
        fields
            .into_iter()
            .map(|(k, v)| (Value::Text(k.to_owned()), v))
            .collect(),
    );
    let mut out = Vec::new();
    // Writing a Value to a Vec cannot fail.
    let _ = ciborium::ser::into_writer(&map, &mut out);
    out
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// The answer to a `join`: this node's peer id, and the version chosen.
pub fn peer(server: &str, client: &str) -> Vec<u8> {
    // Ephemeral: this node keeps no sync state with clients across connections, so a
    // client should not keep one with it either.
    let metadata = Value::Map(vec![(text("isEphemeral"), Value::Bool(true))]);
    encode(vec![
        ("type", text("peer")),
        ("senderId", text(server)),
        ("targetId", text(client)),
        // Both spellings: `peerMetadata` is what current clients read, `metadata` what
        // some earlier ones did.
        ("peerMetadata", metadata.clone()),
        ("metadata", metadata),
        ("selectedProtocolVersion", text(PROTOCOL_VERSION)),
    ])
}

/// An error the client logs, before this node closes the connection.
pub fn error(server: &str, client: &str, message: &str) -> Vec<u8> {
    encode(vec![
        ("type", text("error")),
        ("senderId", text(server)),
        ("targetId", text(client)),
        ("message", text(message)),
    ])
}

/// An Automerge sync message for one document.
pub fn sync(server: &str, client: &str, document: &str, data: Vec<u8>) -> Vec<u8> {
    encode(vec![
        ("type", text("sync")),
        ("senderId", text(server)),
        ("targetId", text(client)),
        ("documentId", text(document)),
        ("data", Value::Bytes(data)),
    ])
}

/// This node does not have the document the client asked for.
pub fn unavailable(server: &str, client: &str, document: &str) -> Vec<u8> {
    encode(vec![
        ("type", text("doc-unavailable")),
        ("senderId", text(server)),
        ("targetId", text(client)),
        ("documentId", text(document)),
    ])
}

/// Another client's ephemeral message, passed on with its sender and session intact.
pub fn ephemeral(
    sender: &str,
    client: &str,
    session: &str,
    count: u64,
    document: &str,
    data: Vec<u8>,
) -> Vec<u8> {
    encode(vec![
        ("type", text("ephemeral")),
        ("senderId", text(sender)),
        ("targetId", text(client)),
        ("sessionId", text(session)),
        ("count", Value::Integer(Integer::from(count))),
        ("documentId", text(document)),
        ("data", Value::Bytes(data)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fields: Vec<(&str, Value)>) -> Vec<u8> {
        encode(fields)
    }

    #[test]
    fn a_join_and_a_sync_decode() {
        let join = map(vec![
            ("type", text("join")),
            ("senderId", text("peer-1")),
            ("peerMetadata", Value::Map(vec![])),
            ("supportedProtocolVersions", Value::Array(vec![text("1")])),
        ]);
        assert_eq!(
            decode(&join),
            Ok(Incoming::Join {
                sender: "peer-1".into(),
                versions: vec!["1".into()]
            })
        );
        let sync = map(vec![
            ("type", text("request")),
            ("senderId", text("peer-1")),
            ("targetId", text("server")),
            ("documentId", text("abc")),
            ("data", Value::Bytes(vec![1, 2, 3])),
        ]);
        assert_eq!(
            decode(&sync),
            Ok(Incoming::Sync {
                request: true,
                document: "abc".into(),
                data: vec![1, 2, 3]
            })
        );
    }

    #[test]
    fn document_ids_are_checked_like_automerge_repo_does() {
        // Made by automerge-repo 2.5 (`repo.create().documentId`).
        assert!(is_document_id("4BEeJ61G9gH9yHNnTJTeBuxh3khX"));
        assert!(is_document_id("44y75VWp92kJThcGjhTrmjFRwHug"));
        assert!(!is_document_id("4BEeJ61G9gH9yHNnTJTeBuxh3khY"), "checksum");
        assert!(!is_document_id("0BEeJ61G9gH9yHNnTJTeBuxh3khX"), "alphabet");
        assert!(!is_document_id(""));
        assert!(!is_document_id("abc"));
    }

    #[test]
    fn a_join_whose_metadata_holds_undefined_decodes() {
        // {type:"join", senderId:"p", peerMetadata:{storageId: undefined}}, as cbor-x
        // writes it for a client without storage.
        let mut bytes = vec![0xa3];
        for s in ["type", "join", "senderId", "p", "peerMetadata"] {
            bytes.push(0x60 + s.len() as u8);
            bytes.extend(s.as_bytes());
        }
        bytes.push(0xa1);
        bytes.push(0x60 + 9);
        bytes.extend(b"storageId");
        bytes.push(0xf7);
        assert!(matches!(decode(&bytes), Ok(Incoming::Join { .. })));
    }

    #[test]
    fn hostile_messages_are_refused_not_panicked_on() {
        let deep = {
            let mut v = Value::Null;
            for _ in 0..10_000 {
                v = Value::Array(vec![v]);
            }
            let mut out = Vec::new();
            ciborium::ser::into_writer(&v, &mut out).expect("encode");
            out
        };
        for junk in [
            vec![],
            vec![0xff],
            deep,
            map(vec![("type", Value::Integer(Integer::from(1)))]),
            map(vec![("type", text("sync")), ("documentId", text("a"))]),
            map(vec![
                ("type", text("join")),
                ("senderId", text(&"x".repeat(MAX_ID_LEN + 1))),
            ]),
            map(vec![
                ("type", text("ephemeral")),
                ("sessionId", text("s")),
                ("count", Value::Integer(Integer::from(-1))),
                ("documentId", text("d")),
                ("data", Value::Bytes(vec![])),
            ]),
        ] {
            assert!(decode(&junk).is_err(), "accepted {junk:?}");
        }
        assert_eq!(
            decode(&map(vec![("type", text("remote-heads-changed"))])),
            Ok(Incoming::Ignored("remote-heads-changed".into()))
        );
    }
}
