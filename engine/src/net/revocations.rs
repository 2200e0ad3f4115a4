//! What a node refuses: the deployment's revocation list (a CRL signed by the CA, the
//! newest seen, by certificate serial) and a local list of node ids (a hub's `revoked`
//! file), shared by the node's TLS verifiers and every connection.
//!
//! A change takes effect at once: new handshakes fail, live connections of a peer it
//! names close, and every connection passes a newer list on to its peer. A list is only
//! ever replaced by a newer one: a missing or damaged source is reported
//! ([`Revocations::problem`]) while the last good list stays in force.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;

use super::crl::{Crl, CrlError};
use crate::model::NodeId;

/// The lists a node enforces. Clones share them.
#[derive(Clone, Debug)]
pub struct Revocations {
    inner: Arc<Inner>,
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    ids: RwLock<HashSet<NodeId>>,
    crl: RwLock<Option<Arc<Crl>>>,
    /// Where a newly taken-up list is written (durably) so a restart keeps it, and the CA
    /// certificate (DER) that signs lists. Held while writing, so two writers of this
    /// process never leave an older list on disk after a newer one (other processes are
    /// kept out by the directory's lock file).
    crl_file: Mutex<Option<(PathBuf, Vec<u8>)>>,
    /// Why a source of the lists cannot be read, by source, while it cannot.
    problems: RwLock<BTreeMap<&'static str, String>>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            changed: watch::channel(0).0,
        }
    }
}

/// What [`Revocations::offer`] did with a list.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// It is newer than the one in force, and now in force.
    TakenUp,
    /// It is the one in force, or older.
    NotNewer,
}

impl Revocations {
    /// Nothing revoked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes every list taken up from now on to `path` (durably, owner-only), unless the
    /// file already holds a list signed by `ca` (DER) that is as new.
    pub fn persist_to(&self, path: PathBuf, ca: Vec<u8>) {
        if let Ok(mut f) = self.inner.crl_file.lock() {
            *f = Some((path, ca));
        }
    }

    /// Refuses node `id` from now on, whatever its certificate.
    pub fn revoke(&self, id: NodeId) {
        let added = self.inner.ids.write().is_ok_and(|mut ids| ids.insert(id));
        if added {
            self.notify();
        }
    }

    /// Replaces the list of refused node ids (as read from a revocation file).
    pub fn replace(&self, ids: impl IntoIterator<Item = NodeId>) {
        let new: HashSet<NodeId> = ids.into_iter().collect();
        let changed = match self.inner.ids.write() {
            Ok(mut cur) if *cur != new => {
                *cur = new;
                true
            }
            _ => false,
        };
        if changed {
            self.notify();
        }
    }

    /// Checks the revocation list `der` against the deployment CA `ca` (DER) and puts it in
    /// force if it is newer than the one in force (a larger CRL number). A list that fails
    /// the check changes nothing. (The node keeps what it takes up: see
    /// [`Revocations::write_file`].)
    pub fn offer(&self, der: &[u8], ca: &[u8]) -> Result<Offered, CrlError> {
        if self.crl().is_some_and(|c| c.der() == der) {
            return Ok(Offered::NotNewer);
        }
        let crl = Crl::verify(der, ca)?;
        Ok(self.take_up(crl))
    }

    /// Puts a checked list in force if it is newer than the one in force.
    pub fn take_up(&self, crl: Crl) -> Offered {
        let number = crl.number();
        let taken = match self.inner.crl.write() {
            Ok(mut cur) if cur.as_ref().is_none_or(|c| c.number() < number) => {
                *cur = Some(Arc::new(crl));
                true
            }
            Ok(cur) => {
                if cur
                    .as_ref()
                    .is_some_and(|c| c.number() == number && c.der() != crl.der())
                {
                    tracing::error!(
                        number,
                        "two different revocation lists carry the same number; this node keeps \
                         the one it had. Issue a new list with `tidesync-hub revoke` at the CA"
                    );
                }
                false
            }
            Err(_) => false,
        };
        if !taken {
            return Offered::NotNewer;
        }
        tracing::info!(number, "took up a newer revocation list");
        self.notify();
        Offered::TakenUp
    }

    /// Writes the list in force to the file [`Revocations::persist_to`] named (durably: it
    /// fsyncs, so call it off the async threads). The newest list is written whoever calls,
    /// under the file's lock, so the file never goes back to an older one.
    pub fn write_file(&self) {
        let Ok(file) = self.inner.crl_file.lock() else {
            return;
        };
        let Some((path, ca)) = file.as_ref() else {
            return;
        };
        let Some(crl) = self.crl() else {
            return;
        };
        let written = (|| {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let _lock = crate::files::lock_dir(dir.unwrap_or(std::path::Path::new(".")))?;
            // `revoke` may have put a newer list there since this node read it.
            let on_disk = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| Crl::from_pem(&text, ca).ok());
            if on_disk.is_some_and(|d| d.number() >= crl.number()) {
                return Ok(());
            }
            crate::files::write_private(path, crl.to_pem().as_bytes())
        })();
        match written {
            Ok(()) => {
                self.set_problem("crl-write", None);
            }
            Err(e) => {
                let why = format!("cannot write {}: {e}", path.display());
                if self.set_problem("crl-write", Some(why)) {
                    tracing::error!(
                        path = %path.display(),
                        error = %e,
                        number = crl.number(),
                        "cannot write the revocation list; it is enforced, and kept in the \
                         database"
                    );
                }
            }
        }
    }

    /// Records that the lists' `source` is unreadable (`Some(why)`) or readable again
    /// (`None`). The lists themselves stay as they are: a missing or damaged file never
    /// means "nobody is revoked". Returns whether this changed the state, so it is logged
    /// once.
    pub fn set_problem(&self, source: &'static str, problem: Option<String>) -> bool {
        let Ok(mut problems) = self.inner.problems.write() else {
            return false;
        };
        match problem {
            Some(why) => problems.insert(source, why.clone()).as_ref() != Some(&why),
            None => problems.remove(source).is_some(),
        }
    }

    /// Why a source of the lists cannot be read, if one cannot.
    pub fn problem(&self) -> Option<String> {
        let problems = self.inner.problems.read().ok()?;
        if problems.is_empty() {
            return None;
        }
        Some(problems.values().cloned().collect::<Vec<_>>().join("; "))
    }

    /// The node ids refused whatever their certificate.
    pub fn ids(&self) -> Vec<NodeId> {
        self.inner
            .ids
            .read()
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The revocation list in force, if the node has one.
    pub fn crl(&self) -> Option<Arc<Crl>> {
        self.inner.crl.read().ok().and_then(|c| c.clone())
    }

    /// Whether a peer named `id` presenting the certificate with serial `serial` is
    /// refused.
    pub fn refuses(&self, id: &NodeId, serial: &[u8]) -> bool {
        // A poisoned lock means a writer panicked mid-update: refuse rather than admit.
        let by_id = self.inner.ids.read().map_or(true, |ids| ids.contains(id));
        let by_serial = self
            .inner
            .crl
            .read()
            .map_or(true, |crl| crl.as_ref().is_some_and(|c| c.revokes(serial)));
        by_id || by_serial
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::model::Role;
    use crate::net::crl::Revoked;
    use crate::net::pki::Ca;

    #[tokio::test]
    async fn revoking_wakes_subscribers_of_every_clone() {
        let r = Revocations::new();
        let clone = r.clone();
        let mut rx = clone.subscribe();
        let id = NodeId::new("edge-1").expect("id");
        r.revoke(id.clone());
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .expect("woken")
            .expect("open");
        assert!(clone.refuses(&id, b"any"));
        clone.replace(Vec::new());
        assert!(!r.refuses(&id, b"any"));
    }

    #[test]
    fn only_a_newer_signed_list_is_taken_up() {
        let ca = Ca::generate("t").expect("ca");
        let ca_der = ca.cert_der().expect("der");
        let id = NodeId::new("edge-1").expect("id");
        let edge = ca.issue(&id, Role::Edge, &[]).expect("issue");
        let serial = edge.serial().expect("serial");
        let entry = Revoked {
            serial: serial.clone(),
            at: SystemTime::now(),
        };
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("crl.pem");
        let r = Revocations::new();
        r.persist_to(file.clone(), ca_der.to_vec());

        let first = ca.revocation_list(1, &[]).expect("crl");
        let written = |r: &Revocations| {
            r.write_file();
            let on_disk = std::fs::read_to_string(&file).expect("written");
            Crl::from_pem(&on_disk, &ca_der)
                .expect("valid on disk")
                .number()
        };
        assert_eq!(r.offer(&first, &ca_der).expect("valid"), Offered::TakenUp);
        let second = ca.revocation_list(2, &[entry]).expect("crl");
        assert_eq!(r.offer(&second, &ca_der).expect("valid"), Offered::TakenUp);
        assert!(r.refuses(&id, &serial));
        // An older list does not undo a revocation.
        assert_eq!(r.offer(&first, &ca_der).expect("valid"), Offered::NotNewer);
        assert!(r.refuses(&id, &serial));
        assert!(!r.refuses(&id, b"another certificate"));
        // A forged one is refused outright.
        let other = Ca::generate("t").expect("ca");
        let forged = other.revocation_list(99, &[]).expect("crl");
        assert!(r.offer(&forged, &ca_der).is_err());
        assert_eq!(r.crl().map(|c| c.number()), Some(2));

        assert_eq!(written(&r), 2);
    }
}
