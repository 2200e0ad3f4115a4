//! The core of Tidesync, with no I/O: the data model and the sync protocol.
//!
//! Everything here is deterministic and synchronous. The crate has no tokio, no sockets,
//! no clock and no database in its dependency tree, and the compiler keeps it so; the
//! node (crate `tidesync`) adds the store, the network and the API around it.
//!
//! ```text
//!   sync     messages, the per-peer Session state machine, what it asks   (sans-IO)
//!     |      (outputs) and what it is answered (inputs)
//!   model    names, grants, JSON <-> Automerge, merge patch, conflicts,   (pure)
//!            Automerge byte checks, feed positions, roles and identities
//! ```
//!
//! The session decides and its driver does. One turn of a driver's loop:
//!
//! ```text
//!   frame from the peer ──► handle_message ─┐
//!   local commit ─────────► handle_feed_advanced / handle_early
//!   answers ──────────────► handle_feed / handle_loaded / handle_sync_state / handle_applied
//!                                           │
//!                               poll_output ▼
//!   Send ──► the peer      ReadFeed, Load, LoadSyncState ──► store reads, answered at once
//!   Event ─► logs, counters   Apply, SaveCursor ──► store writes, answered after the commit
//! ```
//!
//! The design of the whole system, storage and wire formats included, is in the
//! repository's `docs/ARCHITECTURE.md`.

#![warn(missing_docs)]

pub mod error;
pub mod model;
pub mod sync;

pub use error::{ModelError, ProtocolError};
