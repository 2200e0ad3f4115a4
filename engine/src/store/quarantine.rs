//! Documents set aside because their stored bytes no longer load.
//!
//! One damaged document must not stop everything else: without this, every batch that
//! touched it failed (with the unrelated writes in it), and every sync connection that
//! reached it in the feed walk ended, after every reconnect. Once a load fails with
//! [`StoreError::Corrupt`], the document is listed here: reads and writes of it answer
//! [`StoreError::Quarantined`] at once, sync skips it (the peer keeps its copy), and
//! `/v1/status` and the metrics show it. The list lives in memory: after a restart a
//! damaged document is found again at its first load. Its stored bytes stay as they are,
//! for an operator to recover (see OPERATIONS).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::StoreError;
use crate::model::{DocId, Namespace};

/// Longest reason kept per document: the reason comes from a decoder, not from a person.
const MAX_REASON: usize = 512;

/// A document set aside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Quarantined {
    /// Its namespace.
    pub ns: String,
    /// Its id.
    pub id: String,
    /// Why it did not load.
    pub reason: String,
    /// When it was set aside (Unix milliseconds).
    pub since_unix_ms: u64,
}

impl Quarantined {
    /// The error reads and writes of this document get.
    pub fn to_error(&self) -> StoreError {
        StoreError::Quarantined {
            ns: self.ns.clone(),
            id: self.id.clone(),
            reason: self.reason.clone(),
        }
    }
}

/// The documents this store has set aside.
#[derive(Debug, Default)]
pub(crate) struct Quarantine {
    docs: Mutex<BTreeMap<(Namespace, DocId), Quarantined>>,
}

impl Quarantine {
    /// `Err` if the document is set aside.
    pub fn check(&self, ns: &Namespace, id: &DocId) -> Result<(), StoreError> {
        let docs = self.docs.lock().map_err(|_| StoreError::Closed)?;
        match docs.get(&(ns.clone(), id.clone())) {
            Some(q) => Err(q.to_error()),
            None => Ok(()),
        }
    }

    /// Turns a failure to load `ns/id` into its quarantine: a [`StoreError::Corrupt`] sets
    /// the document aside (logged once); any other error passes through unchanged.
    pub fn on_load_error(&self, ns: &Namespace, id: &DocId, e: StoreError) -> StoreError {
        let StoreError::Corrupt(reason) = e else {
            return e;
        };
        let mut reason = reason;
        if reason.len() > MAX_REASON {
            let mut cut = MAX_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        let Ok(mut docs) = self.docs.lock() else {
            return StoreError::Corrupt(reason);
        };
        let entry = docs.entry((ns.clone(), id.clone())).or_insert_with(|| {
            tracing::error!(
                ns = %ns, id = %id, reason = %reason,
                "document quarantined: its stored bytes do not load; reads, writes and \
                 sync of it are refused until it is recovered"
            );
            Quarantined {
                ns: ns.to_string(),
                id: id.to_string(),
                reason,
                since_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            }
        });
        entry.to_error()
    }

    /// Every document set aside, in name order.
    pub fn list(&self) -> Vec<Quarantined> {
        self.docs
            .lock()
            .map(|d| d.values().cloned().collect())
            .unwrap_or_default()
    }

    /// How many documents are set aside.
    pub fn len(&self) -> usize {
        self.docs.lock().map_or(0, |d| d.len())
    }
}
