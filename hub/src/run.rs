//! The hub's commands, wiring engine parts together.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tidesync::daemon::{read_revocations, DaemonConfig, CRL_FILE};
use tidesync::model::{Grant, NodeId, NsPattern, Role};
use tidesync::net::crl::Revoked;
use tidesync::net::token::{hex, unhex};
use tidesync::net::{Ca, Crl};
use tidesync_cli::config::list_or;
use tidesync_cli::files;
use tidesync_cli::run::{serve, RunBase};

use crate::cli::{Command, RoleArg};

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
const BUNDLE: &str = "bundle.pem";
const REVOKED: &str = "revoked";
/// Every certificate the CA issued: serial, node, role, expiry; beside the CA key.
const ISSUED: &str = "issued";
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
        Command::Token(cmd) => crate::token::run(cmd),
        Command::Client(cmd) => Ok(cmd.run(DEFAULT_API)?),
        Command::Run {
            data,
            bundle,
            listen,
            api,
            peers,
            max_peers,
            exports,
            imports,
            common,
            config,
        } => {
            let base = RunBase::resolve(config.as_deref(), data, *common)?;
            let bridge = bridge(&exports, &imports, &base.file)?;
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
                crl_file: Some(base.data.join(CRL_FILE)),
                max_body: base.common.max_body,
                store: base.common.store,
                timers: base.common.timers,
                forget_peers_after: base.common.forget_peers_after,
                audit_every: base.common.audit_every,
                replica_defaults: base.common.replica_defaults,
                blobs: base.common.blobs,
                repo_namespace: base.common.repo_namespace,
                extensions: if bridge.is_empty() {
                    Vec::new()
                } else {
                    vec![std::sync::Arc::new(bridge)]
                },
                traffic: tidesync::net::TrafficConfig {
                    max_peers: max_peers.or(base.file.max_peers),
                    ..base.common.traffic
                },
            };
            serve(cfg, &base.data, None)
        }
    }
}

/// The exports and imports of `--export` and `--import` flags (every namespace, the
/// default subjects and format) and of `[[export]]` and `[[import]]` tables.
fn bridge(
    export_flags: &[String],
    import_flags: &[String],
    file: &tidesync_cli::config::RunFile,
) -> Result<tidesync_bridge::Bridge> {
    let mut exports = Vec::new();
    for url in export_flags {
        exports.push(tidesync_bridge::ExportConfig::new(url, &[], None, None)?);
    }
    let mut imports = Vec::new();
    for url in import_flags {
        imports.push(tidesync_bridge::ImportConfig::new(url, None, None, None)?);
    }
    use tidesync_bridge::Broker;
    for t in &file.import {
        let source = match (Broker::of(&t.url)?, &t.subject, &t.queue) {
            (Broker::Nats, _, Some(_)) => {
                bail!("[[import]] queue is for amqp:// imports; nats:// ones take subject")
            }
            (Broker::Amqp, Some(_), _) => {
                bail!("[[import]] subject is for nats:// imports; amqp:// ones take queue")
            }
            (_, subject, queue) => subject.as_deref().or(queue.as_deref()),
        };
        imports.push(tidesync_bridge::ImportConfig::new(
            &t.url,
            source,
            t.namespace.as_deref(),
            t.dead_letter.as_deref(),
        )?);
    }
    for t in &file.export {
        let template = match (Broker::of(&t.url)?, &t.subject, &t.routing_key) {
            (Broker::Nats, _, Some(_)) => {
                bail!("[[export]] routing_key is for amqp:// exports; nats:// ones take subject")
            }
            (Broker::Amqp, Some(_), _) => {
                bail!("[[export]] subject is for nats:// exports; amqp:// ones take routing_key")
            }
            (_, subject, key) => subject.as_deref().or(key.as_deref()),
        };
        exports.push(
            tidesync_bridge::ExportConfig::new(
                &t.url,
                &t.namespaces,
                template,
                t.format.as_deref(),
            )?
            .with_exchange(t.exchange.as_deref())?,
        );
    }
    Ok(tidesync_bridge::Bridge::new(exports, imports))
}

/// Writes `text` to `path` whole, durably and readable by the owner only (it may hold a
/// private key, or be the revocation list).
pub(crate) fn write_private(path: &Path, text: &str) -> Result<()> {
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
    register(ca_dir, &bundle)?;
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

pub(crate) fn load_ca(data: &Path) -> Result<Ca> {
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
    let _lock = files::lock(data)?;
    refuse_revoked(data, &node)?;
    let ca = load_ca(data)?;
    let bundle = ca.issue_for_days(&node, role, &grants, days)?;
    let bundle = with_current_list(data, &ca, bundle)?;
    register(data, &bundle)?;
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
    let _lock = files::lock(data)?;
    refuse_revoked(data, &identity.node_id)?;
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
    let bundle = with_current_list(data, &ca, bundle)?;
    register(data, &bundle)?;
    write_private(out, &bundle.to_pem())?;
    println!(
        "renewed {} ({}) in {}, valid for {days} days",
        identity.node_id,
        identity.role.as_str(),
        out.display()
    );
    Ok(())
}

/// A revoked name stays revoked: hubs refuse it by name, whatever certificate it shows.
fn refuse_revoked(data: &Path, node: &NodeId) -> Result<()> {
    let path = data.join(REVOKED);
    let ids = read_revocations(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if ids.contains(node) {
        bail!("{node} is revoked; enroll the node again under a new name");
    }
    Ok(())
}

/// One line of the registry of issued certificates.
struct IssuedCert {
    serial: Vec<u8>,
    node: String,
}

/// Records a newly issued certificate in the CA directory's registry, so that `revoke`
/// can name every certificate a node was ever given.
fn register(ca_dir: &Path, bundle: &tidesync::net::Bundle) -> Result<()> {
    let path = ca_dir.join(ISSUED);
    let mut text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# serial node role not-after (unix seconds), one certificate per line\n".to_owned()
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let identity = bundle.identity()?;
    let not_after = bundle
        .not_after()?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    text.push_str(&format!(
        "{} {} {} {not_after}\n",
        hex(&bundle.serial()?),
        identity.node_id,
        identity.role.as_str()
    ));
    write_private(&path, &text)
}

/// The certificates the registry of `ca_dir` records.
fn issued(ca_dir: &Path) -> Result<Vec<IssuedCert>> {
    let path = ca_dir.join(ISSUED);
    let Some(text) = read_if_present(&path)? else {
        return Ok(Vec::new());
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut fields = l.split_whitespace();
            let (Some(serial), Some(node)) = (fields.next(), fields.next()) else {
                bail!("{}: a damaged line {l:?}", path.display());
            };
            let serial = unhex(serial)
                .filter(|s| !s.is_empty())
                .with_context(|| format!("{}: a damaged serial in {l:?}", path.display()))?;
            Ok(IssuedCert {
                serial,
                node: node.to_owned(),
            })
        })
        .collect()
}

/// A CA directory's file, or `None` if it was never written.
pub(crate) fn read_if_present(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The revocation list issued last from `ca_dir`, checked against the CA, if any. A damaged
/// one is an error: a list built on it would drop its entries.
pub(crate) fn current_list(ca_dir: &Path, ca: &Ca) -> Result<Option<Crl>> {
    let path = ca_dir.join(CRL_FILE);
    let Some(text) = read_if_present(&path)? else {
        return Ok(None);
    };
    let crl = Crl::from_pem(&text, ca.cert_der()?.as_ref()).with_context(|| {
        format!(
            "{} is not a valid revocation list of this CA; restore it from a backup or from \
             any node's data directory before issuing or revoking",
            path.display()
        )
    })?;
    Ok(Some(crl))
}

/// `bundle` carrying the deployment's current revocation list, so the node it is for
/// refuses revoked peers from its very first handshake.
fn with_current_list(
    ca_dir: &Path,
    ca: &Ca,
    bundle: tidesync::net::Bundle,
) -> Result<tidesync::net::Bundle> {
    Ok(match current_list(ca_dir, ca)? {
        Some(crl) => bundle.with_revocations(crl.der()),
        None => bundle,
    })
}

/// Revokes every certificate issued to `name`: adds their serials to the deployment's
/// revocation list (signed, numbered one past the last), and the name to the `revoked`
/// file that hubs running from `data` also read. The list is written first, so a hub that
/// reads both finds the list as soon as the name, and can hand it to the node it cuts off.
fn revoke(data: &Path, name: &str) -> Result<()> {
    let node = NodeId::new(name).context("--name")?;
    let path = data.join(REVOKED);
    let mut ids =
        read_revocations(&path).with_context(|| format!("cannot read {}", path.display()))?;
    // Held for the whole read-modify-write: a running hub in this directory and other
    // `enroll` or `revoke` runs wait for it.
    let _lock = files::lock(data)?;
    let signed = if data.join(CA_KEY).exists() {
        // The name is revoked below even if no list can be issued.
        Some(revoke_in_list(data, &node, &ids))
    } else {
        None
    };
    if !ids.contains(&node) {
        ids.push(node.clone());
        let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
        // Written whole and synced before the rename: a running hub never reads half a
        // list, and a crash never loses a revocation that was reported done.
        write_private(&path, &text)?;
    }
    let here = if data.join(BUNDLE).exists() {
        "the hub running from here takes it up at once and passes it to every node".to_owned()
    } else {
        format!(
            "copy it into the data directory of any running hub (as {CRL_FILE}); from there it \
             reaches every node"
        )
    };
    let signed = match signed {
        Some(Err(e)) => {
            return Err(e.context(format!(
                "{node} is revoked at hubs using {} (their `revoked` file), but no signed \
                 list was issued",
                data.display()
            )))
        }
        Some(Ok(listed)) => Some(listed),
        None => None,
    };
    match signed {
        None => println!(
            "revoked {node} at hubs using {}; {} has no CA key, so no signed list was \
             issued: run `revoke` with --data at the CA to revoke {node} at every node",
            data.display(),
            data.display()
        ),
        Some(Listed::NoCertificates) => println!(
            "revoked {node} at hubs using {} only: {} records no certificate issued to it",
            data.display(),
            data.join(ISSUED).display()
        ),
        Some(Listed::Already(number)) => println!(
            "{node} is already revoked (revocation list number {number} in {}); {here}",
            data.join(CRL_FILE).display()
        ),
        Some(Listed::Added {
            certificates,
            number,
        }) => println!(
            "revoked {node} ({certificates} certificate(s)): revocation list number {number} \
             in {}; {here}",
            data.join(CRL_FILE).display()
        ),
    }
    Ok(())
}

/// What [`revoke_in_list`] did.
enum Listed {
    /// The registry records no certificate of the node.
    NoCertificates,
    /// Every certificate of the node is on the list numbered so already.
    Already(u64),
    /// A new list, numbered so, adds this many certificates.
    Added { certificates: usize, number: u64 },
}

/// Issues a new revocation list in `ca_dir` that adds every certificate the registry
/// records for `node`. It also lists every certificate of the names revoked before
/// (`earlier`, the `revoked` file), so a list issued after `crl.pem` was lost or restored
/// from an old copy drops none of them.
fn revoke_in_list(ca_dir: &Path, node: &NodeId, earlier: &[NodeId]) -> Result<Listed> {
    let ca = load_ca(ca_dir)?;
    let old = current_list(ca_dir, &ca)?;
    let mut entries = old
        .as_ref()
        .map(|c| c.entries().to_vec())
        .unwrap_or_default();
    let registry = issued(ca_dir)?;
    let of = |name: &NodeId| -> Vec<Vec<u8>> {
        registry
            .iter()
            .filter(|c| c.node == name.as_str())
            .map(|c| c.serial.clone())
            .collect()
    };
    let serials = of(node);
    if serials.is_empty() {
        return Ok(Listed::NoCertificates);
    }
    let now = std::time::SystemTime::now();
    let mut certificates = 0;
    for serial in serials {
        if !entries.iter().any(|e| e.serial == serial) {
            entries.push(Revoked { serial, at: now });
            certificates += 1;
        }
    }
    for serial in earlier.iter().flat_map(of) {
        if !entries.iter().any(|e| e.serial == serial) {
            entries.push(Revoked { serial, at: now });
        }
    }
    for serial in crate::token::revoked_serials(ca_dir)? {
        if !entries.iter().any(|e| e.serial == serial) {
            entries.push(Revoked { serial, at: now });
        }
    }
    if certificates == 0 {
        return Ok(Listed::Already(old.as_ref().map_or(0, Crl::number)));
    }
    let number = sign_list(ca_dir, &ca, old.as_ref(), &entries)?;
    Ok(Listed::Added {
        certificates,
        number,
    })
}

/// Signs and writes (as `crl.pem` in `ca_dir`) a list of `entries` numbered above `old`'s.
pub(crate) fn sign_list(
    ca_dir: &Path,
    ca: &Ca,
    old: Option<&Crl>,
    entries: &[Revoked],
) -> Result<u64> {
    let now = std::time::SystemTime::now();
    // Numbers follow the clock in milliseconds (and always grow): a list issued from a CA directory whose
    // crl.pem was lost or restored from an old copy still outnumbers every earlier one.
    let now_ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let next = match old {
        Some(c) => c
            .number()
            .checked_add(1)
            .context("the revocation list number is exhausted")?,
        None => 1,
    };
    let number = next.max(now_ms);
    let der = ca.revocation_list(number, entries)?;
    let crl = Crl::verify(&der, ca.cert_der()?.as_ref())?;
    write_private(&ca_dir.join(CRL_FILE), &crl.to_pem())?;
    Ok(number)
}
