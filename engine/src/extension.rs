//! Parts of a node that live outside this crate, such as the hub's bridge to a message
//! bus: started with the node, stopped with it, and shown in its `/v1/status` and
//! `/metrics`. The edge agent registers none, so their dependencies stay out of its tree.

use std::fmt;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// A part of a node started with it.
pub trait Extension: Send + Sync + fmt::Debug + 'static {
    /// Starts its tasks on the running node; they end once `stop` is cancelled.
    fn start(&self, store: Store, stop: CancellationToken) -> Vec<JoinHandle<()>>;
    /// Its parts of `/v1/status`: keys of the status object and their values.
    fn status(&self) -> Vec<(&'static str, serde_json::Value)>;
    /// Registers its metric families (the registry adds the `tidesync_` prefix).
    fn metrics(&self, registry: &mut prometheus_client::registry::Registry);
}
