//! Blob files on disk: complete blobs, blobs being received, and blobs being put.
//!
//! Layout under the node's `blobs/` directory:
//! - `<hash>.data` and `<hash>.obao`: a complete blob and its verification tree (bao
//!   pre-order outboard, 64 bytes per 16 KiB chunk group). Both are fsynced, then renamed
//!   into place outboard first, so a `.data` file always has its tree.
//! - `partial/<hash>-<size>.data` and `.obao`: a blob being received, its data file sized
//!   to the blob (sparse until written). The size is in the name because a reference
//!   states it: two references claiming different sizes never clobber each other's
//!   progress, and the wrong one simply never verifies. What of it is verified is not recorded anywhere: it is recomputed from the two
//!   files when the transfer resumes, so a kill at any moment loses nothing already
//!   written and a torn write is simply fetched again.
//! - `partial/put-*`: a blob being put through the API; removed at start.
//! - `damaged/`: complete blobs that failed verification when served, kept for a look
//!   and fetched again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::{valid_ranges, CreateOutboard};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};

use crate::model::format_blob_hash;

/// Chunk groups of 16 KiB: the unit verified on arrival (and iroh-blobs' choice).
pub const BLOCK: BlockSize = BlockSize::from_chunk_log(4);

/// The blob files of one node.
#[derive(Clone, Debug)]
pub struct BlobFiles {
    dir: PathBuf,
    /// Held while a blob is installed, touched by a put, or checked and deleted by garbage
    /// collection, so a put acknowledged meanwhile is never collected.
    install: std::sync::Arc<std::sync::Mutex<()>>,
}

/// A complete blob opened for reading and serving.
#[derive(Debug)]
pub struct BlobReader {
    /// The content.
    pub data: File,
    /// Its verification tree.
    pub outboard: PreOrderOutboard<File>,
}

impl BlobReader {
    /// The blob's length in bytes.
    pub fn size(&self) -> u64 {
        self.outboard.tree.size()
    }
}

/// A blob being received: its files and which chunks of it are verified.
#[derive(Debug)]
pub struct Partial {
    hash: [u8; 32],
    paths: (PathBuf, PathBuf),
    /// The content written so far, at its offsets.
    pub data: File,
    /// The verification tree as far as received.
    pub outboard: PreOrderOutboard<File>,
    /// The chunks whose data is verified against the hash.
    pub have: ChunkRanges,
}

impl Partial {
    /// The blob's length.
    pub fn size(&self) -> u64 {
        self.outboard.tree.size()
    }

    /// Every chunk of the blob.
    pub fn all(&self) -> ChunkRanges {
        ChunkRanges::from(..self.outboard.tree.chunks())
    }

    /// The chunks still to fetch.
    pub fn missing(&self) -> ChunkRanges {
        self.all() - self.have.clone()
    }

    /// Bytes verified so far.
    pub fn bytes_have(&self) -> u64 {
        ranges_bytes(&self.have, self.size())
    }
}

/// Bytes the chunk ranges cover in a blob of `size` bytes.
pub fn ranges_bytes(ranges: &ChunkRanges, size: u64) -> u64 {
    let mut total = 0;
    for r in ranges.iter() {
        let (start, end) = match r {
            range_collections::range_set::RangeSetRange::Range(r) => (*r.start, *r.end),
            range_collections::range_set::RangeSetRange::RangeFrom(r) => {
                (*r.start, ChunkNum::chunks(size))
            }
        };
        let end = end.to_bytes().min(size);
        total += end.saturating_sub(start.to_bytes().min(size));
    }
    total
}

/// A blob being put: written to a temporary file while its hash is computed.
#[derive(Debug)]
pub struct PutWriter {
    files: BlobFiles,
    file: File,
    path: PathBuf,
    obao: PathBuf,
    hasher: blake3::Hasher,
    size: u64,
    done: bool,
}

impl PutWriter {
    /// Appends bytes of the blob.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes the blob durable under its hash and answers it with its size. A blob held
    /// already is kept as it is (the new copy is dropped): content addressing deduplicates.
    pub fn finish(mut self) -> io::Result<([u8; 32], u64)> {
        self.file.sync_all()?;
        let hash: [u8; 32] = *self.hasher.finalize().as_bytes();
        let size = self.size;
        // The tree is built before the lock: it reads the whole file.
        let mut outboard = PreOrderOutboard {
            root: blake3::Hash::from(hash),
            tree: BaoTree::new(size, BLOCK),
            data: create_sized(&self.obao, BaoTree::new(size, BLOCK).outboard_size())?,
        };
        let data = File::open(&self.path)?;
        outboard.init_from(io::BufReader::with_capacity(1 << 20, data))?;
        if outboard.root.as_bytes() != &hash {
            return Err(io::Error::other("the blob changed while it was being put"));
        }
        outboard.data.sync_all()?;
        let _installing = self.files.lock();
        match self.files.held(&hash)? {
            Some(held) if held == size => {
                // Put again: its grace period (if nothing references it) starts over.
                let f = File::options()
                    .write(true)
                    .open(self.files.complete_path(&hash, "data"))?;
                f.set_modified(std::time::SystemTime::now())?;
            }
            _ => self.files.install(&hash, &self.path, &self.obao)?,
        }
        self.done = true;
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_file(&self.obao);
        Ok((hash, size))
    }
}

impl Drop for PutWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
            let _ = fs::remove_file(&self.obao);
        }
    }
}

fn create_sized(path: &Path, len: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.set_len(len)?;
    Ok(f)
}

impl BlobFiles {
    /// Opens (creating) the blob directory and clears puts a previous run left unfinished.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let files = Self {
            dir: dir.into(),
            install: std::sync::Arc::default(),
        };
        fs::create_dir_all(files.partial_dir())?;
        for entry in fs::read_dir(files.partial_dir())? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with("put-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        // A crash between the two renames of an install leaves a tree without its data:
        // the data is still partial and will be fetched (or put) again.
        for entry in fs::read_dir(&files.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "obao")
                && !path.with_extension("data").exists()
            {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(files)
    }

    /// Serializes installs, re-puts and deletions of complete blobs.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.install
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn partial_dir(&self) -> PathBuf {
        self.dir.join("partial")
    }

    fn complete_path(&self, hash: &[u8; 32], ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", format_blob_hash(hash)))
    }

    fn partial_path(&self, hash: &[u8; 32], size: u64, ext: &str) -> PathBuf {
        self.partial_dir()
            .join(format!("{}-{size}.{ext}", format_blob_hash(hash)))
    }

    /// The size of a complete blob held here.
    pub fn held(&self, hash: &[u8; 32]) -> io::Result<Option<u64>> {
        match fs::metadata(self.complete_path(hash, "data")) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts putting a blob.
    pub fn begin_put(&self) -> io::Result<PutWriter> {
        let mut name = [0u8; 8];
        getrandom::fill(&mut name).map_err(|e| io::Error::other(e.to_string()))?;
        let id = u64::from_le_bytes(name);
        let path = self.partial_dir().join(format!("put-{id}.data"));
        let obao = self.partial_dir().join(format!("put-{id}.obao"));
        let file = create_sized(&path, 0)?;
        Ok(PutWriter {
            files: self.clone(),
            file,
            path,
            obao,
            hasher: blake3::Hasher::new(),
            size: 0,
            done: false,
        })
    }

    /// Opens a complete blob.
    pub fn reader(&self, hash: &[u8; 32]) -> io::Result<Option<BlobReader>> {
        let data = match File::open(self.complete_path(hash, "data")) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let size = data.metadata()?.len();
        let outboard = PreOrderOutboard {
            root: blake3::Hash::from(*hash),
            tree: BaoTree::new(size, BLOCK),
            data: File::open(self.complete_path(hash, "obao"))?,
        };
        Ok(Some(BlobReader { data, outboard }))
    }

    /// Opens the blob being received (creating it). What of it is verified is `known`
    /// (from an earlier attempt of this process) or else read back from its files.
    pub fn partial(
        &self,
        hash: &[u8; 32],
        size: u64,
        known: Option<ChunkRanges>,
    ) -> io::Result<Partial> {
        let tree = BaoTree::new(size, BLOCK);
        let dpath = self.partial_path(hash, size, "data");
        let opath = self.partial_path(hash, size, "obao");
        let open = |path: &Path, len: u64| -> io::Result<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
            if f.metadata()?.len() != len {
                f.set_len(len)?;
            }
            Ok(f)
        };
        let data = open(&dpath, size)?;
        let obao = open(&opath, tree.outboard_size())?;
        if data.metadata()?.len() != size || obao.metadata()?.len() != tree.outboard_size() {
            return Err(io::Error::other("partial blob files of the wrong size"));
        }
        let outboard = PreOrderOutboard {
            root: blake3::Hash::from(*hash),
            tree,
            data: obao,
        };
        let have = match known {
            Some(have) => have,
            None => {
                let mut have = ChunkRanges::empty();
                for range in valid_ranges(&outboard, &data, &ChunkRanges::all()) {
                    have |= ChunkRanges::from(range?);
                }
                have
            }
        };
        Ok(Partial {
            hash: *hash,
            paths: (dpath, opath),
            data,
            outboard,
            have,
        })
    }

    /// Makes a fully verified partial blob complete: fsynced, then renamed into place.
    pub fn complete(&self, partial: Partial) -> io::Result<()> {
        if !partial.missing().is_empty() {
            return Err(io::Error::other("the blob is not complete"));
        }
        // An empty blob has no chunk to verify: only the hash of nothing is one.
        if partial.size() == 0 && blake3::hash(b"").as_bytes() != &partial.hash {
            return Err(io::Error::other(
                "an empty blob under another hash than the empty one's",
            ));
        }
        partial.data.sync_all()?;
        partial.outboard.data.sync_all()?;
        let (hash, (data, obao)) = (partial.hash, partial.paths.clone());
        drop(partial);
        let _installing = self.lock();
        if self.held(&hash)?.is_some() {
            let _ = fs::remove_file(&data);
            let _ = fs::remove_file(&obao);
            return Ok(());
        }
        self.install(&hash, &data, &obao)
    }

    /// Opens the data file of a blob being received, to read what of it is verified.
    pub fn partial_reader(&self, hash: &[u8; 32], size: u64) -> io::Result<File> {
        File::open(self.partial_path(hash, size, "data"))
    }

    /// Blobs being received: hash, claimed size, bytes on disk.
    pub fn partials(&self) -> io::Result<Vec<([u8; 32], u64)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.partial_dir())? {
            let name = entry?.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".data")) else {
                continue;
            };
            let Some((hex, size)) = stem.split_once('-') else {
                continue;
            };
            if let (Some(hash), Ok(size)) = (crate::model::parse_blob_hash(hex), size.parse()) {
                out.push((hash, size));
            }
        }
        Ok(out)
    }

    /// Drops what was received of a blob under one claimed size.
    pub fn discard_partial(&self, hash: &[u8; 32], size: u64) {
        let _ = fs::remove_file(self.partial_path(hash, size, "data"));
        let _ = fs::remove_file(self.partial_path(hash, size, "obao"));
    }

    /// Moves a complete blob that failed verification aside (to `damaged/`), so it is
    /// fetched again and never served as good.
    pub fn set_aside(&self, hash: &[u8; 32]) -> io::Result<()> {
        let _installing = self.lock();
        let damaged = self.dir.join("damaged");
        fs::create_dir_all(&damaged)?;
        for ext in ["data", "obao"] {
            let from = self.complete_path(hash, ext);
            if from.exists() {
                fs::rename(
                    &from,
                    damaged.join(format!("{}.{ext}", format_blob_hash(hash))),
                )?;
            }
        }
        sync_dir(&self.dir)
    }

    /// Renames fsynced files into place, tree first, and makes the renames durable.
    fn install(&self, hash: &[u8; 32], data: &Path, obao: &Path) -> io::Result<()> {
        fs::rename(obao, self.complete_path(hash, "obao"))?;
        fs::rename(data, self.complete_path(hash, "data"))?;
        sync_dir(&self.dir)?;
        sync_dir(&self.partial_dir())
    }

    /// Deletes a complete blob (the caller holds [`Self::lock`]).
    pub fn remove(&self, hash: &[u8; 32]) -> io::Result<()> {
        fs::remove_file(self.complete_path(hash, "data"))?;
        let _ = fs::remove_file(self.complete_path(hash, "obao"));
        sync_dir(&self.dir)
    }

    /// Every complete blob with its size.
    pub fn list(&self) -> io::Result<Vec<([u8; 32], u64)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".data")) else {
                continue;
            };
            if let Some(hash) = crate::model::parse_blob_hash(hex) {
                out.push((hash, entry.metadata()?.len()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Bytes on disk: complete blobs, their trees and partial transfers.
    pub fn used_bytes(&self) -> u64 {
        let sum = |dir: &Path| -> u64 {
            fs::read_dir(dir)
                .map(|it| {
                    it.filter_map(Result::ok)
                        .filter_map(|e| e.metadata().ok())
                        .filter(fs::Metadata::is_file)
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0)
        };
        sum(&self.dir) + sum(&self.partial_dir())
    }
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bao_tree::io::sync::{decode_ranges, encode_ranges_validated};

    fn put(files: &BlobFiles, bytes: &[u8]) -> ([u8; 32], u64) {
        let mut p = files.begin_put().expect("begin");
        for chunk in bytes.chunks(7_000) {
            p.write(chunk).expect("write");
        }
        p.finish().expect("finish")
    }

    fn noise(n: usize) -> Vec<u8> {
        super::super::test_noise(n, 0x9E37_79B9_7F4A_7C15)
    }

    #[test]
    fn a_put_is_addressed_by_its_hash_and_deduplicated() {
        let dir = tempfile::tempdir().expect("dir");
        let files = BlobFiles::open(dir.path()).expect("open");
        let bytes = noise(100_000);
        let (h, size) = put(&files, &bytes);
        assert_eq!(&h, blake3::hash(&bytes).as_bytes());
        assert_eq!(size, 100_000);
        assert_eq!(put(&files, &bytes).0, h);
        assert_eq!(files.list().expect("list"), vec![(h, size)]);
        // Nothing of either put is left behind.
        assert_eq!(
            fs::read_dir(dir.path().join("partial"))
                .expect("dir")
                .count(),
            0
        );
        let r = files.reader(&h).expect("read").expect("held");
        let mut out = Vec::new();
        let ranges = ChunkRanges::all();
        encode_ranges_validated(&r.data, &r.outboard, &ranges, &mut out).expect("valid");
    }

    #[test]
    fn a_put_never_finished_stores_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let files = BlobFiles::open(dir.path()).expect("open");
        let mut p = files.begin_put().expect("begin");
        p.write(&noise(50_000)).expect("write");
        drop(p);
        assert!(files.list().expect("list").is_empty());
        assert_eq!(
            fs::read_dir(dir.path().join("partial"))
                .expect("dir")
                .count(),
            0
        );
    }

    #[test]
    fn an_empty_blob_completes_only_under_the_empty_hash() {
        let dir = tempfile::tempdir().expect("dir");
        let files = BlobFiles::open(dir.path()).expect("open");
        let bogus = [7u8; 32];
        let p = files.partial(&bogus, 0, None).expect("partial");
        assert!(p.missing().is_empty());
        assert!(files.complete(p).is_err());
        assert_eq!(files.held(&bogus).expect("held"), None);
        let empty = *blake3::hash(b"").as_bytes();
        let p = files.partial(&empty, 0, None).expect("partial");
        files.complete(p).expect("the empty blob");
        assert_eq!(files.held(&empty).expect("held"), Some(0));
    }

    #[test]
    fn a_cut_transfer_resumes_from_what_its_files_verify() {
        let dir = tempfile::tempdir().expect("dir");
        let source = BlobFiles::open(dir.path().join("a")).expect("open");
        let sink = BlobFiles::open(dir.path().join("b")).expect("open");
        let bytes = noise(1_000_000 + 333);
        let (h, size) = put(&source, &bytes);
        let r = source.reader(&h).expect("read").expect("held");
        // The first half arrives, verified, then the transfer is cut.
        let half = ChunkRanges::from(..ChunkNum(480));
        let mut wire = Vec::new();
        encode_ranges_validated(&r.data, &r.outboard, &half, &mut wire).expect("encode");
        let mut p = sink.partial(&h, size, None).expect("partial");
        decode_ranges(&wire[..], &half, &mut p.data, &mut p.outboard).expect("decode");
        drop(p);
        // A later run finds exactly that half verified, and the rest missing.
        let p = sink.partial(&h, size, None).expect("reopen");
        assert_eq!(p.have, half);
        // A byte damaged on disk (a torn write) costs its chunk group only.
        {
            use positioned_io::WriteAt;
            let mut f = p.data.try_clone().expect("clone");
            f.write_all_at(20_000, &[bytes[20_000] ^ 1])
                .expect("damage");
        }
        drop(p);
        let p = sink.partial(&h, size, None).expect("reopen");
        assert_eq!(
            p.have,
            half.clone() - ChunkRanges::from(ChunkNum(16)..ChunkNum(32))
        );
        let rest = p.missing();
        let mut wire = Vec::new();
        encode_ranges_validated(&r.data, &r.outboard, &rest, &mut wire).expect("encode");
        let mut p = p;
        decode_ranges(&wire[..], &rest, &mut p.data, &mut p.outboard).expect("decode");
        p.have |= rest;
        sink.complete(p).expect("complete");
        let copy = dir
            .path()
            .join("b")
            .join(format!("{}.data", format_blob_hash(&h)));
        assert_eq!(fs::read(copy).expect("read"), bytes);
    }
}
