//! `tidesync-bench SCENARIO`: measures Tidesync against the raw limit of the same work,
//! printing a readable table and, as the last line, one JSON object.

use anyhow::Result;
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Scenario {
    /// Durable small JSON patches with 1, 8 and 64 concurrent writers, and idle latency.
    Write,
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
    };
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}
