//! What the two Tidesync binaries (`tidesync-hub`, `tidesync-edge`) share and an app that
//! embeds the `tidesync` library never needs: the TOML form of the `run` flags, the client
//! subcommands (`status`, `doc …`, `watch`) over the HTTP API, logging, and the `run`
//! wiring. It keeps clap, a hyper client and tracing-subscriber out of the library.

#![warn(missing_docs)]

pub mod blob;
pub mod client;
pub mod config;
pub mod duration;
pub mod files;
pub mod logging;
pub mod run;

pub use logging::init_logging;
