//! One automerge-repo client's WebSocket: the handshake, then its sync and ephemeral
//! messages in, and the node's changes to the documents it syncs out.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use automerge::sync::{Message as SyncMessage, State as SyncState, SyncDoc};
use axum::extract::ws::{Message, WebSocket};
use tokio::sync::broadcast;

use super::wire::{self, Incoming};
use super::{Relayed, RepoEndpoint};
use crate::api::ApiState;
use crate::model::{DocId, NodeId, SyncPeer};
use crate::store::{FeedSeq, Store};
use crate::sync::Apply;

/// How long a client has to send its `join`.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Most documents one client syncs at once; past this it is told so and disconnected
/// (each costs a sync state in memory).
const MAX_DOCS: usize = 100_000;

/// Feed entries read per look at the store's feed.
const FEED_PAGE: usize = 1000;

/// Why a client's connection ends early.
#[derive(Debug)]
enum End {
    /// The socket closed or failed.
    Closed,
    /// The client broke the protocol: told why, then closed.
    Refused(String),
}

/// Counts the client for as long as it is connected.
struct Connected(RepoEndpoint);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.inner.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one client until it leaves, breaks the protocol or the socket closes.
pub(super) async fn run(mut socket: WebSocket, state: ApiState, writable: bool) {
    let endpoint = state.repo.clone();
    endpoint.inner.clients.fetch_add(1, Ordering::Relaxed);
    let _counted = Connected(endpoint.clone());
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
        endpoint,
        server,
        client,
        client_no,
        writable,
        docs: HashMap::new(),
    };
    let end = session.serve(&mut socket).await;
    if let End::Refused(why) = end {
        tracing::info!(reason = %why, "an automerge-repo client was disconnected");
        let error = wire::error(&session.server, &session.client, &why);
        let _ = socket.send(Message::Binary(error.into())).await;
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// Waits for the client's `join` and answers `peer`; the client's peer id.
async fn handshake(socket: &mut WebSocket, server: &str) -> Result<String, End> {
    let first = tokio::time::timeout(JOIN_TIMEOUT, next_binary(socket))
        .await
        .map_err(|_| End::Refused("no join message within 10 s".into()))??;
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
            "the first message must be a join, not {other:?}"
        ))),
        Err(e) => Err(End::Refused(e.to_string())),
    }
}

/// The next binary message; pings are answered by the socket itself.
async fn next_binary(socket: &mut WebSocket) -> Result<Vec<u8>, End> {
    loop {
        match socket.recv().await {
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
    endpoint: RepoEndpoint,
    server: String,
    client: String,
    client_no: u64,
    writable: bool,
    /// The documents the client syncs, under the id it uses, with the sync state.
    docs: HashMap<DocId, (String, SyncState)>,
}

impl Session {
    async fn serve(&mut self, socket: &mut WebSocket) -> End {
        let mut feed = self.store.subscribe();
        let mut seen = self.store.last_seq();
        let mut relayed = self.endpoint.inner.ephemeral.subscribe();
        loop {
            tokio::select! {
                incoming = next_binary(socket) => {
                    let bytes = match incoming {
                        Ok(b) => b,
                        Err(end) => return end,
                    };
                    if let Err(end) = self.handle(socket, &bytes).await {
                        return end;
                    }
                }
                changed = feed.changed() => {
                    if changed.is_err() {
                        return End::Closed;
                    }
                    if let Err(end) = self.push_changes(socket, &mut seen).await {
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
            }
        }
    }

    async fn handle(&mut self, socket: &mut WebSocket, bytes: &[u8]) -> Result<(), End> {
        match wire::decode(bytes).map_err(|e| End::Refused(e.to_string()))? {
            Incoming::Sync {
                request,
                document,
                data,
            } => self.sync(socket, request, document, &data).await,
            Incoming::Ephemeral { sender, data, .. }
                if sender != self.client || data.is_empty() =>
            {
                let _ = data;
                Ok(())
            }
            Incoming::Ephemeral {
                sender: _,
                session,
                count,
                document,
                data,
            } => {
                let m = Relayed {
                    from_client: self.client_no,
                    sender: self.client.clone(),
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

    /// Applies the client's sync message and answers from the committed document.
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
        let message = SyncMessage::decode(data)
            .map_err(|e| End::Refused(format!("document {document}: a bad sync message: {e}")))?;
        if !self.docs.contains_key(&id) && self.docs.len() >= MAX_DOCS {
            return Err(End::Refused(format!(
                "more than {MAX_DOCS} documents on one connection"
            )));
        }
        let ns = self.endpoint.namespace().clone();
        let held = self.store.doc(&ns, &id).ok().flatten().is_some();
        let (_, state) = self
            .docs
            .entry(id.clone())
            .or_insert_with(|| (document.clone(), SyncState::new()));
        if request && !held && message.changes.is_empty() {
            // Kept: once the document reaches this node, the client gets it.
            let out = wire::unavailable(&self.server, &self.client, &document);
            return send(socket, out).await;
        }
        let apply = Apply {
            ns,
            id: id.clone(),
            state: Some(std::mem::take(state)),
            read_only: !self.writable,
            message,
            // Sync states with clients are never persisted.
            provisional: true,
        };
        let applied = match self.store.apply_sync(&client_peer(), apply).await {
            Ok(a) => a,
            Err(e) => {
                // The document's state is unknown now: start over with the client.
                self.docs.remove(&id);
                return Err(End::Refused(format!("document {document}: {e}")));
            }
        };
        let mut state = applied.state;
        let reply = applied.doc.generate_sync_message(&mut state);
        if let Some(entry) = self.docs.get_mut(&id) {
            entry.1 = state;
        }
        match reply {
            Some(m) => {
                send(
                    socket,
                    wire::sync(&self.server, &self.client, &document, m.encode()),
                )
                .await
            }
            None => Ok(()),
        }
    }

    /// Sends the client what changed in the documents it syncs since `seen`.
    async fn push_changes(
        &mut self,
        socket: &mut WebSocket,
        seen: &mut FeedSeq,
    ) -> Result<(), End> {
        loop {
            let entries = self
                .store
                .changes_since(*seen, FEED_PAGE)
                .map_err(|e| End::Refused(format!("reading the change feed: {e}")))?;
            let Some(last) = entries.last() else {
                return Ok(());
            };
            *seen = last.seq;
            for e in &entries {
                if e.ns != *self.endpoint.namespace() {
                    continue;
                }
                let Some((document, state)) = self.docs.get_mut(&e.id) else {
                    continue;
                };
                let Ok(Some(doc)) = self.store.doc(&e.ns, &e.id) else {
                    continue;
                };
                if let Some(m) = doc.generate_sync_message(state) {
                    let out = wire::sync(&self.server, &self.client, document, m.encode());
                    send(socket, out).await?;
                }
            }
        }
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
