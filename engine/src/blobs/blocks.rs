//! Blob protocol 2: a response's bao encoding cut into blocks, each compressed with zstd
//! when that makes it smaller and sent as it is otherwise.
//!
//! A block is a 4-byte little-endian header and up to [`BLOCK_PLAIN`] bytes of the
//! encoding: the header's top bit says whether the block is a zstd frame, the other bits
//! give its length on the wire. Datasets of text, CSV or JSON shrink to a fraction; model
//! weights and media do not, and then cost 4 bytes in 64 KiB. A sender that found blocks
//! not shrinking stops trying for a while ([`MAX_SKIP`] blocks at most), so dense data
//! does not cost a compression attempt per block, and tries again in case the data
//! changes (an archive of text and images).
//!
//! The reader is hostile by default: a block's length is checked before it is read, and
//! a compressed block is decompressed into at most [`BLOCK_PLAIN`] bytes, so a peer can
//! make it hold no more than two blocks whatever it sends.

use std::io::{self, Read, Write};

/// Most bytes of the encoding in one block. Four of the 16 KiB chunk groups: enough for
/// zstd to find what repeats, small enough that a block costs well under a millisecond.
pub const BLOCK_PLAIN: usize = 64 * 1024;

/// The header bit of a compressed block.
const COMPRESSED: u32 = 1 << 31;

/// zstd's level for blob blocks: the same as for documents.
const LEVEL: i32 = crate::net::frames::ZSTD_LEVEL;

/// A block goes compressed only if that saves at least 1/`WORTH` of it: a saving smaller
/// than that is not worth the receiver's decompression.
const WORTH: usize = 32;

/// Most blocks sent without a compression attempt after blocks that did not shrink.
pub const MAX_SKIP: u32 = 64;

/// The largest a compressed block may be on the wire: zstd's bound for a full block
/// (a sender never sends it larger than the plain block anyway).
fn max_compressed() -> usize {
    zstd::zstd_safe::compress_bound(BLOCK_PLAIN)
}

/// Writes an encoding as blocks into `inner`.
pub struct BlockWriter<W: Write> {
    inner: W,
    plain: Vec<u8>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Where a block is compressed, reused.
    packed: Box<[u8]>,
    /// Blocks still to send without an attempt.
    skip: u32,
    /// Blocks to skip after the next one that does not shrink.
    next_skip: u32,
    /// Told what each compressed block saved, as it is sent.
    on_saved: Box<dyn FnMut(u64) + Send>,
}

impl<W: Write> std::fmt::Debug for BlockWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockWriter")
            .field("buffered", &self.plain.len())
            .field("compress", &self.compressor.is_some())
            .finish_non_exhaustive()
    }
}

impl<W: Write> BlockWriter<W> {
    /// Blocks into `inner`, compressed where it pays if `compress`.
    pub fn new(inner: W, compress: bool) -> io::Result<Self> {
        let compressor = if compress {
            Some(zstd::bulk::Compressor::new(LEVEL)?)
        } else {
            None
        };
        Ok(Self {
            inner,
            plain: Vec::with_capacity(BLOCK_PLAIN),
            packed: vec![0; if compress { BLOCK_PLAIN } else { 0 }].into_boxed_slice(),
            compressor,
            skip: 0,
            next_skip: 1,
            on_saved: Box::new(|_| {}),
        })
    }

    /// Calls `f` with what each compressed block saved (its plain size minus its
    /// compressed size; headers not counted) as the block is sent, so a stream cut short
    /// still counts what it saved.
    pub fn on_saved(mut self, f: impl FnMut(u64) + Send + 'static) -> Self {
        self.on_saved = Box::new(f);
        self
    }

    /// Sends what is buffered and answers the writer under it.
    pub fn finish(mut self) -> io::Result<W> {
        self.send_block()?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn send_block(&mut self) -> io::Result<()> {
        if self.plain.is_empty() {
            return Ok(());
        }
        let (flag, body) = match self.try_compress() {
            Some(n) => (COMPRESSED, &self.packed[..n]),
            None => (0, self.plain.as_slice()),
        };
        let header = (body.len() as u32) | flag;
        self.inner.write_all(&header.to_le_bytes())?;
        self.inner.write_all(body)?;
        if flag == COMPRESSED {
            (self.on_saved)((self.plain.len() - body.len()) as u64);
        }
        self.plain.clear();
        Ok(())
    }

    /// The block compressed into `packed` (its length), if that pays; keeps the back-off
    /// for dense data.
    fn try_compress(&mut self) -> Option<usize> {
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        let compressor = self.compressor.as_mut()?;
        // Room for a block that pays and no more: zstd gives up on one that does not.
        let worth = self.plain.len() - self.plain.len() / WORTH;
        match compressor.compress_to_buffer(&self.plain, &mut self.packed[..worth - 1]) {
            Ok(n) if n > 0 => {
                self.next_skip = 1;
                Some(n)
            }
            _ => {
                self.skip = self.next_skip;
                self.next_skip = (self.next_skip * 2).min(MAX_SKIP);
                None
            }
        }
    }
}

impl<W: Write> Write for BlockWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK_PLAIN - self.plain.len());
        self.plain.extend_from_slice(&buf[..n]);
        if self.plain.len() == BLOCK_PLAIN {
            self.send_block()?;
        }
        Ok(n)
    }

    /// Sends nothing early: blocks are cut by size only, so a flush of the encoder under
    /// a buffered writer does not make small blocks.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads an encoding from the blocks `inner` carries.
pub struct BlockReader<R: Read> {
    inner: R,
    plain: Vec<u8>,
    at: usize,
    wire: Vec<u8>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

/// A block the peer should not have sent: too long, empty, or not zstd. Carried inside
/// the reader's `io::Error`, so the fetch can tell a bad peer from a broken stream.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadBlock(String);

impl BadBlock {
    /// Whether `e` is one.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<BadBlock>())
    }
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, BadBlock(why))
}

impl<R: Read> std::fmt::Debug for BlockReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockReader")
            .field("block", &self.plain.len())
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

impl<R: Read> BlockReader<R> {
    /// Reads blocks from `inner`.
    pub fn new(inner: R) -> io::Result<Self> {
        Ok(Self {
            inner,
            plain: Vec::with_capacity(BLOCK_PLAIN),
            at: 0,
            wire: Vec::with_capacity(max_compressed()),
            decompressor: zstd::bulk::Decompressor::new()?,
        })
    }

    /// The next block into `plain`; `false` at the end of the stream, between blocks.
    /// After an error nothing of the failed block is left to read.
    fn next_block(&mut self) -> io::Result<bool> {
        let next = self.fill_block();
        if next.is_err() {
            self.plain.clear();
            self.at = 0;
        }
        next
    }

    fn fill_block(&mut self) -> io::Result<bool> {
        let mut header = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.inner.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let header = u32::from_le_bytes(header);
        let len = (header & !COMPRESSED) as usize;
        let compressed = header & COMPRESSED != 0;
        let limit = if compressed {
            max_compressed()
        } else {
            BLOCK_PLAIN
        };
        if len == 0 || len > limit {
            return Err(invalid(format!(
                "a blob block of {len} bytes (compressed: {compressed}) is outside 1..={limit}"
            )));
        }
        self.at = 0;
        if !compressed {
            self.plain.resize(len, 0);
            self.inner.read_exact(&mut self.plain)?;
            return Ok(true);
        }
        self.wire.resize(len, 0);
        self.inner.read_exact(&mut self.wire)?;
        self.plain.clear();
        self.decompressor
            .decompress_to_buffer(&self.wire, &mut self.plain)
            .map_err(|e| invalid(format!("a compressed blob block does not decode: {e}")))?;
        if self.plain.is_empty() || self.plain.len() > BLOCK_PLAIN {
            return Err(invalid(format!(
                "a compressed blob block of {} bytes is outside 1..={BLOCK_PLAIN}",
                self.plain.len()
            )));
        }
        Ok(true)
    }
}

impl<R: Read> Read for BlockReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.at == self.plain.len() && !self.next_block()? {
            return Ok(0);
        }
        let n = buf.len().min(self.plain.len() - self.at);
        buf[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    fn text(len: usize) -> Vec<u8> {
        let words = [
            "model", "rollout", "edge", "weights", "dataset", "region", "42",
        ];
        let mut out = Vec::new();
        let mut i = 0usize;
        while out.len() < len {
            out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
            out.push(if i.is_multiple_of(11) { b'\n' } else { b',' });
            i += 1;
        }
        out.truncate(len);
        out
    }

    use super::super::test_noise as noise;

    /// A writer into a Vec, and the bytes its compression saved so far.
    fn counted_writer(compress: bool) -> (BlockWriter<Vec<u8>>, Arc<AtomicU64>) {
        let saved = Arc::new(AtomicU64::new(0));
        let counter = saved.clone();
        let w = BlockWriter::new(Vec::new(), compress)
            .expect("writer")
            .on_saved(move |n| {
                counter.fetch_add(n, Ordering::Relaxed);
            });
        (w, saved)
    }

    /// `data` as blocks, and the bytes compression saved.
    fn blocks_of(data: &[u8], compress: bool) -> (Vec<u8>, u64) {
        let (mut w, saved) = counted_writer(compress);
        // In odd slices, as a buffered encoder writes.
        for piece in data.chunks(10_007) {
            w.write_all(piece).expect("write");
        }
        let wire = w.finish().expect("finish");
        (wire, saved.load(Ordering::Relaxed))
    }

    fn read_all(wire: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        BlockReader::new(wire)?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn text_shrinks_and_noise_costs_four_bytes_a_block() {
        let t = text(1 << 20);
        let (wire, saved) = blocks_of(&t, true);
        assert!(
            wire.len() * 5 < t.len(),
            "text went as {} bytes",
            wire.len()
        );
        assert_eq!(saved as usize + wire.len(), t.len() + 4 * 16);
        assert_eq!(read_all(&wire).expect("read"), t);

        let n = noise((1 << 20) + 123, 9);
        let (wire, saved) = blocks_of(&n, true);
        assert_eq!(saved, 0);
        assert_eq!(wire.len(), n.len() + 4 * 17);
        assert_eq!(read_all(&wire).expect("read"), n);

        let (wire, _) = blocks_of(&t, false);
        assert_eq!(wire.len(), t.len() + 4 * 16, "off means off");
        assert_eq!(read_all(&wire).expect("read"), t);
        assert!(read_all(&[]).expect("empty").is_empty());
    }

    #[test]
    fn dense_data_backs_off_and_text_after_it_is_compressed_again() {
        let mut data = noise(40 * BLOCK_PLAIN, 3);
        data.extend(text(200 * BLOCK_PLAIN));
        let (mut w, saved) = counted_writer(true);
        let mut attempts_skipped = 0;
        for block in data.chunks(BLOCK_PLAIN) {
            if w.skip > 0 {
                attempts_skipped += 1;
            }
            w.write_all(block).expect("write");
        }
        assert!(attempts_skipped >= 30, "skipped {attempts_skipped}");
        let wire = w.finish().expect("finish");
        let saved = saved.load(Ordering::Relaxed);
        // Text after the noise is compressed once the back-off ends (at most MAX_SKIP
        // blocks of it go plain).
        assert!(saved as usize > (200 - MAX_SKIP as usize) * BLOCK_PLAIN * 3 / 4);
        assert_eq!(read_all(&wire).expect("read"), data);
    }

    #[test]
    fn hostile_blocks_are_refused_before_they_cost_memory() {
        let header = |len: u32| len.to_le_bytes().to_vec();
        // Longer than a block, plain or compressed.
        for h in [
            BLOCK_PLAIN as u32 + 1,
            COMPRESSED | (max_compressed() as u32 + 1),
        ] {
            let e = read_all(&header(h)).expect_err("too long");
            assert!(BadBlock::is(&e), "{e}");
        }
        // Empty blocks.
        for h in [0, COMPRESSED] {
            assert!(read_all(&header(h)).is_err_and(|e| BadBlock::is(&e)));
        }
        // A bomb: a small frame of far more than a block.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).expect("zstd");
        let mut wire = header(COMPRESSED | bomb.len() as u32);
        wire.extend_from_slice(&bomb);
        assert!(read_all(&wire).is_err_and(|e| BadBlock::is(&e)));
        // Not zstd at all.
        let mut wire = header(COMPRESSED | 100);
        wire.extend_from_slice(&[7; 100]);
        assert!(read_all(&wire).is_err_and(|e| BadBlock::is(&e)));
        // Cut in a header or in a body.
        let (good, _) = blocks_of(&text(100_000), true);
        for cut in [2, 10, good.len() - 1] {
            let e = read_all(&good[..cut]).expect_err("cut");
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
    }

    /// The verifier above the reader passes a bad block on as what it is, so the fetch
    /// counts the peer as corrupt rather than the stream as broken.
    #[test]
    fn a_bad_block_reaches_the_verifier_as_a_bad_block() {
        use bao_tree::io::sync::DecodeResponseIter;
        use bao_tree::io::DecodeError;
        use bao_tree::{BaoTree, ChunkNum, ChunkRanges};
        let data = text(100_000);
        let hash = blake3::hash(&data);
        let tree = BaoTree::new(data.len() as u64, super::super::files::BLOCK);
        let mut wire = (COMPRESSED | 100).to_le_bytes().to_vec();
        wire.extend_from_slice(&[7; 100]);
        let reader = BlockReader::new(wire.as_slice()).expect("reader");
        let ranges = ChunkRanges::from(ChunkNum(0)..ChunkNum(16));
        let first = DecodeResponseIter::new(hash, tree, reader, &ranges)
            .next()
            .expect("an item");
        assert!(
            matches!(&first, Err(DecodeError::Io(e)) if BadBlock::is(e)),
            "{first:?}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever is written, in whatever slices, reads back the same.
        #[test]
        fn any_data_in_any_slices_reads_back(
            seed in 0u64..1000,
            len in 0usize..(3 * BLOCK_PLAIN),
            text_share in 0usize..=4,
            slice in 1usize..20_000,
            compress: bool,
        ) {
            let mut data = text(len * text_share / 4);
            data.extend(noise(len - data.len(), seed | 1));
            let mut w = BlockWriter::new(Vec::new(), compress).expect("writer");
            for piece in data.chunks(slice) {
                w.write_all(piece).expect("write");
            }
            let wire = w.finish().expect("finish");
            proptest::prop_assert_eq!(read_all(&wire).expect("read"), data);
        }

        /// A stream with bytes changed or cut, or bytes of no stream at all, reads as an
        /// error or as some bytes (which the verifier above then checks), never a panic.
        #[test]
        fn damaged_streams_never_panic(
            seed in 0u64..1000,
            flips in proptest::collection::vec((0usize..200_000, 0u8..8), 0..6),
            cut in proptest::option::of(0usize..200_000),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let mut data = text(150_000);
            data.extend(noise(50_000, seed | 1));
            let (mut wire, _) = blocks_of(&data, true);
            for (at, bit) in flips {
                let at = at % wire.len();
                wire[at] ^= 1 << bit;
            }
            if let Some(cut) = cut {
                wire.truncate(cut % (wire.len() + 1));
            }
            if let Ok(out) = read_all(&wire) {
                // Every block is at most BLOCK_PLAIN; a block is at least 5 wire bytes.
                proptest::prop_assert!(out.len() <= wire.len() / 5 * BLOCK_PLAIN + BLOCK_PLAIN);
            }
            let _ = read_all(&garbage);
        }
    }
}
