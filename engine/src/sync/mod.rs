//! The sync protocol, sans I/O: messages and the per-peer session state machine.
//!
//! This module owns protocol decisions only. It never touches sockets, clocks, tokio or
//! the disk: the `net` driver feeds it frames and store results and carries out its
//! [`session::Output`]s. That keeps it deterministic, so tests can run thousands of
//! randomized multi-node histories in seconds.

pub mod message;
pub mod session;

pub use message::{Cursor, ErrorCode, Hello, Message, Role, ALPN, PROTOCOL_VERSION};
pub use session::{
    Apply, Event, Output, PeerIdentity, ProtocolError, Session, SessionConfig, SessionStats,
};
