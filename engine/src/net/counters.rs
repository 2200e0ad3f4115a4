//! Per-peer counters, declared once: the live atomics the driver bumps, the reading that
//! `/v1/status`, `/metrics` and the `status` command show, and the Prometheus name and
//! help of each. A new counter is one line in [`peer_counters!`]'s invocation below.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::model::{ClassId, Classes};

/// One class's traffic to one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClassCounts {
    /// `critical`, `normal` or `bulk`.
    pub priority: &'static str,
    /// Documents offered to the peer and not yet acknowledged (see `Session::backlog`).
    pub backlog: u64,
    /// Sync messages sent.
    pub sent_messages: u64,
    /// Their frame bytes, as sent (compressed or not).
    pub sent_bytes: u64,
}

impl PeerCounters {
    /// Counts sync messages of `class` sent in one frame of `wire_bytes`.
    pub fn count_class_send(
        &self,
        classes: &Classes,
        class: ClassId,
        messages: u64,
        wire_bytes: u64,
    ) {
        if let Ok(mut map) = self.classes.lock() {
            let c = map.entry(classes.name(class).to_owned()).or_default();
            c.priority = classes.priority(class).as_str();
            c.sent_messages += messages;
            c.sent_bytes += wire_bytes;
        }
    }

    /// Publishes each class's backlog (classes missing from `backlog` have none).
    pub fn set_backlog(&self, classes: &Classes, backlog: &BTreeMap<ClassId, u64>) {
        if let Ok(mut map) = self.classes.lock() {
            for c in map.values_mut() {
                c.backlog = 0;
            }
            for (id, n) in backlog {
                let c = map.entry(classes.name(*id).to_owned()).or_default();
                c.priority = classes.priority(*id).as_str();
                c.backlog = *n;
            }
        }
    }
}

/// How Prometheus sees a per-peer value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only ever grows.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One per-peer value as Prometheus exports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerMetric {
    /// Name, after the `tidesync_` prefix.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// The value.
    pub value: u64,
}

/// Declares the counters: `field: Counter|Gauge("metric name", "help");`, or
/// `field: StatusOnly;` for a value shown by status but not exported as such.
macro_rules! peer_counters {
    ($(
        $(#[doc = $doc:literal])*
        $field:ident : $kind:ident $( ( $metric:literal, $help:literal ) )? ;
    )*) => {
        /// Live counters of one peer, across its connections (monotonic except `lag`),
        /// shared by its driver, status and metrics.
        #[derive(Debug, Default)]
        pub struct PeerCounters {
            $( $(#[doc = $doc])* pub $field: AtomicU64, )*
            /// Per class: backlog and what was sent.
            pub classes: Mutex<BTreeMap<String, ClassCounts>>,
        }

        /// A reading of [`PeerCounters`]; its JSON keys are the field names.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
        pub struct PeerCounts {
            $( $(#[doc = $doc])* pub $field: u64, )*
            /// Per class, by name: backlog and what was sent.
            pub classes: BTreeMap<String, ClassCounts>,
        }

        impl PeerCounters {
            /// The values now.
            pub fn read(&self) -> PeerCounts {
                PeerCounts {
                    $( $field: self.$field.load(Ordering::Relaxed), )*
                    classes: self.classes.lock().map(|c| c.clone()).unwrap_or_default(),
                }
            }
        }

        impl PeerCounts {
            /// The values Prometheus exports, with their names.
            pub fn metrics(&self) -> Vec<PeerMetric> {
                vec![ $( $(
                    PeerMetric {
                        name: $metric,
                        help: $help,
                        kind: MetricKind::$kind,
                        value: self.$field,
                    },
                )? )* ]
            }
        }
    };
}

peer_counters! {
    /// Frame bytes sent, length prefixes included.
    bytes_sent: Counter("peer_sent_bytes", "Frame bytes sent to the peer");
    /// Frame bytes received, length prefixes included.
    bytes_received: Counter("peer_received_bytes", "Frame bytes received from the peer");
    /// Messages sent (a compressed batch counts the messages it carries).
    messages_sent: Counter("peer_sent_messages", "Messages sent to the peer");
    /// Messages received (a compressed batch counts the messages it carries).
    messages_received: Counter("peer_received_messages", "Messages received from the peer");
    /// Automerge changes received from the peer and stored.
    changes_applied: Counter(
        "peer_changes_applied",
        "Automerge changes received from the peer and stored"
    );
    /// Documents whose sync with the peer completed.
    docs_synced: Counter("peer_docs_synced", "Document syncs with the peer completed");
    /// Messages or changes refused because of the peer's grants.
    rejected: Counter(
        "peer_rejected",
        "Changes or reads refused because of the peer's grants"
    );
    /// Protocol errors that ended a connection with this peer.
    protocol_errors: Counter(
        "peer_protocol_errors",
        "Connections with the peer ended by a protocol error"
    );
    /// Local feed positions the peer has not acknowledged yet.
    lag: Gauge(
        "peer_lag_feed_positions",
        "Local feed positions the peer has not acknowledged"
    );
    /// Documents of the local feed the peer has not acknowledged: what its catch-up has left.
    catchup_remaining_documents: Gauge(
        "peer_catchup_remaining_documents",
        "Documents of the local feed the peer has not acknowledged yet"
    );
    /// Estimated bytes left: the remaining documents at the catch-up's bytes per document.
    catchup_remaining_bytes: Gauge(
        "peer_catchup_remaining_bytes",
        "Estimated bytes the peer's catch-up has left to send"
    );
    /// Document syncs completed since the current (or last) catch-up began.
    catchup_done_documents: Gauge(
        "peer_catchup_done_documents",
        "Document syncs completed since the peer's current or last catch-up began"
    );
    /// Frame bytes sent since the current (or last) catch-up began.
    catchup_done_bytes: Gauge(
        "peer_catchup_done_bytes",
        "Frame bytes sent since the peer's current or last catch-up began"
    );
    /// Bytes per second sent since the catch-up began.
    catchup_rate_bytes_per_second: Gauge(
        "peer_catchup_rate_bytes_per_second",
        "Frame bytes per second sent to the peer since its catch-up began"
    );
    /// Estimated seconds to the end of the catch-up (0: done, or not known yet).
    catchup_eta_seconds: Gauge(
        "peer_catchup_eta_seconds",
        "Estimated seconds until the peer has caught up (0: caught up or not known yet)"
    );
    /// Consistency audits of the peer this node started and completed.
    audits: Counter("peer_audits", "Consistency audits of the peer this node completed");
    /// Documents audits found differing between this node and the peer.
    audit_differing: Counter(
        "peer_audit_differing",
        "Documents consistency audits found differing between this node and the peer"
    );
    /// Documents audits found differing that are now the same on both sides.
    audit_repaired: Counter(
        "peer_audit_repaired",
        "Documents consistency audits found differing and repaired"
    );
    /// Unix seconds of the last completed audit (0: never).
    audit_last_unix_s: Gauge(
        "peer_audit_last_timestamp_seconds",
        "Unix time of the last consistency audit of the peer completed (0: never)"
    );
    /// Bytes of blobs sent to the peer (the verified stream: data and tree).
    blob_sent_bytes: Counter("peer_blob_sent_bytes", "Bytes of blob streams sent to the peer");
    /// Bytes of blobs received from the peer.
    blob_received_bytes: Counter(
        "peer_blob_received_bytes",
        "Bytes of blob streams received from the peer"
    );
    /// Blob transfers from the peer that failed verification: the peer sent data that
    /// does not match the hash (the rest came from elsewhere).
    blob_corrupt: Counter(
        "peer_blob_corrupt",
        "Blob transfers from the peer cut off because a chunk group failed verification"
    );
    /// Sync messages sent compressed (the others did not shrink, or the link is protocol 6).
    compressed_messages: Counter(
        "peer_compressed_messages",
        "Sync messages sent to the peer compressed with zstd"
    );
    /// Bytes compression saved on the link: plain size minus compressed size.
    compression_saved_bytes: Counter(
        "peer_compression_saved_bytes",
        "Bytes zstd compression saved on frames sent to the peer"
    );
    /// Unix milliseconds of the last audit of this node the peer started and this node
    /// answered: a peer may start one per `MIN_AUDIT_GAP`.
    audit_answered_ms: StatusOnly;
    /// Automerge sync messages received and applied.
    syncs_applied: StatusOnly;
    /// The protocol version of the last connection (6 for a node from before classes and
    /// compression, 7 for one from before batches, 8 now).
    protocol: StatusOnly;
    /// The blob protocol the peer answered in on this connection (0: not asked yet; 1 for
    /// a node from before compressed blocks), so a fetch asks an old peer in 1 at once.
    blob_protocol: StatusOnly;
    /// Documents loaded from the store for this peer.
    docs_loaded: StatusOnly;
    /// Unix milliseconds of the last completed document sync (0: never); metrics show the
    /// seconds since.
    last_sync_ms: StatusOnly;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_carries_every_counter_and_exports_the_named_ones() {
        let c = PeerCounters::default();
        c.bytes_sent.fetch_add(10, Ordering::Relaxed);
        c.lag.store(3, Ordering::Relaxed);
        c.docs_loaded.fetch_add(2, Ordering::Relaxed);
        let r = c.read();
        assert_eq!((r.bytes_sent, r.lag, r.docs_loaded), (10, 3, 2));
        let m = r.metrics();
        assert!(m.contains(&PeerMetric {
            name: "peer_sent_bytes",
            help: "Frame bytes sent to the peer",
            kind: MetricKind::Counter,
            value: 10,
        }));
        assert!(m
            .iter()
            .any(|p| p.name == "peer_lag_feed_positions" && p.kind == MetricKind::Gauge));
        assert!(
            !m.iter().any(|p| p.value == 2),
            "status-only values stay out"
        );
        let json = serde_json::to_value(&r).expect("serializes");
        assert_eq!(json["docs_loaded"], 2);
    }
}
