//! Tidesync: a CRDT multi-master sync engine for the edge.
//!
//! Every node (an edge agent on a device, or a hub in a region) keeps Automerge documents
//! in an embedded redb database and accepts writes online or offline; concurrent writes
//! converge without a coordinator.
//!
//! The crate is organised as the architecture is (see `docs/ARCHITECTURE.md`):
//!
//! ```text
//!   daemon   a node process: store + node + API, revocation file, graceful stop
//!     |
//!   api      HTTP API (axum): documents, merge patch, Automerge bytes, feed, SSE, metrics
//!   net      PKI (rcgen), mutual TLS (rustls, ring), quinn node, per-connection driver
//!     |
//!   sync     protocol messages and the per-peer session state machine  (sans-IO)
//!     |
//!   store    redb tables, single group-commit writer, change feed,        (disk)
//!            compaction, byte-bounded document cache
//!     |
//!   model    names, JSON <-> Automerge, merge patch, conflicts            (pure)
//! ```
//!
//! Entry points: [`store::Store`] to keep documents, [`net::Node`] to sync them with
//! peers, [`daemon::Daemon`] for everything a node binary runs, and [`sync::Session`]
//! for the protocol itself.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use tidesync::model::{DocId, Namespace};
//! use tidesync::store::{FeedSeq, Store, StoreConfig};
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path().join("node.redb"), StoreConfig::default())?;
//! let (ns, id) = (Namespace::new("flags")?, DocId::new("checkout")?);
//! // Resolves once the write is durable on disk.
//! store.put(&ns, &id, serde_json::json!({"enabled": true}), None).await?;
//! store.patch(&ns, &id, serde_json::json!({"rollout": 0.25}), None).await?;
//! let doc = store.get(&ns, &id)?.expect("just written");
//! assert_eq!(doc.content["rollout"], 0.25);
//! assert_eq!(store.changes_since(FeedSeq(0), 100)?.len(), 1);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod error;
pub mod metrics;
pub mod model;
pub mod net;
pub mod store;
pub mod sync;

pub use error::{Error, ModelError, StoreError};
