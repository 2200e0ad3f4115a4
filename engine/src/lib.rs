//! Tidesync: a CRDT multi-master sync engine for the edge.
//!
//! Every node (an edge agent on a device, or a hub in a region) keeps Automerge documents
//! in an embedded redb database and accepts writes online or offline; concurrent writes
//! converge without a coordinator.
//!
//! This crate is the node. The data model and the sync protocol live, with no I/O, in the
//! core crate `tidesync-core`, re-exported here as [`model`] and [`sync`]. The layers, as
//! the repository's `docs/ARCHITECTURE.md` describes them:
//!
//! ```text
//!   daemon   a node process: store + node + API, revocation file, graceful stop
//!     |
//!   api      HTTP API (axum): documents, merge patch, Automerge bytes, feed, SSE, status
//!   metrics  Prometheus text from the store's and the peers' counters
//!     |
//!   net      PKI (rcgen), mutual TLS (rustls, ring), quinn node, per-connection driver;
//!            exec: the one place a session's outputs are carried out against the store
//!     |                                   \
//!   store    redb tables, group-commit     sync (core)  messages, per-peer Session
//!            writer, change feed, cache,     |          (sans-IO)
//!            compaction            (disk)    |
//!     \______________________________________/
//!   model (core)  names, grants, JSON <-> Automerge, merge patch, conflicts    (pure)
//! ```
//!
//! `store` and `sync` stand side by side on `model`: neither knows the other, and `net` is
//! the only bridge between a session and the store.
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
pub mod blobs;
pub mod daemon;
pub mod error;
pub mod extension;
pub mod files;
pub mod metrics;
pub mod net;
pub mod store;

pub use error::{ModelError, StoreError};
pub use tidesync_core::{model, sync};
