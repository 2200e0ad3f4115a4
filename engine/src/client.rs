//! The client subcommands both binaries share: `status`, `doc …` and `watch`, talking to a
//! node's HTTP API.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;

use clap::{Args, Subcommand};
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
    /// Show the node and its peers: connection state, lag, bytes, last sync.
    Status {
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
    /// Print changes as they arrive.
    Watch {
        /// Start after this feed position (0: everything).
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

impl ClientCommand {
    /// Runs the command against the API at `--api`, or `default_api`.
    pub fn run(self, default_api: SocketAddr) -> Result<(), ClientError> {
        match self {
            Self::Status { opts } => status(&opts, default_api),
            Self::Doc { cmd, opts } => doc(cmd, &opts, default_api),
            Self::Watch { since, opts } => watch(&opts, default_api, since),
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
    },
    /// Delete a document (a tombstone that syncs like any write).
    Rm {
        /// Namespace.
        ns: String,
        /// Document id.
        id: String,
    },
    /// List a namespace's documents.
    Ls {
        /// Namespace.
        ns: String,
    },
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

struct Api {
    base: String,
    token: Option<String>,
}

impl Api {
    fn new(opts: &ClientOpts, default_api: SocketAddr) -> Self {
        Self {
            base: format!("http://{}", opts.api.unwrap_or(default_api)),
            token: opts.token.clone(),
        }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<ureq::Response, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = ureq::request(method, &url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        match result {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(status, resp)) => {
                let message = resp
                    .into_json::<Value>()
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "request failed".into());
                Err(ClientError::Api { status, message })
            }
            Err(e) => Err(ClientError::Unreachable {
                url,
                reason: e.to_string(),
            }),
        }
    }

    fn json(&self, method: &str, path: &str, body: Option<&str>) -> Result<Value, ClientError> {
        self.call(method, path, body)?
            .into_json()
            .map_err(|e| ClientError::Input(format!("the API sent invalid JSON: {e}")))
    }
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
pub fn status(opts: &ClientOpts, default_api: SocketAddr) -> Result<(), ClientError> {
    let s = Api::new(opts, default_api).json("GET", "/v1/status", None)?;
    if opts.json {
        print_json(&s);
        return Ok(());
    }
    println!(
        "node {} ({})  documents {}  feed {}",
        s["node_id"].as_str().unwrap_or("?"),
        s["role"].as_str().unwrap_or("?"),
        s["docs"],
        s["last_seq"]
    );
    println!(
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
        println!(
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
    Ok(())
}

/// `doc …`.
pub fn doc(cmd: DocCommand, opts: &ClientOpts, default_api: SocketAddr) -> Result<(), ClientError> {
    let api = Api::new(opts, default_api);
    match cmd {
        DocCommand::Get { ns, id } => {
            print_json(&api.json("GET", &format!("/v1/docs/{ns}/{id}"), None)?)
        }
        DocCommand::Put { ns, id, body } => {
            let body = body_arg(body)?;
            let out = api.json("PUT", &format!("/v1/docs/{ns}/{id}"), Some(&body))?;
            written(&out, opts.json);
        }
        DocCommand::Patch { ns, id, body } => {
            let body = body_arg(body)?;
            let out = api.json("PATCH", &format!("/v1/docs/{ns}/{id}"), Some(&body))?;
            written(&out, opts.json);
        }
        DocCommand::Rm { ns, id } => {
            let out = api.json("DELETE", &format!("/v1/docs/{ns}/{id}"), None)?;
            written(&out, opts.json);
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

fn written(out: &Value, json: bool) {
    if json {
        print_json(out);
    } else {
        println!("ok, seq {}", out["seq"]);
    }
}

/// `watch`: prints each change as it arrives (one JSON object per line with `--json`).
pub fn watch(opts: &ClientOpts, default_api: SocketAddr, since: u64) -> Result<(), ClientError> {
    let api = Api::new(opts, default_api);
    let url = format!("{}/v1/changes?since={since}", api.base);
    let mut req = ureq::get(&url).set("Accept", "text/event-stream");
    if let Some(t) = &api.token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let resp = req.call().map_err(|e| ClientError::Unreachable {
        url: url.clone(),
        reason: e.to_string(),
    })?;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|e| ClientError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let change: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
        if opts.json {
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
    Ok(())
}
