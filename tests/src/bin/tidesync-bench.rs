//! `tidesync-bench SCENARIO`: measures Tidesync against the raw limit of the same work,
//! printing a readable table and, as the last line, one JSON object.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, ValueEnum};
use serde_json::{Map, Value};
use tidesync_tests::bench::{
    artifact, audit, bridge, constrained, hostile, live, priority, scale, sync, write,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Durable small JSON patches with 1, 8 and 64 concurrent writers, and idle latency.
    Write,
    /// Edge A → hub → edge B, one write at a time, against the raw path's limit.
    Latency,
    /// An edge catching up 500 documents / 2,000 changes made while it was down.
    Catchup,
    /// Reconnecting with 1,000 and 10,000 documents already in sync.
    IdleReconnect,
    /// An edge writing flat out (64 writers) while connected; does the hub keep up?
    Throughput,
    /// 100 edges subscribed to one namespace; writes at the hub until the last edge has them.
    Fanout,
    /// 1,000 idle edges on one hub process: its memory per edge and idle CPU.
    Connections,
    /// A hub process with 1,000 and 100,000 one-KB documents, each read once.
    Memory,
    /// The edge binary's stripped size and its memory with 10,000 documents idle.
    Footprint,
    /// A read-only peer floods 1 GiB while another sends the Bloom and depth attacks; the
    /// hub's memory growth and an honest edge's write latency, with and without the attack.
    Hostile,
    /// Real hub and edge processes behind UDP impairment proxies under a seeded schedule of
    /// every fault kind (delay, loss, reordering, partitions, SIGSTOP, kill -9 and
    /// restart) while every node writes: acknowledged writes lost, documents divergent,
    /// and the longest convergence after a heal. `--minutes`, `--hubs`, `--soak-edges`.
    Soak,
    /// Two hubs sharing 100,000 documents with 0, 10 and 1,000 differences the feed walk
    /// cannot see: one consistency audit each (`--audit-docs`).
    Audit,
    /// A 1 GiB blob hub → edge against one plain quinn stream written to a file and
    /// fsynced; memory growth, a live write during the transfer, resume after kill -9 at
    /// half, and fan-out to 10 edges (`--blob-mb`, `--fanout-edges`, `--fanout-mb`).
    Artifact,
    /// Catch-up of 500 documents by real binaries over a 300 ms, 1 Mbit/s link with 10 %
    /// loss each way, against the same link without loss (the edge on BBR), and with the
    /// default CUBIC.
    Constrained,
    /// One critical write a second from an edge on a 10 Mbit/s link, idle and then while
    /// the link carries a bulk backlog and a blob: the critical latency p99 against the
    /// idle one (`--backlog-mb`, `--blob-mb`, `--samples`).
    Priority,
    /// The hub's export to a real nats-server against plain acknowledged publishes of the
    /// same messages, the export's lag under 64 writers, and the import's rate
    /// (`--bridge-docs`, `--bridge-cache-mb`, `--lag-seconds`).
    Bridge,
    /// Every scenario in turn (but `soak`); one JSON object with each under its name.
    All,
    /// The attacking process of `hostile` (started by it).
    #[value(hide = true)]
    HostileAttacker,
}

/// Tidesync benchmarks. Each scenario prints a table, then its figures as one JSON line.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// What to measure.
    scenario: Scenario,
    /// Seconds each `write` throughput point and the `throughput` scenario run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Seconds the `connections` scenario stays idle while measuring.
    #[arg(long, default_value_t = 60.0)]
    idle_seconds: f64,
    /// Edges in the `connections` scenario.
    #[arg(long, default_value_t = 1000)]
    edges: usize,
    /// Documents the two hubs of the `audit` scenario share.
    #[arg(long, default_value_t = 100_000)]
    audit_docs: usize,
    /// Minutes the `soak` scenario injects faults.
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,
    /// Hubs in the `soak` scenario.
    #[arg(long, default_value_t = 2)]
    hubs: usize,
    /// Edges in the `soak` scenario.
    #[arg(long, default_value_t = 4)]
    soak_edges: usize,
    /// Seed of the `soak` scenario's faults and writes (replays a run) [default: the clock].
    #[arg(long)]
    seed: Option<u64>,
    /// MiB of the blob of the `artifact` scenario, and of the blob in flight in `priority`.
    #[arg(long, default_value_t = 1024)]
    blob_mb: u64,
    /// MB of bulk documents the edge of `priority` holds when its busy phase starts.
    #[arg(long, default_value_t = 50)]
    backlog_mb: usize,
    /// What shapes the poor link of `constrained` and `priority`: `tun` (this process, on
    /// TUN devices) or `netem` (the kernel's netem, in a small guest under qemu that
    /// `scripts/netem-vm` builds).
    #[arg(long, default_value = "tun")]
    link: tidesync_tests::chaos::wire::Shaping,
    /// Critical writes timed per phase of `priority`, one a second.
    #[arg(long, default_value_t = 30)]
    samples: usize,
    /// Documents exported (and patches imported) by `bridge`: enough that the export's
    /// start (connecting, the first batch) does not weigh on its rate.
    #[arg(long, default_value_t = 20_000)]
    bridge_docs: usize,
    /// MiB of document cache of `bridge`'s exporting store (a hub's `--cache-mb`).
    #[arg(long, default_value_t = 512)]
    bridge_cache_mb: u64,
    /// Seconds the 64 writers of `bridge`'s lag phase write.
    #[arg(long, default_value_t = 10.0)]
    lag_seconds: f64,
    /// Edges of the `artifact` scenario's fan-out.
    #[arg(long, default_value_t = 10)]
    fanout_edges: usize,
    /// MiB of the blob the `artifact` scenario fans out.
    #[arg(long, default_value_t = 256)]
    fanout_mb: u64,
    /// MiB of the CSV dataset the `artifact` scenario sends (compressible, unlike the
    /// blob of noise).
    #[arg(long, default_value_t = 256)]
    dataset_mb: u64,
    /// MiB the read-only peer floods in the `hostile` scenario.
    #[arg(long, default_value_t = 1024)]
    flood_mb: u64,
    /// `hostile-attacker`: the hub to attack.
    #[arg(long, hide = true)]
    attack_hub: Option<std::net::SocketAddr>,
    /// `hostile-attacker`: the flooding peer's bundle.
    #[arg(long, hide = true)]
    flood_bundle: Option<std::path::PathBuf>,
    /// `hostile-attacker`: the attacking peer's bundle.
    #[arg(long, hide = true)]
    attack_bundle: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let figures = if args.scenario == Scenario::All {
        let started = Instant::now();
        let mut all = Map::new();
        for s in Scenario::value_variants() {
            if matches!(
                *s,
                Scenario::All | Scenario::HostileAttacker | Scenario::Soak
            ) {
                continue;
            }
            let name = s
                .to_possible_value()
                .map_or_else(|| format!("{s:?}"), |v| v.get_name().to_owned());
            println!("== {name}");
            let out = run(*s, &args).await?;
            println!("{}", serde_json::to_string(&out)?);
            println!();
            all.insert(name, out);
        }
        all.insert(
            "all_seconds".into(),
            Value::from(started.elapsed().as_secs()),
        );
        Value::Object(all)
    } else {
        run(args.scenario, &args).await?
    };
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}

async fn run(scenario: Scenario, args: &Args) -> Result<Value> {
    Ok(match scenario {
        Scenario::Write => write::run(args.seconds).await?,
        Scenario::Latency => {
            let out = live::latency(1000).await?;
            println!("latency: 1,000 single-field writes, one at a time, timed until stored");
            table(
                &out,
                &[
                    ("A→H→B p50 µs", "p50_us"),
                    ("p99 µs", "p99_us"),
                    ("limit µs", "limit_us"),
                    ("ratio", "ratio_to_limit"),
                    ("A→H p50 µs", "direct_p50_us"),
                    ("p99 µs", "direct_p99_us"),
                    ("limit µs", "direct_limit_us"),
                    ("replicas=1 p50 µs", "replicas1_p50_us"),
                    ("p99 µs", "replicas1_p99_us"),
                    ("limit µs", "replicas1_limit_us"),
                ],
            );
            out
        }
        Scenario::Catchup => {
            let out = sync::catchup(500, 2000).await?;
            println!("catchup: 500 documents / 2,000 changes made while the edge was down");
            table(
                &out,
                &[
                    ("ms", "ms"),
                    ("messages", "messages"),
                    ("wire bytes", "bytes"),
                    ("change bytes", "raw_change_bytes"),
                    ("ratio", "bytes_ratio"),
                ],
            );
            out
        }
        Scenario::IdleReconnect => {
            let mut all = Map::new();
            println!("idle-reconnect: documents in sync, the edge restarts");
            for n in [1000, 10000] {
                let out = sync::idle_reconnect(n).await?;
                table(
                    &out,
                    &[
                        ("docs", "docs"),
                        ("ms", "ms"),
                        ("messages", "messages"),
                        ("frame bytes", "bytes"),
                        ("udp bytes", "udp_bytes"),
                        ("docs loaded", "docs_loaded"),
                    ],
                );
                all.insert(n.to_string(), out);
            }
            Value::Object(all)
        }
        Scenario::Throughput => {
            let out = live::throughput(args.seconds.max(10.0)).await?;
            println!("throughput: edge A writes flat out with 64 writers, connected to the hub");
            table(
                &out,
                &[
                    ("edge writes/s", "edge_writes_per_s"),
                    ("hub applied/s", "hub_applied_per_s"),
                    ("ratio", "applied_ratio"),
                    ("max lag ms", "max_lag_ms"),
                ],
            );
            out
        }
        Scenario::Fanout => {
            let out = live::fanout(100, 100).await?;
            println!("fanout: 100 writes at the hub, each until the last of 100 edges has it");
            table(
                &out,
                &[
                    ("edges", "edges"),
                    ("p50 ms", "p50_ms"),
                    ("p99 ms", "p99_ms"),
                    ("max ms", "max_ms"),
                    ("limit p50 ms", "limit_p50_ms"),
                    ("limit p99 ms", "limit_p99_ms"),
                    ("ratio", "ratio_to_limit"),
                ],
            );
            out
        }
        Scenario::Connections => {
            let idle = Duration::from_secs_f64(args.idle_seconds);
            let out = scale::connections(args.edges, idle).await?;
            println!("connections: idle edges on one hub process");
            table(
                &out,
                &[
                    ("edges", "edges"),
                    ("still connected", "connected_after_idle"),
                    ("rss KB/edge", "hub_rss_per_edge_kb"),
                    ("idle cpu %", "hub_idle_cpu_pct"),
                ],
            );
            out
        }
        Scenario::Memory => {
            let small = scale::memory(1000).await?;
            let large = scale::memory(100_000).await?;
            println!("memory: hub process RSS after reading every document once");
            for out in [&small, &large] {
                table(
                    out,
                    &[
                        ("docs", "docs"),
                        ("rss MB at start", "rss_mb_start"),
                        ("rss MB", "rss_mb"),
                        ("reads/s", "read_per_s"),
                    ],
                );
            }
            let (a, b) = (
                small["rss_mb"].as_f64().unwrap_or(0.0),
                large["rss_mb"].as_f64().unwrap_or(0.0),
            );
            serde_json::json!({
                "rss_mb_1k": a,
                "rss_mb_100k": b,
                "ratio": if a > 0.0 { tidesync_tests::bench::round2(b / a) } else { 0.0 },
                "1000": small,
                "100000": large,
            })
        }
        Scenario::Footprint => {
            let out = scale::footprint(10_000).await?;
            println!("footprint: the edge agent");
            table(
                &out,
                &[
                    ("stripped MB", "edge_binary_mb"),
                    ("rss MB, 10k docs idle", "edge_rss_mb_10k"),
                ],
            );
            out
        }
        Scenario::HostileAttacker => {
            let (Some(hub), Some(flood), Some(attack)) =
                (args.attack_hub, &args.flood_bundle, &args.attack_bundle)
            else {
                anyhow::bail!(
                    "hostile-attacker needs --attack-hub, --flood-bundle, --attack-bundle"
                );
            };
            hostile::attacker(hub, flood, attack, args.flood_mb).await?
        }
        Scenario::Hostile => {
            let out = hostile::hostile(args.flood_mb).await?;
            println!("hostile: a hub process under a 1 GiB read-only flood and repeated attacks");
            table(
                &out,
                &[
                    ("flood MB", "flood_mb"),
                    ("flood s", "flood_seconds"),
                    ("attacks", "attacks_sent"),
                    ("refused", "attacks_refused"),
                    ("rss growth MB", "rss_growth_mb"),
                    ("honest p99 ms", "honest_p99_ms"),
                    ("idle p99 ms", "honest_idle_p99_ms"),
                    ("ratio", "p99_ratio"),
                    ("hub up", "hub_up"),
                ],
            );
            out
        }
        Scenario::Soak => {
            let cfg = tidesync_tests::chaos::soak::SoakConfig {
                duration: Duration::from_secs_f64(args.minutes * 60.0),
                hubs: args.hubs,
                edges: args.soak_edges,
                seed: args
                    .seed
                    .unwrap_or_else(|| tidesync_tests::Rng::from_env_or_time().seed()),
                converge_within: Duration::from_secs(5),
            };
            println!(
                "soak: {} hubs, {} edges, {} min, seed {}",
                cfg.hubs, cfg.edges, args.minutes, cfg.seed
            );
            let report = tokio::task::spawn_blocking({
                let cfg = cfg.clone();
                move || tidesync_tests::chaos::soak::run(&cfg, |line| println!("{line}"))
            })
            .await??;
            let out = report.to_json(&cfg);
            table(
                &out,
                &[
                    ("acked", "acked"),
                    ("lost", "lost"),
                    ("divergent", "divergent"),
                    ("heals", "heals"),
                    ("max converge ms", "max_converge_ms"),
                    ("slow heals", "slow_heals"),
                ],
            );
            out
        }
        Scenario::Audit => audit::run(args.audit_docs).await?,
        Scenario::Artifact => {
            let out = artifact::run(artifact::ArtifactConfig {
                blob_mb: args.blob_mb,
                fanout_edges: args.fanout_edges,
                fanout_mb: args.fanout_mb,
                dataset_mb: args.dataset_mb,
            })
            .await?;
            println!("artifact: a blob hub → edge against one plain quinn stream + fsync");
            table(
                &out,
                &[
                    ("MB/s", "throughput_mb_s"),
                    ("limit MB/s", "limit_mb_s"),
                    ("ratio", "ratio"),
                    ("rss growth MB", "rss_growth_mb"),
                    ("live p99 us", "live_write_p99_us"),
                    ("idle p99 us", "idle_write_p99_us"),
                    ("resume extra", "resume_extra_ratio"),
                    ("fan-out s", "fanout_seconds"),
                    ("csv MB/s", "dataset_mb_s"),
                    ("csv wire", "dataset_wire_ratio"),
                ],
            );
            out
        }
        Scenario::Constrained => {
            let out = constrained::run(500, args.link).await?;
            println!(
                "constrained: catch-up of 500 documents, 300 ms RTT, 1 Mbit/s ({})",
                args.link
            );
            table(
                &out,
                &[
                    ("doc KB", "doc_bytes"),
                    ("clean s", "clean_s"),
                    ("lossy s", "lossy_s"),
                    ("clean KB/s", "clean_kb_s"),
                    ("lossy KB/s", "lossy_kb_s"),
                    ("ratio", "ratio"),
                    ("cubic lossy KB/s", "cubic_lossy_kb_s"),
                    ("cubic ratio", "cubic_ratio"),
                ],
            );
            out
        }
        Scenario::Bridge => {
            let out = bridge::run(args.bridge_docs, args.lag_seconds, args.bridge_cache_mb).await?;
            println!(
                "bridge: export of {} documents to JetStream, lag under 64 writers, import",
                args.bridge_docs
            );
            table(
                &out,
                &[
                    ("export msg/s", "export_per_s"),
                    ("limit msg/s", "limit_per_s"),
                    ("ratio", "ratio"),
                    ("read doc/s", "read_per_s"),
                    ("lag p50 ms", "lag_p50_ms"),
                    ("lag p99 ms", "lag_p99_ms"),
                    ("load writes", "load_writes"),
                    ("import patch/s", "import_per_s"),
                ],
            );
            out
        }
        Scenario::Priority => {
            let out = priority::run(priority::PriorityConfig {
                backlog_mb: args.backlog_mb,
                blob_mb: args.blob_mb as usize,
                samples: args.samples,
                link: args.link,
            })
            .await?;
            println!("priority: a critical write a second on a 10 Mbit/s link, idle and busy");
            table(
                &out,
                &[
                    ("idle p50 ms", "idle_p50_ms"),
                    ("idle p99 ms", "idle_p99_ms"),
                    ("busy p50 ms", "critical_p50_ms"),
                    ("busy p99 ms", "critical_p99_ms"),
                    ("ratio", "p99_ratio"),
                    ("bulk MB/s", "bulk_mb_s"),
                    ("link MB/s", "link_mb_s"),
                ],
            );
            out
        }
        Scenario::All => unreachable!("handled by main"),
    })
}

/// Prints the `cols` of `out` as a two-line table: headers, then values.
fn table(out: &Value, cols: &[(&str, &str)]) {
    let width = |h: &str| h.chars().count().max(10);
    let head: Vec<String> = cols
        .iter()
        .map(|(h, _)| format!("{h:>w$}", w = width(h)))
        .collect();
    let vals: Vec<String> = cols
        .iter()
        .map(|(h, k)| format!("{:>w$}", out[*k].to_string(), w = width(h)))
        .collect();
    println!("{}", head.join("  "));
    println!("{}", vals.join("  "));
}
