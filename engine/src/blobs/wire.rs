//! The blob stream protocol. A node that wants chunks of a blob opens a bidirectional
//! QUIC stream to a peer (beside the sync stream, at a lower priority) and sends one
//! [`BlobRequest`]; the peer answers one [`BlobAnswer`] and, if it sends, the bao encoding
//! of exactly the requested chunk ranges (parent hash pairs and 16 KiB chunk groups in
//! pre-order), then finishes the stream. The receiver verifies every chunk group against
//! the hash as it arrives. Both messages are postcard, after a 4-byte little-endian length.
//!
//! Versions: in protocol 1 the encoding follows the answer as it is; in protocol 2 it
//! comes in blocks, compressed where that pays (`blocks`). A node asks in the newest
//! version it speaks; a node of protocol 1 answers [`BlobAnswer::Malformed`] to a
//! version it does not know, and the asker asks it again in version 1.

use serde::{Deserialize, Serialize};

/// Newest version of the blob stream protocol, first in every request.
pub const BLOB_PROTOCOL: u8 = 2;

/// The first version: the encoding follows the answer unframed.
pub const PLAIN_BLOB_PROTOCOL: u8 = 1;

/// Largest request or answer frame: ranges are few (a request covers what one source
/// is asked for).
pub const MAX_BLOB_FRAME: usize = 64 * 1024;

/// Most chunk ranges one request may ask for.
pub const MAX_REQUEST_RANGES: usize = 1024;

/// Largest blob this node accepts a reference to or a request for: 1 TiB.
pub const MAX_BLOB_SIZE: u64 = 1 << 40;

/// Chunks of a blob, asked of one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRequest {
    /// The protocol version the answer is to use: [`BLOB_PROTOCOL`] or
    /// [`PLAIN_BLOB_PROTOCOL`].
    pub version: u8,
    /// The blob's BLAKE3 hash.
    pub hash: [u8; 32],
    /// Its size as the asker knows it (from the reference).
    pub size: u64,
    /// Chunk ranges (1 KiB chunks, end exclusive), sorted and disjoint.
    pub ranges: Vec<(u64, u64)>,
}

/// A peer's answer to a [`BlobRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobAnswer {
    /// The encoding of the requested ranges follows.
    Sending,
    /// Not held here, or not readable by the asker: the two are not told apart, so a
    /// hash alone reveals nothing.
    Unavailable,
    /// Held, but with another size than the request states: the reference is wrong.
    OtherSize(u64),
    /// Too many transfers at once here; ask again later or elsewhere.
    Busy,
    /// The request is not well formed.
    Malformed,
}

/// Why a frame is refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Longer than [`MAX_BLOB_FRAME`].
    #[error("blob frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Not a valid message.
    #[error("blob frame does not decode: {0}")]
    Decode(String),
    /// The stream failed.
    #[error("blob stream: {0}")]
    Stream(String),
}

impl BlobRequest {
    /// Checks what a peer sent before any work is done for it, on a node that speaks
    /// versions up to `newest`.
    pub fn check(&self, newest: u8) -> Result<(), &'static str> {
        if !(PLAIN_BLOB_PROTOCOL..=newest).contains(&self.version) {
            return Err("unknown blob protocol version");
        }
        if self.size > MAX_BLOB_SIZE {
            return Err("blob too large");
        }
        if self.ranges.is_empty() || self.ranges.len() > MAX_REQUEST_RANGES {
            return Err("no ranges, or too many");
        }
        let chunks = self.size.div_ceil(1024).max(1);
        let mut last_end = 0;
        for (i, &(start, end)) in self.ranges.iter().enumerate() {
            if start >= end || end > chunks || (i > 0 && start <= last_end) {
                return Err("ranges out of order, empty or past the blob's end");
            }
            last_end = end;
        }
        Ok(())
    }
}

/// Encodes a message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let body = postcard::to_stdvec(msg).map_err(|e| WireError::Decode(e.to_string()))?;
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads one frame from a QUIC stream.
pub async fn read<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
) -> Result<T, WireError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| WireError::Stream(e.to_string()))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_BLOB_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| WireError::Stream(e.to_string()))?;
    postcard::from_bytes(&body).map_err(|e| WireError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(size: u64, ranges: Vec<(u64, u64)>) -> BlobRequest {
        BlobRequest {
            version: BLOB_PROTOCOL,
            hash: [0; 32],
            size,
            ranges,
        }
    }

    #[test]
    fn requests_are_checked_before_any_work() {
        assert!(req(10_000, vec![(0, 10)]).check(BLOB_PROTOCOL).is_ok());
        assert!(req(10_000, vec![(0, 2), (4, 10)])
            .check(BLOB_PROTOCOL)
            .is_ok());
        assert!(req(0, vec![(0, 1)]).check(BLOB_PROTOCOL).is_ok());
        for bad in [
            req(10_000, vec![]),
            req(10_000, vec![(0, 11)]),
            req(10_000, vec![(3, 3)]),
            req(10_000, vec![(4, 6), (0, 2)]),
            req(10_000, vec![(0, 4), (4, 6)]),
            req(MAX_BLOB_SIZE + 1, vec![(0, 1)]),
            req(
                10_000,
                (0..MAX_REQUEST_RANGES as u64 + 1)
                    .map(|i| (i, i + 1))
                    .collect(),
            ),
        ] {
            assert!(bad.check(BLOB_PROTOCOL).is_err(), "{bad:?}");
        }
        // Versions: both known ones, and not one past; a node held to the first refuses
        // the second, as a node of that version does.
        let mut v = req(1, vec![(0, 1)]);
        for (version, newest, ok) in [
            (PLAIN_BLOB_PROTOCOL, BLOB_PROTOCOL, true),
            (BLOB_PROTOCOL, BLOB_PROTOCOL, true),
            (BLOB_PROTOCOL + 1, BLOB_PROTOCOL, false),
            (0, BLOB_PROTOCOL, false),
            (BLOB_PROTOCOL, PLAIN_BLOB_PROTOCOL, false),
        ] {
            v.version = version;
            assert_eq!(
                v.check(newest).is_ok(),
                ok,
                "{version} on a node of {newest}"
            );
        }
    }
}
