//! A session's consistency audits: the one this node started with the peer and the one it
//! answers, each a [`Reconciler`] plus the repairs it found. A repair is the normal
//! per-document sync, started from a fresh sync state so the stored one (which may claim
//! the peer holds what it does not) cannot hide the difference; it is done once the peer
//! holds this node's version.

use std::collections::{HashSet, VecDeque};

use super::{DocKey, Offer, Phase, Session};
use crate::error::ProtocolError;
use crate::model::{Namespace, NsPattern};
use crate::sync::audit::{AuditFault, RangePrint, Reconciler, Step};
use crate::sync::{Event, Message, Output};

/// Most namespace patterns an audit may name.
pub const MAX_AUDIT_PATTERNS: usize = 64;

/// Which documents an audit compares, judged without the session: the driver reads and
/// hashes them off the connection's task ([`Output::LoadAuditItems`]).
#[derive(Clone, Debug)]
pub struct AuditScope {
    /// The namespace patterns asked for.
    pub patterns: Vec<NsPattern>,
    /// Keys the audit's hashes.
    pub salt: u64,
    peer_subscriptions: Vec<NsPattern>,
    my_subscriptions: Vec<NsPattern>,
    peer_grants: crate::model::Grants,
}

impl AuditScope {
    /// Whether documents of `ns` are compared: asked for, and synced between the two
    /// sides either way (the peer subscribes and may read, or this node subscribes and
    /// the peer may write).
    pub fn includes(&self, ns: &Namespace) -> bool {
        let asked = self.patterns.iter().any(|p| p.matches(ns));
        let to_peer =
            self.peer_subscriptions.iter().any(|p| p.matches(ns)) && self.peer_grants.can_read(ns);
        let from_peer =
            self.my_subscriptions.iter().any(|p| p.matches(ns)) && self.peer_grants.can_write(ns);
        asked && (to_peer || from_peer)
    }
}

/// What an audit this node started found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Documents compared on this side.
    pub compared: u64,
    /// Documents found differing (by either side).
    pub differing: u64,
    /// Of those, documents now the same on both sides.
    pub repaired: u64,
    /// Round trips of the reconciliation.
    pub rounds: u32,
    /// Bytes of audit messages, both ways (repairs are normal sync traffic).
    pub bytes: u64,
}

#[derive(Default)]
pub(super) struct Audits {
    next_id: u32,
    mine: Option<Run>,
    theirs: Option<Run>,
    /// The audit this node started stands in for walking its whole feed to the peer.
    covering: bool,
    /// The walk falls back to the start once the feed read under way is answered.
    rewind: bool,
    /// Repairs waiting for room, and those under way (sent from a fresh state).
    queue: VecDeque<DocKey>,
    active: HashSet<DocKey>,
}

struct Run {
    id: u32,
    /// Keys the audit's hashes (see [`crate::sync::audit::RangePrint`]).
    salt: u64,
    namespaces: Vec<NsPattern>,
    /// `None` while this side's items load.
    rec: Option<Reconciler>,
    /// The peer's opening fingerprint, until the items are loaded.
    opening: Option<RangePrint>,
    /// No claims are left either way.
    reconciled: bool,
    /// Documents this side sends that the peer does not hold yet.
    repairing: HashSet<DocKey>,
    repaired: u64,
    rounds: u32,
    bytes: u64,
    /// The answering side's count of what it found and repaired (started runs only).
    peer_end: Option<(u64, u64)>,
}

impl Run {
    fn new(id: u32, salt: u64, namespaces: Vec<NsPattern>) -> Self {
        Self {
            id,
            salt,
            namespaces,
            rec: None,
            opening: None,
            reconciled: false,
            repairing: HashSet::new(),
            repaired: 0,
            rounds: 0,
            bytes: 0,
            peer_end: None,
        }
    }
}

impl Session {
    /// Starts an audit of what this node and the peer hold in `namespaces` (within what
    /// they share): answered with [`Event::AuditDone`] once every difference found is
    /// repaired, or [`Event::AuditFailed`]. One at a time; `None` if one is running.
    /// `salt` must be random: it keys the audit's hashes.
    pub fn start_audit(&mut self, namespaces: Vec<NsPattern>, salt: u64) -> Option<u32> {
        if self.audits.mine.is_some() || self.peer_hello.is_none() {
            return None;
        }
        let namespaces = if namespaces.is_empty() {
            vec![NsPattern::all()]
        } else {
            namespaces
        };
        self.audits.next_id = self.audits.next_id.wrapping_add(1);
        let id = self.audits.next_id;
        self.audits.mine = Some(Run::new(id, salt, namespaces.clone()));
        self.load_audit_items(true, namespaces, salt);
        Some(id)
    }

    fn load_audit_items(&mut self, starter: bool, patterns: Vec<NsPattern>, salt: u64) {
        let scope = AuditScope {
            patterns,
            salt,
            peer_subscriptions: self
                .peer_hello
                .as_ref()
                .map(|h| h.subscriptions.clone())
                .unwrap_or_default(),
            my_subscriptions: self.cfg.subscriptions.clone(),
            peer_grants: self.peer.grants.clone(),
        };
        self.outputs
            .push_back(Output::LoadAuditItems { starter, scope });
    }

    /// The answer to [`Output::LoadAuditItems`]: a [`Reconciler`] over the documents of
    /// the scope, hashed with its salt.
    pub fn handle_audit_items(&mut self, starter: bool, mut rec: Reconciler) {
        let Some(run) = self.run(starter) else {
            return;
        };
        if starter {
            let msg = Message::AuditStart {
                audit: run.id,
                namespaces: run.namespaces.clone(),
                salt: run.salt,
                root: rec.opening(),
            };
            run.rec = Some(rec);
            run.rounds += 1;
            run.bytes += msg.wire_len();
            self.outputs.push_back(Output::Send(msg));
        } else {
            let root = run.opening.take().unwrap_or_default();
            let step = rec.answer_opening(root);
            run.rec = Some(rec);
            self.send_step(false, step);
        }
        self.check_audits();
        self.progress();
    }

    /// The driver will not load the items of the peer's audit now (one came too soon).
    pub fn refuse_audit(&mut self, reason: &str) {
        self.refuse_theirs(reason);
    }

    /// Whether an audit stands in for walking the feed to the peer up to the position of
    /// the hello: until it is done, `Synced` tells the peer nothing new, so a connection
    /// lost meanwhile leaves the peer's stale cursor, and the next connection tries again.
    pub fn auditing_instead_of_walking(&self) -> bool {
        self.audits.covering
    }

    /// Starts the audit that replaces the walk (see [`SessionConfig::audit_salt`]).
    pub(super) fn audit_instead_of_walking(&mut self, salt: u64) {
        if self.start_audit(Vec::new(), salt).is_some() {
            self.audits.covering = true;
        } else {
            self.walk_after_all();
        }
    }

    /// The audit could not stand in for the walk: walk the whole feed after all.
    fn walk_after_all(&mut self) {
        self.audits.covering = false;
        if self.reading {
            // The read under way ends where the walk skipped to: its answer is dropped
            // and the walk starts over then (see `Session::handle_feed`).
            self.audits.rewind = true;
        } else {
            self.walked = crate::model::FeedSeq(0);
        }
        self.synced_sent = crate::model::FeedSeq(0);
        self.progress();
    }

    /// Whether a feed read's answer is to be dropped for a walk from the start; clears it.
    pub(super) fn take_rewind(&mut self) -> bool {
        std::mem::take(&mut self.audits.rewind)
    }

    fn refuse_theirs(&mut self, reason: &str) {
        if let Some(id) = self.audits.theirs.as_ref().map(|r| r.id) {
            self.drop_run(false);
            self.send_refusal(id, false, reason);
        }
    }

    /// Ends an audit this side cannot finish, telling the peer.
    fn give_up(&mut self, starter: bool, reason: &str) {
        if !starter {
            self.refuse_theirs(reason);
            return;
        }
        if let Some(id) = self.audits.mine.as_ref().map(|r| r.id) {
            self.send_refusal(id, true, reason);
        }
        self.fail_mine(reason.to_owned());
    }

    /// Tells the peer this side will not go on with audit `id`.
    fn send_refusal(&mut self, audit: u32, from_starter: bool, reason: &str) {
        self.outputs.push_back(Output::Send(Message::AuditEnd {
            audit,
            from_starter,
            found: 0,
            repaired: 0,
            refused: Some(reason.to_owned()),
        }));
    }

    /// The audit this node started failed: the node is told, or, if it stood in for the
    /// walk, the feed is walked after all.
    fn fail_mine(&mut self, reason: String) {
        self.drop_run(true);
        if self.audits.covering {
            self.walk_after_all();
            return;
        }
        self.outputs
            .push_back(Output::Event(Event::AuditFailed { reason }));
    }

    /// Forgets a run and the repairs it queued (those under way finish as normal sync).
    fn drop_run(&mut self, starter: bool) {
        let run = if starter {
            self.audits.mine.take()
        } else {
            self.audits.theirs.take()
        };
        if let Some(run) = run {
            self.audits.queue.retain(|k| !run.repairing.contains(k));
            self.audits.active.retain(|k| !run.repairing.contains(k));
        }
    }

    /// Gives up the audits that have run longer than the driver allows (a peer that
    /// stopped answering); one that stood in for the walk falls back to it.
    pub fn abandon_audits(&mut self) {
        if self.audits.theirs.is_some() {
            self.refuse_theirs("the audit took too long");
        }
        if self.audits.mine.is_some() {
            self.give_up(true, "the audit took too long");
        }
        self.progress();
    }

    /// Gives up the audit this node started (whoever asked stopped waiting).
    pub fn cancel_audit(&mut self) {
        if self.audits.mine.is_some() && !self.audits.covering {
            self.give_up(true, "nobody waits for it any more");
            self.progress();
        }
    }

    /// Whether an audit runs, started by either side.
    pub fn audit_running(&self) -> bool {
        self.audits.mine.is_some() || self.audits.theirs.is_some()
    }

    fn run(&mut self, starter: bool) -> Option<&mut Run> {
        if starter {
            self.audits.mine.as_mut()
        } else {
            self.audits.theirs.as_mut()
        }
    }

    pub(super) fn on_audit_start(
        &mut self,
        audit: u32,
        namespaces: Vec<NsPattern>,
        salt: u64,
        root: RangePrint,
    ) -> Result<(), ProtocolError> {
        if namespaces.len() > MAX_AUDIT_PATTERNS {
            return Err(ProtocolError::protocol("too many namespaces in an audit"));
        }
        if self.audits.theirs.is_some() {
            self.send_refusal(audit, false, "an audit by this peer is already running");
            return Ok(());
        }
        let mut run = Run::new(audit, salt, namespaces.clone());
        run.opening = Some(root);
        self.audits.theirs = Some(run);
        self.load_audit_items(false, namespaces, salt);
        Ok(())
    }

    /// A step of the peer's, `wire_len` bytes on the wire.
    pub(super) fn on_audit_step(
        &mut self,
        audit: u32,
        from_starter: bool,
        step: Step,
        wire_len: u64,
    ) -> Result<(), ProtocolError> {
        // A step from the starter belongs to the audit this node answers, and back.
        let starter = !from_starter;
        let Some(run) = self.run(starter).filter(|r| r.id == audit && !r.reconciled) else {
            // A step of an audit that ended or was refused.
            return Ok(());
        };
        let Some(rec) = run.rec.as_mut() else {
            return Err(ProtocolError::protocol(
                "an audit step before the audit started",
            ));
        };
        if starter {
            run.bytes += wire_len;
        }
        let reply = match rec.answer(&step) {
            Ok(reply) => reply,
            Err(AuditFault::Peer(e)) => return Err(e),
            Err(AuditFault::TooManyDifferences) => {
                self.give_up(
                    starter,
                    "too many differences for one audit: audit fewer namespaces at a time",
                );
                return Ok(());
            }
        };
        let to_send = rec.take_to_send();
        match reply {
            Some(reply) => self.send_step(starter, reply),
            None => {
                if let Some(run) = self.run(starter) {
                    run.reconciled = true;
                }
            }
        }
        for key in to_send {
            self.repair(starter, key);
        }
        self.check_audits();
        Ok(())
    }

    /// The peer's `AuditEnd`, `wire_len` bytes on the wire.
    pub(super) fn on_audit_end(
        &mut self,
        audit: u32,
        from_starter: bool,
        found: u64,
        repaired: u64,
        refused: Option<String>,
        wire_len: u64,
    ) {
        if from_starter {
            // The starter gave up on the audit this node answers.
            if self.audits.theirs.as_ref().is_some_and(|r| r.id == audit) {
                self.drop_run(false);
            }
            return;
        }
        let Some(run) = self.audits.mine.as_mut().filter(|r| r.id == audit) else {
            return;
        };
        run.bytes += wire_len;
        if let Some(reason) = refused {
            self.fail_mine(reason);
            return;
        }
        run.peer_end = Some((found, repaired));
        self.check_audits();
    }

    /// Sends this side's step in an audit; one with no answers ends the comparison.
    fn send_step(&mut self, starter: bool, step: Step) {
        let Some(run) = self.run(starter) else {
            return;
        };
        run.reconciled = step.answers.is_empty();
        let msg = Message::AuditStep {
            audit: run.id,
            from_starter: starter,
            step,
        };
        if starter {
            run.rounds += 1;
            run.bytes += msg.wire_len();
        }
        self.outputs.push_back(Output::Send(msg));
    }

    /// Sends this node's version of a document the audit found differing, if the peer
    /// takes it (else the difference stays found and unrepaired: the peer may not read it,
    /// or does not subscribe to it).
    fn repair(&mut self, starter: bool, key: DocKey) {
        if !self.wants(&key.0) {
            return;
        }
        let Some(run) = self.run(starter) else {
            return;
        };
        if run.repairing.insert(key.clone()) {
            self.audits.queue.push_back(key);
        }
    }

    /// Starts queued repairs while fewer than the in-flight window are under way.
    pub(super) fn pump_repairs(&mut self) {
        while self.audits.active.len() < self.cfg.max_docs_in_flight {
            let Some(key) = self.audits.queue.pop_front() else {
                break;
            };
            if !self.audits.active.insert(key.clone()) {
                continue;
            }
            let entry = self.docs.entry(key.clone()).or_default();
            entry.fresh = true;
            if matches!(entry.offer, Offer::None | Offer::Early) {
                entry.offer = Offer::Repair;
            }
            if entry.phase == Phase::Idle {
                self.restart_fresh(&key);
            }
        }
    }

    /// Loads the document again to send it from a fresh sync state.
    pub(super) fn restart_fresh(&mut self, key: &DocKey) {
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        entry.state = None;
        entry.phase = Phase::Loading;
        self.outputs.push_back(Output::Load {
            ns: key.0.clone(),
            id: key.1.clone(),
        });
    }

    /// The peer holds this node's version of `key` (`held`: this node has the document),
    /// or the document is gone: a repair under way is over. Only a repair under way: before
    /// it, "the peer holds it" is judged from a state the audit does not trust.
    pub(super) fn audit_sent(&mut self, key: &DocKey, held: bool) {
        if self.audits.active.is_empty() || !self.audits.active.remove(key) {
            return;
        }
        for run in [self.audits.mine.as_mut(), self.audits.theirs.as_mut()]
            .into_iter()
            .flatten()
        {
            if run.repairing.remove(key) {
                run.repaired += u64::from(held);
            }
        }
        self.check_audits();
    }

    /// Ends the audits whose comparison and repairs are over.
    fn check_audits(&mut self) {
        let done = |r: &Run| r.rec.is_some() && r.reconciled && r.repairing.is_empty();
        if self.audits.theirs.as_ref().is_some_and(done) {
            if let Some(run) = self.audits.theirs.take() {
                let found = run.rec.as_ref().map_or(0, Reconciler::found);
                self.outputs.push_back(Output::Send(Message::AuditEnd {
                    audit: run.id,
                    from_starter: false,
                    found,
                    repaired: run.repaired,
                    refused: None,
                }));
            }
        }
        if self
            .audits
            .mine
            .as_ref()
            .is_some_and(|r| done(r) && r.peer_end.is_some())
        {
            if let Some(run) = self.audits.mine.take() {
                let (peer_found, peer_repaired) = run.peer_end.unwrap_or_default();
                let (compared, found) = run
                    .rec
                    .as_ref()
                    .map_or((0, 0), |r| (r.len() as u64, r.found()));
                self.outputs
                    .push_back(Output::Event(Event::AuditDone(AuditReport {
                        compared,
                        differing: found.saturating_add(peer_found),
                        repaired: run.repaired.saturating_add(peer_repaired),
                        rounds: run.rounds,
                        bytes: run.bytes,
                    })));
                if std::mem::take(&mut self.audits.covering) {
                    // The peer holds everything of the feed up to the hello.
                    self.advance_synced();
                }
            }
        }
    }
}
