//! The hub's bridge to the data center's message bus: every committed change of chosen
//! namespaces goes out to NATS JetStream or RabbitMQ, in feed order per document, at
//! least once and deduplicated by message id, from a position kept durably in the hub's
//! own store; and JSON merge patches come in from the bus, each acknowledged after its
//! durable commit.
//!
//! It is a [`tidesync::extension::Extension`] of the hub, so the edge agent carries none of
//! it. What an export sends and why it loses nothing is in [`export`]; its settings in
//! [`config`].

mod bus;
pub mod config;
pub mod export;
pub mod import;
mod retry;

use std::sync::Arc;

use tidesync::extension::Extension;
use tidesync::store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{Broker, ConfigError, ExportConfig, Format, ImportConfig};
pub use export::ExportState;
pub use import::ImportState;

/// The hub's exports and imports.
#[derive(Debug, Default)]
pub struct Bridge {
    exports: Vec<Arc<ExportState>>,
    imports: Vec<Arc<ImportState>>,
}

impl Bridge {
    /// A bridge running `exports` and `imports`.
    pub fn new(exports: Vec<ExportConfig>, imports: Vec<ImportConfig>) -> Self {
        Self {
            exports: exports
                .into_iter()
                .map(|c| Arc::new(ExportState::new(c)))
                .collect(),
            imports: imports
                .into_iter()
                .map(|c| Arc::new(ImportState::new(c)))
                .collect(),
        }
    }

    /// Whether it has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.exports.is_empty() && self.imports.is_empty()
    }
}

impl Extension for Bridge {
    fn start(&self, store: Store, stop: CancellationToken) -> Vec<JoinHandle<()>> {
        let exports = self
            .exports
            .iter()
            .map(|e| tokio::spawn(export::run(e.clone(), store.clone(), stop.clone())));
        let imports = self
            .imports
            .iter()
            .map(|i| tokio::spawn(import::run(i.clone(), store.clone(), stop.clone())));
        exports.chain(imports).collect()
    }

    fn status(&self) -> Vec<(&'static str, serde_json::Value)> {
        vec![
            (
                "exports",
                serde_json::Value::Array(self.exports.iter().map(|e| e.status()).collect()),
            ),
            (
                "imports",
                serde_json::Value::Array(self.imports.iter().map(|i| i.status()).collect()),
            ),
        ]
    }

    fn metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        export::register_metrics(&self.exports, registry);
        import::register_metrics(&self.imports, registry);
    }
}
