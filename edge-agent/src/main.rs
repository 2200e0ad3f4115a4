//! `tidesync-edge`: the Tidesync agent for devices.

mod cli;

use anyhow::{Context, Result};
use clap::Parser;
use tidesync::daemon::DaemonConfig;
use tidesync::model::NsPattern;
use tidesync_cli::config::list_or;
use tidesync_cli::run::{serve, RunBase};

use cli::{Cli, Command};

/// Sync bursts allocate documents on the store's writer thread and free them on the
/// runtime's; glibc's per-thread arenas keep such memory, so after pushing 10,000
/// documents an edge held 330-390 MB of which 50 MB was live. mimalloc gives it back
/// (85-95 MB). The hub keeps glibc: with 1,000 idle connections mimalloc cost it 82 KB per
/// edge instead of 56 (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    tidesync_cli::init_logging();
    let default_api = std::net::SocketAddr::from(([127, 0, 0, 1], 7780));
    match cli.command {
        Command::Client(cmd) => Ok(cmd.run(default_api)?),
        Command::Run {
            data,
            bundle,
            hubs,
            api,
            subscribe,
            common,
            config,
        } => {
            let base = RunBase::resolve(config.as_deref(), data, *common)?;
            if !base.file.export.is_empty() || !base.file.import.is_empty() {
                anyhow::bail!(
                    "[[export]] and [[import]] tables are for hubs: the bridge runs where the data center's bus is"
                );
            }
            let (bundle, bundle_file) = base.bundle(bundle, None)?;
            let hubs = list_or(hubs, base.file.hubs.clone());
            if hubs.is_empty() {
                anyhow::bail!("at least one --hub is required (or `hubs` in the config file)");
            }
            let subscribe = list_or(subscribe, base.file.subscribe.clone());
            let subscriptions = if subscribe.is_empty() {
                vec![NsPattern::all()]
            } else {
                subscribe
                    .iter()
                    .map(|p| p.parse().with_context(|| format!("--subscribe {p}")))
                    .collect::<Result<_>>()?
            };
            let cfg = DaemonConfig {
                db_path: base.data.join("node.redb"),
                bundle,
                listen: None,
                api: api.or(base.file.api).unwrap_or(default_api),
                dial: hubs,
                failover: true,
                subscriptions,
                token: base.common.token,
                api_hosts: base.common.api_hosts,
                bundle_file: Some(bundle_file),
                api_limits: base.common.api_limits,
                revocation_file: None,
                crl_file: Some(base.data.join(tidesync::daemon::CRL_FILE)),
                max_body: base.common.max_body,
                store: base.common.store,
                timers: base.common.timers,
                forget_peers_after: base.common.forget_peers_after,
                audit_every: base.common.audit_every,
                replica_defaults: base.common.replica_defaults,
                blobs: base.common.blobs,
                repo_namespace: base.common.repo_namespace,
                extensions: Vec::new(),
                traffic: base.common.traffic,
            };
            serve(cfg, &base.data, Some(2))
        }
    }
}
