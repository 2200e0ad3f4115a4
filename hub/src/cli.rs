//! The command line of `tidesync-hub`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use tidesync_cli::config::CommonRunFlags;

/// Tidesync hub: a data-center node of a Tidesync deployment, and the tool that creates the
/// deployment's certificate authority and enrolls its nodes.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The hub's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a deployment: a new CA and this hub's own certificate, in DIR.
    Init {
        /// Directory for the CA, the hub's bundle and its database (created if missing).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Name of the deployment's first hub, also its node id.
        #[arg(long, default_value = "hub")]
        name: String,
        /// Keep the CA (ca.pem, ca-key.pem) in this directory instead of DIR, for
        /// example on removable media kept offline; `enroll --data CA_DIR` issues from it.
        /// The hub runs without the CA key.
        #[arg(long, value_name = "CA_DIR")]
        ca_dir: Option<PathBuf>,
    },
    /// Issue a certificate bundle for a node (edge or additional hub).
    Enroll {
        /// The deployment directory made by `init` (holds the CA).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The node's id: [A-Za-z0-9._-]{1,64}.
        #[arg(long, value_name = "NODE", required_unless_present = "renew")]
        name: Option<String>,
        /// The node's role.
        #[arg(long, value_enum, required_unless_present = "renew")]
        role: Option<RoleArg>,
        /// For edges: a namespace pattern and its access, PATTERN=rw or PATTERN=ro
        /// (e.g. models=ro, health.*=rw). Repeat for several. An edge without grants
        /// can read and write nothing.
        #[arg(long = "grant", value_name = "PATTERN=rw|ro", conflicts_with = "renew")]
        grants: Vec<String>,
        /// Renew the bundle at --out, with a new certificate and key for the same node,
        /// role and grants, valid for --days from now. A running node using that file takes it
        /// up within a second (or on SIGHUP), keeping its data and its peers' cursors.
        #[arg(long, conflicts_with_all = ["name", "role"])]
        renew: bool,
        /// Where to write the bundle (CA certificate, node certificate, node key, and the
        /// deployment's current revocation list, so the node refuses revoked peers at once).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// How long the certificate is valid, in days (1 to 36500); a peer refuses it at the handshake
        /// once it has expired. Enroll the node again before then.
        #[arg(
            long,
            value_name = "N",
            default_value_t = tidesync::net::pki::DEFAULT_VALIDITY_DAYS,
            value_parser = clap::value_parser!(u32).range(1..=36_500)
        )]
        days: u32,
    },
    /// Revoke a node (edge or hub): where the CA is, issue a new signed revocation list
    /// (DIR/crl.pem) that every node takes up from its peers and enforces without a
    /// restart; the name also goes to DIR/revoked, which hubs running from DIR read.
    Revoke {
        /// The directory holding the CA (or, without the CA key, a hub's directory: then
        /// only that hub's `revoked` file is updated).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The node id to revoke: every certificate issued to it.
        #[arg(long, value_name = "NODE")]
        name: String,
    },
    /// Scoped API tokens for apps: issue one, or revoke one everywhere.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run the hub.
    Run {
        /// Directory of the hub's database, and of `bundle.pem` and `revoked` by default.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// The hub's certificate bundle [default: DIR/bundle.pem]. Give the file `enroll`
        /// wrote to run an additional hub of the deployment.
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
        /// QUIC address to accept nodes on; port 0 picks a free port
        /// [default: 127.0.0.1:7443].
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// HTTP API address; port 0 picks a free port [default: 127.0.0.1:7790].
        #[arg(long, value_name = "ADDR")]
        api: Option<SocketAddr>,
        /// Another hub to sync with (QUIC address). Repeat for several.
        #[arg(long = "peer", value_name = "ADDR")]
        peers: Vec<SocketAddr>,
        /// Edges this hub holds at most; the next is turned away with a reason that sends
        /// it to its next hub (other hubs are never turned away) [default: unlimited].
        #[arg(long, value_name = "N")]
        max_peers: Option<usize>,
        /// Publish every committed change to a message bus: nats://HOST:PORT (JetStream;
        /// a stream must cover subjects tidesync.>) or amqp://USER:PASS@HOST:PORT/VHOST
        /// (RabbitMQ; topic exchange tidesync, routing keys tidesync.NS.ID, a queue must be
        /// bound). Repeat for several; `[[export]]` tables choose namespaces, subject or
        /// routing key, exchange and format. Resumes where it stopped.
        #[arg(long = "export", value_name = "URL")]
        exports: Vec<String>,
        /// Apply JSON merge patches from a message bus: nats://HOST:PORT (JetStream;
        /// messages {"ns","id","patch"} on tidesync.import.>) or amqp://… (RabbitMQ; queue
        /// tidesync.import); refused ones go to tidesync.dead. Repeat for several;
        /// `[[import]]` tables choose the subject or queue and the namespace. Each message
        /// is acknowledged once its write is durable.
        #[arg(long = "import", value_name = "URL")]
        imports: Vec<String>,
        /// --token, --max-body and --cache-mb.
        #[command(flatten)]
        common: Box<CommonRunFlags>,
        /// A TOML file with any of these settings (keys: data, bundle, listen, api, peers,
        /// token, max_body, cache_mb, [[export]] and [[import]] tables). Flags given here win over the file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Client commands: status, doc, watch, backup, restore.
    #[command(flatten)]
    Client(tidesync_cli::client::ClientCommand),
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a token signed by the deployment CA and print it. Every node (hub or edge)
    /// accepts it on its HTTP API and at /v1/automerge-repo (as `?token=`), for the
    /// documents its grants name and nothing else. Treat it as a password.
    Create {
        /// The directory holding the CA (made by `init`).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// A namespace pattern and its access, PATTERN=rw or PATTERN=ro (repo=rw,
        /// models.*=ro). Repeat for several; at least one.
        #[arg(long = "grant", value_name = "PATTERN=rw|ro", required = true)]
        grants: Vec<String>,
        /// How long the token is valid, in days (1 to 3650).
        #[arg(
            long,
            value_name = "N",
            default_value_t = 30,
            value_parser = clap::value_parser!(u32).range(1..=3650)
        )]
        days: u32,
        /// Who or what the token is for, kept in its claims.
        #[arg(long, value_name = "TEXT", default_value = "app")]
        name: String,
    },
    /// Revoke a token: a new signed revocation list lists it, and every node refuses it
    /// once the list reaches it (within a second of a running hub reading it).
    Revoke {
        /// The directory holding the CA.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The token's id, as `token create` printed it.
        #[arg(
            long,
            value_name = "ID",
            required_unless_present = "token",
            conflicts_with = "token"
        )]
        id: Option<String>,
        /// The token itself, if its id is not at hand (it shows in `ps` while this runs;
        /// --id does not).
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
    },
}

/// A node's role, as written in its certificate.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleArg {
    /// A device or branch node: reads and writes what its grants allow.
    Edge,
    /// A data-center node: reads and writes everything.
    Hub,
}
