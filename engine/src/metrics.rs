//! Prometheus metrics in the text exposition format, built from the live counters of the
//! store and the node at each scrape.

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::net::counters::MetricKind;
use crate::net::{Node, PeerCounts, PeerStatus};
use crate::store::{CommitTimesSnapshot, Store};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    peer: String,
    role: String,
    class: String,
    priority: String,
}

/// Per peer and namespace class: the backlog, and the sync messages and bytes sent.
fn render_classes(r: &mut Registry, peers: &[PeerStatus]) {
    let backlog = Family::<ClassLabels, Gauge>::default();
    let messages = Family::<ClassLabels, Counter>::default();
    let bytes = Family::<ClassLabels, Counter>::default();
    for p in peers {
        for (class, c) in &p.counts.classes {
            let l = ClassLabels {
                peer: p.node_id.to_string(),
                role: p.role.as_str().to_owned(),
                class: class.clone(),
                priority: c.priority.to_owned(),
            };
            backlog.get_or_create(&l).set(c.backlog as i64);
            messages.get_or_create(&l).inc_by(c.sent_messages);
            bytes.get_or_create(&l).inc_by(c.sent_bytes);
        }
    }
    r.register(
        "peer_class_backlog_documents",
        "Documents of the class offered to the peer and not yet acknowledged",
        backlog,
    );
    r.register(
        "peer_class_sent_messages",
        "Sync messages of the class sent to the peer",
        messages,
    );
    r.register(
        "peer_class_sent_bytes",
        "Frame bytes of the class's sync messages sent to the peer",
        bytes,
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlobLabels {
    blob: String,
}

/// Blob totals and, per transfer under way (at most `MAX_FETCHES` of them), its progress.
fn render_blobs(r: &mut Registry, blobs: &crate::blobs::Blobs) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = blobs.stats();
    gauge(
        r,
        "blob_bytes_used",
        "Bytes of blob files on disk: complete blobs, their trees and partial transfers",
        blobs.files().used_bytes() as i64,
    );
    gauge(
        r,
        "blobs_held",
        "Complete blobs held",
        blobs.files().list().map_or(0, |l| l.len()) as i64,
    );
    for (name, help, value) in [
        (
            "blobs_fetched",
            "Blobs fetched from peers and verified",
            &s.fetched,
        ),
        (
            "blob_fetch_failures",
            "Blob fetches that ended incomplete (tried again with backoff)",
            &s.fetch_failures,
        ),
        (
            "blob_received_bytes",
            "Bytes received in blob streams (data and verification tree)",
            &s.received_bytes,
        ),
        (
            "blob_resumed_bytes",
            "Bytes of cut blob transfers found verified on resume, not fetched again",
            &s.resumed_bytes,
        ),
        (
            "blob_sent_bytes",
            "Bytes sent in blob streams",
            &s.sent_bytes,
        ),
        (
            "blob_compression_saved_bytes",
            "Bytes zstd saved on blob streams sent: plain blocks minus compressed blocks",
            &s.compression_saved_bytes,
        ),
        (
            "blob_corrupt",
            "Blob transfers cut off because a peer sent a chunk group that failed verification",
            &s.corrupt,
        ),
        (
            "blob_requests_refused",
            "Blob requests refused: not readable by the peer, not held, busy or malformed",
            &s.refused,
        ),
        (
            "blobs_collected",
            "Blobs deleted because no document referenced them for the grace period",
            &s.collected,
        ),
    ] {
        counter(r, name, help, value.load(Relaxed));
    }
    let transfers = blobs.transfers();
    let done = Family::<BlobLabels, Gauge>::default();
    let total = Family::<BlobLabels, Gauge>::default();
    let rate = Family::<BlobLabels, Gauge>::default();
    for t in &transfers {
        let l = BlobLabels {
            blob: t.hash.clone(),
        };
        done.get_or_create(&l).set(t.done as i64);
        total.get_or_create(&l).set(t.size as i64);
        rate.get_or_create(&l).set(t.rate_bytes_s as i64);
    }
    r.register(
        "blob_transfer_done_bytes",
        "Bytes of a blob being fetched that are verified so far",
        done,
    );
    r.register(
        "blob_transfer_size_bytes",
        "Size of a blob being fetched",
        total,
    );
    r.register(
        "blob_transfer_rate_bytes_per_second",
        "Verified bytes per second of a blob being fetched, since its transfer started",
        rate,
    );
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn per_peer_counter(registry: &mut Registry, name: &str, help: &str, values: &[(PeerLabels, u64)]) {
    let family = Family::<PeerLabels, Counter>::default();
    for (labels, v) in values {
        family.get_or_create(labels).inc_by(*v);
    }
    registry.register(name, help, family);
}

fn per_peer_gauge(registry: &mut Registry, name: &str, help: &str, values: &[(PeerLabels, i64)]) {
    let family = Family::<PeerLabels, Gauge>::default();
    for (labels, v) in values {
        family.get_or_create(labels).set(*v);
    }
    registry.register(name, help, family);
}

/// The store's commit times as a Prometheus histogram.
#[derive(Debug)]
struct CommitHistogram(CommitTimesSnapshot);

impl EncodeMetric for CommitHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        // The text encoder writes `+Inf` for f64::MAX.
        let buckets: Vec<(f64, u64)> = s
            .buckets
            .iter()
            .map(|&(le, n)| (if le.is_finite() { le } else { f64::MAX }, n))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(s.sum_seconds, s.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The metrics of `store` and (if running) `node`, as Prometheus text.
pub fn render(
    store: &Store,
    node: Option<&Node>,
    extensions: &[std::sync::Arc<dyn crate::extension::Extension>],
) -> String {
    let mut r = Registry::with_prefix("tidesync");
    for e in extensions {
        e.metrics(&mut r);
    }
    let docs = store.doc_count().unwrap_or(0);
    gauge(
        &mut r,
        "documents",
        "Documents in the store, deleted ones included",
        docs as i64,
    );
    gauge(
        &mut r,
        "store_fault",
        "1 while a storage fault (a full disk, an I/O error) stops writes; /v1/health says why",
        i64::from(store.fault().is_some()),
    );
    gauge(
        &mut r,
        "docs_quarantined",
        "Documents set aside because their stored bytes do not load; /v1/status lists them",
        store.quarantined_count() as i64,
    );
    counter(
        &mut r,
        "store_writer_panics",
        "Write batches that panicked (a defect); the writer went on from the committed state",
        store.writer_panics(),
    );
    gauge(
        &mut r,
        "feed_last_seq",
        "Position of the latest local commit in the change feed",
        store.last_seq().0 as i64,
    );
    let (cached, cache_bytes) = store.cache_usage();
    gauge(
        &mut r,
        "doc_cache_documents",
        "Documents held in the document cache",
        cached as i64,
    );
    gauge(
        &mut r,
        "doc_cache_bytes",
        "Estimated bytes held by the document cache",
        cache_bytes as i64,
    );
    r.register(
        "commit_duration_seconds",
        "Duration of durable store commits",
        CommitHistogram(store.commit_times().snapshot()),
    );
    if let Some(blobs) = node.and_then(Node::blobs) {
        render_blobs(&mut r, blobs);
    }
    if let Some(node) = node {
        let peers = node.peers();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let label = |p: &PeerStatus| PeerLabels {
            peer: p.node_id.to_string(),
            role: p.role.as_str().to_owned(),
        };
        gauge(
            &mut r,
            "connected_peers",
            "Peers with a live connection",
            peers.iter().filter(|p| p.connected).count() as i64,
        );
        per_peer_gauge(
            &mut r,
            "peer_connected",
            "1 if the peer is connected",
            &peers
                .iter()
                .map(|p| (label(p), i64::from(p.connected)))
                .collect::<Vec<_>>(),
        );
        // Every exported counter of every peer, one family per name.
        let per_peer: Vec<(PeerLabels, Vec<_>)> = peers
            .iter()
            .map(|p| (label(p), p.counts.metrics()))
            .collect();
        for (i, m) in PeerCounts::default().metrics().iter().enumerate() {
            let values = per_peer.iter().map(|(l, ms)| (l.clone(), ms[i].value));
            match m.kind {
                MetricKind::Counter => {
                    per_peer_counter(&mut r, m.name, m.help, &values.collect::<Vec<_>>())
                }
                MetricKind::Gauge => per_peer_gauge(
                    &mut r,
                    m.name,
                    m.help,
                    &values
                        .map(|(l, v)| (l, i64::try_from(v).unwrap_or(i64::MAX)))
                        .collect::<Vec<_>>(),
                ),
            }
        }
        per_peer_gauge(
            &mut r,
            "peer_seconds_since_last_sync",
            "Seconds since a document sync with the peer last completed (-1: never)",
            &peers
                .iter()
                .map(|p| {
                    let last = p.counts.last_sync_ms;
                    let s = if last == 0 {
                        -1
                    } else {
                        (now_ms.saturating_sub(last) / 1000) as i64
                    };
                    (label(p), s)
                })
                .collect::<Vec<_>>(),
        );
        let seconds_left = crate::net::node::seconds_until;
        gauge(
            &mut r,
            "revocation_list_ok",
            "0 while the revocation list cannot be read (the last good one is enforced)",
            i64::from(node.revocations().problem().is_none()),
        );
        let crl = node.revocations().crl();
        gauge(
            &mut r,
            "revocation_list_number",
            "Number of the deployment revocation list in force (0: none yet)",
            crl.as_ref()
                .map_or(0, |c| i64::try_from(c.number()).unwrap_or(i64::MAX)),
        );
        gauge(
            &mut r,
            "revoked_certificates",
            "Certificates the revocation list in force revokes",
            crl.as_ref()
                .map_or(0, |c| i64::try_from(c.entries().len()).unwrap_or(i64::MAX)),
        );
        if let Some(t) = node.cert_not_after() {
            gauge(
                &mut r,
                "cert_expiry_seconds",
                "Seconds until this node's certificate expires (negative: expired)",
                seconds_left(t),
            );
        }
        per_peer_gauge(
            &mut r,
            "peer_cert_expiry_seconds",
            "Seconds until the certificate the peer last connected with expires",
            &peers
                .iter()
                .filter_map(|p| Some((label(p), seconds_left(p.cert_not_after?))))
                .collect::<Vec<_>>(),
        );
        counter(
            &mut r,
            "handshake_failures",
            "Handshakes refused: bad, foreign or revoked certificates, wrong roles",
            node.handshake_failures(),
        );
        counter(
            &mut r,
            "penalty_refusals",
            "Connections refused because their peer broke the protocol a moment before",
            node.penalty_refusals(),
        );
        gauge(
            &mut r,
            "edges_connected",
            "Edges with a live connection to this node",
            node.edges_connected() as i64,
        );
        counter(
            &mut r,
            "peers_refused_full",
            "Edges turned away because this hub held --max-peers edges",
            node.refused_full(),
        );
        render_classes(&mut r, &peers);
        r.register(
            "replication_seconds",
            "Time from a write's commit to its Kth replica, for writes with ?replicas=K that reached K",
            CommitHistogram(node.replicas().times().snapshot()),
        );
        counter(
            &mut r,
            "replication_timeouts",
            "Writes with ?replicas=K answered 202: fewer than K replicas confirmed in time",
            node.replicas().timeouts(),
        );
        counter(
            &mut r,
            "peers_forgotten",
            "Peers whose cursors and sync states were dropped after they went unseen for --forget-peers-after",
            node.peers_forgotten(),
        );
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}
