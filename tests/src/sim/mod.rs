//! A deterministic network of sync sessions over real stores, raft-harness style.
//!
//! Nodes are [`Store`]s (on tmpfs when the machine has one); links are pairs of
//! [`Session`]s with a frame queue each way. The harness delivers, drops, duplicates and
//! reorders frames, cuts and restores links and restarts nodes from their stores, all from
//! one seed, with no sockets and no timers. Session outputs are carried out by the node's
//! own executor (`tidesync::net::exec`, writes awaited in turn), so the simulation runs
//! what the driver runs. The stores' early notices reach the sessions before the feed
//! moves, as in the driver, and chaos replays stale ones. After
//! [`Net::heal`] every link is fresh and every frame delivered, so a correct protocol
//! converges.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use automerge::ReadDoc;
use serde_json::json;
use tidesync::model::{DocId, Grants, Identity, Namespace, NodeId, Role};
use tidesync::net::exec::{Exec, ExecError, Outbox, Writes};
use tidesync::net::PeerCounters;
use tidesync::store::{Store, StoreConfig};
use tidesync::sync::{EarlyDoc, Message, Session, SessionConfig};
use tokio::sync::broadcast;

use crate::Rng;

/// One node: a store that survives restarts.
#[derive(Debug)]
pub struct SimNode {
    /// The node's id.
    pub id: NodeId,
    /// Edge or hub (an edge must have one link only: it talks to one hub at a time).
    pub role: Role,
    path: PathBuf,
    /// Open while the node runs.
    pub store: Option<Store>,
    /// The store's early notices, while it runs.
    early: Option<broadcast::Receiver<Arc<[EarlyDoc]>>>,
    /// Notices already delivered, kept to replay late.
    old_early: VecDeque<Arc<[EarlyDoc]>>,
    /// Change hashes of every write the store acknowledged, with the document.
    pub acked: Vec<(Namespace, DocId, automerge::ChangeHash)>,
    /// The last copy of the file (see [`Net::copy_file`]).
    copy: Option<Copied>,
}

/// What a copy of a node's file holds.
#[derive(Debug, Clone, Copy)]
struct Copied {
    /// Its feed epoch and last position.
    epoch: u128,
    last_seq: u64,
}

/// A connection between two nodes: `sessions[0]` runs at `ends[0]`.
#[derive(Debug)]
struct Link {
    ends: [usize; 2],
    sessions: [Option<Session>; 2],
    /// Frames in flight towards `ends[i]`.
    queues: [VecDeque<Message>; 2],
}

/// The network.
#[derive(Debug)]
pub struct Net {
    /// The nodes.
    pub nodes: Vec<SimNode>,
    links: Vec<Link>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    /// Frames delivered so far.
    pub delivered: u64,
    /// Sync messages sent from early notices, ahead of their commit.
    pub early_sent: u64,
    /// Nodes killed between a write's early notice and its commit.
    pub killed_in_commit: u64,
    /// Nodes restored from an old copy of their file.
    pub restored: u64,
    /// Feed epochs renewed (restores, and feeds found gone back).
    pub epochs_renewed: u64,
    /// Of those, found by a peer's cursor past the feed's end.
    pub went_back_found: u64,
}

const NAMESPACES: [&str; 2] = ["alpha", "beta"];
const DOCS: usize = 4;

impl Net {
    /// A node of each role in `roles`, with links `edges`.
    pub fn new(roles: &[Role], edges: &[(usize, usize)]) -> Result<Self> {
        let dir = match tempfile::Builder::new()
            .prefix("tidesync-sim")
            .tempdir_in("/dev/shm")
        {
            Ok(d) => d,
            Err(_) => tempfile::tempdir()?,
        };
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let mut nodes = Vec::new();
        for (i, &role) in roles.iter().enumerate() {
            let path = dir.path().join(format!("n{i}.redb"));
            let store = Store::open(&path, sim_store_config())?;
            nodes.push(SimNode {
                id: NodeId::new(format!("n{i}"))?,
                role,
                path,
                early: Some(store.subscribe_early()),
                old_early: VecDeque::new(),
                store: Some(store),
                acked: Vec::new(),
                copy: None,
            });
        }
        let links = edges
            .iter()
            .map(|&(a, b)| Link {
                ends: [a, b],
                sessions: [None, None],
                queues: [VecDeque::new(), VecDeque::new()],
            })
            .collect();
        let mut net = Self {
            nodes,
            links,
            rt,
            _dir: dir,
            delivered: 0,
            early_sent: 0,
            killed_in_commit: 0,
            restored: 0,
            epochs_renewed: 0,
            went_back_found: 0,
        };
        for l in 0..net.links.len() {
            net.connect(l)?;
        }
        Ok(net)
    }

    /// A local write at `node`: one field of one document.
    pub fn write(&mut self, node: usize, rng: &mut Rng) -> Result<()> {
        let Some(store) = self.nodes[node].store.clone() else {
            return Ok(());
        };
        let (ns, id, patch) = random_patch(rng)?;
        let out = self.rt.block_on(store.patch(&ns, &id, patch, None))?;
        if out.changed {
            // A local change depends on every current head, so it is the only head after.
            if let [h] = out.heads[..] {
                self.nodes[node].acked.push((ns, id, h));
            } else {
                bail!("a local write left {} heads", out.heads.len());
            }
        }
        self.notify(node)
    }

    /// A local write that `node` dies during: killed after its store sent the early notice
    /// and before the batch was written. The sessions there get the notice (as the driver
    /// would, racing the commit) and what they send is in flight: it arrives at the peers.
    /// Then the node restarts from its file as the kill left it. The write was never
    /// acknowledged, so it may be lost; but whatever a peer took from it must then come
    /// back, or the two never converge.
    pub fn crash_during_write(&mut self, node: usize, rng: &mut Rng) -> Result<()> {
        let Some(store) = self.nodes[node].store.clone() else {
            return Ok(());
        };
        let path = self.nodes[node].path.clone();
        let image = path.with_extension("killed");
        let (from, to) = (path.clone(), image.clone());
        store.at_next_early_notice(move || std::fs::copy(&from, &to).is_ok());
        let (ns, id, patch) = random_patch(rng)?;
        let written = self.rt.block_on(store.patch(&ns, &id, patch, None));
        drop(store);
        if written.is_ok() {
            // Nothing changed, so no notice and no crash: disarm, and carry on.
            if let Some(s) = &self.nodes[node].store {
                s.at_next_early_notice(|| false);
            }
            return self.notify(node);
        }
        self.killed_in_commit += 1;
        // The notice reaches the sessions; the store is dead, so only what they send from
        // memory and reads gets out.
        let mut notices = Vec::new();
        if let Some(rx) = self.nodes[node].early.as_mut() {
            while let Ok(docs) = rx.try_recv() {
                notices.push(docs);
            }
        }
        let store = self.nodes[node].store.clone().context("running")?;
        for l in 0..self.links.len() {
            for side in 0..2 {
                if self.links[l].ends[side] != node {
                    continue;
                }
                let Some(session) = self.links[l].sessions[side].as_mut() else {
                    continue;
                };
                for docs in &notices {
                    for d in docs.iter() {
                        session.handle_early(d);
                    }
                }
                // Writes fail: the process is gone. What was queued still went out.
                let _ = self.drain(l, side, &store);
                // Killed: nothing more at this end; what is in flight arrives.
                let link = &mut self.links[l];
                link.sessions[side] = None;
                link.queues[side].clear();
                while !self.links[l].queues[1 - side].is_empty() {
                    self.deliver(l, 1 - side, 0)?;
                }
                self.disconnect(l);
            }
        }
        drop(store);
        self.nodes[node].store = None;
        self.nodes[node].early = None;
        self.nodes[node].old_early.clear();
        std::fs::rename(&image, &path).context("the killed node's file")?;
        self.start(node)
    }

    /// Copies `node`'s file as it is now (as a backup or disk image of the running node
    /// would), for [`Net::restore_copy`].
    pub fn copy_file(&mut self, node: usize) -> Result<()> {
        let Some(store) = &self.nodes[node].store else {
            return Ok(());
        };
        let copy = Copied {
            epoch: store.feed_epoch(),
            last_seq: store.last_seq().0,
        };
        let path = &self.nodes[node].path;
        std::fs::copy(path, path.with_extension("copy")).context("copying a node's file")?;
        self.nodes[node].copy = Some(copy);
        Ok(())
    }

    /// Stops `node` and starts it again from its last copy: it lacks every write since
    /// the copy. Writes that no node holds any more are lost with it; the rest must come
    /// back. Two cases:
    /// - A peer holds a cursor past the copy's feed end: restored as a disk image would
    ///   be, under the same feed epoch. The restored node's first hellos arrive before
    ///   anything else it does, so that peer finds the feed gone back while it is still
    ///   behind, and the node moves to a new epoch.
    /// - Otherwise nothing shows that the feed went back (peers' sync states may still
    ///   claim changes it lost): restored as a restore of a backup is, which moves the
    ///   node to a new feed epoch before it connects.
    pub fn restore_copy(&mut self, node: usize) -> Result<()> {
        let Some(copy) = self.nodes[node].copy else {
            return Ok(());
        };
        let me = self.nodes[node].id.clone();
        let shows = self
            .nodes
            .iter()
            .filter_map(|n| n.store.as_ref())
            .filter_map(|s| s.peer_cursor(&me).ok().flatten())
            .any(|c| c.epoch == copy.epoch && c.seq > copy.last_seq);
        for l in 0..self.links.len() {
            if self.links[l].ends.contains(&node) {
                self.disconnect(l);
            }
        }
        self.nodes[node].store = None;
        self.nodes[node].early = None;
        self.nodes[node].old_early.clear();
        let path = self.nodes[node].path.clone();
        std::fs::copy(path.with_extension("copy"), &path).context("restoring a copy")?;
        self.restored += 1;
        self.start(node)?;
        self.forget_lost_writes();
        if !shows {
            return self.new_epoch(node);
        }
        for l in 0..self.links.len() {
            if self.links[l].ends.contains(&node) {
                for dir in 0..2 {
                    if matches!(self.links[l].queues[dir].front(), Some(Message::Hello(_))) {
                        self.deliver(l, dir, 0)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies `node`'s file (unless it has a copy), writes at it, lets its links carry the
    /// write to its neighbours over fresh connections, then restores the copy: the case where a peer holds a
    /// cursor past the copy's feed end, which random events alone reach only rarely.
    pub fn restore_after_catch_up(&mut self, node: usize, rng: &mut Rng) -> Result<()> {
        if self.nodes[node].store.is_none() {
            return Ok(());
        }
        if self.nodes[node].copy.is_none() {
            self.copy_file(node)?;
        }
        self.write(node, rng)?;
        // Fresh sessions on its links only: the chaos before may have dropped frames
        // inside a session, which only a new connection recovers from (QUIC never drops
        // them), and the other links are left as the history made them.
        for l in 0..self.links.len() {
            if self.links[l].ends.contains(&node) {
                self.disconnect(l);
                self.connect(l)?;
            }
        }
        self.deliver_until_quiet(1_000_000, Some(node))?;
        self.restore_copy(node)
    }

    /// After a restore: acknowledged writes that no node holds any more (the restored one
    /// had them alone, or only nodes restored since) are lost with the copies; every other
    /// one must reach every node.
    fn forget_lost_writes(&mut self) {
        let stores: Vec<Store> = self.nodes.iter().filter_map(|n| n.store.clone()).collect();
        for node in &mut self.nodes {
            node.acked
                .retain(|(ns, id, hash)| stores.iter().any(|s| holds_change(s, ns, id, hash)));
        }
    }

    /// Moves `node` to a new feed epoch and reconnects its links, as the node does when a
    /// peer finds its feed gone back.
    fn new_epoch(&mut self, node: usize) -> Result<()> {
        let Some(store) = self.nodes[node].store.clone() else {
            return Ok(());
        };
        self.rt.block_on(store.renew_feed_epoch())?;
        self.epochs_renewed += 1;
        for l in 0..self.links.len() {
            if self.links[l].ends.contains(&node) {
                self.disconnect(l);
                self.connect(l)?;
            }
        }
        Ok(())
    }

    /// One random network event: mostly in-order delivery, sometimes chaos.
    pub fn step(&mut self, rng: &mut Rng, chaos: bool) -> Result<()> {
        let l = rng.range(0, self.links.len() as u64) as usize;
        let dir = rng.range(0, 2) as usize;
        let roll = rng.range(0, 100);
        if !chaos || roll < 80 {
            return self.deliver(l, dir, 0);
        }
        let q = &mut self.links[l].queues[dir];
        match roll {
            80..=85 if q.len() > 1 => {
                let i = rng.range(1, q.len() as u64) as usize;
                self.deliver(l, dir, i)
            }
            86..=89 => {
                if let Some(m) = q.front().cloned() {
                    q.push_front(m);
                }
                self.deliver(l, dir, 0)
            }
            90..=93 => {
                q.pop_front();
                Ok(())
            }
            94..=96 => {
                self.disconnect(l);
                Ok(())
            }
            97 => self.connect(l),
            98 => {
                let node = self.links[l].ends[dir];
                let old = &self.nodes[node].old_early;
                match old.get(rng.range(0, old.len().max(1) as u64) as usize) {
                    Some(docs) => {
                        let docs = docs.clone();
                        self.deliver_early(node, &docs)
                    }
                    None => Ok(()),
                }
            }
            _ => self.restart(self.links[l].ends[dir]),
        }
    }

    /// Restarts every link (fresh sessions from the stores) and delivers everything.
    pub fn heal(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].store.is_none() {
                self.start(i)?;
            }
        }
        for l in 0..self.links.len() {
            self.disconnect(l);
            self.connect(l)?;
        }
        self.run_until_quiet(1_000_000)
    }

    /// Delivers frames in order until none is left; fails after `max` frames.
    pub fn run_until_quiet(&mut self, max: u64) -> Result<()> {
        self.deliver_until_quiet(max, None)
    }

    /// Delivers frames in order on the links of `node` (or all links) until none is left
    /// there; fails after `max` frames.
    fn deliver_until_quiet(&mut self, max: u64, node: Option<usize>) -> Result<()> {
        let mut budget = max;
        loop {
            let mut any = false;
            for l in 0..self.links.len() {
                if node.is_some_and(|n| !self.links[l].ends.contains(&n)) {
                    continue;
                }
                for dir in 0..2 {
                    while !self.links[l].queues[dir].is_empty() {
                        any = true;
                        self.deliver(l, dir, 0)?;
                        budget = budget
                            .checked_sub(1)
                            .context("no quiescence: too many frames")?;
                    }
                }
            }
            if !any {
                return Ok(());
            }
        }
    }

    /// Checks that every node holds the same heads and content for every document, and
    /// every acknowledged write.
    pub fn check_converged(&self) -> Result<()> {
        let stores: Vec<&Store> = self.nodes.iter().filter_map(|n| n.store.as_ref()).collect();
        for ns in NAMESPACES {
            let ns = Namespace::new(ns)?;
            // Feed positions are local; ids, heads and tombstones must agree.
            let summary = |s: &Store| -> Result<Vec<_>> {
                Ok(s.list(&ns)?
                    .into_iter()
                    .map(|d| (d.id, d.heads, d.deleted))
                    .collect())
            };
            let first = summary(stores[0])?;
            for (i, s) in stores.iter().enumerate().skip(1) {
                let other = summary(s)?;
                if first != other {
                    bail!("node {i} differs in {ns}: {other:?} vs node 0: {first:?}");
                }
            }
            for (id, _, _) in &first {
                let content =
                    |s: &Store| -> Result<_> { Ok(s.get(&ns, id)?.map(|d| (d.content, d.heads))) };
                let c0 = content(stores[0])?;
                for (i, s) in stores.iter().enumerate().skip(1) {
                    if content(s)? != c0 {
                        bail!("node {i} content of {ns}/{id} differs");
                    }
                }
            }
        }
        for node in &self.nodes {
            for (ns, id, hash) in &node.acked {
                for (i, s) in stores.iter().enumerate() {
                    let bytes = s.export(ns, id)?.context("acked doc missing")?.bytes;
                    let doc = automerge::Automerge::load(&bytes)?;
                    if doc.get_change_by_hash(hash).is_none() {
                        bail!("node {i} lacks write {hash} of {} to {ns}/{id}", node.id);
                    }
                }
            }
        }
        Ok(())
    }

    fn deliver(&mut self, l: usize, dir: usize, index: usize) -> Result<()> {
        let Some(msg) = self.links[l].queues[dir].remove(index) else {
            return Ok(());
        };
        self.delivered += 1;
        let Some(session) = self.links[l].sessions[dir].as_mut() else {
            return Ok(());
        };
        if let Err(e) = session.handle_message(msg) {
            // A protocol error closes the connection, as the driver does, after the error
            // frame (and whatever was queued before it) reached the other end.
            self.links[l].sessions[dir] = None;
            self.links[l].queues[dir].clear();
            let other = 1 - dir;
            self.links[l].queues[other].push_back(e.to_message());
            while self.links[l].sessions[dir].is_none() && !self.links[l].queues[other].is_empty() {
                self.deliver(l, other, 0)?;
            }
            if self.links[l].sessions[dir].is_none() {
                self.disconnect(l);
            }
            return Ok(());
        }
        if session.feed_went_back() {
            self.went_back_found += 1;
            return self.new_epoch(self.links[l].ends[dir]);
        }
        self.drive(l, dir)
    }

    fn connect(&mut self, l: usize) -> Result<()> {
        if self.links[l].sessions.iter().any(Option::is_some) {
            return Ok(());
        }
        let ends = self.links[l].ends;
        if ends.iter().any(|&n| self.nodes[n].store.is_none()) {
            return Ok(());
        }
        for side in 0..2 {
            let (me, peer) = (ends[side], ends[1 - side]);
            let store = self.nodes[me].store.as_ref().context("running")?;
            let cfg = SessionConfig::new(
                self.nodes[me].id.clone(),
                self.nodes[me].role,
                store.feed_epoch(),
            );
            let identity = Identity {
                node_id: self.nodes[peer].id.clone(),
                role: self.nodes[peer].role,
                grants: Grants::everything(),
            };
            let record = store.peer_cursor(&self.nodes[peer].id)?;
            self.links[l].sessions[side] =
                Some(Session::new(cfg, identity, record, store.last_seq()));
        }
        self.drive(l, 0)?;
        self.drive(l, 1)
    }

    fn disconnect(&mut self, l: usize) {
        self.links[l].sessions = [None, None];
        self.links[l].queues = [VecDeque::new(), VecDeque::new()];
    }

    fn restart(&mut self, node: usize) -> Result<()> {
        for l in 0..self.links.len() {
            if self.links[l].ends.contains(&node) {
                self.disconnect(l);
            }
        }
        self.nodes[node].store = None; // closes the database
        self.nodes[node].early = None;
        self.nodes[node].old_early.clear();
        self.start(node)
    }

    fn start(&mut self, node: usize) -> Result<()> {
        let store = Store::open(&self.nodes[node].path, sim_store_config())?;
        self.nodes[node].early = Some(store.subscribe_early());
        self.nodes[node].store = Some(store);
        for l in 0..self.links.len() {
            if self.links[l].ends.contains(&node) {
                self.connect(l)?;
            }
        }
        Ok(())
    }

    /// Hands `docs`, an early notice of `node`'s store, to every session there.
    fn deliver_early(&mut self, node: usize, docs: &[EarlyDoc]) -> Result<()> {
        if self.nodes[node].store.is_none() {
            return Ok(());
        }
        let early_sent = |net: &Self, l: usize, side: usize| {
            net.links[l].sessions[side]
                .as_ref()
                .map_or(0, |s| s.stats().early_sent)
        };
        for l in 0..self.links.len() {
            for side in 0..2 {
                if self.links[l].ends[side] != node {
                    continue;
                }
                let before = early_sent(self, l, side);
                if let Some(s) = self.links[l].sessions[side].as_mut() {
                    for d in docs {
                        s.handle_early(d);
                    }
                }
                self.drive(l, side)?;
                self.early_sent += early_sent(self, l, side).saturating_sub(before);
            }
        }
        Ok(())
    }

    /// Tells every session at `node` that its store moved, and drives them: the store's
    /// early notices first, as the driver sees them, then the feed.
    fn notify(&mut self, node: usize) -> Result<()> {
        let mut notices = Vec::new();
        if let Some(rx) = self.nodes[node].early.as_mut() {
            while let Ok(docs) = rx.try_recv() {
                notices.push(docs);
            }
        }
        for docs in notices {
            self.deliver_early(node, &docs)?;
            let old = &mut self.nodes[node].old_early;
            old.push_back(docs);
            if old.len() > 8 {
                old.pop_front();
            }
        }
        let Some(last) = self.nodes[node].store.as_ref().map(Store::last_seq) else {
            return Ok(());
        };
        for l in 0..self.links.len() {
            for side in 0..2 {
                if self.links[l].ends[side] == node {
                    if let Some(s) = self.links[l].sessions[side].as_mut() {
                        s.handle_feed_advanced(last);
                    }
                    self.drive(l, side)?;
                }
            }
        }
        Ok(())
    }

    /// Carries out the outputs of the session at `ends[side]` of link `l`, through the
    /// node's executor; a protocol error closes the link, as the driver does.
    fn drive(&mut self, l: usize, side: usize) -> Result<()> {
        let node = self.links[l].ends[side];
        let Some(store) = self.nodes[node].store.clone() else {
            return Ok(());
        };
        let before = store.last_seq();
        match self.drain(l, side, &store) {
            Ok(()) => {}
            Err(ExecError::Protocol(_)) => self.disconnect(l),
            Err(e) => return Err(e.into()),
        }
        if store.last_seq() != before {
            self.notify(node)?;
        }
        Ok(())
    }

    /// Hands the outputs of the session at `ends[side]` of link `l` to `store`'s executor,
    /// writes awaited in turn; its frames go to the link's queue towards the other end.
    fn drain(&mut self, l: usize, side: usize, store: &Store) -> Result<(), ExecError> {
        let link = &mut self.links[l];
        let Some(session) = link.sessions[side].as_mut() else {
            return Ok(());
        };
        let counters = PeerCounters::default();
        let exec = Exec {
            store,
            counters: &counters,
            replicas: None,
        };
        let mut outbox = Frames(&mut link.queues[1 - side]);
        self.rt
            .block_on(exec.drain(session, &mut outbox, &mut Writes::Inline))
    }
}

/// A link's queue towards the other end, as a session's outbox.
struct Frames<'a>(&'a mut VecDeque<Message>);

impl Outbox for Frames<'_> {
    async fn send(&mut self, msg: Message) -> Result<(), ExecError> {
        self.0.push_back(msg);
        Ok(())
    }
}

/// Whether `store`'s copy of `ns/id` holds the change `hash`.
fn holds_change(store: &Store, ns: &Namespace, id: &DocId, hash: &automerge::ChangeHash) -> bool {
    store
        .export(ns, id)
        .ok()
        .flatten()
        .and_then(|d| automerge::Automerge::load(&d.bytes).ok())
        .is_some_and(|doc| doc.get_change_by_hash(hash).is_some())
}

/// One field of one document, at random.
fn random_patch(rng: &mut Rng) -> Result<(Namespace, DocId, serde_json::Value)> {
    let ns = Namespace::new(NAMESPACES[rng.range(0, 2) as usize])?;
    let id = DocId::new(format!("d{}", rng.range(0, DOCS as u64)))?;
    let field = format!("f{}", rng.range(0, 3));
    let value = rng.range(0, 1000);
    Ok((ns, id, json!({ field: value })))
}

fn sim_store_config() -> StoreConfig {
    StoreConfig {
        doc_cache_bytes: 1 << 20,
        redb_cache_bytes: 1 << 20,
        ..StoreConfig::default()
    }
}
