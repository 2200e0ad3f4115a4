//! Carries out a session's outputs against the store: the one bridge between the sans-IO
//! [`Session`] and the node's [`Store`].
//!
//! The connection driver, the simulation and the engine's tests all run sessions through
//! [`Exec::drain`], so what they test is what runs. They differ only in where frames go
//! (an [`Outbox`]) and in how store writes run ([`Writes`]): the driver spawns them so that
//! several documents apply at once, while a deterministic harness awaits each in turn.
//!
//! Store reads (`ReadFeed`, `Load`, `LoadSyncState`) are answered at once; writes (`Apply`,
//! `SaveCursor`) are answered after their commit, through [`Exec::finish`].

use std::future::Future;
use std::sync::atomic::Ordering;

use tokio::task::JoinSet;

use super::counters::PeerCounters;
use super::replicas::Replicas;
use crate::error::StoreError;
use crate::model::{Cursor, DocId, Namespace, Priority, SyncPeer};
use crate::store::Store;
use crate::sync::audit::Reconciler;
use crate::sync::{Applied, Apply, Event, Message, Output, ProtocolError, Session};

/// Where a session's frames and events go.
pub trait Outbox {
    /// Queues one frame for the peer.
    fn send(&mut self, msg: Message) -> impl Future<Output = Result<(), ExecError>> + Send;

    /// Something the session reports (its counters are already kept): log it, or ignore it.
    fn event(&mut self, _event: Event) {}

    /// Queues whatever [`Outbox::send`] held back to send together: the session is done
    /// for now.
    fn flush(&mut self) -> Result<(), ExecError> {
        Ok(())
    }

    /// Whether more frames of this priority may be queued now; without room the session
    /// owes its messages instead of queueing them (see `Session::set_room`).
    fn has_room(&self, _priority: Priority) -> bool {
        true
    }
}

/// How [`Exec::drain`] runs store writes.
#[derive(Debug)]
pub enum Writes<'a> {
    /// Await each write and hand its result to the session before going on: deterministic,
    /// for simulations and tests.
    Inline,
    /// Spawn each write; the caller hands the results to [`Exec::finish`] as they come.
    Spawned(&'a mut JoinSet<WriteDone>),
}

/// A store write that finished, for [`Exec::finish`].
#[derive(Debug)]
pub enum WriteDone {
    /// A peer's sync message was applied (or refused).
    Applied {
        /// Namespace.
        ns: Namespace,
        /// Document id.
        id: DocId,
        /// The committed result.
        result: Result<Applied, StoreError>,
        /// The message came from a version its sender had not committed
        /// ([`crate::sync::Message::SyncAhead`]): its heads prove nothing durable.
        provisional: bool,
    },
    /// A cursor was saved (or not).
    CursorSaved(Result<(), StoreError>),
}

/// Why carrying out an output failed; each ends the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The peer sent something the store refused, or the store could not keep it: tell
    /// the peer, then close.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// A store read or bookkeeping write failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The outbox could not take a frame (the stream failed).
    #[error("stream: {0}")]
    Stream(String),
}

/// A session's executor: the store it works on, and the peer's counters it keeps.
#[derive(Debug, Clone, Copy)]
pub struct Exec<'a> {
    /// The node's store.
    pub store: &'a Store,
    /// The peer's counters.
    pub counters: &'a PeerCounters,
    /// Where the peer's durable acknowledgements are reported, for writes that wait for
    /// replicas; `None` where nothing waits (simulations, tests).
    pub replicas: Option<&'a Replicas>,
}

impl Exec<'_> {
    /// Carries out every pending output of `session`, feeding the answers back, until it
    /// has nothing more to do. Call after every input.
    pub async fn drain(
        &self,
        session: &mut Session,
        outbox: &mut impl Outbox,
        writes: &mut Writes<'_>,
    ) -> Result<(), ExecError> {
        // Only a hello changes it, and hellos never arrive during a drain.
        let peer = session.sync_peer();
        for p in Priority::ALL {
            session.set_room(p, outbox.has_room(p));
        }
        while let Some(out) = session.poll_output() {
            match out {
                Output::Send(msg) => {
                    outbox.send(msg).await?;
                    for p in Priority::ALL {
                        session.set_room(p, outbox.has_room(p));
                    }
                }
                Output::ReadFeed { after, limit } => {
                    let last = self.store.last_seq();
                    let entries = self.store.changes_since(after, limit)?;
                    session.handle_feed(entries, last);
                }
                Output::Load { ns, id } => {
                    self.counters.docs_loaded.fetch_add(1, Ordering::Relaxed);
                    let loaded = match self.store.load_for_sync(&ns, &id, &peer) {
                        Ok(loaded) => loaded,
                        // Set aside here (its stored bytes do not load): nothing to send.
                        Err(StoreError::Quarantined { .. }) => None,
                        Err(e) => return Err(e.into()),
                    };
                    session.handle_loaded(ns, id, loaded);
                }
                Output::LoadSyncState { ns, id } => {
                    let state = self.store.sync_state(&peer, &ns, &id)?;
                    session.handle_sync_state(ns, id, state);
                }
                Output::Apply(apply) => {
                    let write = apply_sync(self.store.clone(), peer.clone(), *apply);
                    self.run(session, writes, write).await?;
                }
                Output::SaveCursor(cursor) => {
                    let write = save_cursor(self.store.clone(), peer.clone(), cursor);
                    self.run(session, writes, write).await?;
                }
                Output::LoadAuditItems { starter, scope } => {
                    if !starter && !super::audit::may_answer(self.counters) {
                        session.refuse_audit(&format!(
                            "at most one audit per {} ms",
                            super::audit::MIN_AUDIT_GAP.as_millis()
                        ));
                        continue;
                    }
                    // A scan of every document's record and two hashes each: off the
                    // connection's task.
                    let store = self.store.clone();
                    let _turn = super::audit::ITEM_LOADS
                        .acquire()
                        .await
                        .map_err(|e| ExecError::Stream(format!("audit items: {e}")))?;
                    let rec = tokio::task::spawn_blocking(move || {
                        let items = store.audit_items(|ns| scope.includes(ns))?;
                        Ok::<_, StoreError>(Reconciler::new(items, scope.salt))
                    })
                    .await
                    .map_err(|e| ExecError::Stream(format!("audit items: {e}")))??;
                    session.handle_audit_items(starter, rec);
                }
                Output::Event(Event::PeerHolds { ns, id, heads }) => {
                    if let Some(replicas) = self.replicas {
                        replicas.peer_holds(&peer.id, &ns, &id, &heads);
                    }
                }
                Output::Event(event) => {
                    if matches!(event, Event::Rejected { .. }) {
                        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    outbox.event(event);
                }
            }
        }
        outbox.flush()
    }

    /// Hands a finished write to the session. A sync message the store refused as invalid
    /// is the peer's protocol error; any other store failure is this node's (`Internal`).
    pub fn finish(&self, session: &mut Session, done: WriteDone) -> Result<(), ExecError> {
        match done {
            WriteDone::Applied {
                ns,
                id,
                result: Err(StoreError::Quarantined { .. }),
                ..
            } => {
                // The peer's message is for a document set aside here: dropped, and the
                // session goes on with every other document.
                session.handle_set_aside(ns, id);
                Ok(())
            }
            WriteDone::Applied {
                ns,
                id,
                result,
                provisional,
            } => {
                let applied = result.map_err(|e| match e {
                    StoreError::Model(e) => ProtocolError::protocol(format!("{ns}/{id}: {e}")),
                    e => ProtocolError::internal(e.to_string()),
                })?;
                self.counters.syncs_applied.fetch_add(1, Ordering::Relaxed);
                // The peer replied after its own commit: it holds the heads it names.
                if let (Some(replicas), Some(theirs), false) =
                    (self.replicas, &applied.state.their_heads, provisional)
                {
                    let peer = session.sync_peer();
                    replicas.peer_committed(&peer.id, &ns, &id, theirs, &applied.doc);
                }
                self.counters
                    .changes_applied
                    .fetch_add(applied.changes_applied, Ordering::Relaxed);
                session.handle_applied(ns, id, applied);
                Ok(())
            }
            WriteDone::CursorSaved(result) => {
                result?;
                session.handle_cursor_saved();
                Ok(())
            }
        }
    }

    async fn run(
        &self,
        session: &mut Session,
        writes: &mut Writes<'_>,
        write: impl Future<Output = WriteDone> + Send + 'static,
    ) -> Result<(), ExecError> {
        match writes {
            Writes::Inline => self.finish(session, write.await),
            Writes::Spawned(set) => {
                set.spawn(write);
                Ok(())
            }
        }
    }
}

async fn apply_sync(store: Store, peer: SyncPeer, apply: Apply) -> WriteDone {
    let (ns, id, provisional) = (apply.ns.clone(), apply.id.clone(), apply.provisional);
    let result = store.apply_sync(&peer, apply).await;
    WriteDone::Applied {
        ns,
        id,
        result,
        provisional,
    }
}

async fn save_cursor(store: Store, peer: SyncPeer, cursor: Cursor) -> WriteDone {
    WriteDone::CursorSaved(store.set_peer_cursor(&peer.id, cursor).await)
}
