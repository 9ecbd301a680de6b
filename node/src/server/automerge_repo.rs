//! automerge-repo's sync protocol over WebSocket (`aspen node run --automerge-repo ADDR`), so
//! JavaScript apps built on `@automerge/automerge-repo` sync the cluster's documents directly.
//!
//! **Documents.** automerge-repo document id `X` (base58check, see [`aspen_repo_protocol`])
//! is the Aspen document named `automerge/X` ([`doc_name`]), the same one `aspen doc` reads and
//! writes. Changes an app sends are committed through the document service exactly as
//! `aspen doc apply` commits them (same checks and limits, one Raft transaction), before
//! anything is sent on to other apps: an app only ever receives committed changes.
//!
//! **Who may connect.** Every connection presents a bearer token in the upgrade request's URL
//! (`?token=aspen-token-v1:...`, issued with `aspen auth token issue --bearer`). Without a valid
//! one the upgrade is refused with 401 before any WebSocket exists. Each document message is
//! then authorized as the matching `aspen doc` request would be (a read for `request`/`sync`,
//! a change, and a create for a new document), through the node's usual access check. A
//! document the token may not read is answered `doc-unavailable`, as if it did not exist; a
//! change it may not write ends the connection with an `error` message.
//!
//! **Sync.** The node keeps, per document with connected apps, one Automerge copy of the
//! committed document (the *replica*) and one Automerge sync state per connection
//! ([`SharedDoc`]). A message from an app is checked and committed first, then received into
//! the replica with that app's sync state, then every connected app of the document is sent
//! what it lacks. Changes committed elsewhere (the CLI, another member, federation) wake a task
//! that watches the documents' keys ([`run_refresh`]): it brings each replica up to the stored
//! document and sends the news the same way. `ephemeral` messages are relayed to the other
//! apps connected to the same document on this node, and never stored.
//!
//! **Bounds.** At most [`MAX_PENDING_UPGRADES`] TCP connections before their upgrade (each
//! with [`UPGRADE_TIMEOUT`] to send it) and [`MAX_CONNECTIONS`] connections, [`MAX_DOCS_PER_CONNECTION`] documents
//! per connection and [`MAX_SHARED_DOCS`] documents with connected apps per node; messages of
//! at most [`MAX_MESSAGE_BYTES`]; a join within [`JOIN_TIMEOUT`]; and a connection whose
//! outgoing queue ([`OUTBOX_MESSAGES`]) fills (an app that does not read) is closed. Each
//! connection's messages are handled one at a time, so a flood waits on its own socket.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use aspen_client::protocol::{Consistency, DocRequest, RpcError};
use aspen_crdt::limits::{MAX_CHANGES_PER_REQUEST, MAX_REQUEST_BYTES};
use aspen_crdt::{DocError, DocName};
use aspen_repo_protocol::{DocumentId, Message, PeerMetadata, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use automerge::sync::{self, SyncDoc};
use automerge::Automerge;
use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use super::auth::{Caller, PresentedToken};
use super::NodeState;

/// The Aspen document name of automerge-repo document `X` is this prefix and `X`.
pub const DOC_PREFIX: &str = "automerge/";
/// Most WebSocket connections a node serves at once; more are answered 503.
pub const MAX_CONNECTIONS: usize = 256;
/// Most TCP connections still in their HTTP request (not upgraded yet); more are closed at
/// once. Each has [`UPGRADE_TIMEOUT`] to send its request.
pub const MAX_PENDING_UPGRADES: usize = 256;
/// How long a new TCP connection has to send its upgrade request.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most documents one connection may sync (or ask for) at once.
pub const MAX_DOCS_PER_CONNECTION: usize = 256;
/// Most documents with connected apps on one node (each holds a replica in memory).
pub const MAX_SHARED_DOCS: usize = 4096;
/// How long a new connection has to send `join`.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued for one connection before it is closed as not reading.
pub const OUTBOX_MESSAGES: usize = 1024;
/// Most messages taken from one connection at once (those already arrived), so that the
/// changes of consecutive sync messages are committed as one request.
pub const MAX_MESSAGES_AT_ONCE: usize = 64;
/// Ephemeral sessions remembered per document (to relay each message once: apps send
/// relayed messages back). Past it the memory is cleared.
pub const MAX_EPHEMERAL_SESSIONS: usize = 1024;

/// The Aspen document that automerge-repo document `id` is.
pub fn doc_name(id: &DocumentId) -> DocName {
    DocName::new(format!("{DOC_PREFIX}{id}")).expect("a document id makes a valid name")
}

#[derive(Debug, thiserror::Error)]
pub enum RepoListenError {
    #[error("cannot listen for automerge-repo on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Binds the listener (at start, so a taken port fails the start).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, RepoListenError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| RepoListenError::Bind(addr, e))
}

/// The node's automerge-repo side: the documents apps are connected to.
pub struct RepoHub {
    /// This node's peer id in the protocol.
    peer_id: String,
    docs: Mutex<HashMap<DocumentId, Arc<SharedDoc>>>,
    connections: Arc<Semaphore>,
    next_connection: AtomicU64,
}

/// One document with connected apps.
pub struct SharedDoc {
    id: DocumentId,
    name: DocName,
    state: Mutex<DocState>,
}

#[derive(Default)]
struct DocState {
    /// The committed document as this node knows it; `None` until it exists.
    replica: Option<Automerge>,
    /// The connections syncing it, by connection number.
    peers: HashMap<u64, DocPeer>,
    /// The highest `count` relayed per ephemeral (sender, session).
    ephemeral: HashMap<(String, String), u64>,
}

struct DocPeer {
    peer_id: String,
    sync: sync::State,
    outbox: Outbox,
}

/// Where a connection's outgoing messages queue; full means the app does not read.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Vec<u8>>,
    overflow: Arc<Notify>,
}

impl Outbox {
    fn send(&self, frame: Vec<u8>) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(frame) {
            self.overflow.notify_one();
        }
    }

    fn message(&self, m: &Message) {
        match m.encode() {
            Ok(frame) => self.send(frame),
            Err(e) => tracing::warn!("automerge-repo: cannot send a {} message: {e}", m.kind()),
        }
    }
}

impl RepoHub {
    pub fn new(node_id: u64) -> Self {
        RepoHub {
            peer_id: format!("aspen-{node_id:016x}"),
            docs: Default::default(),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            next_connection: AtomicU64::new(1),
        }
    }

    /// Documents with connected apps now.
    pub fn shared_docs(&self) -> usize {
        self.docs.lock().expect("docs lock").len()
    }

    fn doc(&self, id: &DocumentId) -> Result<Arc<SharedDoc>, String> {
        let mut docs = self.docs.lock().expect("docs lock");
        if let Some(d) = docs.get(id) {
            return Ok(d.clone());
        }
        if docs.len() >= MAX_SHARED_DOCS {
            return Err(format!(
                "this node already syncs {MAX_SHARED_DOCS} documents with apps; try another member"
            ));
        }
        let d = Arc::new(SharedDoc {
            id: id.clone(),
            name: doc_name(id),
            state: Default::default(),
        });
        docs.insert(id.clone(), d.clone());
        Ok(d)
    }

    /// Forgets connection `conn` on `ids`, and documents no connection syncs any more.
    fn leave(&self, conn: u64, ids: &HashSet<DocumentId>) {
        let mut docs = self.docs.lock().expect("docs lock");
        for id in ids {
            let empty = docs.get(id).is_some_and(|d| {
                let mut st = d.state.lock().expect("doc lock");
                st.peers.remove(&conn);
                st.peers.is_empty()
            });
            if empty {
                docs.remove(id);
            }
        }
    }

    fn all_docs(&self) -> Vec<Arc<SharedDoc>> {
        self.docs
            .lock()
            .expect("docs lock")
            .values()
            .cloned()
            .collect()
    }
}

/// Sends every connected app of the document what it lacks of `replica`.
fn fan_out(hub_peer: &str, doc: &SharedDoc, st: &mut DocState) {
    let DocState { replica, peers, .. } = st;
    let Some(replica) = replica else { return };
    for peer in peers.values_mut() {
        send_lacking(hub_peer, &doc.id, replica, peer);
    }
}

/// Sends one connected app what it lacks of `replica`, if anything (Automerge's sync state
/// for the app knows what it has and what is in flight).
fn send_lacking(hub_peer: &str, id: &DocumentId, replica: &Automerge, peer: &mut DocPeer) {
    if let Some(m) = replica.generate_sync_message(&mut peer.sync) {
        peer.outbox.message(&Message::Sync {
            sender_id: hub_peer.to_string(),
            target_id: peer.peer_id.clone(),
            document_id: id.clone(),
            data: m.encode(),
        });
    }
}

/// Receives sync messages from connection `conn` into the document's replica, then answers:
/// every connected app if the replica gained changes, else that app only. `false` if the
/// document does not exist here (no replica).
fn receive(
    hub_peer: &str,
    doc: &SharedDoc,
    st: &mut DocState,
    conn: u64,
    messages: Vec<sync::Message>,
) -> Result<bool, String> {
    let DocState { replica, peers, .. } = st;
    let Some(replica) = replica else {
        return Ok(false);
    };
    let peer = peers
        .get_mut(&conn)
        .expect("a connection subscribes before it syncs");
    let before = replica.get_heads();
    for message in messages {
        no_panic(|| replica.receive_sync_message(&mut peer.sync, message))?
            .map_err(|e| format!("Automerge refused the sync message: {e}"))?;
    }
    if replica.get_heads() == before {
        // Nothing new for the others: answer this app only.
        send_lacking(hub_peer, &doc.id, replica, peer);
    } else {
        fan_out(hub_peer, doc, st);
    }
    Ok(true)
}

/// Keeps every replica up to the stored documents: wakes when a document write applies on
/// this node, and sends connected apps what changed.
pub async fn run_refresh(node: Weak<NodeState>, hub: Arc<RepoHub>) {
    let Some(mut changes) = node.upgrade().map(|n| {
        n.cluster
            .sm
            .watch_system_prefix(aspen_crdt::layout::DATA_PREFIX)
    }) else {
        return;
    };
    while changes.changed().await.is_ok() {
        let Some(node) = node.upgrade() else { return };
        for doc in hub.all_docs() {
            if let Err(e) = refresh(&node, &hub, doc.clone()).await {
                tracing::debug!(doc = %doc.name, "automerge-repo refresh: {e}");
            }
        }
    }
}

/// Brings `doc`'s replica up to the stored document and sends the news.
async fn refresh(
    node: &NodeState,
    hub: &Arc<RepoHub>,
    doc: Arc<SharedDoc>,
) -> Result<(), RpcError> {
    let hub = hub.clone();
    let name = doc.name.clone();
    node.docs
        .with_doc(&name, move |stored| {
            let mut st = doc.state.lock().expect("doc lock");
            if st.peers.is_empty() {
                return;
            }
            match &mut st.replica {
                None => st.replica = Some(stored.clone()),
                Some(replica) => {
                    let known = |h: &automerge::ChangeHash| replica.get_change_meta_by_hash(h).is_some();
                    if stored.get_heads().iter().all(known) {
                        return;
                    }
                    let added = replica.get_changes_added(stored);
                    if let Err(e) = replica.apply_changes(added) {
                        tracing::warn!(doc = %doc.name, "automerge-repo: replica refused stored changes: {e}");
                        st.replica = Some(stored.clone());
                    }
                }
            }
            fan_out(&hub.peer_id, &doc, &mut st);
        })
        .await?;
    Ok(())
}

/// Serves the listener until the node stops.
pub async fn serve(listener: tokio::net::TcpListener, node: Weak<NodeState>, hub: Arc<RepoHub>) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_UPGRADES));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("automerge-repo accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = pending.clone().try_acquire_owned() else {
            drop(stream); // Over the limit: closed at once.
            if let Some(n) = node.upgrade() {
                n.cluster.metrics.repo_refused.inc();
            }
            continue;
        };
        let (node, hub) = (node.clone(), hub.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let (node, hub) = (node.clone(), hub.clone());
                async move { Ok::<_, std::convert::Infallible>(upgrade(req, node, hub)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(UPGRADE_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades();
            // The HTTP part ends with the upgrade (the WebSocket goes on in its own task); a
            // connection that idles in it, even between requests, is closed.
            match tokio::time::timeout(UPGRADE_TIMEOUT, conn).await {
                Ok(Err(e)) => tracing::debug!("automerge-repo http: {e}"),
                Err(_) => {
                    tracing::debug!("automerge-repo http: no upgrade within {UPGRADE_TIMEOUT:?}")
                }
                Ok(Ok(())) => {}
            }
        });
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The bearer token in the request URL's `token` parameter, verified.
fn presented_token(
    req: &Request<hyper::body::Incoming>,
    node: &NodeState,
) -> Result<PresentedToken, String> {
    let query = req.uri().query().unwrap_or_default();
    let Some(text) = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
    else {
        return Err(
            "a bearer token is required: ws://HOST:PORT/?token=aspen-token-v1:... \
                    (`aspen auth token issue --bearer`)"
                .into(),
        );
    };
    super::auth::verify_bearer(&text, &node.auth.policy(), super::identity::unix_now())
}

/// Answers one HTTP request: a WebSocket upgrade with a valid token becomes a connection.
fn upgrade(
    mut req: Request<hyper::body::Incoming>,
    node: Weak<NodeState>,
    hub: Arc<RepoHub>,
) -> Response<Full<Bytes>> {
    let Some(node) = node.upgrade() else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "the node is stopping\n");
    };
    let header = |name: hyper::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    let is_upgrade = header(hyper::header::UPGRADE).is_some_and(|u| u == "websocket")
        && header(hyper::header::CONNECTION).is_some_and(|c| c.contains("upgrade"));
    let Some(key) = req.headers().get(hyper::header::SEC_WEBSOCKET_KEY).cloned() else {
        return plain(
            StatusCode::BAD_REQUEST,
            "this is an automerge-repo WebSocket endpoint: connect with \
             ws://HOST:PORT/?token=...\n",
        );
    };
    if !is_upgrade || req.method() != hyper::Method::GET {
        return plain(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (GET)\n",
        );
    }
    let token = match presented_token(&req, &node) {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!("automerge-repo: refused an upgrade: {e}");
            node.cluster.metrics.repo_refused.inc();
            return plain(StatusCode::UNAUTHORIZED, &format!("{e}\n"));
        }
    };
    let Ok(slot) = hub.connections.clone().try_acquire_owned() else {
        node.cluster.metrics.repo_refused.inc();
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many automerge-repo connections on this node; try another member\n",
        );
    };
    let caller = Caller::new(aspen_trust::BEARER_AUDIENCE);
    *caller.token.lock().expect("token lock") = Some(token);
    let upgraded = hyper::upgrade::on(&mut req);
    let metrics = node.cluster.metrics.clone();
    let node = Arc::downgrade(&node);
    tokio::spawn(async move {
        let _slot = slot;
        let io = match upgraded.await {
            Ok(io) => hyper_util::rt::TokioIo::new(io),
            Err(e) => {
                tracing::debug!("automerge-repo upgrade: {e}");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_MESSAGE_BYTES));
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        metrics.repo_connections.inc();
        Connection::serve(node, hub.clone(), ws, caller).await;
        metrics.repo_connections.dec();
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("Upgrade"),
    );
    h.insert(
        hyper::header::SEC_WEBSOCKET_ACCEPT,
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
            .parse()
            .expect("base64 is a valid header value"),
    );
    r
}

/// One `sync` or `request` message's Automerge sync message, and whether it was a `request`.
type SyncPayload = (Vec<u8>, bool);

/// Why a connection ends with an `error` message.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

/// One app's connection.
struct Connection {
    id: u64,
    node: Weak<NodeState>,
    hub: Arc<RepoHub>,
    caller: Caller,
    /// The app's peer id (from its join).
    peer_id: String,
    outbox: Outbox,
    /// Documents this connection syncs.
    docs: HashSet<DocumentId>,
}

impl Connection {
    async fn serve<S>(
        node: Weak<NodeState>,
        hub: Arc<RepoHub>,
        ws: WebSocketStream<S>,
        caller: Caller,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUTBOX_MESSAGES);
        let overflow = Arc::new(Notify::new());
        // The writer: every outgoing frame, in order; closes the socket when the connection
        // drops its senders.
        let writer = tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if sink.send(WsMessage::Binary(frame.into())).await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
        let outbox = Outbox {
            tx,
            overflow: overflow.clone(),
        };
        let first = tokio::time::timeout(JOIN_TIMEOUT, next_message(&mut stream)).await;
        let join = match first {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                outbox.message(&Message::Error { message: e });
                drop(outbox);
                let _ = writer.await;
                return;
            }
            Ok(None) => return,
            Err(_) => {
                outbox.message(&Message::Error {
                    message: format!("no join message within {JOIN_TIMEOUT:?}"),
                });
                drop(outbox);
                let _ = writer.await;
                return;
            }
        };
        let Message::Join {
            sender_id,
            supported_protocol_versions,
            ..
        } = join
        else {
            outbox.message(&Message::Error {
                message: format!("expected a join message first, got '{}'", join.kind()),
            });
            drop(outbox);
            let _ = writer.await;
            return;
        };
        if !supported_protocol_versions
            .iter()
            .any(|v| v == PROTOCOL_VERSION)
        {
            outbox.message(&Message::Error {
                message: format!(
                    "unsupported protocol versions {supported_protocol_versions:?}: this server \
                     speaks version {PROTOCOL_VERSION}"
                ),
            });
            drop(outbox);
            let _ = writer.await;
            return;
        }
        // Every member is the same storage (the cluster): apps that keep sync state keep one
        // for the cluster, whichever member they reach, and see which heads it has.
        let storage_id = match node.upgrade() {
            Some(n) => n
                .cluster_secret()
                .await
                .ok()
                .flatten()
                .map(|k| format!("aspen-cluster-{}", hex::encode(k.public().to_bytes()))),
            None => None,
        };
        outbox.message(&Message::Peer {
            sender_id: hub.peer_id.clone(),
            target_id: sender_id.clone(),
            peer_metadata: PeerMetadata {
                storage_id,
                is_ephemeral: false,
            },
            selected_protocol_version: PROTOCOL_VERSION.to_string(),
        });
        let mut conn = Connection {
            id: hub.next_connection.fetch_add(1, Ordering::Relaxed),
            node,
            hub,
            caller,
            peer_id: sender_id,
            outbox,
            docs: HashSet::new(),
        };
        let ended = loop {
            let next = tokio::select! {
                m = next_message(&mut stream) => m,
                _ = overflow.notified() => {
                    break Some(format!(
                        "closing: more than {OUTBOX_MESSAGES} messages waited for this app to read them"
                    ));
                }
            };
            let first = match next {
                None => break None,
                Some(Err(e)) => break Some(e),
                Some(Ok(Message::Leave { .. })) => break None,
                Some(Ok(m)) => m,
            };
            // What else has arrived already (without waiting): consecutive sync messages
            // for one document are committed together, as one request.
            let mut batch = vec![first];
            let mut ended = None;
            while batch.len() < MAX_MESSAGES_AT_ONCE {
                match next_message(&mut stream).now_or_never() {
                    None => break,
                    Some(None) | Some(Some(Ok(Message::Leave { .. }))) => {
                        ended = Some(None);
                        break;
                    }
                    Some(Some(Err(e))) => {
                        ended = Some(Some(e));
                        break;
                    }
                    Some(Some(Ok(m))) => batch.push(m),
                }
            }
            if let Some(node) = conn.node.upgrade() {
                node.cluster
                    .metrics
                    .repo_messages
                    .inc_by(batch.len() as u64);
            }
            let started = std::time::Instant::now();
            let n = batch.len();
            let handled = conn.handle_all(batch).await;
            tracing::trace!(peer = %conn.peer_id, messages = n, took = ?started.elapsed(), "automerge-repo messages");
            if let Err(e) = handled {
                break Some(e.to_string());
            }
            if let Some(end) = ended {
                break end;
            }
        };
        conn.hub.leave(conn.id, &conn.docs);
        if let Some(message) = ended {
            tracing::debug!(peer = %conn.peer_id, "automerge-repo connection ends: {message}");
            conn.outbox.message(&Message::Error { message });
        }
        drop(conn);
        let _ = writer.await;
    }

    /// Handles messages in order; a run of `sync`/`request` messages for one document is
    /// handled at once ([`Self::sync`]).
    async fn handle_all(&mut self, batch: Vec<Message>) -> Result<(), Refusal> {
        let mut run: Option<(DocumentId, Vec<SyncPayload>)> = None;
        for m in batch {
            let (id, data, request) = match m {
                Message::Sync {
                    document_id, data, ..
                } => (document_id, data, false),
                Message::Request {
                    document_id, data, ..
                } => (document_id, data, true),
                other => {
                    if let Some((id, messages)) = run.take() {
                        self.sync(id, messages).await?;
                    }
                    self.handle(other).await?;
                    continue;
                }
            };
            match &mut run {
                Some((current, messages)) if *current == id => messages.push((data, request)),
                _ => {
                    if let Some((id, messages)) = run.take() {
                        self.sync(id, messages).await?;
                    }
                    run = Some((id, vec![(data, request)]));
                }
            }
        }
        if let Some((id, messages)) = run {
            self.sync(id, messages).await?;
        }
        Ok(())
    }

    /// Any message but `sync` and `request`.
    async fn handle(&mut self, m: Message) -> Result<(), Refusal> {
        match m {
            Message::Sync { .. } | Message::Request { .. } => {
                unreachable!("handle_all handles sync and request")
            }
            Message::Ephemeral {
                sender_id,
                document_id,
                session_id,
                count,
                data,
                ..
            } => {
                if self.may_read(&document_id).await? && self.docs.contains(&document_id) {
                    let doc = self.hub.doc(&document_id).map_err(Refusal::Protocol)?;
                    let mut st = doc.state.lock().expect("doc lock");
                    let session = (sender_id.clone(), session_id.clone());
                    if st
                        .ephemeral
                        .get(&session)
                        .is_some_and(|&seen| seen >= count)
                    {
                        return Ok(()); // Relayed already (it came back).
                    }
                    if st.ephemeral.len() >= MAX_EPHEMERAL_SESSIONS {
                        st.ephemeral.clear();
                    }
                    st.ephemeral.insert(session, count);
                    for (conn, peer) in &st.peers {
                        if *conn != self.id {
                            peer.outbox.message(&Message::Ephemeral {
                                sender_id: sender_id.clone(),
                                target_id: peer.peer_id.clone(),
                                document_id: document_id.clone(),
                                session_id: session_id.clone(),
                                count,
                                data: data.clone(),
                            });
                        }
                    }
                }
                Ok(())
            }
            // Not served: Aspen answers sync, not other storages' heads.
            Message::RemoteSubscriptionChange { .. }
            | Message::RemoteHeadsChanged { .. }
            | Message::DocUnavailable { .. } => Ok(()),
            Message::Error { message } => {
                tracing::debug!(peer = %self.peer_id, "automerge-repo app reports: {message}");
                Ok(())
            }
            Message::Join { .. } | Message::Peer { .. } | Message::Leave { .. } => Err(
                Refusal::Protocol(format!("unexpected '{}' message", m.kind())),
            ),
        }
    }

    fn node(&self) -> Result<Arc<NodeState>, Refusal> {
        self.node
            .upgrade()
            .ok_or_else(|| Refusal::Protocol("the node is stopping".into()))
    }

    async fn may_read(&self, id: &DocumentId) -> Result<bool, Refusal> {
        let request = aspen_client::ClientRequest::Doc(DocRequest::Get {
            name: doc_name(id).to_string(),
            consistency: Consistency::Linearizable,
        });
        let node = self.node()?;
        match retry_transient(|| node.authorize(&request, &self.caller)).await {
            Ok(_) => {
                // Authorized: worth keeping the worker awake for (see `busy_poll`).
                crate::busy_poll::touch();
                Ok(true)
            }
            Err(RpcError::PermissionDenied { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// `sync` and `request` messages for one document, in the order received: commits what
    /// they carry that the document lacks (together), receives them into the replica, and
    /// answers every connected app. A `request` for a document the cluster has not got is
    /// answered `doc-unavailable`; a `sync` for one is an app offering a new document (its
    /// first message carries only heads): the node syncs against an empty document, and the
    /// changes it then receives create the document.
    async fn sync(
        &mut self,
        id: DocumentId,
        messages: Vec<(Vec<u8>, bool)>,
    ) -> Result<(), Refusal> {
        let node = self.node()?;
        if !self.may_read(&id).await? {
            self.unavailable(&id);
            return Ok(());
        }
        let offered = messages.iter().any(|(_, request)| !request);
        let doc = self.subscribe(&id)?;
        // Parse off the executor: a sync message may carry a whole document. Messages that
        // bring nothing new (most are acknowledgements) are received and answered in the
        // same trip.
        let parse_doc = doc.clone();
        let (hub, conn) = (self.hub.clone(), self.id);
        let parsed = tokio::task::spawn_blocking(move || {
            let mut parsed = Vec::with_capacity(messages.len());
            let mut new = Vec::new();
            let mut seen = HashSet::new();
            let mut st = parse_doc.state.lock().expect("doc lock");
            for (data, _) in messages {
                let message = no_panic(|| sync::Message::decode(&data))?
                    .map_err(|e| format!("not an Automerge sync message: {e}"))?;
                for chunk in message.changes.iter() {
                    for change in aspen_crdt::received_changes(chunk).map_err(|e| e.to_string())? {
                        let hash = change.hash();
                        let known = st
                            .replica
                            .as_ref()
                            .is_some_and(|r| r.get_change_meta_by_hash(&hash).is_some());
                        if !known && seen.insert(hash) {
                            new.push(change.raw_bytes().to_vec());
                        }
                    }
                }
                parsed.push(message);
            }
            if new.is_empty() && st.replica.is_some() {
                receive(&hub.peer_id, &parse_doc, &mut st, conn, parsed)?;
                return Ok(None);
            }
            Ok::<_, String>(Some((parsed, new)))
        })
        .await
        .map_err(|e| Refusal::Protocol(format!("sync task failed: {e}")))?
        .map_err(Refusal::Protocol)?;
        let Some((parsed, new)) = parsed else {
            return Ok(());
        };
        // In requests within the document service's bounds, dependencies first (as
        // `aspen doc apply` sends a saved document).
        let mut batch = Vec::new();
        let mut bytes = 0;
        let total = new.len();
        for (i, change) in new.into_iter().enumerate() {
            bytes += change.len();
            batch.push(change);
            if i + 1 == total
                || batch.len() == MAX_CHANGES_PER_REQUEST
                || bytes >= MAX_REQUEST_BYTES / 2
            {
                self.commit(&node, &id, std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
        }
        let missing = doc.state.lock().expect("doc lock").replica.is_none();
        if missing {
            // First use on this node: the document as committed (after a read barrier, so a
            // document created through another member is found).
            retry_transient(|| node.cluster.read_barrier()).await?;
            let loaded = node.docs.with_doc(&doc.name, |d| d.clone()).await?;
            let loaded = match loaded {
                Some(d) => Some(d),
                None if offered => Some(Automerge::new()),
                None => None,
            };
            let mut st = doc.state.lock().expect("doc lock");
            if st.replica.is_none() {
                st.replica = loaded;
            }
        }
        let hub = self.hub.clone();
        let answered = tokio::task::spawn_blocking(move || {
            let mut st = doc.state.lock().expect("doc lock");
            receive(&hub.peer_id, &doc, &mut st, conn, parsed)
        })
        .await
        .map_err(|e| Refusal::Protocol(format!("sync task failed: {e}")))?
        .map_err(Refusal::Protocol)?;
        if !answered {
            self.unavailable(&id);
        }
        crate::busy_poll::touch();
        Ok(())
    }

    fn unavailable(&self, id: &DocumentId) {
        self.outbox.message(&Message::DocUnavailable {
            sender_id: self.hub.peer_id.clone(),
            target_id: self.peer_id.clone(),
            document_id: id.clone(),
        });
    }

    /// Registers this connection on document `id` (once).
    fn subscribe(&mut self, id: &DocumentId) -> Result<Arc<SharedDoc>, Refusal> {
        if !self.docs.contains(id) && self.docs.len() >= MAX_DOCS_PER_CONNECTION {
            return Err(Refusal::Protocol(format!(
                "this connection already syncs {MAX_DOCS_PER_CONNECTION} documents"
            )));
        }
        let doc = self.hub.doc(id).map_err(Refusal::Protocol)?;
        doc.state
            .lock()
            .expect("doc lock")
            .peers
            .entry(self.id)
            .or_insert_with(|| DocPeer {
                peer_id: self.peer_id.clone(),
                sync: sync::State::new(),
                outbox: self.outbox.clone(),
            });
        self.docs.insert(id.clone());
        Ok(doc)
    }

    /// Commits `changes` to document `id` as `aspen doc apply` would, creating the document
    /// first if it does not exist.
    async fn commit(
        &self,
        node: &NodeState,
        id: &DocumentId,
        changes: Vec<Vec<u8>>,
    ) -> Result<(), Refusal> {
        let name = doc_name(id).to_string();
        let change = DocRequest::Change {
            name: name.clone(),
            changes,
        };
        let request = aspen_client::ClientRequest::Doc(change.clone());
        retry_transient(|| node.authorize(&request, &self.caller)).await?;
        match retry_transient(|| node.docs.handle(change.clone())).await {
            Ok(_) => Ok(()),
            Err(RpcError::Doc(DocError::NotFound(_))) => {
                let create = DocRequest::Create {
                    name,
                    incarnation: rand::random(),
                };
                let request = aspen_client::ClientRequest::Doc(create.clone());
                retry_transient(|| node.authorize(&request, &self.caller)).await?;
                match retry_transient(|| node.docs.handle(create.clone())).await {
                    // Created meanwhile by someone else (or by an earlier try): as good.
                    Ok(_) | Err(RpcError::Doc(DocError::Exists(_))) => {}
                    Err(e) => return Err(e.into()),
                }
                retry_transient(|| node.docs.handle(change.clone())).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// How long a commit is retried through a leader change before the app is told.
const COMMIT_RETRY_FOR: Duration = Duration::from_secs(30);

/// Runs `attempt` until it succeeds, fails for good, or [`COMMIT_RETRY_FOR`] passes: a
/// leader change or a lost quorum is waited out, as the SDK waits it out for the CLI. Safe to
/// repeat: a document change that was applied is skipped the second time.
async fn retry_transient<T, F, Fut>(mut attempt: F) -> Result<T, RpcError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RpcError>>,
{
    let deadline = tokio::time::Instant::now() + COMMIT_RETRY_FOR;
    let mut pause = Duration::from_millis(20);
    loop {
        match attempt().await {
            Err(RpcError::Unavailable(_) | RpcError::NotLeader { .. })
                if tokio::time::Instant::now() + pause < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

/// The next protocol message: `None` when the app closed the connection, `Err` for what ends
/// it (a frame that is not one message, a socket error).
async fn next_message<S>(
    stream: &mut futures::stream::SplitStream<WebSocketStream<S>>,
) -> Option<Result<Message, String>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        return match stream.next().await? {
            Ok(WsMessage::Binary(b)) => Some(Message::decode(&b).map_err(|e| e.to_string())),
            Ok(WsMessage::Text(_)) => Some(Err(
                "text frames are not part of the protocol (binary CBOR only)".into(),
            )),
            Ok(WsMessage::Close(_)) => None,
            Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_)) => continue,
            Err(e) => Some(Err(format!("websocket: {e}"))),
        };
    }
}

fn no_panic<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .map_err(|_| "Automerge panicked on this input".to_string())
}
