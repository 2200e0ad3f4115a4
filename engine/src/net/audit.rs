//! Consistency audits on the node's side: the request a caller hands a connection's
//! driver, what comes back, and how it is counted. The comparison itself is the session's
//! ([`crate::sync::audit`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde::Serialize;
use tokio::sync::oneshot;

use super::counters::PeerCounters;
use crate::model::{NodeId, NsPattern};
use crate::sync::AuditReport;

/// Shortest time between two audits a peer may have this node answer: each one reads
/// every document's heads.
pub const MIN_AUDIT_GAP: Duration = Duration::from_secs(1);

/// Longest an audit may run on a connection, started by either side, before it is given
/// up (a peer that stopped answering must not hold it, or its repairs, for ever).
pub const MAX_AUDIT_RUN: Duration = Duration::from_secs(900);

/// How long an audit may take (comparison and repairs) unless told.
pub const DEFAULT_AUDIT_TIMEOUT: Duration = Duration::from_secs(600);

/// Asks a connection's driver to audit its peer.
#[derive(Debug)]
pub struct AuditRequest {
    /// Namespaces compared (empty: every shared one).
    pub namespaces: Vec<NsPattern>,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<AuditReport, AuditError>>,
}

/// What `POST /v1/audit` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditOutcome {
    /// The peer audited.
    pub peer: String,
    /// Documents compared on this node.
    pub compared: u64,
    /// Documents found differing.
    pub differing: u64,
    /// Of those, documents now the same on both nodes.
    pub repaired: u64,
    /// Round trips of the comparison.
    pub rounds: u32,
    /// Bytes of the comparison, both ways (repairs are normal sync traffic).
    pub bytes: u64,
    /// Time from the request to the last repair.
    pub ms: u64,
}

/// Why an audit did not complete.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// No connection to the peer.
    #[error("not connected to {0}: an audit runs over a live connection")]
    NotConnected(String),
    /// An audit of this peer is already running.
    #[error("an audit of {0} is already running")]
    Busy(String),
    /// The peer refused it.
    #[error("{peer} refused the audit: {reason}")]
    Refused {
        /// The peer.
        peer: String,
        /// Its reason.
        reason: String,
    },
    /// The connection ended first.
    #[error("the connection to {0} ended during the audit; run it again")]
    Ended(String),
    /// It took longer than allowed.
    #[error("the audit of {peer} did not finish within {} s", .after.as_secs())]
    TimedOut {
        /// The peer.
        peer: String,
        /// The limit.
        after: Duration,
    },
}

impl AuditError {
    /// The HTTP status that reports it.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotConnected(_) => StatusCode::NOT_FOUND,
            Self::Busy(_) => StatusCode::CONFLICT,
            Self::Refused { .. } | Self::Ended(_) => StatusCode::BAD_GATEWAY,
            Self::TimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// Counts a completed audit in the peer's counters.
pub fn count(counters: &PeerCounters, report: &AuditReport) {
    counters.audits.fetch_add(1, Ordering::Relaxed);
    counters
        .audit_differing
        .fetch_add(report.differing, Ordering::Relaxed);
    counters
        .audit_repaired
        .fetch_add(report.repaired, Ordering::Relaxed);
    counters
        .audit_last_unix_s
        .store(since_epoch().as_secs(), Ordering::Relaxed);
}

/// One audit's documents are read and hashed at a time in the process, whichever peers
/// ask: each read costs every document's record, and many peers must not multiply it.
pub static ITEM_LOADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// A random key for an audit's hashes (see [`crate::sync::audit::RangePrint`]).
pub fn salt() -> u64 {
    let mut b = [0u8; 8];
    // Without randomness the salt is the clock: still different for every audit.
    if getrandom::fill(&mut b).is_err() {
        return since_epoch().as_nanos() as u64;
    }
    u64::from_le_bytes(b)
}

/// Whether the peer may have this node answer another audit now; if so, notes the time.
pub fn may_answer(counters: &PeerCounters) -> bool {
    let now = since_epoch().as_millis() as u64;
    let last = counters.audit_answered_ms.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < MIN_AUDIT_GAP.as_millis() as u64 {
        return false;
    }
    counters.audit_answered_ms.store(now, Ordering::Relaxed);
    true
}

/// The wall clock, for the counters that status shows as times.
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The outcome as the API shows it.
pub fn outcome(peer: &NodeId, report: &AuditReport, took: Duration) -> AuditOutcome {
    AuditOutcome {
        peer: peer.to_string(),
        compared: report.compared,
        differing: report.differing,
        repaired: report.repaired,
        rounds: report.rounds,
        bytes: report.bytes,
        ms: took.as_millis() as u64,
    }
}
