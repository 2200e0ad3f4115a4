//! The logging both binaries set up.

/// `TIDESYNC_LOG` as a filter (`warn` unless set), on standard error, in colour only on a
/// terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDESYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
