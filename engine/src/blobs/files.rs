//! Blob files on disk: complete blobs, blobs being received, and blobs being put.
//!
//! Layout under the node's `blobs/` directory:
//! - `<hash>.data` and `<hash>.obao`: a complete blob and its verification tree (bao
//!   pre-order outboard, 64 bytes per 16 KiB chunk group). Both are fsynced, then renamed
//!   into place outboard first, so a `.data` file always has its tree.
//! - `partial/<hash>.data` and `.obao`: a blob being received, its data file sized to the
//!   blob. What of it is verified is not recorded anywhere: it is recomputed from the two
//!   files when the transfer resumes, so a kill at any moment loses nothing already
//!   written and a torn write is simply fetched again.
//! - `partial/put-*.tmp`: a blob being put through the API; removed at start.

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
        if self.files.held(&hash)?.is_none() {
            let obao = self
                .files
                .partial_dir()
                .join(format!("{}.put-obao", format_blob_hash(&hash)));
            let mut outboard = PreOrderOutboard {
                root: blake3::Hash::from(hash),
                tree: BaoTree::new(size, BLOCK),
                data: create_sized(&obao, BaoTree::new(size, BLOCK).outboard_size())?,
            };
            let data = File::open(&self.path)?;
            outboard.init_from(io::BufReader::with_capacity(1 << 20, data))?;
            if outboard.root.as_bytes() != &hash {
                return Err(io::Error::other("the blob changed while it was being put"));
            }
            outboard.data.sync_all()?;
            self.files.install(&hash, &self.path, &obao)?;
        } else if let Ok(f) = File::options()
            .write(true)
            .open(self.files.complete_path(&hash, "data"))
        {
            // Put again: its grace period (if nothing references it) starts over.
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        self.done = true;
        let _ = fs::remove_file(&self.path);
        Ok((hash, size))
    }
}

impl Drop for PutWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
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
        let files = Self { dir: dir.into() };
        fs::create_dir_all(files.partial_dir())?;
        for entry in fs::read_dir(files.partial_dir())? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("put-") || name.ends_with(".put-obao") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(files)
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

    fn partial_path(&self, hash: &[u8; 32], ext: &str) -> PathBuf {
        self.partial_dir()
            .join(format!("{}.{ext}", format_blob_hash(hash)))
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
        let path = self
            .partial_dir()
            .join(format!("put-{}.tmp", u64::from_le_bytes(name)));
        let file = create_sized(&path, 0)?;
        Ok(PutWriter {
            files: self.clone(),
            file,
            path,
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

    /// Opens the blob being received (creating it): what of it is verified is read back
    /// from its files.
    pub fn partial(&self, hash: &[u8; 32], size: u64) -> io::Result<Partial> {
        let tree = BaoTree::new(size, BLOCK);
        let (dpath, opath) = (
            self.partial_path(hash, "data"),
            self.partial_path(hash, "obao"),
        );
        let open = |path: &Path, len: u64| -> io::Result<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
            if f.metadata()?.len() != len {
                // Another size than the one asked: a different claim about the blob. What
                // was there proves nothing about this one.
                f.set_len(0)?;
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
        let mut have = ChunkRanges::empty();
        for range in valid_ranges(&outboard, &data, &ChunkRanges::all()) {
            let range = range?;
            have |= ChunkRanges::from(range);
        }
        Ok(Partial {
            hash: *hash,
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
        partial.data.sync_all()?;
        partial.outboard.data.sync_all()?;
        let hash = partial.hash;
        drop(partial);
        self.install(
            &hash,
            &self.partial_path(&hash, "data"),
            &self.partial_path(&hash, "obao"),
        )
    }

    /// Drops what was received of a blob.
    pub fn discard_partial(&self, hash: &[u8; 32]) {
        let _ = fs::remove_file(self.partial_path(hash, "data"));
        let _ = fs::remove_file(self.partial_path(hash, "obao"));
    }

    /// Renames fsynced files into place, tree first, and makes the renames durable.
    fn install(&self, hash: &[u8; 32], data: &Path, obao: &Path) -> io::Result<()> {
        fs::rename(obao, self.complete_path(hash, "obao"))?;
        fs::rename(data, self.complete_path(hash, "data"))?;
        sync_dir(&self.dir)?;
        sync_dir(&self.partial_dir())
    }

    /// Deletes a complete blob.
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
