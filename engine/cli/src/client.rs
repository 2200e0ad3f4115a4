//! The client subcommands both binaries share: `status`, `doc …`, `watch` and `backup`,
//! talking to a node's HTTP API, and `restore`, which works on a stopped node's files.

use std::io::Read;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{header, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Options every client subcommand takes.
#[derive(Debug, Args)]
pub struct ClientOpts {
    /// The node's HTTP API address [default: 127.0.0.1:7790 for tidesync-hub,
    /// 127.0.0.1:7780 for tidesync-edge].
    #[arg(long, value_name = "ADDR", global = true)]
    pub api: Option<SocketAddr>,
    /// Bearer token, if the node requires one.
    #[arg(long, env = "TIDESYNC_API_TOKEN", value_name = "TOKEN", global = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a readable form (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
}

/// The client subcommands, the same on both binaries (flattened into their commands).
// clap would show field docs as help; the variants' own docs say everything.
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Show the node and its peers: connection state, lag, bytes, last sync, and each
    /// catch-up's progress.
    Status {
        /// Redraw every second (with progress bars on a terminal; plain lines otherwise)
        /// until interrupted.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Read and write documents through the node's API.
    Doc {
        #[command(subcommand)]
        cmd: DocCommand,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Compare this node's documents with a connected peer's, without shipping them, and
    /// repair every difference by syncing exactly those documents. Waits for the repairs.
    Audit {
        /// The peer's node id (it must be connected).
        #[arg(long, value_name = "NODE")]
        peer: String,
        /// Only namespaces matching PATTERN (repeatable) [default: every namespace the two
        /// nodes share].
        #[arg(long = "ns", value_name = "PATTERN")]
        namespaces: Vec<String>,
        /// Give up after this long, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 600_000)]
        timeout_ms: u64,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Store, fetch and list blobs (model weights, datasets): `blob put FILE`,
    /// `blob get HASH --out FILE`, `blob ls`.
    Blob {
        #[command(subcommand)]
        cmd: crate::blob::BlobCommand,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Print changes as they arrive.
    Watch {
        /// Start after this feed position (0: everything).
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Save a consistent copy of the node's database to FILE, without stopping it: from
    /// the running node's API, or, when the node in --data is stopped, from its file.
    Backup {
        /// The node's data directory. If the node is stopped, the copy is read from its
        /// `node.redb`; if it runs, from its API (--api).
        #[arg(long, value_name = "DIR")]
        data: Option<std::path::PathBuf>,
        /// Where to write the copy (must not exist).
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Make DIR's database a copy saved by `backup`, for a stopped node. The node rejoins
    /// under a new feed epoch: its peers sync it again from the start, so it gets back
    /// everything they hold that the copy lacks. The database it replaces is kept as
    /// `node.redb.before-restore`.
    Restore {
        /// The copy `backup` wrote.
        #[arg(long, value_name = "FILE")]
        from: std::path::PathBuf,
        /// The node's data directory (its `node.redb` is replaced).
        #[arg(long, value_name = "DIR")]
        data: std::path::PathBuf,
    },
}

impl ClientCommand {
    /// Runs the command against the API at `--api`, or `default_api`.
    pub fn run(self, default_api: SocketAddr) -> Result<(), ClientError> {
        match self {
            Self::Status { opts, watch } => status(&opts, default_api, watch),
            Self::Doc { cmd, opts } => doc(cmd, &opts, default_api),
            Self::Watch { since, opts } => watch(&opts, default_api, since),
            Self::Blob { cmd, opts } => cmd.run(&opts, default_api),
            Self::Audit {
                peer,
                namespaces,
                timeout_ms,
                opts,
            } => audit(&opts, default_api, &peer, namespaces, timeout_ms),
            Self::Backup { data, out, opts } => backup(data.as_deref(), &out, &opts, default_api),
            Self::Restore { from, data } => restore(&from, &data),
        }
    }
}

/// Document commands.
#[derive(Debug, Subcommand)]
pub enum DocCommand {
    /// Print a document as JSON.
    Get {
        /// Namespace.
        ns: String,
        /// Document id.
        id: String,
    },
    /// Replace a document with a JSON object (argument, or standard input if absent or -).
    Put {
        /// Namespace.
        ns: String,
        /// Document id.
        id: String,
        /// The JSON object.
        #[arg(value_name = "JSON")]
        body: Option<String>,
        /// Synchronous replication of this write.
        #[command(flatten)]
        replicas: ReplicaArgs,
    },
    /// Apply an RFC 7386 merge patch (argument, or standard input if absent or -).
    Patch {
        /// Namespace.
        ns: String,
        /// Document id.
        id: String,
        /// The merge patch.
        #[arg(value_name = "JSON")]
        body: Option<String>,
        /// Synchronous replication of this write.
        #[command(flatten)]
        replicas: ReplicaArgs,
    },
    /// Delete a document (a tombstone that syncs like any write).
    Rm {
        /// Namespace.
        ns: String,
        /// Document id.
        id: String,
        /// Synchronous replication of this write.
        #[command(flatten)]
        replicas: ReplicaArgs,
    },
    /// List a namespace's documents.
    Ls {
        /// Namespace.
        ns: String,
    },
}

/// Synchronous replication for one write.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplicaArgs {
    /// Answer only once K other nodes (on an edge: hubs) have durably stored the write;
    /// if the timeout passes first the write is still durable here and replicating, and
    /// the command says how many confirmed.
    #[arg(long, value_name = "K")]
    pub replicas: Option<usize>,
    /// How long to wait for the replicas, in milliseconds [default: 5000].
    #[arg(long, value_name = "MS", requires = "replicas")]
    pub timeout_ms: Option<u64>,
}

impl ReplicaArgs {
    /// The query string for the write's URL.
    fn query(&self) -> String {
        match (self.replicas, self.timeout_ms) {
            (Some(k), Some(t)) => format!("?replicas={k}&timeout_ms={t}"),
            (Some(k), None) => format!("?replicas={k}"),
            _ => String::new(),
        }
    }
}

/// A client subcommand's failure, with the API's own message when there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The API answered with an error status.
    #[error("{status}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The API's error message.
        message: String,
    },
    /// The API could not be reached.
    #[error("cannot reach the node's API at {url}: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Bad input on the command line or standard input.
    #[error("{0}")]
    Input(String),
}

/// The node's HTTP API, over plain HTTP/1.1 (hyper, already there for the server).
pub(crate) struct Api {
    pub(crate) addr: SocketAddr,
    token: Option<String>,
}

impl Api {
    pub(crate) fn new(opts: &ClientOpts, default_api: SocketAddr) -> Self {
        Self {
            addr: opts.api.unwrap_or(default_api),
            token: opts.token.clone(),
        }
    }

    pub(crate) fn unreachable(&self, path: &str, reason: impl std::fmt::Display) -> ClientError {
        ClientError::Unreachable {
            url: format!("http://{}{path}", self.addr),
            reason: reason.to_string(),
        }
    }

    /// Runs one request to completion on a small runtime of its own: the subcommands are
    /// one-shot and synchronous.
    pub(crate) fn run<T>(
        &self,
        path: &str,
        work: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.unreachable(path, e))?
            .block_on(work)
    }

    /// Sends a request; an error status becomes [`ClientError::Api`] with the API's message.
    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        accept: &str,
    ) -> Result<Response<Incoming>, ClientError> {
        let content_type = body.is_some().then_some("application/json");
        let body = Full::new(Bytes::from(body.unwrap_or_default().to_owned()));
        self.send_body(method, path, body, content_type, accept)
            .await
    }

    /// Sends a request with any body (a streamed file, say).
    pub(crate) async fn send_body<B>(
        &self,
        method: &str,
        path: &str,
        body: B,
        content_type: Option<&str>,
        accept: &str,
    ) -> Result<Response<Incoming>, ClientError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| self.unreachable(path, e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(path, e))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string())
            .header(header::ACCEPT, accept);
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(t) = content_type {
            req = req.header(header::CONTENT_TYPE, t);
        }
        let req = req
            .body(body)
            .map_err(|e| ClientError::Input(format!("bad request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(path, e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map(|b| b.to_bytes());
        let message = bytes
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "request failed".into());
        Err(ClientError::Api { status, message })
    }

    /// Writes the body of `GET path` to `out`: into `out.partial`, checked against its
    /// length, fsynced, then renamed (removed on failure). `progress` hears the expected
    /// length and each chunk's size. Answers the bytes written and the response headers.
    pub(crate) fn download(
        &self,
        path: &str,
        what: &str,
        out: &std::path::Path,
        mut progress: impl FnMut(Option<u64>, u64),
    ) -> Result<(u64, hyper::HeaderMap), ClientError> {
        let partial = out.with_extension("partial");
        let written = self.run(path, async {
            use std::io::Write;
            let resp = self
                .send("GET", path, None, "application/octet-stream")
                .await?;
            let expected: Option<u64> = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok());
            let file_error = |e: std::io::Error| {
                ClientError::Input(format!("writing {}: {e}", partial.display()))
            };
            let mut file = std::fs::File::create(&partial).map_err(file_error)?;
            let (parts, mut body) = resp.into_parts();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| self.unreachable(path, e))?;
                if let Some(chunk) = frame.data_ref() {
                    file.write_all(chunk).map_err(file_error)?;
                    len += chunk.len() as u64;
                    progress(expected, chunk.len() as u64);
                }
            }
            if expected.is_some_and(|n| n != len) {
                return Err(self.unreachable(path, format!("{what} was cut off after {len} bytes")));
            }
            file.sync_all().map_err(file_error)?;
            Ok((len, parts.headers))
        });
        if written.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        let written = written?;
        std::fs::rename(&partial, out)
            .map_err(|e| ClientError::Input(format!("writing {}: {e}", out.display())))?;
        Ok(written)
    }

    pub(crate) fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Value, ClientError> {
        self.run(path, async {
            let resp = self.send(method, path, body, "application/json").await?;
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.unreachable(path, e))?
                .to_bytes();
            serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Input(format!("the API sent invalid JSON: {e}")))
        })
    }
}

/// `backup`: from the stopped node's file if `data` names one, else from the API.
fn backup(
    data: Option<&std::path::Path>,
    out: &std::path::Path,
    opts: &ClientOpts,
    default_api: SocketAddr,
) -> Result<(), ClientError> {
    if out.exists() {
        return Err(ClientError::Input(format!(
            "{} exists already; choose a new file",
            out.display()
        )));
    }
    if let Some(dir) = data {
        match tidesync::store::Store::backup_file(&dir.join("node.redb"), out) {
            Ok(s) => {
                println!(
                    "saved {} ({} documents) from the stopped node's {}",
                    out.display(),
                    s.docs,
                    dir.join("node.redb").display()
                );
                return Ok(());
            }
            Err(e) if e.is_in_use() => {}
            Err(e) => {
                return Err(ClientError::Input(format!(
                    "reading {}: {e}",
                    dir.display()
                )))
            }
        }
    }
    let api = Api::new(opts, default_api);
    let path = "/v1/backup";
    let (len, headers) = api.download(path, "the copy", out, |_, _| {})?;
    let docs = headers
        .get("x-tidesync-backup-docs")
        .and_then(|v| v.to_str().ok());
    println!(
        "saved {} ({len} bytes, {} documents) from the running node at {}",
        out.display(),
        docs.unwrap_or("?"),
        api.addr
    );
    Ok(())
}

/// `restore`: puts the copy in place and moves it to a new feed epoch.
fn restore(from: &std::path::Path, data: &std::path::Path) -> Result<(), ClientError> {
    if !from.is_file() {
        return Err(ClientError::Input(format!(
            "{} is not a file",
            from.display()
        )));
    }
    let db = data.join("node.redb");
    let epoch = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Input(e.to_string()))?
        .block_on(tidesync::store::Store::restore(from, &db))
        .map_err(|e| ClientError::Input(format!("restoring {}: {e}", db.display())))?;
    println!(
        "restored {} from {}; new feed epoch {epoch:032x}: peers will sync this node again \
         from the start",
        db.display(),
        from.display()
    );
    Ok(())
}

fn body_arg(arg: Option<String>) -> Result<String, ClientError> {
    let text = match arg.as_deref() {
        None | Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| ClientError::Input(format!("reading standard input: {e}")))?;
            s
        }
        Some(s) => s.to_owned(),
    };
    serde_json::from_str::<Value>(&text)
        .map_err(|e| ClientError::Input(format!("not valid JSON: {e}")))?;
    Ok(text)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `status`: the node and its peers, as a table (or JSON).
pub fn status(opts: &ClientOpts, default_api: SocketAddr, watch: bool) -> Result<(), ClientError> {
    let api = Api::new(opts, default_api);
    if !watch {
        let s = api.json("GET", "/v1/status", None)?;
        if opts.json {
            print_json(&s);
        } else {
            print!("{}", render_status(&s, false));
        }
        return Ok(());
    }
    // Redrawn in place on a terminal; elsewhere (a log, a pipe) one block per second.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let s = api.json("GET", "/v1/status", None)?;
        if opts.json {
            println!("{s}");
        } else if terminal {
            print!("\x1b[H\x1b[2J{}", render_status(&s, true));
        } else {
            println!("{}", render_status(&s, false));
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// `CATCHUP peer …` for a peer with a catch-up under way: documents and bytes done and
/// left, rate and time left; with `bars`, a bar of the documents done.
fn catch_up_line(p: &Value, bars: bool) -> Option<String> {
    let g = &p["progress"];
    if g["active"] != true {
        return None;
    }
    let n = |k: &str| g[k].as_u64().unwrap_or(0);
    let (done, left) = (n("documents_done"), n("documents_remaining"));
    let total = done + left;
    let share = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let bar = if bars {
        const WIDTH: usize = 30;
        let filled = ((share * WIDTH as f64) as usize).min(WIDTH);
        format!("[{}{}] ", "#".repeat(filled), ".".repeat(WIDTH - filled))
    } else {
        String::new()
    };
    let eta = g["eta_seconds"]
        .as_u64()
        .map_or_else(|| "unknown".to_owned(), |s| format!("{s}s"));
    Some(format!(
        "CATCHUP {} {bar}{:.0}% {done} of {total} documents, {} bytes sent, ~{} left, {} B/s, eta {eta}",
        p["node_id"].as_str().unwrap_or("?"),
        share * 100.0,
        n("bytes_done"),
        n("bytes_remaining"),
        n("rate_bytes_per_second"),
    ))
}

/// "connected", or "DISCONNECTED" with the failures so far, for a bridge's export or import.
fn connection(v: &Value) -> String {
    if v["connected"] == true {
        "connected".to_owned()
    } else {
        format!("DISCONNECTED after {} failures", v["failures"])
    }
}

/// "; last error: …" when the bridge's export or import has one.
fn last_error(v: &Value) -> String {
    v["last_error"]
        .as_str()
        .map(|e| format!("; last error: {e}"))
        .unwrap_or_default()
}

/// The status table and the lines under it; `bars`: progress bars for catch-ups.
fn render_status(s: &Value, bars: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {} ({})  documents {}  feed {}",
        s["node_id"].as_str().unwrap_or("?"),
        s["role"].as_str().unwrap_or("?"),
        s["docs"],
        s["last_seq"]
    );
    let _ = writeln!(
        out,
        "{:<20} {:<5} {:<22} {:<6} {:>6} {:>12} {:>12} {:>10}",
        "PEER", "ROLE", "ADDRESS", "STATE", "LAG", "SENT", "RECEIVED", "LAST SYNC"
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for p in s["peers"].as_array().into_iter().flatten() {
        let last = p["last_sync_ms"].as_u64().unwrap_or(0);
        let ago = if last == 0 {
            "never".to_owned()
        } else {
            format!("{}s ago", now_ms.saturating_sub(last) / 1000)
        };
        let _ = writeln!(
            out,
            "{:<20} {:<5} {:<22} {:<6} {:>6} {:>12} {:>12} {:>10}",
            p["node_id"].as_str().unwrap_or("?"),
            p["role"].as_str().unwrap_or("?"),
            p["addr"].as_str().unwrap_or("?"),
            if p["connected"] == true { "up" } else { "down" },
            p["lag"],
            p["bytes_sent"],
            p["bytes_received"],
            ago
        );
    }
    for p in s["peers"].as_array().into_iter().flatten() {
        if let Some(line) = catch_up_line(p, bars) {
            let _ = writeln!(out, "{line}");
        }
    }
    if s["role"] == "hub" {
        let of = s["max_peers"]
            .as_u64()
            .map_or_else(|| "no limit".to_owned(), |m| format!("of {m}"));
        let _ = writeln!(out, "EDGES {} {of}", s["edges_connected"]);
    }
    for p in s["peers"].as_array().into_iter().flatten() {
        for (class, c) in p["classes"].as_object().into_iter().flatten() {
            let _ = writeln!(
                out,
                "CLASS {} {class} ({}): {} documents waiting, {} messages and {} bytes sent",
                p["node_id"].as_str().unwrap_or("?"),
                c["priority"].as_str().unwrap_or("?"),
                c["backlog"],
                c["sent_messages"],
                c["sent_bytes"]
            );
        }
    }
    for p in s["peers"].as_array().into_iter().flatten() {
        let last = p["audit_last_unix_s"].as_u64().unwrap_or(0);
        if last == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "AUDIT {}: last {}s ago; {} audits found {} documents differing, {} repaired",
            p["node_id"].as_str().unwrap_or("?"),
            (now_ms / 1000).saturating_sub(last),
            p["audits"],
            p["audit_differing"],
            p["audit_repaired"]
        );
    }
    if let Some(b) = s["blobs"].as_object() {
        let _ = writeln!(
            out,
            "BLOBS {} held, {} bytes on disk; {} fetched, {} corrupt transfers caught",
            b.get("held").unwrap_or(&Value::Null),
            b.get("bytes_used").unwrap_or(&Value::Null),
            b.get("fetched").unwrap_or(&Value::Null),
            b.get("corrupt").unwrap_or(&Value::Null),
        );
        for t in b
            .get("transfers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (done, size) = (
                t["done"].as_u64().unwrap_or(0),
                t["size"].as_u64().unwrap_or(0),
            );
            let pct = if size == 0 {
                100.0
            } else {
                done as f64 * 100.0 / size as f64
            };
            let _ = writeln!(
                out,
                "FETCHING {} {pct:.1}% of {size} bytes from {} peers, {} B/s",
                t["hash"].as_str().unwrap_or("?"),
                t["sources"],
                t["rate_bytes_s"]
            );
        }
    }
    for e in s["exports"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "EXPORT {} {} {} ({}): {}, position {}, {} behind ({:.1}s), {} published, {} confirmed, {} duplicates{}",
            e["id"].as_str().unwrap_or("?"),
            e["broker"].as_str().unwrap_or("?"),
            e["url"].as_str().unwrap_or("?"),
            e["format"].as_str().unwrap_or("?"),
            connection(e),
            e["position"],
            e["behind"],
            e["lag_seconds"].as_f64().unwrap_or(0.0),
            e["published"],
            e["confirmed"],
            e["duplicates"],
            last_error(e),
        );
    }
    for i in s["imports"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "IMPORT {} {} {}: {}, {} applied, {} rejected to {}, {} skipped as applied already{}",
            i["id"].as_str().unwrap_or("?"),
            i["broker"].as_str().unwrap_or("?"),
            i["url"].as_str().unwrap_or("?"),
            connection(i),
            i["applied"],
            i["rejected"],
            i["dead_letter"].as_str().unwrap_or("?"),
            i["skipped"],
            last_error(i),
        );
    }
    if let Some(fault) = s["store_fault"].as_object() {
        let _ = writeln!(
            out,
            "STORE FAULT: {} (writes are refused until it clears)",
            fault.get("reason").and_then(|r| r.as_str()).unwrap_or("?")
        );
    }
    for q in s["quarantined"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "QUARANTINED {}/{}: {}",
            q["ns"].as_str().unwrap_or("?"),
            q["id"].as_str().unwrap_or("?"),
            q["reason"].as_str().unwrap_or("?")
        );
    }
    out
}

/// `audit`: runs an audit of `peer` and prints what it found and repaired.
pub fn audit(
    opts: &ClientOpts,
    default_api: SocketAddr,
    peer: &str,
    namespaces: Vec<String>,
    timeout_ms: u64,
) -> Result<(), ClientError> {
    let body = serde_json::json!({
        "peer": peer,
        "namespaces": namespaces,
        "timeout_ms": timeout_ms,
    })
    .to_string();
    let out = Api::new(opts, default_api).json("POST", "/v1/audit", Some(&body))?;
    if opts.json {
        print_json(&out);
        return Ok(());
    }
    println!(
        "audit of {}: {} documents compared, {} differing, {} repaired ({} round trips, {} bytes, {} ms)",
        out["peer"].as_str().unwrap_or(peer),
        out["compared"],
        out["differing"],
        out["repaired"],
        out["rounds"],
        out["bytes"],
        out["ms"]
    );
    Ok(())
}

/// `doc …`.
pub fn doc(cmd: DocCommand, opts: &ClientOpts, default_api: SocketAddr) -> Result<(), ClientError> {
    let api = Api::new(opts, default_api);
    match cmd {
        DocCommand::Get { ns, id } => {
            print_json(&api.json("GET", &format!("/v1/docs/{ns}/{id}"), None)?)
        }
        DocCommand::Put {
            ns,
            id,
            body,
            replicas,
        } => {
            let body = body_arg(body)?;
            let path = format!("/v1/docs/{ns}/{id}{}", replicas.query());
            let out = api.json("PUT", &path, Some(&body))?;
            written(&out, opts.json, replicas.replicas);
        }
        DocCommand::Patch {
            ns,
            id,
            body,
            replicas,
        } => {
            let body = body_arg(body)?;
            let path = format!("/v1/docs/{ns}/{id}{}", replicas.query());
            let out = api.json("PATCH", &path, Some(&body))?;
            written(&out, opts.json, replicas.replicas);
        }
        DocCommand::Rm { ns, id, replicas } => {
            let path = format!("/v1/docs/{ns}/{id}{}", replicas.query());
            let out = api.json("DELETE", &path, None)?;
            written(&out, opts.json, replicas.replicas);
        }
        DocCommand::Ls { ns } => {
            let out = api.json("GET", &format!("/v1/docs/{ns}"), None)?;
            if opts.json {
                print_json(&out);
            } else {
                for d in out["docs"].as_array().into_iter().flatten() {
                    let deleted = if d["deleted"] == true {
                        "  (deleted)"
                    } else {
                        ""
                    };
                    println!("{}{deleted}", d["id"].as_str().unwrap_or("?"));
                }
            }
        }
    }
    Ok(())
}

fn written(out: &Value, json: bool, wanted: Option<usize>) {
    if json {
        print_json(out);
        return;
    }
    match (wanted, out["replicas"].as_u64()) {
        (Some(k), Some(n)) if (n as usize) < k => {
            println!("stored here, seq {}", out["seq"]);
            eprintln!(
                "only {n} of {k} replicas confirmed in time; the write is durable here and \
                 still replicating"
            );
        }
        (_, Some(n)) => println!("ok, seq {}, on {n} replicas", out["seq"]),
        _ => println!("ok, seq {}", out["seq"]),
    }
}

/// `watch`: prints each change as it arrives (one JSON object per line with `--json`).
pub fn watch(opts: &ClientOpts, default_api: SocketAddr, since: u64) -> Result<(), ClientError> {
    let api = Api::new(opts, default_api);
    let path = format!("/v1/changes?since={since}");
    api.run(&path, async {
        let mut body = api
            .send("GET", &path, None, "text/event-stream")
            .await?
            .into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| api.unreachable(&path, e))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                print_change(&String::from_utf8_lossy(&line), opts.json);
            }
        }
        Ok(())
    })
}

/// Prints one line of the server-sent event stream, if it carries a change.
fn print_change(line: &str, json: bool) {
    let Some(data) = line.trim_end().strip_prefix("data:") else {
        return;
    };
    let change: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
    if json {
        println!("{change}");
    } else {
        let deleted = if change["deleted"] == true {
            " (deleted)"
        } else {
            ""
        };
        println!(
            "{:>8}  {}/{}{deleted}",
            change["seq"],
            change["ns"].as_str().unwrap_or("?"),
            change["id"].as_str().unwrap_or("?")
        );
    }
}
