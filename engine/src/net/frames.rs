//! A message's frame on the wire: its encoding, compressed with zstd where that pays.
//!
//! Only document payloads ([`Message::Sync`], [`Message::SyncAhead`]) are worth trying: the
//! rest is small or already dense. On protocol 7 each is compressed on its own
//! ([`Message::Compressed`]). On protocol 8 consecutive ones of a stream are compressed
//! together ([`Message::CompressedBatch`], see [`Batch`]): documents share keys, actors and
//! words that one message alone does not repeat. Either way a frame goes compressed only
//! when that is smaller, so data that does not shrink costs a compression attempt and not
//! one byte more on the link; and no frame needs another to decode.
//!
//! Decoding is hostile by default: a compressed frame must say its decompressed size, and
//! that size is checked against the frame limit (a batch's against [`BATCH_MAX_CONTENT`])
//! before anything is allocated.

use crate::sync::{validate, Message, ProtocolError, CLASSES_PROTOCOL_VERSION, PROTOCOL_VERSION};

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
/// Most a compressed batch may expand: more than a single message, since documents that
/// share most of their bytes are what batches are for, and a batch's content is bounded
/// anyway ([`BATCH_MAX_CONTENT`]); a batch of the most content is at least 1 KiB.
pub const BATCH_MAX_EXPANSION: usize = 256;
/// Most content a batch may have: its messages' encodings and their 4-byte lengths. Small
/// enough to decode (and compress) in about a millisecond; large enough for a few dozen
/// documents of a few kilobytes, where the gain levels off.
pub const BATCH_MAX_CONTENT: usize = 256 << 10;
/// Most messages in a batch: bounds what one frame hands the session at once.
pub const BATCH_MAX_MESSAGES: usize = 128;
/// Largest message put in a batch; a larger one goes alone.
pub const BATCH_ITEM_MAX: usize = 64 << 10;

/// The largest content a compressed payload of `len` bytes may declare.
fn max_content(len: usize) -> usize {
    len.saturating_mul(MAX_EXPANSION)
        .saturating_add(EXPANSION_SLACK)
}

/// One frame, ready for the wire.
#[derive(Debug)]
pub struct Encoded {
    /// The frame's payload.
    pub bytes: Vec<u8>,
    /// The size of the plain encodings of the messages it carries.
    pub plain_len: usize,
    /// Whether `bytes` is a [`Message::Compressed`] or [`Message::CompressedBatch`].
    pub compressed: bool,
    /// Messages it carries.
    pub messages: usize,
}

impl Encoded {
    fn plain(bytes: Vec<u8>) -> Self {
        Self {
            plain_len: bytes.len(),
            bytes,
            compressed: false,
            messages: 1,
        }
    }
}

/// Whether a message is a document's payload, the only kind compressed.
pub fn is_document(msg: &Message) -> bool {
    matches!(msg, Message::Sync { .. } | Message::SyncAhead { .. })
}

/// Encodes a message, compressed when `compress` allows it and it comes out smaller.
pub fn encode(msg: &Message, compress: bool) -> Encoded {
    encode_message(msg.encode(), compress && is_document(msg))
}

/// A message's encoding as a frame of its own, compressed when `compress` allows it and it
/// comes out smaller (only documents are worth it: see [`is_document`]).
pub fn encode_message(plain: Vec<u8>, compress: bool) -> Encoded {
    let plain_len = plain.len();
    if compress && (COMPRESS_MIN..=COMPRESS_MAX).contains(&plain_len) {
        if let Ok(data) = zstd::bulk::compress(&plain, ZSTD_LEVEL) {
            let within = plain_len <= max_content(data.len());
            let wrapped = Message::Compressed { data }.encode();
            if within && wrapped.len() < plain_len {
                return Encoded {
                    bytes: wrapped,
                    plain_len,
                    compressed: true,
                    messages: 1,
                };
            }
        }
    }
    Encoded::plain(plain)
}

/// Document messages of one stream and class waiting to go out together (protocol 8). The
/// driver fills it while the session hands it messages, and empties it when the session
/// is done for now, so a batch never waits for messages to come.
#[derive(Debug, Default)]
pub struct Batch {
    /// The messages' encodings, in order.
    plains: Vec<Vec<u8>>,
    /// What the batch's content would be now.
    content: usize,
}

impl Batch {
    /// Whether a message of `plain_len` bytes may join: it is small enough, and the batch
    /// has room for it.
    pub fn fits(&self, plain_len: usize) -> bool {
        Self::takes(plain_len)
            && self.plains.len() < BATCH_MAX_MESSAGES
            && self.content + 4 + plain_len <= BATCH_MAX_CONTENT
    }

    /// Whether a message of `plain_len` bytes may ever join a batch.
    pub fn takes(plain_len: usize) -> bool {
        plain_len <= BATCH_ITEM_MAX
    }

    /// Adds a document message's encoding (check [`Batch::fits`] first).
    pub fn push(&mut self, plain: Vec<u8>) {
        self.content += 4 + plain.len();
        self.plains.push(plain);
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.plains.is_empty()
    }

    /// The frames to send for what waits, emptying the batch: one compressed frame when
    /// that is smaller than the messages' own frames, else each message's own frame.
    pub fn take(&mut self) -> Vec<Encoded> {
        let plains = std::mem::take(&mut self.plains);
        let content_len = std::mem::take(&mut self.content);
        if plains.len() < 2 {
            return plains
                .into_iter()
                .map(|p| encode_message(p, true))
                .collect();
        }
        let mut content = Vec::with_capacity(content_len);
        for p in &plains {
            // An item is at most BATCH_ITEM_MAX bytes: its length fits in a u32.
            content.extend_from_slice(&(p.len() as u32).to_le_bytes());
            content.extend_from_slice(p);
        }
        let plain_len: usize = plains.iter().map(Vec::len).sum();
        let own_frames = plain_len + 4 * plains.len();
        if let Ok(data) = zstd::bulk::compress(&content, ZSTD_LEVEL) {
            let within = content.len() <= data.len().saturating_mul(BATCH_MAX_EXPANSION);
            let wrapped = Message::CompressedBatch { data }.encode();
            if within && wrapped.len() + 4 < own_frames {
                return vec![Encoded {
                    bytes: wrapped,
                    plain_len,
                    compressed: true,
                    messages: plains.len(),
                }];
            }
        }
        // Each on its own: what did not shrink together will not alone, but what expands
        // too far together may go compressed alone.
        plains
            .into_iter()
            .map(|p| encode_message(p, true))
            .collect()
    }
}

// A document the session sends without deflate always fits in a batch.
const _: () = assert!(crate::sync::raw::RAW_DOC_MAX + 4096 <= BATCH_ITEM_MAX);

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

/// The content size a zstd frame declares: refused if it declares none.
fn declared_size(data: &[u8]) -> Result<u64, ProtocolError> {
    match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(size)) => Ok(size),
        Ok(None) | Err(_) => Err(ProtocolError::protocol(
            "a compressed frame that does not say its size",
        )),
    }
}

/// Decodes one frame of a connection speaking `version` into the messages it carries:
/// itself, or what a compressed frame holds (each message at most `max_frame` bytes).
pub fn decode(frame: &[u8], version: u16, max_frame: usize) -> Result<Vec<Message>, ProtocolError> {
    validate::check_frame(frame)?;
    let msg = Message::decode(frame).map_err(|e| match Message::hello_version(frame) {
        Some(v) if v != version => ProtocolError::version(v, version),
        _ => ProtocolError::protocol(format!("undecodable frame of {} bytes: {e}", frame.len())),
    })?;
    match msg {
        Message::Compressed { data } if version >= CLASSES_PROTOCOL_VERSION => {
            Ok(vec![decode_compressed(&data, max_frame)?])
        }
        Message::CompressedBatch { data } if version >= PROTOCOL_VERSION => {
            decode_batch(&data, max_frame)
        }
        Message::Compressed { .. } | Message::CompressedBatch { .. } => {
            Err(ProtocolError::protocol(format!(
                "a compressed frame this connection's protocol version {version} does not have"
            )))
        }
        msg => Ok(vec![msg]),
    }
}

/// The document message inside a [`Message::Compressed`].
fn decode_compressed(data: &[u8], max_frame: usize) -> Result<Message, ProtocolError> {
    let size = declared_size(data)?;
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
        first_byte(data),
        Some(ref b) if b.first().is_some_and(|v| SYNC_VARIANTS.contains(v))
    ) {
        return Err(ProtocolError::protocol(
            "a compressed frame holds something other than a document's sync message",
        ));
    }
    let plain = zstd::bulk::decompress(data, size as usize)
        .map_err(|e| ProtocolError::protocol(format!("compressed frame: {e}")))?;
    document_message(&plain)
}

/// One document message of a compressed frame's content.
fn document_message(plain: &[u8]) -> Result<Message, ProtocolError> {
    validate::check_frame(plain)?;
    let inner = Message::decode(plain).map_err(|e| {
        ProtocolError::protocol(format!(
            "undecodable compressed frame of {} bytes: {e}",
            plain.len()
        ))
    })?;
    if is_document(&inner) {
        Ok(inner)
    } else {
        Err(ProtocolError::protocol(
            "a compressed frame holds something other than a document's sync message",
        ))
    }
}

/// The document messages inside a [`Message::CompressedBatch`].
fn decode_batch(data: &[u8], max_frame: usize) -> Result<Vec<Message>, ProtocolError> {
    let size = declared_size(data)?;
    if size > BATCH_MAX_CONTENT as u64 {
        return Err(ProtocolError::protocol(format!(
            "a compressed batch of {size} bytes (at most {BATCH_MAX_CONTENT})"
        )));
    }
    if size > data.len().saturating_mul(BATCH_MAX_EXPANSION) as u64 {
        return Err(ProtocolError::protocol(format!(
            "a compressed batch of {} bytes claims {size} (at most {BATCH_MAX_EXPANSION} times)",
            data.len()
        )));
    }
    let content = zstd::bulk::decompress(data, size as usize)
        .map_err(|e| ProtocolError::protocol(format!("compressed batch: {e}")))?;
    let mut rest = content.as_slice();
    let mut messages = Vec::new();
    while !rest.is_empty() {
        if messages.len() == BATCH_MAX_MESSAGES {
            return Err(ProtocolError::protocol(format!(
                "a compressed batch of more than {BATCH_MAX_MESSAGES} messages"
            )));
        }
        let (len, after) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| ProtocolError::protocol("a compressed batch cut inside a length"))?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > after.len() || len > max_frame {
            return Err(ProtocolError::protocol(format!(
                "a message of {len} bytes in a compressed batch ({} left, at most {max_frame})",
                after.len()
            )));
        }
        let (item, next) = after.split_at(len);
        messages.push(document_message(item)?);
        rest = next;
    }
    if messages.len() < 2 {
        return Err(ProtocolError::protocol(
            "a compressed batch of fewer than two messages",
        ));
    }
    Ok(messages)
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
            vec![m]
        );
        let mut noise = vec![0u8; 4096];
        getrandom::fill(&mut noise).expect("random");
        let m = sync(noise);
        let e = encode(&m, true);
        assert!(!e.compressed && e.bytes.len() == e.plain_len);
        assert_eq!(
            decode(&e.bytes, PROTOCOL_VERSION, 1 << 20).expect("decodes"),
            vec![m]
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

    fn batch_of(msgs: &[Message]) -> Vec<Encoded> {
        let mut batch = Batch::default();
        for m in msgs {
            let plain = m.encode();
            assert!(batch.fits(plain.len()));
            batch.push(plain);
        }
        let frames = batch.take();
        assert!(batch.is_empty());
        frames
    }

    /// Text shaped like documents' notes: words of a shared vocabulary, in an order of
    /// their own (a xorshift from `seed`).
    fn notes(seed: usize) -> Vec<u8> {
        let words = [
            "model", "edge", "rollout", "latency", "sensor", "night", "shift",
        ];
        let mut x = (seed as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (0..700)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                words[(x % words.len() as u64) as usize]
            })
            .collect::<Vec<_>>()
            .join(" ")
            .into_bytes()
    }

    #[test]
    fn a_batch_shares_what_its_messages_repeat_and_decodes_in_order() {
        let msgs: Vec<Message> = (0..40).map(|i| sync(notes(i))).collect();
        let frames = batch_of(&msgs);
        assert_eq!(frames.len(), 1);
        let batched = &frames[0];
        assert!(batched.compressed && batched.messages == 40);
        let alone: usize = msgs.iter().map(|m| encode(m, true).bytes.len()).sum();
        assert!(
            batched.bytes.len() * 10 < alone * 9,
            "{} batched, {alone} one by one",
            batched.bytes.len()
        );
        assert_eq!(
            decode(&batched.bytes, PROTOCOL_VERSION, 1 << 20).expect("decodes"),
            msgs
        );
        // A peer of protocol 7 never gets a batch, and refuses one.
        assert!(decode(&batched.bytes, CLASSES_PROTOCOL_VERSION, 1 << 20).is_err());
        // Noise goes as it is, message by message.
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        getrandom::fill(&mut a).expect("random");
        getrandom::fill(&mut b).expect("random");
        let frames = batch_of(&[sync(a), sync(b)]);
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| !f.compressed));
        // One message alone is compressed on its own.
        let frames = batch_of(&[sync(notes(1))]);
        assert!(frames.len() == 1 && frames[0].compressed && frames[0].messages == 1);
    }

    #[test]
    fn a_batch_is_bounded_when_filled_and_when_decoded() {
        let mut batch = Batch::default();
        assert!(!batch.fits(BATCH_ITEM_MAX + 1));
        let small = sync(vec![1; 100]).encode();
        while batch.fits(small.len()) {
            batch.push(small.clone());
        }
        assert_eq!(batch.plains.len(), BATCH_MAX_MESSAGES);
        let content = |items: &[Vec<u8>]| {
            let mut c = Vec::new();
            for i in items {
                c.extend_from_slice(&(i.len() as u32).to_le_bytes());
                c.extend_from_slice(i);
            }
            Message::CompressedBatch {
                data: zstd::bulk::compress(&c, 3).expect("zstd"),
            }
            .encode()
        };
        let refused = |frame: Vec<u8>, why: &str| {
            let err = decode(&frame, PROTOCOL_VERSION, 1 << 20).expect_err(why);
            println!("{why}: {}", err.reason);
        };
        refused(
            content(&vec![small.clone(); BATCH_MAX_MESSAGES + 1]),
            "too many messages",
        );
        refused(
            content(&[sync(vec![0; BATCH_MAX_CONTENT]).encode(), small.clone()]),
            "too much content",
        );
        refused(content(std::slice::from_ref(&small)), "a batch of one");
        refused(
            content(&[small.clone(), Message::Synced { seq: 1 }.encode()]),
            "something other than a document",
        );
        let mut cut = Vec::new();
        cut.extend_from_slice(&(small.len() as u32 + 9).to_le_bytes());
        cut.extend_from_slice(&small);
        refused(
            Message::CompressedBatch {
                data: zstd::bulk::compress(&cut, 3).expect("zstd"),
            }
            .encode(),
            "a length past the end",
        );
        let err = decode(
            &content(&[small.clone(), sync(vec![2; 5000]).encode()]),
            PROTOCOL_VERSION,
            4096,
        )
        .expect_err("over the frame limit");
        assert!(err.reason.contains("at most 4096"), "{}", err.reason);
        // Content that claims more than 256 times its frame is refused, and a sender sends
        // such messages one by one instead.
        let same = sync(vec![0; 60 << 10]).encode();
        refused(
            content(&[same.clone(), same.clone(), same.clone(), same.clone()]),
            "expands too far",
        );
        let mut batch = Batch::default();
        for _ in 0..4 {
            batch.push(same.clone());
        }
        let frames = batch.take();
        assert_eq!(frames.len(), 4, "sent one by one");
        assert!(frames.iter().all(|f| f.messages == 1));
        let ok = content(&[small.clone(), small.clone()]);
        assert_eq!(
            decode(&ok, PROTOCOL_VERSION, 4096).expect("decodes").len(),
            2
        );
    }

    proptest::proptest! {
        /// Whatever a peer puts in a batch, decoding ends in messages within the bounds
        /// or in a protocol error, never a panic: arbitrary content, and content made of
        /// real messages with one byte changed.
        #[test]
        fn a_hostile_batch_is_decoded_within_bounds_or_refused(
            content in proptest::collection::vec(proptest::num::u8::ANY, 0..4096),
            flip in 0usize..4096,
            to in proptest::num::u8::ANY,
        ) {
            let frame = |c: &[u8]| {
                Message::CompressedBatch {
                    data: zstd::bulk::compress(c, 1).expect("zstd"),
                }
                .encode()
            };
            if let Ok(msgs) = decode(&frame(&content), PROTOCOL_VERSION, 1 << 20) {
                proptest::prop_assert!((2..=BATCH_MAX_MESSAGES).contains(&msgs.len()));
                proptest::prop_assert!(msgs.iter().all(is_document));
            }
            let mut real = Vec::new();
            for i in 0..3u8 {
                let m = sync(vec![i; 40]).encode();
                real.extend_from_slice(&(m.len() as u32).to_le_bytes());
                real.extend_from_slice(&m);
            }
            let at = flip % real.len();
            real[at] = to;
            if let Ok(msgs) = decode(&frame(&real), PROTOCOL_VERSION, 1 << 20) {
                proptest::prop_assert!(msgs.iter().all(is_document));
            }
        }
    }
}
