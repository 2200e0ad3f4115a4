//! Fetching one blob from the peers that have it.
//!
//! What is missing is cut into pieces; one worker per source takes pieces from a shared
//! queue and asks its peer for them on a stream of its own, so several peers serve one
//! blob at once and a slow one takes fewer pieces. Every chunk group is verified as it
//! arrives (bao), written at its offset and only then counted as had. A source that
//! does not have the blob, fails, or sends a chunk group that does not verify stops;
//! the part of its piece not yet verified goes back to the queue for the others. A
//! corrupt source is reported on its peer counters and in the log.
//!
//! Nothing is recorded of the progress but the files themselves: a cut transfer (a lost
//! connection, a killed process) resumes with exactly the chunk groups still missing.

use std::io::{self, BufReader, Read};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::{DecodeResponseIter, OutboardMut};
use bao_tree::io::{BaoContentItem, DecodeError, Leaf, Parent};
use bao_tree::{BaoTree, ChunkNum, ChunkRanges};
use positioned_io::WriteAt;

use super::blocks::{BadBlock, BlockReader};
use super::files::{ranges_bytes, BLOCK};
use super::stall::StallRead;
use super::wire::{self, BlobAnswer, BlobRequest, MAX_REQUEST_RANGES, PLAIN_BLOB_PROTOCOL};
use super::{Blobs, Transfer, MAX_SOURCES};
use crate::model::{format_blob_hash, NodeId};
use crate::net::counters::PeerCounters;

/// A peer to fetch from.
#[derive(Clone, Debug)]
pub struct Source {
    /// Its node id.
    pub peer: NodeId,
    /// The connection to it.
    pub conn: quinn::Connection,
    /// Its counters.
    pub counters: Arc<PeerCounters>,
}

/// How a fetch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The blob is complete and durable.
    Complete,
    /// Another fetch of it is under way.
    AlreadyRunning,
    /// Some of it is still missing: no source had it, or every source failed.
    Incomplete {
        /// Bytes still missing.
        missing: u64,
    },
}

/// Bytes of a blob written between two syncs of its file while it is received.
const SYNC_EVERY: u64 = 2 << 20;

/// Smallest piece asked of one source.
const MIN_PIECE_CHUNKS: u64 = 4 * 1024;

/// Why one source stopped.
#[derive(Debug)]
enum SourceFailed {
    Unavailable,
    Corrupt(String),
    Other(String),
}

/// The pieces still to fetch, shared by the workers.
type Pieces = Arc<Mutex<Vec<ChunkRanges>>>;

/// Fetches `hash` (of `size` bytes) from `sources`.
pub async fn fetch_blob(
    blobs: &Blobs,
    hash: [u8; 32],
    size: u64,
    sources: Vec<Source>,
) -> io::Result<Fetched> {
    let Some(guard) = blobs.begin_transfer(hash, size) else {
        return Ok(Fetched::AlreadyRunning);
    };
    let files = blobs.files().clone();
    let known = blobs.known_partial(&hash, size);
    let partial = tokio::task::spawn_blocking(move || files.partial(&hash, size, known))
        .await
        .map_err(io::Error::other)??;
    let transfer = guard.transfer.clone();
    let resumed = partial.bytes_have();
    transfer.start_from(&partial.have, resumed);
    blobs
        .stats()
        .resumed_bytes
        .fetch_add(resumed, Ordering::Relaxed);
    let missing = partial.missing();
    if !missing.is_empty() {
        let n = sources.len().clamp(1, MAX_SOURCES) as u64;
        // Taken from the end: the first piece goes first.
        let pieces = split(&missing, size, n).into_iter().rev().collect();
        let queue: Pieces = Arc::new(Mutex::new(pieces));
        let mut workers = tokio::task::JoinSet::new();
        let newest = blobs.config().protocol;
        for source in sources.into_iter().take(MAX_SOURCES) {
            // A peer that answered in protocol 1 on this connection is asked in 1 at once.
            let version = match source.counters.blob_protocol.load(Ordering::Relaxed) {
                0 => newest,
                answered => newest.min(u8::try_from(answered).unwrap_or(u8::MAX)),
            };
            let w = Worker {
                blobs: blobs.clone(),
                hash,
                size,
                source,
                queue: queue.clone(),
                transfer: transfer.clone(),
                data: partial.data.try_clone()?,
                outboard: partial.outboard.data.try_clone()?,
                version,
            };
            workers.spawn(w.run());
        }
        while workers.join_next().await.is_some() {}
    }
    let have = transfer.have.lock().map(|h| h.clone()).unwrap_or_default();
    let all = ChunkRanges::from(..ChunkNum::chunks(size));
    let left = all - have.clone();
    if !left.is_empty() {
        blobs.remember_partial(hash, size, have);
        blobs.stats().fetch_failures.fetch_add(1, Ordering::Relaxed);
        return Ok(Fetched::Incomplete {
            missing: ranges_bytes(&left, size),
        });
    }
    let mut partial = partial;
    partial.have = have;
    let files = blobs.files().clone();
    tokio::task::spawn_blocking(move || files.complete(partial))
        .await
        .map_err(io::Error::other)??;
    blobs.stats().fetched.fetch_add(1, Ordering::Relaxed);
    drop(guard);
    blobs.finished(&hash);
    tracing::info!(blob = %format_blob_hash(&hash), size, "blob fetched and verified");
    Ok(Fetched::Complete)
}

/// Cuts `missing` into about `2 * sources` pieces of whole chunk groups.
fn split(missing: &ChunkRanges, size: u64, sources: u64) -> Vec<ChunkRanges> {
    let group = 1u64 << BLOCK.chunk_log();
    let total = ranges_bytes(missing, size).div_ceil(1024);
    let piece = (total / (2 * sources))
        .max(MIN_PIECE_CHUNKS)
        .div_ceil(group)
        * group;
    let end_all = ChunkNum::chunks(size).0;
    let mut out = Vec::new();
    let mut current = ChunkRanges::empty();
    let mut in_current = 0;
    for r in missing.iter() {
        let (mut s, e) = match r {
            range_collections::range_set::RangeSetRange::Range(r) => (r.start.0, r.end.0),
            range_collections::range_set::RangeSetRange::RangeFrom(r) => (r.start.0, end_all),
        };
        while s < e {
            let take = (piece - in_current).min(e - s);
            current |= ChunkRanges::from(ChunkNum(s)..ChunkNum(s + take));
            in_current += take;
            s += take;
            if in_current >= piece || current.boundaries().len() / 2 >= MAX_REQUEST_RANGES {
                out.push(std::mem::replace(&mut current, ChunkRanges::empty()));
                in_current = 0;
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

struct Worker {
    blobs: Blobs,
    hash: [u8; 32],
    size: u64,
    source: Source,
    queue: Pieces,
    transfer: Arc<Transfer>,
    data: std::fs::File,
    outboard: std::fs::File,
    /// The blob protocol version asked in: the newest this node speaks, until the peer
    /// shows it speaks only the first.
    version: u8,
}

impl Worker {
    async fn run(mut self) {
        self.transfer.sources.fetch_add(1, Ordering::Relaxed);
        loop {
            let Some(piece) = self.queue.lock().ok().and_then(|mut q| q.pop()) else {
                break;
            };
            // Another source may have verified part of it meanwhile (a returned piece).
            let piece = piece - self.have();
            if piece.is_empty() {
                continue;
            }
            match self.fetch_piece(&piece).await {
                Ok(()) => {}
                Err(failed) => {
                    let rest = piece - self.have();
                    if !rest.is_empty() {
                        if let Ok(mut q) = self.queue.lock() {
                            q.push(rest);
                        }
                    }
                    let peer = &self.source.peer;
                    let blob = format_blob_hash(&self.hash);
                    match failed {
                        SourceFailed::Unavailable => {
                            tracing::debug!(%peer, %blob, "the peer does not have the blob")
                        }
                        SourceFailed::Corrupt(at) => {
                            self.source
                                .counters
                                .blob_corrupt
                                .fetch_add(1, Ordering::Relaxed);
                            self.blobs.stats().corrupt.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%peer, %blob, %at, "the peer sent blob data that fails verification: dropped it, fetching the rest elsewhere");
                        }
                        SourceFailed::Other(why) => {
                            tracing::debug!(%peer, %blob, %why, "fetching from the peer failed")
                        }
                    }
                    break;
                }
            }
        }
        self.transfer.sources.fetch_sub(1, Ordering::Relaxed);
    }

    fn have(&self) -> ChunkRanges {
        self.transfer
            .have
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }

    /// Asks the peer for `piece` in [`Self::version`]: its answer, and the stream the
    /// encoding follows on.
    async fn ask(
        &self,
        piece: &ChunkRanges,
    ) -> Result<(BlobAnswer, quinn::RecvStream), SourceFailed> {
        let other = |e: &dyn std::fmt::Display| SourceFailed::Other(e.to_string());
        let (mut send, mut recv) = self.source.conn.open_bi().await.map_err(|e| other(&e))?;
        let req = BlobRequest {
            version: self.version,
            hash: self.hash,
            size: self.size,
            ranges: ranges_list(piece, self.size),
        };
        let frame = wire::encode(&req).map_err(|e| other(&e))?;
        send.write_all(&frame).await.map_err(|e| other(&e))?;
        let _ = send.finish();
        let answer = wire::read::<BlobAnswer>(&mut recv)
            .await
            .map_err(|e| other(&e))?;
        Ok((answer, recv))
    }

    async fn fetch_piece(&mut self, piece: &ChunkRanges) -> Result<(), SourceFailed> {
        let other = |e: &dyn std::fmt::Display| SourceFailed::Other(e.to_string());
        let (mut answer, mut recv) = self.ask(piece).await?;
        if answer == BlobAnswer::Malformed && self.version > PLAIN_BLOB_PROTOCOL {
            // A node of the first protocol refuses a version it does not know.
            tracing::debug!(peer = %self.source.peer, "the peer speaks blob protocol 1");
            self.version = PLAIN_BLOB_PROTOCOL;
            (answer, recv) = self.ask(piece).await?;
        }
        if answer == BlobAnswer::Sending {
            self.source
                .counters
                .blob_protocol
                .store(u64::from(self.version), Ordering::Relaxed);
        }
        match answer {
            BlobAnswer::Sending => {}
            BlobAnswer::Unavailable => return Err(SourceFailed::Unavailable),
            BlobAnswer::OtherSize(s) => {
                return Err(SourceFailed::Other(format!(
                    "the peer holds it with {s} bytes, not {}",
                    self.size
                )))
            }
            a => return Err(SourceFailed::Other(format!("the peer answered {a:?}"))),
        }
        let bridge = StallRead::new(recv);
        let ctx = Decode {
            hash: self.hash,
            size: self.size,
            ranges: piece.clone(),
            data: self.data.try_clone().map_err(|e| other(&e))?,
            outboard: self.outboard.try_clone().map_err(|e| other(&e))?,
            transfer: self.transfer.clone(),
            counters: self.source.counters.clone(),
            blobs: self.blobs.clone(),
            blocks: self.version > PLAIN_BLOB_PROTOCOL,
        };
        tokio::task::spawn_blocking(move || ctx.run(bridge))
            .await
            .map_err(|e| other(&e))?
    }
}

/// The chunk ranges of a piece as a request lists them.
fn ranges_list(piece: &ChunkRanges, size: u64) -> Vec<(u64, u64)> {
    let end_all = ChunkNum::chunks(size).0;
    piece
        .iter()
        .map(|r| match r {
            range_collections::range_set::RangeSetRange::Range(r) => (r.start.0, r.end.0),
            range_collections::range_set::RangeSetRange::RangeFrom(r) => (r.start.0, end_all),
        })
        .collect()
}

/// One response being verified and written (on a blocking thread).
struct Decode {
    hash: [u8; 32],
    size: u64,
    ranges: ChunkRanges,
    data: std::fs::File,
    outboard: std::fs::File,
    transfer: Arc<Transfer>,
    counters: Arc<PeerCounters>,
    blobs: Blobs,
    /// The encoding comes in blocks (protocol 2).
    blocks: bool,
}

/// Counts what is read off the stream.
struct Counted<'a, R> {
    inner: R,
    ctx: &'a Decode,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let n64 = n as u64;
        self.ctx.transfer.received.fetch_add(n64, Ordering::Relaxed);
        self.ctx
            .counters
            .blob_received_bytes
            .fetch_add(n64, Ordering::Relaxed);
        self.ctx
            .blobs
            .stats()
            .received_bytes
            .fetch_add(n64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Decode {
    fn run(self, stream: StallRead) -> Result<(), SourceFailed> {
        let mut outboard = PreOrderOutboard {
            root: bao_tree::blake3::Hash::from(self.hash),
            tree: BaoTree::new(self.size, BLOCK),
            data: self
                .outboard
                .try_clone()
                .map_err(|e| SourceFailed::Other(e.to_string()))?,
        };
        let mut data = self
            .data
            .try_clone()
            .map_err(|e| SourceFailed::Other(e.to_string()))?;
        let ranges = self.ranges.clone();
        let counted = Counted {
            inner: stream,
            ctx: &self,
        };
        let reader: Box<dyn Read + '_> = if self.blocks {
            let blocks = BlockReader::new(BufReader::with_capacity(256 * 1024, counted))
                .map_err(|e| SourceFailed::Other(e.to_string()))?;
            Box::new(blocks)
        } else {
            Box::new(BufReader::with_capacity(256 * 1024, counted))
        };
        let iter = DecodeResponseIter::new(outboard.root, outboard.tree, reader, &ranges);
        let mut unsynced = 0u64;
        for item in iter {
            match item {
                Ok(BaoContentItem::Parent(Parent { node, pair })) => outboard
                    .save(node, &pair)
                    .map_err(|e| SourceFailed::Other(e.to_string()))?,
                Ok(BaoContentItem::Leaf(Leaf {
                    offset,
                    data: bytes,
                })) => {
                    data.write_all_at(offset, &bytes)
                        .map_err(|e| SourceFailed::Other(e.to_string()))?;
                    let chunks = ChunkNum::full_chunks(offset)
                        ..ChunkNum::chunks(offset + bytes.len() as u64);
                    if let Ok(mut have) = self.transfer.have.lock() {
                        *have |= ChunkRanges::from(chunks);
                    }
                    self.transfer.progress.notify_waiters();
                    self.transfer
                        .done
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    // Written back a little at a time: a gigabyte of dirty pages flushed
                    // at once would stall every document commit (its fsync) behind it.
                    unsynced += bytes.len() as u64;
                    if unsynced >= SYNC_EVERY {
                        data.sync_data()
                            .map_err(|e| SourceFailed::Other(e.to_string()))?;
                        unsynced = 0;
                    }
                }
                Err(DecodeError::LeafHashMismatch(c)) => {
                    return Err(SourceFailed::Corrupt(format!(
                        "chunk group at byte {}",
                        c.to_bytes()
                    )))
                }
                Err(DecodeError::ParentHashMismatch(n)) => {
                    return Err(SourceFailed::Corrupt(format!(
                        "tree node at chunk {}",
                        n.mid().0
                    )))
                }
                Err(DecodeError::Io(e)) if BadBlock::is(&e) => {
                    return Err(SourceFailed::Corrupt(e.to_string()))
                }
                Err(e) => return Err(SourceFailed::Other(e.to_string())),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_what_is_missing_exactly_in_whole_groups() {
        let size = 100 * 1024 * 1024 + 5;
        let all = ChunkRanges::from(..ChunkNum::chunks(size));
        let have = ChunkRanges::from(ChunkNum(1000)..ChunkNum(30_000));
        let missing = all.clone() - have;
        let pieces = split(&missing, size, 3);
        assert!(pieces.len() >= 6);
        let mut union = ChunkRanges::empty();
        for p in &pieces {
            assert!((union.clone() & p.clone()).is_empty(), "pieces overlap");
            union |= p.clone();
        }
        assert_eq!(union, missing);
    }
}
