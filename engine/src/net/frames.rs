//! A message's frame on the wire: its encoding, compressed with zstd where that pays.
//!
//! Only document payloads ([`Message::Sync`], [`Message::SyncAhead`]) are worth trying: the
//! rest is small or already dense. Each is compressed on its own (no shared context, so
//! any frame decodes alone) and sent compressed only when that is smaller, so data that
//! does not shrink costs a compression attempt and not one byte more on the link.
//!
//! Decoding is hostile by default: a compressed frame must say its decompressed size, and
//! that size is checked against the frame limit before anything is allocated.

use crate::sync::{validate, Message, ProtocolError, PROTOCOL_VERSION};

/// Smallest encoded message worth an attempt: below this zstd's frame header eats the
/// gain.
pub const COMPRESS_MIN: usize = 192;
/// zstd's level: its default, which keeps up with a gigabit link on one core.
pub const ZSTD_LEVEL: i32 = 3;
/// Largest encoded message worth an attempt: larger ones are whole documents, which
/// Automerge has deflated already, and compressing them would hold a runtime thread for
/// tens of milliseconds.
pub const COMPRESS_MAX: usize = 1 << 20;
/// Most a compressed frame may expand: its content is at most this many times its size
/// (plus [`EXPANSION_SLACK`]). A sender sends plain what would expand more, so a few
/// hundred bytes can never cost the receiver megabytes of decoding.
pub const MAX_EXPANSION: usize = 32;
/// Bytes of content a compressed frame may have beyond [`MAX_EXPANSION`] times its size.
pub const EXPANSION_SLACK: usize = 64 * 1024;

/// The largest content a compressed payload of `len` bytes may declare.
fn max_content(len: usize) -> usize {
    len.saturating_mul(MAX_EXPANSION)
        .saturating_add(EXPANSION_SLACK)
}

/// One message, ready for the wire.
#[derive(Debug)]
pub struct Encoded {
    /// The frame's payload.
    pub bytes: Vec<u8>,
    /// The size of the message's plain encoding.
    pub plain_len: usize,
    /// Whether `bytes` is a [`Message::Compressed`].
    pub compressed: bool,
}

/// Encodes a message, compressed when `compress` allows it and it comes out smaller.
pub fn encode(msg: &Message, compress: bool) -> Encoded {
    let plain = msg.encode();
    let plain_len = plain.len();
    let worth_trying = matches!(msg, Message::Sync { .. } | Message::SyncAhead { .. });
    if compress && worth_trying && (COMPRESS_MIN..=COMPRESS_MAX).contains(&plain_len) {
        if let Ok(data) = zstd::bulk::compress(&plain, ZSTD_LEVEL) {
            let within = plain_len <= max_content(data.len());
            let wrapped = Message::Compressed { data }.encode();
            if within && wrapped.len() < plain_len {
                return Encoded {
                    bytes: wrapped,
                    plain_len,
                    compressed: true,
                };
            }
        }
    }
    Encoded {
        bytes: plain,
        plain_len,
        compressed: false,
    }
}

/// The postcard variant indices of [`Message::Sync`] and [`Message::SyncAhead`].
const SYNC_VARIANTS: [u8; 2] = [1, 5];

/// The first byte of a zstd frame's content, decoding no more than that.
fn first_byte(data: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut one = [0u8; 1];
    let mut d = zstd::stream::read::Decoder::new(data).ok()?;
    d.read_exact(&mut one).ok()?;
    Some(one.to_vec())
}

/// Decodes one frame of a connection speaking `version`, unwrapping a compressed one
/// (whose content may be at most `max_frame` bytes).
pub fn decode(frame: &[u8], version: u16, max_frame: usize) -> Result<Message, ProtocolError> {
    validate::check_frame(frame)?;
    let msg = Message::decode(frame).map_err(|e| match Message::hello_version(frame) {
        Some(v) if v != version => ProtocolError::version(v, version),
        _ => ProtocolError::protocol(format!("undecodable frame of {} bytes: {e}", frame.len())),
    })?;
    let Message::Compressed { data } = msg else {
        return Ok(msg);
    };
    if version < PROTOCOL_VERSION {
        return Err(ProtocolError::protocol(format!(
            "a compressed frame on a connection of protocol version {version}"
        )));
    }
    let size = match zstd::zstd_safe::get_frame_content_size(&data) {
        Ok(Some(size)) => size,
        Ok(None) | Err(_) => {
            return Err(ProtocolError::protocol(
                "a compressed frame that does not say its size",
            ))
        }
    };
    if size > max_frame as u64 {
        return Err(ProtocolError::protocol(format!(
            "a compressed frame of {size} bytes (at most {max_frame})"
        )));
    }
    if size > max_content(data.len()) as u64 {
        return Err(ProtocolError::protocol(format!(
            "a compressed frame of {} bytes claims {size} (at most {MAX_EXPANSION} times)",
            data.len()
        )));
    }
    // Only a document's sync message may be inside: its variant is the first byte.
    if !matches!(
        first_byte(&data),
        Some(ref b) if b.first().is_some_and(|v| SYNC_VARIANTS.contains(v))
    ) {
        return Err(ProtocolError::protocol(
            "a compressed frame holds something other than a document's sync message",
        ));
    }
    let plain = zstd::bulk::decompress(&data, size as usize)
        .map_err(|e| ProtocolError::protocol(format!("compressed frame: {e}")))?;
    validate::check_frame(&plain)?;
    let inner = Message::decode(&plain).map_err(|e| {
        ProtocolError::protocol(format!(
            "undecodable compressed frame of {} bytes: {e}",
            plain.len()
        ))
    })?;
    match inner {
        Message::Sync { .. } | Message::SyncAhead { .. } => Ok(inner),
        _ => Err(ProtocolError::protocol(
            "a compressed frame holds something other than a document's sync message",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::LEGACY_PROTOCOL_VERSION;

    fn sync(data: Vec<u8>) -> Message {
        Message::Sync {
            ns: "models".into(),
            id: "a".into(),
            data,
        }
    }

    #[test]
    fn text_shrinks_noise_goes_plain_and_both_decode() {
        let text = "the quick brown fox jumps over the lazy dog; ".repeat(100);
        let m = sync(text.into_bytes());
        let e = encode(&m, true);
        assert!(e.compressed && e.bytes.len() * 4 < e.plain_len, "{e:?}");
        assert_eq!(
            decode(&e.bytes, PROTOCOL_VERSION, 1 << 20).expect("decodes"),
            m
        );
        let mut noise = vec![0u8; 4096];
        getrandom::fill(&mut noise).expect("random");
        let m = sync(noise);
        let e = encode(&m, true);
        assert!(!e.compressed && e.bytes.len() == e.plain_len);
        assert_eq!(
            decode(&e.bytes, PROTOCOL_VERSION, 1 << 20).expect("decodes"),
            m
        );
        assert!(!encode(&sync(vec![7; 4096]), false).compressed);
    }

    #[test]
    fn hostile_compressed_frames_are_refused_before_they_cost() {
        let bomb = zstd::bulk::compress(&sync(vec![0; 8 << 20]).encode(), 3).expect("zstd");
        let frame = Message::Compressed { data: bomb.clone() }.encode();
        assert!(frame.len() < 4096);
        let err = decode(&frame, PROTOCOL_VERSION, 1 << 20).expect_err("too big");
        assert!(err.reason.contains("at most"), "{}", err.reason);
        let err = decode(&frame, PROTOCOL_VERSION, 16 << 20).expect_err("expands too far");
        assert!(err.reason.contains("times"), "{}", err.reason);
        assert!(
            !encode(&sync(vec![0; 1 << 19]), true).compressed,
            "what would expand too far is sent plain"
        );
        let hello = crate::sync::Message::Synced { seq: 1 }.encode().repeat(100);
        let smuggled = Message::Compressed {
            data: zstd::bulk::compress(&hello, 3).expect("zstd"),
        }
        .encode();
        assert!(decode(&smuggled, PROTOCOL_VERSION, 1 << 20).is_err());
        let small = encode(&sync(vec![1; 4096]), true);
        assert!(decode(&small.bytes, LEGACY_PROTOCOL_VERSION, 1 << 20).is_err());
        let nested = Message::Compressed {
            data: zstd::bulk::compress(&small.bytes, 3).expect("zstd"),
        }
        .encode();
        assert!(decode(&nested, PROTOCOL_VERSION, 1 << 20).is_err());
        let garbage = Message::Compressed {
            data: vec![0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3],
        }
        .encode();
        assert!(decode(&garbage, PROTOCOL_VERSION, 1 << 20).is_err());
    }
}
