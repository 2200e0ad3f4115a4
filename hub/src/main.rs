//! `tidesync-hub`: the Tidesync hub for data-center regions, and the deployment's PKI tool.

mod cli;
mod run;
mod token;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    tidesync_cli::init_logging();
    match run::run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
