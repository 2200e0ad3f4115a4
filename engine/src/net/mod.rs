//! Transport and security: the deployment PKI, TLS, the quinn endpoint, the drivers that
//! run sync sessions over connections, and the executor that carries out a session's
//! outputs against the store.
//!
//! Everything here is I/O; protocol decisions stay in `sync`. This is the only module that
//! knows both a session and the store: `store` never sees the protocol, and `sync` never
//! sees the disk.

pub mod audit;
pub mod batch;
pub mod counters;
pub mod crl;
pub mod driver;
pub mod exec;
pub mod frames;
pub mod log_limit;
pub mod node;
pub mod pacing;
pub mod penalties;
pub mod pki;
pub mod placement;
pub mod progress;
pub mod replicas;
pub mod revocations;
pub mod send_queue;
pub mod tls;
pub mod token;

pub use counters::{PeerCounters, PeerCounts};
pub use crl::{Crl, CrlError};
pub use node::{NetError, Node, NodeConfig, PeerStatus, TrafficConfig, UdpStats};
pub use pki::{Bundle, Ca, TlsError};
pub use revocations::Revocations;
