//! The TOML form of the `run` flags: every flag has a key of the same name (`peer` and
//! `hub` take lists, as `peers` and `hubs`). A flag given on the command line wins over
//! the file; the file wins over the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::duration::{parse_duration, parse_every_or_never, parse_or_never, OrNever};
use tidesync::api::serve::ServeLimits;
use tidesync::blobs::{BlobConfig, FetchPolicy};
pub use tidesync::daemon::DEFAULT_MAX_BODY;
use tidesync::model::json::Strings;
use tidesync::model::{Class, Classes, Mode, Namespace, NsPattern, Priority, Window};
use tidesync::net::node::{DEFAULT_AUDIT_EVERY, DEFAULT_FORGET_PEERS_AFTER};
use tidesync::net::tls::{Congestion, Timers};
use tidesync::net::TrafficConfig;
use tidesync::store::StoreConfig;

/// Cache memory in MiB when neither `--cache-mb` nor the file says: bounds the process
/// whatever the number of documents.
pub const DEFAULT_CACHE_MB: u64 = 32;

/// Settings of `tidesync-hub run` and `tidesync-edge run` as read from a config file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// `--data`.
    pub data: Option<PathBuf>,
    /// `--bundle`.
    pub bundle: Option<PathBuf>,
    /// `--listen` (hub).
    pub listen: Option<SocketAddr>,
    /// `--api`.
    pub api: Option<SocketAddr>,
    /// `--peer`, repeated (hub).
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    /// `--hub`, repeated (edge).
    #[serde(default)]
    pub hubs: Vec<SocketAddr>,
    /// `--subscribe`, repeated (edge).
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// `--token`.
    pub token: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--api-host`, repeated.
    #[serde(default)]
    pub api_hosts: Vec<String>,
    /// `--max-api-connections`.
    pub max_api_connections: Option<usize>,
    /// `--max-body`.
    pub max_body: Option<usize>,
    /// `--cache-mb`.
    pub cache_mb: Option<u64>,
    /// `--keep-alive`, as `"1.5s"` or seconds.
    #[serde(default, with = "crate::duration::serde_opt")]
    pub keep_alive: Option<Duration>,
    /// `--idle-timeout`, as `"15s"` or seconds.
    #[serde(default, with = "crate::duration::serde_opt")]
    pub idle_timeout: Option<Duration>,
    /// `--forget-peers-after`, as `"90d"` or `"never"`.
    #[serde(default, with = "crate::duration::serde_or_never")]
    pub forget_peers_after: Option<OrNever>,
    /// `--audit-every`, as `"24h"` or `"never"`.
    #[serde(default, with = "crate::duration::serde_every_or_never")]
    pub audit_every: Option<OrNever>,
    /// `--blob-policy`: `"eager"` or `"lazy"`.
    pub blob_policy: Option<String>,
    /// `--blob-max-rate`, bytes per second.
    pub blob_max_rate: Option<u64>,
    /// `--blob-gc-grace`, as `"24h"` or seconds.
    #[serde(default, with = "crate::duration::serde_opt")]
    pub blob_gc_grace: Option<Duration>,
    /// `[[namespace]]` tables: settings of the namespaces matching their patterns.
    #[serde(default)]
    pub namespace: Vec<NamespaceSettings>,
    /// `--max-rate`, bytes per second.
    pub max_rate: Option<u64>,
    /// `--compression`: `"zstd"` or `"off"`.
    pub compression: Option<String>,
    /// `--congestion`: `"cubic"` or `"bbr"`.
    pub congestion: Option<String>,
    /// `--max-peers` (hub).
    pub max_peers: Option<usize>,
    /// `[[class]]` tables: priorities and schedules of namespaces, first match wins.
    #[serde(default)]
    pub class: Vec<ClassSettings>,
    /// `--repo-namespace`.
    pub repo_namespace: Option<String>,
    /// `[[export]]` tables (hub): the change feed out to a message bus.
    #[serde(default)]
    pub export: Vec<ExportSettings>,
    /// `[[import]]` tables (hub): merge patches in from a message bus.
    #[serde(default)]
    pub import: Vec<ImportSettings>,
}

/// An `[[import]]` table of the config file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportSettings {
    /// The broker: `nats://host:port` (JetStream) or `amqp://user:pass@host:port/vhost`.
    pub url: String,
    /// NATS: the subject its patches arrive on [default: `tidesync.import.>`].
    pub subject: Option<String>,
    /// AMQP: the durable queue its patches arrive on [default: `tidesync.import`].
    pub queue: Option<String>,
    /// The only namespace its patches may write [default: the one each message names].
    pub namespace: Option<String>,
    /// Where messages that are not valid patches go: a subject (NATS) or queue (AMQP)
    /// [default: `tidesync.dead`].
    pub dead_letter: Option<String>,
}

/// An `[[export]]` table of the config file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportSettings {
    /// The broker: `nats://host:port` (JetStream) or `amqp://user:pass@host:port/vhost`.
    pub url: String,
    /// Namespace patterns exported [default: all].
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Subject template, `{ns}` and `{id}` replaced [default: `tidesync.{ns}.{id}`].
    pub subject: Option<String>,
    /// AMQP: routing key template, `{ns}` and `{id}` replaced [default: `tidesync.{ns}.{id}`].
    pub routing_key: Option<String>,
    /// AMQP: the durable topic exchange published to [default: `tidesync`].
    pub exchange: Option<String>,
    /// `json` (the document) or `automerge` (its changes) [default: json].
    pub format: Option<String>,
}

/// A `[[class]]` table of the config file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClassSettings {
    /// How status and metrics name the class [default: its patterns, comma-separated].
    pub name: Option<String>,
    /// Namespace patterns (`alerts.*`, `flags`) of the class.
    pub namespaces: Vec<String>,
    /// `critical`, `normal` or `bulk` [default: normal].
    pub priority: Option<String>,
    /// `live` (as documents change) or `batch` (coalesced, on a schedule) [default: live].
    pub mode: Option<String>,
    /// Batch: send at most this often (`60s`, `15m`).
    #[serde(default, with = "crate::duration::serde_opt")]
    pub every: Option<Duration>,
    /// Batch: only inside this local-time window (`01:00-05:00`).
    pub window: Option<String>,
    /// Bytes per second the class may take of each link.
    pub max_rate: Option<u64>,
}

impl ClassSettings {
    /// The class this table describes, checked.
    pub fn to_class(&self) -> Result<Class, String> {
        let mut namespaces = Vec::new();
        for p in &self.namespaces {
            namespaces.push(NsPattern::new(p.as_str()).map_err(|e| format!("{p:?}: {e}"))?);
        }
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| self.namespaces.join(","));
        let priority = match self.priority.as_deref() {
            None => Priority::Normal,
            Some(p) => Priority::parse(p).ok_or_else(|| {
                format!("class {name:?}: priority {p:?} is not critical, normal or bulk")
            })?,
        };
        let window = self.window.as_deref().map(Window::parse).transpose()?;
        let mode = match self.mode.as_deref().unwrap_or("live") {
            "live" => {
                if self.every.is_some() || window.is_some() {
                    return Err(format!(
                        "class {name:?}: every and window need mode = \"batch\""
                    ));
                }
                Mode::Live
            }
            "batch" => Mode::Batch {
                every: self.every.ok_or_else(|| {
                    format!("class {name:?}: a batch class needs every (such as \"60s\")")
                })?,
                window,
            },
            m => return Err(format!("class {name:?}: mode {m:?} is not live or batch")),
        };
        Ok(Class {
            name,
            namespaces,
            priority,
            mode,
            max_rate: self.max_rate,
        })
    }
}

/// A `[[namespace]]` table of the config file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSettings {
    /// Namespace patterns (`orders`, `orders.*`, `*`) these settings apply to.
    pub namespaces: Vec<String>,
    /// Replicas a write waits for unless the request says (`?replicas=K`); 0: none.
    pub replicas: Option<usize>,
    /// When the blobs its documents reference are fetched: `"eager"` (as soon as the
    /// reference arrives) or `"lazy"` (on the first read).
    pub blobs: Option<String>,
    /// How strings written through the JSON API are stored: `"text"` (collaborative
    /// text, what JS Automerge makes), `"scalar"` (one value; concurrent writes pick a
    /// winner) or `"auto"` (as the document's strings already are).
    pub strings: Option<String>,
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("config file {path}: {reason}")]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

impl RunFile {
    /// Reads the `--config` file if one was given; without one, every key is unset.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        path.map_or_else(|| Ok(Self::default()), Self::read)
    }

    /// Reads `path`; unknown keys are errors, so a typo never silently falls back.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }
}

/// The `run` flags that mean the same on both binaries, flattened into their `run`
/// commands so the two cannot drift apart.
#[derive(Debug, clap::Args)]
pub struct CommonRunFlags {
    /// Require `Authorization: Bearer TOKEN` on the API (except /v1/health). Prefer
    /// --token-file or the environment: a flag is visible to every local user in `ps`.
    #[arg(
        long,
        env = "TIDESYNC_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Read the API token from FILE (its first line; keep the file mode 0600).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// A name the API answers to besides IP addresses and `localhost` (repeat for more):
    /// requests naming any other host are refused, which stops DNS rebinding.
    #[arg(long = "api-host", value_name = "NAME")]
    pub api_hosts: Vec<String>,
    /// API connections open at once; more wait until one closes [default: 256].
    #[arg(long, value_name = "N")]
    pub max_api_connections: Option<usize>,
    /// Largest API request body, in bytes [default: 16777216].
    #[arg(long, value_name = "BYTES")]
    pub max_body: Option<usize>,
    /// Memory for caches of documents and storage pages, in MiB; more keeps more
    /// documents loaded, less bounds the process tighter [default: 32].
    #[arg(long, value_name = "MIB")]
    pub cache_mb: Option<u64>,
    /// How often this node pings a quiet connection it dialed (500ms, 1.5s, 30s, …). It
    /// bounds how long an idle edge takes to notice a restarted hub; on a metered or
    /// sleepy link a longer one saves bytes and wake-ups [default: 1.5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub keep_alive: Option<Duration>,
    /// How long a connection lives without hearing from its peer: how fast a silently
    /// dead peer is noticed. At least three keep-alives; QUIC uses the smaller of both
    /// sides' values [default: 15s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Forget a peer unseen for this long (30d, 90d, never): its cursor and sync states
    /// are dropped, so a hub met by many short-lived devices does not keep their rows for
    /// ever. A forgotten peer that comes back syncs from scratch [default: 90d].
    #[arg(long, value_name = "DURATION", value_parser = parse_or_never)]
    pub forget_peers_after: Option<OrNever>,
    /// Audit each peer this node dialed this often (1h, 24h, never): compare what both
    /// hold without shipping it, and repair every difference. Also `audit` on demand
    /// [default: 24h].
    #[arg(long, value_name = "DURATION", value_parser = parse_every_or_never)]
    pub audit_every: Option<OrNever>,
    /// When blobs referenced by synced documents are fetched, unless a `[[namespace]]`
    /// table says otherwise: eager (as soon as the reference arrives) or lazy (on the
    /// first read through the API) [default: eager].
    #[arg(long, value_name = "POLICY", value_parser = ["eager", "lazy"])]
    pub blob_policy: Option<String>,
    /// Cap on the bytes per second this node sends in blob streams on each link (model
    /// weights, datasets); document sync is never capped and always goes first
    /// [default: uncapped].
    #[arg(long, value_name = "BYTES/S")]
    pub blob_max_rate: Option<u64>,
    /// How long a blob no document references any more is kept before it is deleted
    /// (1h, 24h, 7d) [default: 24h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub blob_gc_grace: Option<Duration>,
    /// Fault injection for tests: serve blob streams with a flipped bit.
    #[arg(long, hide = true)]
    pub fault_corrupt_blob_sends: bool,
    /// Cap on the bytes per second this node sends on each link, documents and blobs
    /// together, so sync never takes the whole modem; critical classes go first within
    /// it. Set it on both ends to cap both directions [default: uncapped].
    #[arg(long, value_name = "BYTES/S")]
    pub max_rate: Option<u64>,
    /// Compress document payloads with zstd where it pays (each message is sent
    /// compressed only if that is smaller), on links whose peer supports it: zstd or off
    /// [default: zstd].
    #[arg(long, value_name = "MODE", value_parser = ["zstd", "off"])]
    pub compression: Option<String>,
    /// How this node's sending reacts to loss: cubic (QUIC's usual; backs off on every
    /// loss) or bbr (paces at the measured bandwidth; for long, lossy links such as radio
    /// or satellite, where random loss is not congestion) [default: cubic].
    #[arg(long, value_name = "ALGORITHM", value_parser = ["cubic", "bbr"])]
    pub congestion: Option<String>,
    /// The namespace holding the documents of automerge-repo clients connected at
    /// /v1/automerge-repo, under their automerge-repo document ids; its strings are text
    /// unless a `[[namespace]]` table says otherwise [default: repo].
    #[arg(long, value_name = "NS")]
    pub repo_namespace: Option<String>,
}

/// The common settings once flags, file and defaults are applied, in that order.
#[derive(Debug)]
pub struct CommonRun {
    /// Bearer token the API requires, if any.
    pub token: Option<String>,
    /// Names the API answers to besides IP addresses and `localhost`.
    pub api_hosts: Vec<String>,
    /// Bounds on the API's connections.
    pub api_limits: ServeLimits,
    /// Largest API request body.
    pub max_body: usize,
    /// Store settings, with the caches sized from `cache_mb`.
    pub store: StoreConfig,
    /// Keep-alive and idle timeout of connections.
    pub timers: Timers,
    /// Forget peers unseen for this long; `None`: never.
    pub forget_peers_after: Option<Duration>,
    /// Audit dialed peers this often; `None`: only on demand.
    pub audit_every: Option<Duration>,
    /// Replicas writes wait for by default, per namespace pattern, in file order.
    pub replica_defaults: Vec<(NsPattern, usize)>,
    /// Blob settings.
    pub blobs: BlobConfig,
    /// Classes, caps and compression.
    pub traffic: TrafficConfig,
    /// Where automerge-repo clients' documents live.
    pub repo_namespace: Namespace,
}

impl CommonRunFlags {
    /// A flag given wins over the file's key, which wins over the default. Reads the
    /// token file, if one is named.
    pub fn resolve(self, file: &RunFile) -> Result<CommonRun, ConfigError> {
        let cache_mb = self.cache_mb.or(file.cache_mb).unwrap_or(DEFAULT_CACHE_MB);
        let token = match (self.token, self.token_file) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => Some(read_token(&path)?),
            (None, None) => match (&file.token, &file.token_file) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(path)) => Some(read_token(path)?),
                (None, None) => None,
            },
        };
        let defaults = Timers::default();
        let congestion = match self.congestion.as_deref().or(file.congestion.as_deref()) {
            Some(c) => Congestion::parse(c).map_err(|reason| ConfigError {
                path: PathBuf::from("congestion"),
                reason,
            })?,
            None => defaults.congestion,
        };
        let timers = Timers {
            congestion,
            keep_alive: self
                .keep_alive
                .or(file.keep_alive)
                .unwrap_or(defaults.keep_alive),
            idle_timeout: self
                .idle_timeout
                .or(file.idle_timeout)
                .unwrap_or(defaults.idle_timeout),
        };
        timers.check().map_err(|reason| ConfigError {
            path: PathBuf::from("--keep-alive/--idle-timeout"),
            reason,
        })?;
        let mut replica_defaults = Vec::new();
        for table in &file.namespace {
            let Some(k) = table.replicas else { continue };
            if k > tidesync::api::replication::MAX_REPLICAS {
                return Err(ConfigError {
                    path: PathBuf::from("[[namespace]] replicas"),
                    reason: format!(
                        "{k} is more than {}",
                        tidesync::api::replication::MAX_REPLICAS
                    ),
                });
            }
            for p in &table.namespaces {
                let pattern = NsPattern::new(p.as_str()).map_err(|e| ConfigError {
                    path: PathBuf::from("[[namespace]] namespaces"),
                    reason: format!("{p:?}: {e}"),
                })?;
                replica_defaults.push((pattern, k));
            }
        }
        let policy = |s: &str, key: &str| -> Result<FetchPolicy, ConfigError> {
            s.parse().map_err(|reason| ConfigError {
                path: PathBuf::from(key),
                reason,
            })
        };
        let mut blobs = BlobConfig::default();
        if let Some(p) = self.blob_policy.as_deref().or(file.blob_policy.as_deref()) {
            blobs.default_policy = policy(p, "blob_policy")?;
        }
        blobs.max_rate = self.blob_max_rate.or(file.blob_max_rate);
        if blobs.max_rate == Some(0) {
            return Err(ConfigError {
                path: PathBuf::from("blob_max_rate"),
                reason: "0 bytes per second would stop every blob; leave it out for no cap"
                    .to_owned(),
            });
        }
        blobs.fault_corrupt_sends = self.fault_corrupt_blob_sends;
        if let Some(g) = self.blob_gc_grace.or(file.blob_gc_grace) {
            blobs.gc_grace = g;
        }
        for table in &file.namespace {
            let Some(p) = table.blobs.as_deref() else {
                continue;
            };
            let p = policy(p, "[[namespace]] blobs")?;
            for ns in &table.namespaces {
                let pattern = NsPattern::new(ns.as_str()).map_err(|e| ConfigError {
                    path: PathBuf::from("[[namespace]] namespaces"),
                    reason: format!("{ns:?}: {e}"),
                })?;
                blobs.policies.push((pattern, p));
            }
        }
        let traffic = traffic(self.max_rate, self.compression.as_deref(), file)?;
        let repo_namespace = self
            .repo_namespace
            .or_else(|| file.repo_namespace.clone())
            .unwrap_or_else(|| DEFAULT_REPO_NAMESPACE.to_owned());
        let repo_namespace = Namespace::new(repo_namespace.as_str()).map_err(|e| ConfigError {
            path: PathBuf::from("repo_namespace"),
            reason: format!("{repo_namespace:?}: {e}"),
        })?;
        let mut store = StoreConfig::with_cache_budget(cache_mb << 20);
        store.strings = strings(file, &repo_namespace)?;
        let mut api_limits = ServeLimits::default();
        if let Some(n) = self.max_api_connections.or(file.max_api_connections) {
            api_limits.max_connections = n;
        }
        Ok(CommonRun {
            token,
            api_hosts: list_or(self.api_hosts, file.api_hosts.clone()),
            api_limits,
            max_body: self.max_body.or(file.max_body).unwrap_or(DEFAULT_MAX_BODY),
            store,
            timers,
            forget_peers_after: self
                .forget_peers_after
                .or(file.forget_peers_after)
                .map_or(Some(DEFAULT_FORGET_PEERS_AFTER), |o| o.0),
            audit_every: self
                .audit_every
                .or(file.audit_every)
                .map_or(Some(DEFAULT_AUDIT_EVERY), |o| o.0),
            replica_defaults,
            blobs,
            traffic,
            repo_namespace,
        })
    }
}

/// The namespace of automerge-repo clients' documents unless configured.
pub const DEFAULT_REPO_NAMESPACE: &str = "repo";

/// How strings are stored per namespace: the `[[namespace]]` tables' `strings`, in file
/// order, then text for the repo namespace (its documents come from JS apps).
fn strings(file: &RunFile, repo: &Namespace) -> Result<Vec<(NsPattern, Strings)>, ConfigError> {
    let err = |key: &str, reason: String| ConfigError {
        path: PathBuf::from(key),
        reason,
    };
    let mut out = Vec::new();
    for table in &file.namespace {
        let Some(s) = table.strings.as_deref() else {
            continue;
        };
        let mode = Strings::parse(s).ok_or_else(|| {
            err(
                "[[namespace]] strings",
                format!("{s:?} is not text, scalar or auto"),
            )
        })?;
        for ns in &table.namespaces {
            let pattern = NsPattern::new(ns.as_str())
                .map_err(|e| err("[[namespace]] namespaces", format!("{ns:?}: {e}")))?;
            out.push((pattern, mode));
        }
    }
    let repo =
        NsPattern::new(repo.as_str()).map_err(|e| err("repo_namespace", format!("{repo}: {e}")))?;
    out.push((repo, Strings::Text));
    Ok(out)
}

/// The traffic settings from the flags and the file's `max_rate`, `compression` and
/// `[[class]]` tables.
fn traffic(
    max_rate: Option<u64>,
    compression: Option<&str>,
    file: &RunFile,
) -> Result<TrafficConfig, ConfigError> {
    let err = |key: &str, reason: String| ConfigError {
        path: PathBuf::from(key),
        reason,
    };
    let max_rate = max_rate.or(file.max_rate);
    if max_rate == Some(0) {
        return Err(err(
            "max_rate",
            "0 bytes per second would stop every link; leave it out for no cap".into(),
        ));
    }
    let compress = match compression.or(file.compression.as_deref()) {
        None | Some("zstd") => true,
        Some("off") => false,
        Some(other) => return Err(err("compression", format!("{other:?} is not zstd or off"))),
    };
    let classes = file
        .class
        .iter()
        .map(ClassSettings::to_class)
        .collect::<Result<Vec<_>, _>>()
        .and_then(Classes::new)
        .map_err(|reason| err("[[class]]", reason))?;
    Ok(TrafficConfig {
        classes: std::sync::Arc::new(classes),
        max_rate,
        compress,
        ..TrafficConfig::default()
    })
}

/// Largest token file read, in bytes.
pub const MAX_TOKEN_FILE: u64 = 64 * 1024;

/// The token in `path`: its first line, without surrounding whitespace; never empty.
pub fn read_token(path: &Path) -> Result<String, ConfigError> {
    let err = |reason: String| ConfigError {
        path: path.to_owned(),
        reason,
    };
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_FILE + 1).read_to_string(&mut text))
        .map_err(|e| err(format!("token file: {e}")))?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(err(format!(
            "the token file is over {MAX_TOKEN_FILE} bytes"
        )));
    }
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(err("the token file is empty".into()));
    }
    Ok(token.to_owned())
}

/// The command line's list if it has one, else the file's.
pub fn list_or<T>(cli: Vec<T>, file: Vec<T>) -> Vec<T> {
    if cli.is_empty() {
        file
    } else {
        cli
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_key_and_refuses_unknown_ones() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("hub.toml");
        std::fs::write(
            &path,
            "data = \"/var/lib/tidesync\"\nlisten = \"0.0.0.0:7443\"\napi = \"127.0.0.1:0\"\n\
             peers = [\"10.0.0.2:7443\"]\ntoken = \"t\"\nmax_body = 1024\ncache_mb = 64\n\
             keep_alive = \"5s\"\nidle_timeout = 30\n\
             blob_policy = \"lazy\"\nblob_max_rate = 5\nblob_gc_grace = \"1h\"\n\
             [[namespace]]\nnamespaces = [\"orders.*\"]\nreplicas = 1\n\
             [[namespace]]\nnamespaces = [\"models\"]\nblobs = \"eager\"\n",
        )
        .expect("write");
        let f = RunFile::read(&path).expect("read");
        assert_eq!(f.listen, Some("0.0.0.0:7443".parse().expect("addr")));
        assert_eq!(f.peers.len(), 1);
        assert_eq!(f.max_body, Some(1024));
        assert_eq!(f.cache_mb, Some(64));
        std::fs::write(&path, "lisen = \"0.0.0.0:7443\"\n").expect("write");
        let e = RunFile::read(&path).expect_err("typo");
        assert!(e.reason.contains("lisen"), "{e}");
        let common = CommonRunFlags {
            token: None,
            token_file: None,
            api_hosts: Vec::new(),
            max_api_connections: None,
            max_body: Some(2048),
            cache_mb: None,
            keep_alive: None,
            idle_timeout: None,
            forget_peers_after: None,
            audit_every: None,
            blob_policy: None,
            blob_max_rate: Some(1_000_000),
            blob_gc_grace: None,
            fault_corrupt_blob_sends: false,
            max_rate: None,
            compression: None,
            congestion: None,
            repo_namespace: None,
        }
        .resolve(&f)
        .expect("resolve");
        assert_eq!(common.blobs.default_policy, FetchPolicy::Lazy);
        assert_eq!(common.blobs.max_rate, Some(1_000_000), "a flag wins");
        assert_eq!(common.blobs.gc_grace, Duration::from_secs(3600));
        let models = tidesync::model::Namespace::new("models").expect("ns");
        assert_eq!(common.blobs.policies.len(), 1);
        assert!(common.blobs.policies[0].0.matches(&models));
        assert_eq!(common.blobs.policies[0].1, FetchPolicy::Eager);
        assert_eq!(common.replica_defaults.len(), 1);
        assert_eq!(common.replica_defaults[0].1, 1);
        assert_eq!(
            common.timers,
            Timers {
                keep_alive: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(30),
                congestion: Congestion::Cubic,
            }
        );
        assert_eq!(
            common.token.as_deref(),
            Some("t"),
            "the file fills what no flag gave"
        );
        assert_eq!(common.max_body, 2048, "a flag wins over the file");
        assert_eq!(
            common.store.doc_cache_bytes,
            StoreConfig::with_cache_budget(64 << 20).doc_cache_bytes
        );
        let too_short = CommonRunFlags {
            token: None,
            token_file: None,
            api_hosts: Vec::new(),
            max_api_connections: None,
            max_body: None,
            cache_mb: None,
            keep_alive: Some(Duration::from_secs(11)),
            idle_timeout: None,
            forget_peers_after: None,
            audit_every: None,
            blob_policy: None,
            blob_max_rate: None,
            blob_gc_grace: None,
            fault_corrupt_blob_sends: false,
            max_rate: None,
            compression: None,
            congestion: None,
            repo_namespace: None,
        }
        .resolve(&f)
        .expect_err("an idle timeout of three keep-alives at least");
        assert!(
            too_short.reason.contains("three keep-alives"),
            "{too_short}"
        );
        assert_eq!(list_or(vec![1], vec![2]), vec![1]);
        assert_eq!(list_or(Vec::new(), vec![2]), vec![2]);
    }

    #[test]
    fn classes_read_from_the_file_and_bad_ones_say_why() {
        let read = |text: &str| -> Result<TrafficConfig, ConfigError> {
            let file: RunFile = toml::from_str(text).map_err(|e| ConfigError {
                path: PathBuf::from("test"),
                reason: e.to_string(),
            })?;
            traffic(None, None, &file)
        };
        let t = read(
            "max_rate = 1250000\ncompression = \"off\"\n\
             [[class]]\nnamespaces = [\"alerts.*\", \"flags\"]\npriority = \"critical\"\n\
             [[class]]\nnamespaces = [\"telemetry.*\"]\npriority = \"bulk\"\nmode = \"batch\"\n\
             every = \"60s\"\nwindow = \"01:00-05:00\"\nmax_rate = 100000\n",
        )
        .expect("valid");
        assert_eq!((t.max_rate, t.compress), (Some(1_250_000), false));
        let list = t.classes.list();
        assert_eq!(list[0].name, "alerts.*,flags");
        assert_eq!(list[0].priority, Priority::Critical);
        assert_eq!(
            list[1].mode,
            Mode::Batch {
                every: Duration::from_secs(60),
                window: Some(Window::parse("01:00-05:00").expect("window"))
            }
        );
        assert_eq!(list[1].max_rate, Some(100_000));
        for (bad, says) in [
            (
                "[[class]]\nnamespaces = [\"x\"]\npriority = \"urgent\"\n",
                "urgent",
            ),
            (
                "[[class]]\nnamespaces = [\"x\"]\nmode = \"batch\"\n",
                "needs every",
            ),
            ("[[class]]\nnamespaces = [\"x\"]\nevery = \"5s\"\n", "batch"),
            (
                "[[class]]\nnamespaces = [\"x\"]\npriority = \"critical\"\nmax_rate = 5\n",
                "critical",
            ),
            ("[[class]]\nnamespaces = [\"X!\"]\n", "X!"),
            ("max_rate = 0\n", "0 bytes"),
        ] {
            let e = read(bad).expect_err(bad);
            assert!(e.reason.contains(says), "{bad}: {e}");
        }
    }
}
