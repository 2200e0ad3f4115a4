//! The command line of `tidesync-edge`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tidesync_cli::config::CommonRunFlags;

/// Tidesync edge agent: keeps the documents this device is granted, accepts writes online or
/// offline, and syncs them with the deployment's hubs.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The edge agent's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the edge agent.
    Run {
        /// Directory of the agent's database (created if missing).
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// The certificate bundle `tidesync-hub enroll` wrote for this edge.
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
        /// A hub's QUIC address. Repeat for failover: the first that answers is used, and
        /// the agent moves to the next when it fails.
        #[arg(long = "hub", value_name = "ADDR")]
        hubs: Vec<SocketAddr>,
        /// HTTP API address; port 0 picks a free port [default: 127.0.0.1:7780].
        #[arg(long, value_name = "ADDR")]
        api: Option<SocketAddr>,
        /// Namespace pattern to receive (e.g. models, flags.*). Repeat for several
        /// [default: everything the certificate grants].
        #[arg(long = "subscribe", value_name = "PATTERN")]
        subscribe: Vec<String>,
        /// --token, --max-body and --cache-mb.
        #[command(flatten)]
        common: Box<CommonRunFlags>,
        /// A TOML file with any of these settings (keys: data, bundle, hubs, api,
        /// subscribe, token, max_body, cache_mb). Flags given here win over the file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Client commands: status, doc, watch, backup, restore.
    #[command(flatten)]
    Client(tidesync_cli::client::ClientCommand),
}
