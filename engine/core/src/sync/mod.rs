//! The sync protocol, sans I/O: messages, the per-peer session state machine, and the
//! plain values it exchanges with its driver.
//!
//! This module owns protocol decisions only. It never touches sockets, clocks, threads or
//! the disk: a driver feeds it frames and the answers to its questions, and carries out
//! its [`Output`]s. That keeps it deterministic, so tests can run thousands of randomized
//! multi-node histories in seconds.
//!
//! - `message`: what travels between two nodes, and its encoding;
//! - `session`: one peer's [`Session`];
//! - `output`: what a session asks of its driver; `input`: what the driver hands back;
//! - `state`: the Automerge sync state a document's exchange starts from;
//! - `raw`: documents sent whole without Automerge's deflate, for links that compress
//!   frames;
//! - `validate`: the bounds every peer input is checked against before it is used;
//! - `audit`: the consistency audit's range-based set reconciliation.

pub mod audit;
pub mod input;
pub mod message;
pub mod output;
pub mod raw;
pub mod session;
pub mod state;
pub mod validate;

pub use crate::error::ProtocolError;
pub use crate::model::{Cursor, Identity, Role, SyncPeer};
pub use input::{Applied, EarlyDoc, LoadedDoc};
pub use message::{
    alpn_protocols, version_for_alpn, ErrorCode, Hello, Message, ALPN, ALPN_BATCHES, ALPN_CLASSES,
    CLASSES_PROTOCOL_VERSION, LEGACY_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use output::{Apply, Event, Output};
pub use session::{AuditReport, Session, SessionConfig, SessionStats};
pub use state::warm as warm_sync_state;
