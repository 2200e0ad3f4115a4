//! One automerge-repo client's WebSocket: the handshake, then its sync and ephemeral
//! messages in, and the node's changes to the documents it syncs out.
//!
//! A client's sync message gets the checks a peer's does on its own connection (the
//! message's Bloom filters and lists, each change's kinds, ops and depth) before the store
//! sees it. A message the protocol does not allow ends the connection with the reason; a
//! change the node refuses (too many ops, too deep, a damaged document) costs only that
//! document: the client is told, and the document's exchange starts over.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use automerge::sync::{Message as SyncMessage, State as SyncState, SyncDoc};
use axum::extract::ws::{Message, WebSocket};
use tokio::sync::broadcast;

use super::wire::{self, Incoming};
use super::{Admitted, Relayed, RepoEndpoint};
use crate::api::access::Access;
use crate::api::ApiState;
use crate::error::StoreError;
use crate::model::{automerge_bytes, op_count, DocId, NodeId, SyncPeer};
use crate::net::Node;
use crate::store::Store;
use crate::sync::{validate, Apply};

/// How long a client has to send its `join`.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest `join`, in bytes: it is decoded before anything else is known of the client.
const MAX_JOIN_BYTES: usize = 64 * 1024;

/// Most documents one client syncs at once; past this it is told so and disconnected
/// (each costs a sync state in memory).
const MAX_DOCS: usize = 10_000;

/// How often the node pings a client, and checks that its token still holds.
const TICK: Duration = Duration::from_secs(1);
const PING_EVERY_TICKS: u32 = 20;

/// A client heard from neither by a message nor a pong for this long is gone.
const SILENT_FOR: Duration = Duration::from_secs(60);

/// Largest ephemeral payload relayed, and how many a client may send per second (more
/// are dropped: presence and cursors are superseded by the next one anyway).
const MAX_EPHEMERAL_BYTES: usize = 64 * 1024;
const EPHEMERAL_PER_SECOND: u32 = 50;

/// Why a client's connection ends early.
#[derive(Debug)]
enum End {
    /// The socket closed or failed, or the node stops.
    Closed,
    /// The client broke the protocol, or its token no longer holds: told why, then closed.
    Refused(String),
}

/// Serves one client until it leaves, breaks the protocol or the socket closes.
pub(super) async fn run(
    mut socket: WebSocket,
    state: ApiState,
    access: Access,
    writable: bool,
    admitted: Admitted,
) {
    let endpoint = state.repo.clone();
    let client_no = endpoint.inner.next_client.fetch_add(1, Ordering::Relaxed);
    let server = endpoint.inner.peer_id.clone();
    let client = match handshake(&mut socket, &server).await {
        Ok(client) => client,
        Err(End::Refused(why)) => {
            let _ = socket
                .send(Message::Binary(wire::error(&server, "", &why).into()))
                .await;
            return;
        }
        Err(End::Closed) => return,
    };
    let mut session = Session {
        store: state.store.clone(),
        node: state.node.clone(),
        endpoint,
        server,
        client,
        client_no,
        writable,
        access,
        docs: HashMap::new(),
        told_read_only: false,
        last_heard: Instant::now(),
        ephemeral_window: (Instant::now(), 0),
    };
    let end = session.serve(&mut socket).await;
    if let End::Refused(why) = end {
        tracing::info!(reason = %why, "an automerge-repo client was disconnected");
        let error = wire::error(&session.server, &session.client, &why);
        let _ = socket.send(Message::Binary(error.into())).await;
    }
    let _ = socket.send(Message::Close(None)).await;
    drop(admitted);
}

/// Waits for the client's `join` and answers `peer`; the client's peer id.
async fn handshake(socket: &mut WebSocket, server: &str) -> Result<String, End> {
    let mut heard = Instant::now();
    let first = tokio::time::timeout(JOIN_TIMEOUT, next_binary(socket, &mut heard))
        .await
        .map_err(|_| End::Refused("no join message within 10 s".into()))??;
    if first.len() > MAX_JOIN_BYTES {
        return Err(End::Refused(format!(
            "the first message must be a join of at most {MAX_JOIN_BYTES} bytes"
        )));
    }
    match wire::decode(&first) {
        Ok(Incoming::Join { sender, versions }) => {
            if !versions.iter().any(|v| v == wire::PROTOCOL_VERSION) {
                return Err(End::Refused(format!(
                    "unsupported protocol versions {versions:?}: this node speaks {}",
                    wire::PROTOCOL_VERSION
                )));
            }
            socket
                .send(Message::Binary(wire::peer(server, &sender).into()))
                .await
                .map_err(|_| End::Closed)?;
            Ok(sender)
        }
        Ok(other) => Err(End::Refused(format!(
            "the first message must be a join, not a {}",
            other.kind()
        ))),
        Err(e) => Err(End::Refused(e.to_string())),
    }
}

/// The next binary message; pings are answered by the socket itself. Any message from the
/// client, pongs included, sets `heard`.
async fn next_binary(socket: &mut WebSocket, heard: &mut Instant) -> Result<Vec<u8>, End> {
    loop {
        let m = socket.recv().await;
        *heard = Instant::now();
        match m {
            Some(Ok(Message::Binary(b))) => return Ok(b.to_vec()),
            Some(Ok(Message::Text(_))) => {
                return Err(End::Refused("messages must be binary CBOR".into()))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_)) | Err(_)) | None => return Err(End::Closed),
        }
    }
}

/// A connected client.
struct Session {
    store: Store,
    node: Option<Node>,
    endpoint: RepoEndpoint,
    server: String,
    client: String,
    client_no: u64,
    writable: bool,
    access: Access,
    /// The documents the client syncs, under the id it uses, with the sync state.
    docs: HashMap<DocId, (String, SyncState)>,
    told_read_only: bool,
    last_heard: Instant,
    /// Start of the current second and the ephemeral messages taken in it.
    ephemeral_window: (Instant, u32),
}

impl Session {
    async fn serve(&mut self, socket: &mut WebSocket) -> End {
        let mut changed = self.endpoint.changes(&self.store);
        let mut relayed = self.endpoint.inner.ephemeral.subscribe();
        let stop = self.endpoint.inner.stop.clone();
        let mut tick = tokio::time::interval(TICK);
        let mut ticks = 0u32;
        loop {
            let mut heard = self.last_heard;
            tokio::select! {
                incoming = next_binary(socket, &mut heard) => {
                    self.last_heard = heard;
                    let bytes = match incoming {
                        Ok(b) => b,
                        Err(end) => return end,
                    };
                    if let Err(end) = self.handle(socket, &bytes).await {
                        return end;
                    }
                }
                ids = changed.recv() => {
                    let pushed = match ids {
                        Ok(ids) => self.push(socket, &ids).await,
                        // Fell behind: every document it syncs may have changed.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let all: Vec<DocId> = self.docs.keys().cloned().collect();
                            self.push(socket, &all).await
                        }
                        Err(broadcast::error::RecvError::Closed) => return End::Closed,
                    };
                    if let Err(end) = pushed {
                        return end;
                    }
                }
                r = relayed.recv() => match r {
                    Ok(m) => if let Err(end) = self.relay(socket, &m).await {
                        return end;
                    },
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return End::Closed,
                },
                _ = tick.tick() => {
                    if let Err(end) = self.still_allowed() {
                        return end;
                    }
                    if self.last_heard.elapsed() > SILENT_FOR {
                        return End::Closed;
                    }
                    ticks = ticks.wrapping_add(1);
                    if ticks.is_multiple_of(PING_EVERY_TICKS)
                        && socket.send(Message::Ping(Default::default())).await.is_err()
                    {
                        return End::Closed;
                    }
                }
                () = stop.cancelled() => return End::Closed,
            }
        }
    }

    /// Ends the connection once its scoped token has expired or been revoked.
    fn still_allowed(&self) -> Result<(), End> {
        let Access::Scoped(token) = &self.access else {
            return Ok(());
        };
        if SystemTime::now() >= token.expires {
            return Err(End::Refused("the token expired".into()));
        }
        let revoked = self
            .node
            .as_ref()
            .and_then(|n| n.revocations().crl())
            .is_some_and(|crl| crl.revokes(&token.serial));
        if revoked {
            return Err(End::Refused("the token was revoked".into()));
        }
        Ok(())
    }

    async fn handle(&mut self, socket: &mut WebSocket, bytes: &[u8]) -> Result<(), End> {
        match wire::decode(bytes).map_err(|e| End::Refused(e.to_string()))? {
            Incoming::Sync {
                request,
                document,
                data,
            } => self.sync(socket, request, document, &data).await,
            Incoming::Ephemeral {
                sender,
                session,
                count,
                document,
                data,
            } => {
                // Clients pass on what they received from others: only the client's own
                // messages are taken, for documents it syncs, small, and at a bounded rate.
                let syncs = DocId::new(document.as_str())
                    .ok()
                    .is_some_and(|id| self.docs.contains_key(&id));
                if sender != self.client
                    || !syncs
                    || data.is_empty()
                    || data.len() > MAX_EPHEMERAL_BYTES
                    || !self.ephemeral_allowed()
                {
                    return Ok(());
                }
                let m = Relayed {
                    from_client: self.client_no,
                    sender: format!("{}-{}", self.client_no, self.client),
                    session,
                    count,
                    document,
                    data,
                };
                // No receiver is not an error: the client is alone.
                let _ = self.endpoint.inner.ephemeral.send(Arc::new(m));
                Ok(())
            }
            Incoming::Leave => Err(End::Closed),
            Incoming::Join { .. } => Err(End::Refused("a second join".into())),
            Incoming::Ignored(_) => Ok(()),
        }
    }

    /// Counts an ephemeral message against the client's rate; whether it may pass.
    fn ephemeral_allowed(&mut self) -> bool {
        let (start, n) = &mut self.ephemeral_window;
        if start.elapsed() >= Duration::from_secs(1) {
            *start = Instant::now();
            *n = 0;
        }
        *n += 1;
        *n <= EPHEMERAL_PER_SECOND
    }

    /// Checks and applies the client's sync message, and answers from the committed
    /// document.
    async fn sync(
        &mut self,
        socket: &mut WebSocket,
        request: bool,
        document: String,
        data: &[u8],
    ) -> Result<(), End> {
        let id = DocId::new(document.as_str())
            .ok()
            .filter(|_| wire::is_document_id(&document))
            .ok_or_else(|| End::Refused(format!("{document:?} is not a document id")))?;
        let mut message = SyncMessage::decode(data)
            .map_err(|e| End::Refused(format!("document {document}: a bad sync message: {e}")))?;
        validate::check_sync_message(&message)
            .map_err(|e| End::Refused(format!("document {document}: {}", e.reason)))?;
        if !self.docs.contains_key(&id) && self.docs.len() >= MAX_DOCS {
            return Err(End::Refused(format!(
                "more than {MAX_DOCS} documents on one connection"
            )));
        }
        if !self.writable && !message.changes.is_empty() {
            // Synced read-only: the exchange goes on, the changes are dropped here.
            message.changes = Vec::<Vec<u8>>::new().into();
            if !self.told_read_only {
                self.told_read_only = true;
                let why = "this connection may only read: changes are not stored";
                send(socket, wire::error(&self.server, &self.client, why)).await?;
            }
        }
        if let Err(why) = check_changes(&message) {
            return self.refuse_document(socket, &id, &document, &why).await;
        }
        let ns = self.endpoint.namespace().clone();
        if request && message.changes.is_empty() && !self.docs.contains_key(&id) {
            let held = self.store.doc(&ns, &id).ok().flatten().is_some();
            if !held {
                // Kept: once the document reaches this node, the client gets it.
                self.docs.insert(id, (document.clone(), SyncState::new()));
                let out = wire::unavailable(&self.server, &self.client, &document);
                return send(socket, out).await;
            }
        }
        let state = self
            .docs
            .remove(&id)
            .map_or_else(SyncState::new, |(_, s)| s);
        let apply = Apply {
            ns,
            id: id.clone(),
            state: Some(state),
            read_only: !self.writable,
            message,
            // Sync states with clients are never persisted.
            provisional: true,
        };
        let applied = match self.store.apply_sync(&client_peer(), apply).await {
            Ok(a) => a,
            Err(StoreError::Closed) => return Err(End::Closed),
            Err(e) => {
                return self
                    .refuse_document(socket, &id, &document, &e.to_string())
                    .await
            }
        };
        let mut state = applied.state;
        let reply = applied.doc.generate_sync_message(&mut state);
        self.docs.insert(id, (document.clone(), state));
        match reply {
            Some(m) => {
                let out = wire::sync(&self.server, &self.client, &document, m.encode());
                send(socket, out).await
            }
            None => Ok(()),
        }
    }

    /// Tells the client a change to `document` was refused and forgets the document's
    /// exchange; the connection goes on.
    async fn refuse_document(
        &mut self,
        socket: &mut WebSocket,
        id: &DocId,
        document: &str,
        why: &str,
    ) -> Result<(), End> {
        self.docs.remove(id);
        let why = format!("document {document}: refused: {why}");
        tracing::info!(reason = %why, "an automerge-repo client's change was refused");
        send(socket, wire::error(&self.server, &self.client, &why)).await
    }

    /// Sends the client what changed in `ids`, of the documents it syncs.
    async fn push(&mut self, socket: &mut WebSocket, ids: &[DocId]) -> Result<(), End> {
        let ns = self.endpoint.namespace().clone();
        for id in ids {
            let Some((document, state)) = self.docs.get_mut(id) else {
                continue;
            };
            let Ok(Some(doc)) = self.store.doc(&ns, id) else {
                continue;
            };
            if let Some(m) = doc.generate_sync_message(state) {
                let out = wire::sync(&self.server, &self.client, document, m.encode());
                send(socket, out).await?;
            }
        }
        Ok(())
    }

    /// Passes another client's ephemeral message on, if this client syncs its document.
    async fn relay(&mut self, socket: &mut WebSocket, m: &Relayed) -> Result<(), End> {
        if m.from_client == self.client_no {
            return Ok(());
        }
        let syncs = DocId::new(m.document.as_str())
            .ok()
            .is_some_and(|id| self.docs.contains_key(&id));
        if !syncs {
            return Ok(());
        }
        let out = wire::ephemeral(
            &m.sender,
            &self.client,
            &m.session,
            m.count,
            &m.document,
            m.data.clone(),
        );
        send(socket, out).await
    }
}

/// The checks a peer's changes get on its connection, before the store's single writer
/// spends time on them: chunk kinds, ops (in all, at most `MAX_OPS`) and depth.
fn check_changes(message: &SyncMessage) -> Result<(), String> {
    let mut ops = 0u64;
    for chunk in message.changes.iter() {
        ops = ops
            .saturating_add(automerge_bytes::check_peer_chunk(chunk).map_err(|e| e.to_string())?);
    }
    if ops > op_count::MAX_OPS {
        return Err(format!(
            "{ops} ops in one message; at most {}",
            op_count::MAX_OPS
        ));
    }
    Ok(())
}

/// Who the store's apply path sees: all clients share one name, and since their sync
/// states are never persisted, nothing is kept under it.
fn client_peer() -> SyncPeer {
    SyncPeer {
        id: NodeId::new("automerge-repo").unwrap_or_else(|_| unreachable!("a valid node id")),
        epoch: 0,
    }
}

async fn send(socket: &mut WebSocket, bytes: Vec<u8>) -> Result<(), End> {
    socket
        .send(Message::Binary(bytes.into()))
        .await
        .map_err(|_| End::Closed)
}
