//! Serving blob streams to a peer: every bidirectional stream the peer opens beside the
//! sync stream is one [`BlobRequest`](super::wire::BlobRequest).
//!
//! A request is answered only for a blob held here that a document the peer may read
//! references. The encoding is validated against the tree while it is read from disk, so
//! a blob damaged on this node's disk is never sent as good: the stream is cut at the bad
//! chunk group and the blob is set aside to be fetched again.

use std::io::{self, BufWriter, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bao_tree::io::sync::encode_ranges_validated;
use bao_tree::io::EncodeError;
use bao_tree::{ChunkNum, ChunkRanges};
use tokio_util::sync::CancellationToken;

use super::blocks::BlockWriter;
use super::stall::StallWrite;
use super::wire::{self, BlobAnswer, BlobRequest};
use super::Blobs;
use crate::model::{format_blob_hash, Grants, NodeId};
use crate::net::counters::PeerCounters;
use crate::net::pacing::Bucket;

/// How long a peer has to send its request once it opened a stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Blob streams one peer may have open at once; quinn's stream limit holds the rest.
pub const MAX_STREAMS_PER_PEER: u32 = 4;

/// What a connection's blob server needs to know of the peer.
#[derive(Clone, Debug)]
pub struct ServedPeer {
    /// Its node id, for logs.
    pub id: NodeId,
    /// What it may read.
    pub grants: Grants,
    /// Its counters.
    pub counters: Arc<PeerCounters>,
    /// Whether blob streams to it are compressed where that pays (protocol 2).
    pub compress: bool,
}

/// Serves the blob streams `conn`'s peer opens until the connection ends or `stop`.
pub async fn serve_connection(
    blobs: Blobs,
    conn: quinn::Connection,
    peer: ServedPeer,
    link: Option<Arc<Bucket>>,
    stop: CancellationToken,
) {
    // The blob streams' own cap and the link's, shared with the link's documents.
    let pace: Arc<[Arc<Bucket>]> = blobs
        .config()
        .max_rate
        .map(|r| Arc::new(Bucket::new(r)))
        .into_iter()
        .chain(link)
        .collect();
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = conn.accept_bi() => a,
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
        };
        let Ok((send, recv)) = accepted else {
            break;
        };
        let (blobs, peer, pace) = (blobs.clone(), peer.clone(), pace.clone());
        streams.spawn(async move {
            if let Err(e) = serve_stream(&blobs, &peer, pace, send, recv).await {
                tracing::debug!(peer = %peer.id, error = %e, "blob stream ended");
            }
        });
    }
    streams.abort_all();
}

async fn serve_stream(
    blobs: &Blobs,
    peer: &ServedPeer,
    pace: Arc<[Arc<Bucket>]>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> io::Result<()> {
    let req: BlobRequest = tokio::time::timeout(REQUEST_TIMEOUT, wire::read(&mut recv))
        .await
        .map_err(|_| io::Error::other("no request in time"))?
        .map_err(io::Error::other)?;
    let permit = blobs.inner.serving.clone().try_acquire_owned().ok();
    let answer = answer_for(blobs, peer, &req, permit.is_some()).await;
    let frame = wire::encode(&answer).map_err(io::Error::other)?;
    send.write_all(&frame).await.map_err(io::Error::other)?;
    if answer != BlobAnswer::Sending {
        blobs.stats().refused.fetch_add(1, Ordering::Relaxed);
        let _ = send.finish();
        return Ok(());
    }
    // Documents first: the sync stream keeps priority 0.
    let _ = send.set_priority(-1);
    let ranges = to_chunk_ranges(&req.ranges);
    let bridge = StallWrite::new(send);
    let (b, counters, hash) = (blobs.clone(), peer.counters.clone(), req.hash);
    let framing = Framing {
        blocks: req.version >= wire::BLOB_PROTOCOL,
        compress: peer.compress,
        corrupt_at: blobs.corrupts_sends().then_some(100_000),
    };
    let sent = tokio::task::spawn_blocking(move || -> io::Result<quinn::SendStream> {
        let _permit = permit;
        let reader = b
            .files()
            .reader(&hash)?
            .ok_or_else(|| io::Error::other("blob deleted meanwhile"))?;
        let out = Metered {
            inner: bridge,
            pace,
            blobs: b.clone(),
            counters,
        };
        match framing.encode(&reader, &ranges, out) {
            Ok(out) => Ok(out.inner.into_inner()),
            Err(EncodeError::LeafHashMismatch(_) | EncodeError::ParentHashMismatch(_)) => {
                tracing::error!(blob = %format_blob_hash(&hash), "a blob held here fails verification: setting it aside to fetch again");
                drop(reader);
                if let Err(e) = b.files().set_aside(&hash) {
                    tracing::error!(error = %e, "setting a damaged blob aside failed");
                }
                b.poke();
                Err(io::Error::other("blob damaged on disk"))
            }
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    })
    .await
    .map_err(io::Error::other)??;
    let mut sent = sent;
    sent.finish().map_err(io::Error::other)?;
    // Wait until the peer has it all (or goes), so the stream is not cut by a close.
    let _ = sent.stopped().await;
    Ok(())
}

/// How a response's encoding goes on the stream.
#[derive(Clone, Copy, Debug)]
struct Framing {
    /// In blocks (protocol 2), else unframed (protocol 1).
    blocks: bool,
    /// Blocks compressed where that pays.
    compress: bool,
    /// Test hook: the byte of the encoding to flip, as a faulty or hostile peer would
    /// (before any compression, so the receiver sees a chunk group that fails
    /// verification, whatever the framing).
    corrupt_at: Option<u64>,
}

impl Framing {
    /// Encodes `ranges` of the blob into `out` and answers `out` back; what compression
    /// saves is counted block by block.
    fn encode(
        self,
        reader: &super::BlobReader,
        ranges: &ChunkRanges,
        out: Metered,
    ) -> Result<Metered, EncodeError> {
        let (data, outboard) = (&reader.data, &reader.outboard);
        if self.blocks {
            let blobs = out.blobs.clone();
            let w = BlockWriter::new(out, self.compress)?.on_saved(move |n| {
                let saved = &blobs.stats().compression_saved_bytes;
                saved.fetch_add(n, Ordering::Relaxed);
            });
            let mut w = FlipAt::new(w, self.corrupt_at);
            encode_ranges_validated(data, outboard, ranges, &mut w)?;
            Ok(w.inner.finish()?)
        } else {
            let w = BufWriter::with_capacity(256 * 1024, out);
            let mut w = FlipAt::new(w, self.corrupt_at);
            encode_ranges_validated(data, outboard, ranges, &mut w)?;
            let out = w
                .inner
                .into_inner()
                .map_err(|e| EncodeError::Io(e.into_error()))?;
            Ok(out)
        }
    }
}

async fn answer_for(blobs: &Blobs, peer: &ServedPeer, req: &BlobRequest, room: bool) -> BlobAnswer {
    if req.check(blobs.config().protocol).is_err() {
        return BlobAnswer::Malformed;
    }
    let (b, grants, hash) = (blobs.clone(), peer.grants.clone(), req.hash);
    let looked = tokio::task::spawn_blocking(move || {
        let readable = b.index().readable_by(&hash, &grants)?;
        let held = b.files().held(&hash)?;
        Ok::<_, super::BlobError>((readable, held))
    })
    .await;
    match looked {
        Ok(Ok((true, Some(size)))) if size != req.size => BlobAnswer::OtherSize(size),
        Ok(Ok((true, Some(_)))) if !room => BlobAnswer::Busy,
        Ok(Ok((true, Some(_)))) => BlobAnswer::Sending,
        Ok(Ok((readable, _))) => {
            if !readable {
                peer.counters.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %peer.id, blob = %format_blob_hash(&req.hash), "blob request refused: no document the peer may read references it");
            }
            BlobAnswer::Unavailable
        }
        _ => BlobAnswer::Unavailable,
    }
}

/// Chunk ranges of a checked request.
pub fn to_chunk_ranges(ranges: &[(u64, u64)]) -> ChunkRanges {
    let mut out = ChunkRanges::empty();
    for &(s, e) in ranges {
        out |= ChunkRanges::from(ChunkNum(s)..ChunkNum(e));
    }
    out
}

/// The test hook's writer: flips the lowest bit of byte `at` of what passes, if any.
struct FlipAt<W: Write> {
    inner: W,
    at: Option<u64>,
    written: u64,
}

impl<W: Write> FlipAt<W> {
    fn new(inner: W, at: Option<u64>) -> Self {
        Self {
            inner,
            at,
            written: 0,
        }
    }
}

impl<W: Write> Write for FlipAt<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match self.at {
            Some(at) if at >= self.written && at < self.written + buf.len() as u64 => {
                let mut bad = buf.to_vec();
                bad[(at - self.written) as usize] ^= 0x01;
                self.inner.write_all(&bad)?;
                buf.len()
            }
            _ => self.inner.write(buf)?,
        };
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The blocking writer under the encoder: counts and paces.
struct Metered {
    inner: StallWrite,
    pace: Arc<[Arc<Bucket>]>,
    blobs: Blobs,
    counters: Arc<PeerCounters>,
}

impl Write for Metered {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Paced in small slices: a capped link never gets a burst longer than a slice,
        // which a modem's queue would hold everything else behind.
        let buf = if self.pace.is_empty() {
            buf
        } else {
            &buf[..buf.len().min(crate::net::pacing::PACED_SLICE)]
        };
        for p in self.pace.iter() {
            p.take_blocking(buf.len());
        }
        let n = self.inner.write(buf)?;
        self.blobs
            .stats()
            .sent_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        self.counters
            .blob_sent_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
