//! `tidesync-edge`: the Tidesync agent for devices.

mod cli;

use anyhow::{Context, Result};
use clap::Parser;
use tidesync::config::{list_or, RunFile};
use tidesync::daemon::{Daemon, DaemonConfig};
use tidesync::model::NsPattern;
use tidesync::net::Bundle;

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
    tidesync::daemon::init_logging();
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
            let file = RunFile::load(config.as_deref())?;
            let common = common.resolve(&file);
            let data = data
                .or(file.data)
                .context("--data is required (or `data` in the config file)")?;
            let bundle = bundle
                .or(file.bundle)
                .context("--bundle is required (or `bundle` in the config file)")?;
            let bundle = Bundle::read(&bundle)?;
            let hubs = list_or(hubs, file.hubs);
            if hubs.is_empty() {
                anyhow::bail!("at least one --hub is required (or `hubs` in the config file)");
            }
            let subscribe = list_or(subscribe, file.subscribe);
            let api = api.or(file.api).unwrap_or(default_api);
            let subscriptions = if subscribe.is_empty() {
                vec![NsPattern::all()]
            } else {
                subscribe
                    .iter()
                    .map(|p| p.parse().with_context(|| format!("--subscribe {p}")))
                    .collect::<Result<_>>()?
            };
            std::fs::create_dir_all(&data)
                .with_context(|| format!("cannot create {}", data.display()))?;
            let cfg = DaemonConfig {
                db_path: data.join("node.redb"),
                bundle,
                listen: None,
                api,
                dial: hubs,
                failover: true,
                subscriptions,
                token: common.token,
                revocation_file: None,
                max_body: common.max_body,
                store: common.store,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            rt.block_on(Daemon::run_until_signal(cfg))?;
            Ok(())
        }
    }
}
