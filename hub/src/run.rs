//! The hub's commands, wiring engine parts together.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tidesync::daemon::{read_revocations, DaemonConfig};
use tidesync::model::{Grant, NodeId, NsPattern, Role};
use tidesync::net::Ca;
use tidesync_cli::config::list_or;
use tidesync_cli::files;
use tidesync_cli::run::{serve, RunBase};

use crate::cli::{Command, RoleArg};

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
const BUNDLE: &str = "bundle.pem";
const REVOKED: &str = "revoked";
const DB: &str = "node.redb";
/// Where a hub accepts nodes unless told.
const DEFAULT_QUIC: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7443);
/// Where a hub serves its API, and client subcommands find it, unless told.
const DEFAULT_API: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7790);

/// Runs one command.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Init { data, name, ca_dir } => init(&data, &name, ca_dir.as_deref()),
        Command::Enroll {
            data,
            name,
            role,
            grants,
            out,
            days,
            renew,
        } => {
            if renew {
                renew_bundle(&data, &out, days)
            } else {
                let (Some(name), Some(role)) = (name, role) else {
                    bail!("--name and --role are required (or --renew)");
                };
                enroll(&data, &name, role, &grants, &out, days)
            }
        }
        Command::Revoke { data, name } => revoke(&data, &name),
        Command::Client(cmd) => Ok(cmd.run(DEFAULT_API)?),
        Command::Run {
            data,
            bundle,
            listen,
            api,
            peers,
            common,
            config,
        } => {
            let base = RunBase::resolve(config.as_deref(), data, common)?;
            let (bundle, bundle_file) = base.bundle(bundle, Some(base.data.join(BUNDLE)))?;
            let cfg = DaemonConfig {
                db_path: base.data.join(DB),
                bundle,
                listen: Some(listen.or(base.file.listen).unwrap_or(DEFAULT_QUIC)),
                api: api.or(base.file.api).unwrap_or(DEFAULT_API),
                dial: list_or(peers, base.file.peers.clone()),
                failover: false,
                subscriptions: vec![NsPattern::all()],
                token: base.common.token,
                api_hosts: base.common.api_hosts,
                bundle_file: Some(bundle_file),
                api_limits: base.common.api_limits,
                revocation_file: Some(base.data.join(REVOKED)),
                max_body: base.common.max_body,
                store: base.common.store,
            };
            serve(cfg, &base.data, None)
        }
    }
}

/// Writes `text` to `path` whole, durably and readable by the owner only (it may hold a
/// private key, or be the revocation list).
fn write_private(path: &Path, text: &str) -> Result<()> {
    files::write_private(path, text.as_bytes())
}

fn init(data: &Path, name: &str, ca_dir: Option<&Path>) -> Result<()> {
    let node = NodeId::new(name).context("--name")?;
    let ca_dir = ca_dir.unwrap_or(data);
    for (dir, file) in [(ca_dir, CA_KEY), (data, BUNDLE)] {
        if dir.join(file).exists() {
            bail!(
                "{} already holds a deployment (found {file}); refusing to overwrite it",
                dir.display()
            );
        }
    }
    files::private_dir(ca_dir)?;
    files::private_dir(data)?;
    let ca = Ca::generate(name)?;
    write_private(&ca_dir.join(CA_CERT), ca.cert_pem())?;
    write_private(&ca_dir.join(CA_KEY), ca.key_pem())?;
    let bundle = ca.issue(&node, Role::Hub, &[])?;
    write_private(&data.join(BUNDLE), &bundle.to_pem())?;
    if ca_dir == data {
        println!(
            "created a deployment in {}: CA {CA_CERT}, hub {node} with {BUNDLE}",
            data.display()
        );
    } else {
        println!(
            "created a deployment: CA in {} (keep it offline; enroll with --data {}), hub {node} with {BUNDLE} in {}",
            ca_dir.display(),
            ca_dir.display(),
            data.display()
        );
    }
    Ok(())
}

fn load_ca(data: &Path) -> Result<Ca> {
    let read = |f: &str| {
        fs::read_to_string(data.join(f)).with_context(|| {
            format!(
                "cannot read {} (is {} a directory made by `tidesync-hub init`?)",
                data.join(f).display(),
                data.display()
            )
        })
    };
    Ok(Ca::from_pem(&read(CA_CERT)?, &read(CA_KEY)?)?)
}

fn enroll(
    data: &Path,
    name: &str,
    role: RoleArg,
    grants: &[String],
    out: &Path,
    days: u32,
) -> Result<()> {
    let node = NodeId::new(name).context("--name")?;
    let grants: Vec<Grant> = grants
        .iter()
        .map(|g| g.parse().with_context(|| format!("--grant {g}")))
        .collect::<Result<_>>()?;
    let role = match role {
        RoleArg::Edge => Role::Edge,
        RoleArg::Hub => Role::Hub,
    };
    if role == Role::Hub && !grants.is_empty() {
        bail!("hubs hold every grant; --grant is for edges");
    }
    let bundle = load_ca(data)?.issue_for_days(&node, role, &grants, days)?;
    write_private(out, &bundle.to_pem())?;
    println!(
        "enrolled {node} ({}) into {}, valid for {days} days",
        role.as_str(),
        out.display()
    );
    Ok(())
}

/// Issues a new certificate for the node whose bundle is at `out`, with its identity.
fn renew_bundle(data: &Path, out: &Path, days: u32) -> Result<()> {
    let old = tidesync::net::Bundle::read(out)?;
    let identity = old.identity()?;
    let ca = load_ca(data)?;
    let grants: Vec<Grant> = identity.grants.iter().cloned().collect();
    let bundle = ca.issue_for_days(&identity.node_id, identity.role, &grants, days)?;
    if !bundle.same_ca(&old) {
        bail!(
            "{} was issued by another CA than the one in {}",
            out.display(),
            data.display()
        );
    }
    write_private(out, &bundle.to_pem())?;
    println!(
        "renewed {} ({}) in {}, valid for {days} days",
        identity.node_id,
        identity.role.as_str(),
        out.display()
    );
    Ok(())
}

fn revoke(data: &Path, name: &str) -> Result<()> {
    let node = NodeId::new(name).context("--name")?;
    let path = data.join(REVOKED);
    let mut ids =
        read_revocations(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if ids.contains(&node) {
        println!("{node} is already revoked");
        return Ok(());
    }
    ids.push(node.clone());
    let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
    // Written whole and synced before the rename: a running hub never reads half a list,
    // and a crash never loses a revocation that was reported done.
    write_private(&path, &text)?;
    println!(
        "revoked {node}; running hubs using {} cut it off",
        data.display()
    );
    Ok(())
}
