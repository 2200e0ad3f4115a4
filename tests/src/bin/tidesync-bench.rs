//! `tidesync-bench SCENARIO`: measures Tidesync against the raw limit of the same work,
//! printing a readable table and, as the last line, one JSON object.

use anyhow::Result;
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Scenario {
    /// Durable small JSON patches with 1, 8 and 64 concurrent writers, and idle latency.
    Write,
    /// An edge catching up 500 documents / 2,000 changes made while it was down.
    Catchup,
    /// Reconnecting with 1,000 and 10,000 documents already in sync.
    IdleReconnect,
}

/// Tidesync benchmarks. Each scenario prints a table, then its figures as one JSON line.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// What to measure.
    scenario: Scenario,
    /// Seconds each throughput point runs.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let figures = match args.scenario {
        Scenario::Write => tidesync_tests::bench::write::run(args.seconds).await?,
        Scenario::Catchup => {
            let out = tidesync_tests::bench::sync::catchup(500, 2000).await?;
            println!("catchup: 500 documents / 2,000 changes made while the edge was down");
            println!(
                "{:>10} {:>10} {:>12} {:>14} {:>10}",
                "ms", "messages", "wire bytes", "change bytes", "ratio"
            );
            println!(
                "{:>10} {:>10} {:>12} {:>14} {:>10}",
                cell(&out["ms"]),
                cell(&out["messages"]),
                cell(&out["bytes"]),
                cell(&out["raw_change_bytes"]),
                cell(&out["bytes_ratio"])
            );
            out
        }
        Scenario::IdleReconnect => {
            let mut all = serde_json::Map::new();
            println!("idle-reconnect: documents in sync, the edge restarts");
            println!(
                "{:>8} {:>10} {:>10} {:>12} {:>12} {:>12}",
                "docs", "ms", "messages", "frame bytes", "udp bytes", "docs loaded"
            );
            for n in [1000, 10000] {
                let out = tidesync_tests::bench::sync::idle_reconnect(n).await?;
                println!(
                    "{:>8} {:>10} {:>10} {:>12} {:>12} {:>12}",
                    n,
                    cell(&out["ms"]),
                    cell(&out["messages"]),
                    cell(&out["bytes"]),
                    cell(&out["udp_bytes"]),
                    cell(&out["docs_loaded"])
                );
                all.insert(n.to_string(), out);
            }
            serde_json::Value::Object(all)
        }
    };
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}

/// A JSON value as table text (serde_json's Display ignores widths).
fn cell(v: &serde_json::Value) -> String {
    v.to_string()
}
