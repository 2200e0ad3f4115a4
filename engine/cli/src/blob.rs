//! `blob put FILE`, `blob get HASH --out FILE`, `blob ls`: blobs through the node's API,
//! streamed both ways, with a progress bar when standard error is a terminal.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use clap::Subcommand;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::Value;

use crate::client::{Api, ClientError, ClientOpts};

/// Blob commands.
#[derive(Debug, Subcommand)]
pub enum BlobCommand {
    /// Store FILE as a blob (streamed; nothing is held in memory) and print its hash and
    /// size. Reference it from a document as {"@blob": "<hash>", "size": <size>}.
    Put {
        /// The file.
        file: PathBuf,
    },
    /// Write blob HASH to FILE, fetching it from a peer first if this node does not hold
    /// it yet but a document here references it.
    Get {
        /// The blob's hash (64 hex digits).
        hash: String,
        /// Where to write it (written beside as FILE.partial, renamed when complete).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// How long to wait for a blob being fetched, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 600_000)]
        timeout_ms: u64,
    },
    /// List the blobs this node holds, with their sizes and the documents that reference
    /// each, and the transfers under way.
    Ls,
}

impl BlobCommand {
    /// Runs the command against the API at `--api`, or `default_api`.
    pub fn run(self, opts: &ClientOpts, default_api: SocketAddr) -> Result<(), ClientError> {
        let api = Api::new(opts, default_api);
        match self {
            Self::Put { file } => put(&api, opts, &file),
            Self::Get {
                hash,
                out,
                timeout_ms,
            } => get(&api, opts, &hash, &out, timeout_ms),
            Self::Ls => ls(&api, opts),
        }
    }
}

/// A progress line on standard error, redrawn at most ten times a second; nothing when
/// standard error is not a terminal.
struct Progress {
    what: &'static str,
    total: Option<u64>,
    done: u64,
    started: Instant,
    drawn: Option<Instant>,
    on: bool,
}

impl Progress {
    fn new(what: &'static str, total: Option<u64>) -> Self {
        Self {
            what,
            total,
            done: 0,
            started: Instant::now(),
            drawn: None,
            on: std::io::stderr().is_terminal(),
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if !self.on || self.drawn.is_some_and(|d| d.elapsed().as_millis() < 100) {
            return;
        }
        self.drawn = Some(Instant::now());
        self.draw();
    }

    fn draw(&self) {
        let mb = |b: u64| b as f64 / 1e6;
        let rate = mb(self.done) / self.started.elapsed().as_secs_f64().max(0.001);
        let line = match self.total {
            Some(t) if t > 0 => {
                let frac = (self.done as f64 / t as f64).min(1.0);
                let filled = (frac * 30.0) as usize;
                format!(
                    "{} [{}{}] {:5.1}% {:.1}/{:.1} MB {:.1} MB/s",
                    self.what,
                    "#".repeat(filled),
                    " ".repeat(30 - filled),
                    frac * 100.0,
                    mb(self.done),
                    mb(t),
                    rate
                )
            }
            _ => format!("{} {:.1} MB {:.1} MB/s", self.what, mb(self.done), rate),
        };
        eprint!("\r{line}\x1b[K");
    }

    fn finish(&self) {
        if self.on {
            self.draw();
            eprintln!();
        }
    }
}

fn file_error(path: &Path) -> impl Fn(std::io::Error) -> ClientError + '_ {
    move |e| ClientError::Input(format!("{}: {e}", path.display()))
}

fn put(api: &Api, opts: &ClientOpts, file: &Path) -> Result<(), ClientError> {
    let mut f = std::fs::File::open(file).map_err(file_error(file))?;
    let total = f.metadata().ok().map(|m| m.len());
    let path = "/v1/blobs";
    let answer =
        api.run(path, async {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
            // The file is read on a thread of its own and streamed as it is read.
            let reader = std::thread::spawn(move || {
                let mut progress = Progress::new("put", total);
                loop {
                    let mut buf = vec![0u8; 256 * 1024];
                    match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            buf.truncate(n);
                            progress.add(n as u64);
                            if tx.blocking_send(Ok(Frame::data(Bytes::from(buf)))).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            return;
                        }
                    }
                }
                progress.finish();
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|t| (t, rx))
            });
            let resp = api
                .send_body(
                    "PUT",
                    path,
                    StreamBody::new(stream),
                    Some("application/octet-stream"),
                    "application/json",
                )
                .await?;
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| api.unreachable(path, e))?
                .to_bytes();
            let _ = reader.join();
            serde_json::from_slice::<Value>(&body)
                .map_err(|e| ClientError::Input(format!("the API sent invalid JSON: {e}")))
        })?;
    if opts.json {
        println!("{answer}");
    } else {
        println!(
            "{} {} bytes\nreference it as {{\"@blob\": \"{}\", \"size\": {}}}",
            answer["hash"].as_str().unwrap_or("?"),
            answer["size"],
            answer["hash"].as_str().unwrap_or("?"),
            answer["size"]
        );
    }
    Ok(())
}

fn get(
    api: &Api,
    opts: &ClientOpts,
    hash: &str,
    out: &Path,
    timeout_ms: u64,
) -> Result<(), ClientError> {
    if tidesync::model::parse_blob_hash(hash).is_none() {
        return Err(ClientError::Input(format!(
            "{hash:?} is not a blob hash (64 hex digits)"
        )));
    }
    let path = format!("/v1/blobs/{hash}?timeout_ms={timeout_ms}");
    let mut progress: Option<Progress> = None;
    let (len, _) = api.download(&path, "the blob", out, |total, n| {
        progress
            .get_or_insert_with(|| Progress::new("get", total))
            .add(n);
    })?;
    if let Some(p) = &progress {
        p.finish();
    }
    if opts.json {
        println!(
            "{}",
            serde_json::json!({"hash": hash, "size": len, "out": out})
        );
    } else {
        println!("wrote {} ({len} bytes)", out.display());
    }
    Ok(())
}

fn ls(api: &Api, opts: &ClientOpts) -> Result<(), ClientError> {
    let list = api.json("GET", "/v1/blobs", None)?;
    if opts.json {
        println!("{list}");
        return Ok(());
    }
    let empty = Vec::new();
    let blobs = list["blobs"].as_array().unwrap_or(&empty);
    println!("{:<64}  {:>14}  DOCUMENTS", "HASH", "BYTES");
    for b in blobs {
        let docs: Vec<&str> = b["docs"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "{:<64}  {:>14}  {}",
            b["hash"].as_str().unwrap_or("?"),
            b["size"],
            if docs.is_empty() {
                "(none: deleted after the grace period)".to_owned()
            } else {
                docs.join(", ")
            }
        );
    }
    for t in list["transfers"].as_array().unwrap_or(&empty) {
        println!(
            "FETCHING {} {}/{} bytes from {} peers, {} B/s",
            t["hash"].as_str().unwrap_or("?"),
            t["done"],
            t["size"],
            t["sources"],
            t["rate_bytes_s"]
        );
    }
    println!(
        "{} blobs, {} bytes on disk",
        blobs.len(),
        list["bytes_used"]
    );
    Ok(())
}
