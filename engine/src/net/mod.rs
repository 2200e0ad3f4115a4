//! Transport and security: the deployment PKI, TLS, the quinn endpoint, and the drivers
//! that run sync sessions over connections.
//!
//! Everything here is I/O; protocol decisions stay in `sync`.

pub mod driver;
pub mod node;
pub mod pki;
pub mod tls;

pub use node::{NetError, Node, NodeConfig, PeerStatus};
pub use pki::{Bundle, Ca, Identity, TlsError};
pub use tls::Revocations;
