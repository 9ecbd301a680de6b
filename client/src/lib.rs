//! Aspen's Rust SDK: talk to a cluster over iroh with the `aspen/client/1` protocol.
//!
//! ```no_run
//! # async fn demo(ticket: aspen_client::ClusterTicket) -> Result<(), aspen_client::ClientError> {
//! let client = aspen_client::Client::connect(ticket).await?;
//! let put = client.put(b"greeting".to_vec(), b"hello".to_vec()).await?;
//! let kv = client.get(b"greeting".to_vec()).await?.expect("just written");
//! assert_eq!(kv.mod_revision, put.revision);
//! # Ok(()) }
//! ```
//!
//! One connection per node is opened lazily and reused by every request (each request is a
//! QUIC bi-stream). On a transport error, a leader change or an election, a request is retried
//! on another member until the deadline; writes carry a (client id, sequence) session so a
//! retried write is applied at most once.

mod auth;
mod blobs;
mod coordination;
pub mod endpoint;
mod fed;
mod lease;
mod namespaces;
pub mod protocol;
pub mod ticket;
mod watch;
pub mod wire;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aspen_kv::api::*;
use aspen_kv::{NodeId, StateDigest};
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr, EndpointId};

pub use blobs::BlobAdded;
pub use coordination::{Held, LeaseSession};
pub use lease::{is_lease_gone, KeepAlive, KeptAlive, Lease, LeaseRevoked};
pub use protocol::{
    AuthRequest, AuthResponse, BlobInfo, BlobRequest, BlobResponse, BlobStoreStats, BlobTagSummary,
    ClientRequest, ClientResponse, ClusterIdentity, ClusterRequest, ClusterResponse, ClusterStatus,
    Consistency, DocRequest, DocResponse, DocSummary, ExportSummary, FedRequest, FedResponse,
    FollowSummary, KvRequest, KvResponse, MemberStatus, MirrorReport, MirrorSummary, NetFaults,
    NsRequest, NsResponse, Resource, ResourceKind, RpcError, ViaMirror, WhoAmI,
};
pub use protocol::{LeaseStatus, WatchCanceled, WatchRequest};
pub use ticket::{ClusterTicket, NodeTicket, TicketError};
pub use watch::{Watch, WatchError, WatchUpdate};

use protocol::{CLIENT_ALPN, MAX_CLIENT_FRAME};

/// Identity, timeouts and retry policy.
#[derive(Clone)]
pub struct ClientOptions {
    /// Give up on one attempt (connect + request + response) after this long.
    pub attempt_timeout: Duration,
    /// Give up on a request, across all retries, after this long.
    pub deadline: Duration,
    /// The key the client connects with: nodes know the caller by it (grants are given to
    /// keys). `None`: a fresh random key, which a cluster grants nothing.
    pub identity: Option<iroh::SecretKey>,
    /// A capability token (`aspen_trust::CapabilityToken` bytes) presented once on every
    /// connection; its audience must be `identity`'s public key.
    pub token: Option<Vec<u8>>,
    /// Longest one dial may take before the member counts as down for now.
    pub connect_timeout: Duration,
    /// A request safe to send twice (reads, writes with a session, document changes) that
    /// has no answer from one member after this long is also sent to the next one; the
    /// first answer wins. This is what rides out a member that died mid-request.
    pub hedge_after: Duration,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret key or the token.
        f.debug_struct("ClientOptions")
            .field("attempt_timeout", &self.attempt_timeout)
            .field("deadline", &self.deadline)
            .field(
                "identity",
                &self
                    .identity
                    .as_ref()
                    .map(|k| k.public().fmt_short().to_string()),
            )
            .field("token", &self.token.as_ref().map(|_| "<token>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("hedge_after", &self.hedge_after)
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            attempt_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(20),
            identity: None,
            token: None,
            connect_timeout: Duration::from_secs(2),
            hedge_after: Duration::from_millis(500),
        }
    }
}

/// Longest [`Client::close`] waits for members to acknowledge the close.
pub const CLOSE_GRACE: Duration = Duration::from_millis(200);
/// ... when a dial to some member is still pending (it does not answer): the close frames to
/// the others leave at once, and waiting would hold a finished command for the dial's timeout.
pub const CLOSE_GRACE_MEMBER_DOWN: Duration = Duration::from_millis(2);

/// How long a member that failed a dial or a request is tried only after the others.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cluster unreachable after {attempts} attempts over {elapsed:?}: {last}")]
    Unavailable {
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error(transparent)]
    Rpc(RpcError),
    /// (Not a `source`: the message already carries it, and error chains would repeat it.)
    #[error("write refused: {0}")]
    Apply(ApplyError),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(transparent)]
    Endpoint(#[from] endpoint::EndpointError),
    #[error("protocol error: unexpected response {0}")]
    Protocol(String),
    #[error(transparent)]
    Doc(#[from] aspen_crdt::DocError),
    #[error(transparent)]
    Blob(#[from] aspen_blobs::BlobError),
    #[error(transparent)]
    Namespace(#[from] protocol::NamespaceError),
    #[error("{0}")]
    Io(String),
}

impl From<ApplyError> for ClientError {
    fn from(e: ApplyError) -> Self {
        ClientError::Apply(e)
    }
}

/// A document as a node stores it: load `snapshot` (a saved Automerge document), then apply
/// `changes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDocParts {
    pub snapshot: Option<Vec<u8>>,
    pub changes: Vec<Vec<u8>>,
}

/// The outcome of committing changes to a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocChanged {
    /// Hashes of the changes the document did not have yet (empty: nothing new).
    pub added: Vec<automerge::ChangeHash>,
    /// The document's heads right after the commit.
    pub heads: Vec<automerge::ChangeHash>,
}

/// The outcome of a put.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutResult {
    pub revision: Revision,
    pub prev: Option<KeyValue>,
}

/// The outcome of a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteResult {
    pub revision: Revision,
    pub deleted: u64,
    pub prev: Vec<KeyValue>,
}

/// The outcome of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Store revision after the transaction.
    pub revision: Revision,
    /// Whether the comparisons held (the `success` branch ran).
    pub succeeded: bool,
    /// One outcome per write of the branch that ran.
    pub results: Vec<WriteOutcome>,
}

/// A connection to a cluster. Cheap to clone; clones share connections and the session.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    /// Whether `close` closes the endpoint (not when it belongs to someone else, e.g. a node).
    owns_endpoint: bool,
    options: ClientOptions,
    members: Mutex<Vec<NodeTicket>>,
    /// Index into `members` of the node to try first.
    preferred: AtomicUsize,
    conns: Mutex<HashMap<[u8; 32], Connection>>,
    /// One gate per member, so concurrent requests share one new connection to it (and a
    /// dead member's dial never holds up the others).
    dials: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    /// Members that recently failed, and when: tried after the others.
    down: Mutex<HashMap<[u8; 32], std::time::Instant>>,
    /// Dials still running in the background (aborted by `close`).
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    client_id: u64,
    next_seq: AtomicU64,
    in_flight: Mutex<BTreeSet<u64>>,
    /// The watch stream to each member that has watches (see `watch.rs`).
    watch_streams: Mutex<HashMap<[u8; 32], Arc<watch::WatchStream>>>,
    /// Ids of watches on watch streams (never reused).
    next_watch_id: AtomicU64,
}

impl Client {
    /// A client for the cluster in `ticket`, with default options.
    pub async fn connect(ticket: ClusterTicket) -> Result<Client, ClientError> {
        Self::connect_with(ticket, ClientOptions::default()).await
    }

    /// A client for the cluster in `ticket`. Connections are opened on first use.
    pub async fn connect_with(
        ticket: ClusterTicket,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let bind = endpoint::client_bind_addr(ticket.members.iter().flat_map(|m| m.addrs.iter()));
        let endpoint = endpoint::offline_endpoint(bind, options.identity.clone(), vec![]).await?;
        Ok(Self::on_endpoint(endpoint, true, ticket, options))
    }

    /// A client that dials from an endpoint the caller owns (a node asking to join uses its
    /// own endpoint, so the cluster sees the node's key). `close` leaves the endpoint open.
    pub fn with_endpoint(
        endpoint: Endpoint,
        ticket: ClusterTicket,
        options: ClientOptions,
    ) -> Client {
        Self::on_endpoint(endpoint, false, ticket, options)
    }

    fn on_endpoint(
        endpoint: Endpoint,
        owns_endpoint: bool,
        ticket: ClusterTicket,
        options: ClientOptions,
    ) -> Client {
        Client {
            inner: Arc::new(Inner {
                endpoint,
                owns_endpoint,
                options,
                members: Mutex::new(ticket.members),
                preferred: AtomicUsize::new(0),
                conns: Mutex::new(HashMap::new()),
                dials: Mutex::new(HashMap::new()),
                down: Mutex::new(HashMap::new()),
                background: Mutex::new(Vec::new()),
                client_id: rand::random(),
                next_seq: AtomicU64::new(1),
                in_flight: Mutex::new(BTreeSet::new()),
                watch_streams: Default::default(),
                next_watch_id: AtomicU64::new(1),
            }),
        }
    }

    /// The public key this client connects with (what nodes know it by).
    pub fn key(&self) -> [u8; 32] {
        *self.inner.endpoint.id().as_bytes()
    }

    /// A client that talks to one node only (to initialize it, or inspect it).
    pub async fn connect_node(
        node: NodeTicket,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        Self::connect_with(
            ClusterTicket {
                members: vec![node],
            },
            options,
        )
        .await
    }

    /// Closes connections and the endpoint (if the client made it). Waits at most
    /// [`CLOSE_GRACE`] for peers to acknowledge: a member that stopped answering must not hold
    /// up a command that is done.
    pub async fn close(&self) {
        // A dial still running means a member that does not answer: nothing to wait for.
        let mut grace = CLOSE_GRACE;
        for task in self.inner.background.lock().expect("lock").drain(..) {
            if !task.is_finished() {
                grace = CLOSE_GRACE_MEMBER_DOWN;
            }
            task.abort();
        }
        self.inner.watch_streams.lock().expect("lock").clear();
        for (_, c) in self.inner.conns.lock().expect("lock").drain() {
            c.close(0u32.into(), b"client closed");
        }
        if self.inner.owns_endpoint {
            let _ = tokio::time::timeout(grace, self.inner.endpoint.close()).await;
        }
    }

    /// Sets `key` to `value`.
    pub async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<PutResult, ClientError> {
        self.put_with(key, value, false).await
    }

    /// Sets `key` to `value`, returning the previous value when `prev_kv`.
    pub async fn put_with(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        prev_kv: bool,
    ) -> Result<PutResult, ClientError> {
        match self
            .write(WriteOp::Put {
                key,
                value,
                prev_kv,
            })
            .await?
        {
            WriteOutcome::Put { revision, prev } => Ok(PutResult { revision, prev }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: Vec<u8>) -> Result<DeleteResult, ClientError> {
        self.delete_range(key, None, false).await
    }

    /// Deletes the keys in `[start, end)` (`end == None`: just `start`; empty `end`: to the end).
    pub async fn delete_range(
        &self,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        prev_kv: bool,
    ) -> Result<DeleteResult, ClientError> {
        match self
            .write(WriteOp::Delete {
                start,
                end,
                prev_kv,
            })
            .await?
        {
            WriteOutcome::Delete {
                revision,
                deleted,
                prev,
            } => Ok(DeleteResult {
                revision,
                deleted,
                prev,
            }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Runs an etcd-style transaction: if every comparison holds, the `success` writes, else
    /// the `failure` writes, atomically at one revision.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResult, ClientError> {
        match self.write(WriteOp::Txn(txn)).await? {
            WriteOutcome::Txn {
                revision,
                succeeded,
                results,
            } => Ok(TxnResult {
                revision,
                succeeded,
                results,
            }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sets `key` to `new` if its value is `expect` (`None`: if it is absent). Returns whether
    /// it swapped, and the store revision.
    pub async fn compare_and_swap(
        &self,
        key: Vec<u8>,
        expect: Option<Vec<u8>>,
        new: Vec<u8>,
    ) -> Result<TxnResult, ClientError> {
        self.txn(Txn::compare_and_swap(key, expect, new)).await
    }

    /// Forgets history below `revision`.
    pub async fn compact(&self, revision: Revision) -> Result<Revision, ClientError> {
        Ok(self.write(WriteOp::Compact { revision }).await?.revision())
    }

    /// Applies one write, at most once even across retries.
    pub async fn write(&self, op: WriteOp) -> Result<WriteOutcome, ClientError> {
        op.validate()?;
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let acked_below = {
            let mut in_flight = self.inner.in_flight.lock().expect("lock");
            in_flight.insert(seq);
            *in_flight.first().expect("just inserted")
        };
        let session = Session {
            client_id: self.inner.client_id,
            seq,
            acked_below,
        };
        let request = ClientRequest::Kv(KvRequest::Write {
            commands: vec![Command {
                session: Some(session),
                op,
            }],
        });
        let result = self.request(&request).await;
        self.inner.in_flight.lock().expect("lock").remove(&seq);
        match result? {
            ClientResponse::Kv(KvResponse::Write { mut results }) if results.len() == 1 => {
                Ok(results.pop().expect("one")?)
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Reads `key` (linearizable).
    pub async fn get(&self, key: Vec<u8>) -> Result<Option<KeyValue>, ClientError> {
        self.get_with(key, 0, Consistency::Linearizable).await
    }

    /// Reads `key` at `revision` (0: current) with the given consistency.
    pub async fn get_with(
        &self,
        key: Vec<u8>,
        revision: Revision,
        consistency: Consistency,
    ) -> Result<Option<KeyValue>, ClientError> {
        let mut request = RangeRequest::key(key);
        request.revision = revision;
        Ok(self.range(request, consistency).await?.kvs.pop())
    }

    /// Reads a range of keys.
    pub async fn range(
        &self,
        request: RangeRequest,
        consistency: Consistency,
    ) -> Result<RangeResponse, ClientError> {
        request.validate()?;
        match self
            .request(&ClientRequest::Kv(KvRequest::Range {
                request,
                consistency,
            }))
            .await?
        {
            ClientResponse::Kv(KvResponse::Range(r)) => Ok(r),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The cluster as seen by the first node that answers.
    /// The cluster as seen by the first node that answers. The client also adopts the
    /// membership it reports, so it keeps reaching the cluster as members come and go.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        match self
            .request(&ClientRequest::Cluster(ClusterRequest::Status))
            .await?
        {
            ClientResponse::Cluster(ClusterResponse::Status(s)) => {
                self.adopt_members(&s);
                Ok(s)
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// A digest of one node's local state (the first member that answers): replicas that
    /// applied the same log prefix report equal digests. Use [`Client::connect_node`] to ask a
    /// particular node.
    pub async fn state_digest(&self) -> Result<StateDigest, ClientError> {
        match self
            .request(&ClientRequest::Cluster(ClusterRequest::StateDigest))
            .await?
        {
            ClientResponse::Cluster(ClusterResponse::StateDigest(d)) => Ok(d),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sets the network faults of the first member that answers (use
    /// [`Client::connect_node`] to pick the node). Fault tests only: a node refuses unless it
    /// runs with `--unsafe-allow-fault-injection`.
    pub async fn set_net_faults(&self, faults: NetFaults) -> Result<(), ClientError> {
        match self
            .request(&ClientRequest::Cluster(ClusterRequest::SetNetFaults(
                faults,
            )))
            .await?
        {
            ClientResponse::Cluster(ClusterResponse::Done) => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Learns the cluster's current members (a ticket may list only some, or old ones).
    pub async fn refresh_members(&self) -> Result<(), ClientError> {
        self.status().await.map(|_| ())
    }

    /// The members this client currently knows.
    pub fn members(&self) -> Vec<NodeTicket> {
        self.inner.members.lock().expect("lock").clone()
    }

    fn adopt_members(&self, status: &ClusterStatus) {
        if status.members.is_empty() {
            return; // An uninitialized node knows no cluster.
        }
        let mut members = self.inner.members.lock().expect("lock");
        let current =
            members[self.inner.preferred.load(Ordering::Relaxed) % members.len()].endpoint_id;
        *members = status.members.iter().map(|m| m.node.clone()).collect();
        // Keep talking to the leader if known, else to the node we were using.
        let leader = status
            .leader
            .and_then(|l| status.members.iter().position(|m| m.node_id == l));
        let index = leader
            .or_else(|| members.iter().position(|m| m.endpoint_id == current))
            .unwrap_or(0);
        self.inner.preferred.store(index, Ordering::Relaxed);
    }

    /// Makes the (single) node this client talks to a one-member cluster named `name` (may
    /// be empty), with this client's key as its first admin. `secret` is the node's
    /// bootstrap secret (`DATA_DIR/bootstrap.secret`).
    pub async fn init_cluster(
        &self,
        name: String,
        secret: [u8; 32],
    ) -> Result<ClusterStatus, ClientError> {
        match self
            .request(&ClientRequest::Cluster(ClusterRequest::Init {
                name,
                secret,
            }))
            .await?
        {
            ClientResponse::Cluster(ClusterResponse::Status(s)) => Ok(s),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Adds a node (learner, then voter) and returns its node id. `secret` is the new node's
    /// bootstrap secret (its `DATA_DIR/bootstrap.secret`), which shows the node that its
    /// operator wants it in this cluster. Needs `cluster:admin`.
    pub async fn add_member(
        &self,
        node: NodeTicket,
        secret: [u8; 32],
    ) -> Result<NodeId, ClientError> {
        let id = node.node_id();
        match self
            .request(&ClientRequest::Cluster(ClusterRequest::Admit {
                node,
                secret,
            }))
            .await?
        {
            ClientResponse::Cluster(ClusterResponse::Done) => Ok(id),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Removes a node from the cluster.
    pub async fn remove_member(&self, node_id: NodeId) -> Result<(), ClientError> {
        match self
            .request(&ClientRequest::Cluster(ClusterRequest::RemoveMember {
                node_id,
            }))
            .await?
        {
            ClientResponse::Cluster(ClusterResponse::Done) => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The cluster identity as the first member that answers holds it, and that member (whose
    /// endpoint id iroh's TLS authenticated). Check `certificate` against the cluster key you
    /// expect before trusting the answer (`aspen_trust::NodeCertificate::verify`).
    pub async fn identity(&self) -> Result<(NodeTicket, ClusterIdentity), ClientError> {
        match self
            .request_from(&ClientRequest::Cluster(ClusterRequest::Identity))
            .await?
        {
            (node, ClientResponse::Cluster(ClusterResponse::Identity(i))) => Ok((node, i)),
            (_, other) => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Creates a single-use invitation for one node to join; returns the secret token and
    /// its expiry (Unix seconds).
    pub async fn create_invite(&self, valid_for: Duration) -> Result<([u8; 32], u64), ClientError> {
        let request = ClientRequest::Cluster(ClusterRequest::CreateInvite {
            valid_for_secs: valid_for.as_secs(),
        });
        match self.request(&request).await? {
            ClientResponse::Cluster(ClusterResponse::Invite { token, expires_at }) => {
                Ok((token, expires_at))
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Asks the cluster to admit `node` with the invitation `invite`.
    pub async fn join(&self, node: NodeTicket, invite: [u8; 32]) -> Result<(), ClientError> {
        match self
            .request(&ClientRequest::Cluster(ClusterRequest::Join {
                node,
                invite,
            }))
            .await?
        {
            ClientResponse::Cluster(ClusterResponse::Done) => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Creates an empty Automerge document named `name`.
    pub async fn doc_create(&self, name: &str) -> Result<(), ClientError> {
        aspen_crdt::DocName::new(name)?;
        let request = ClientRequest::Doc(DocRequest::Create {
            name: name.to_string(),
            incarnation: rand::random(),
        });
        match self.request(&request).await? {
            ClientResponse::Doc(DocResponse::Done) => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Commits raw Automerge changes (from any Automerge implementation) to a document.
    /// Changes it already has are skipped, so a retry is harmless.
    pub async fn doc_apply(
        &self,
        name: &str,
        changes: Vec<Vec<u8>>,
    ) -> Result<DocChanged, ClientError> {
        let request = ClientRequest::Doc(DocRequest::Change {
            name: name.to_string(),
            changes,
        });
        match self.request(&request).await? {
            ClientResponse::Doc(DocResponse::Changed { added, heads }) => Ok(DocChanged {
                added: added.into_iter().map(automerge::ChangeHash).collect(),
                heads: heads.into_iter().map(automerge::ChangeHash).collect(),
            }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The document as the cluster holds it (linearizable unless asked otherwise).
    pub async fn doc_get(
        &self,
        name: &str,
        consistency: Consistency,
    ) -> Result<automerge::Automerge, ClientError> {
        let stored = self.doc_fetch(name, consistency).await?;
        Ok(aspen_crdt::assemble(
            name,
            stored.snapshot.as_deref(),
            stored.changes.iter().map(Vec::as_slice),
        )?)
    }

    /// The document as stored: its compacted snapshot (if any) and its pending changes.
    pub async fn doc_fetch(
        &self,
        name: &str,
        consistency: Consistency,
    ) -> Result<StoredDocParts, ClientError> {
        let request = ClientRequest::Doc(DocRequest::Get {
            name: name.to_string(),
            consistency,
        });
        match self.request(&request).await? {
            ClientResponse::Doc(DocResponse::Doc { snapshot, changes }) => {
                Ok(StoredDocParts { snapshot, changes })
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Edits a document: `edit` runs on a transaction over the current document (with a
    /// fresh actor), and the resulting change is committed. Edits made concurrently elsewhere
    /// merge with it as Automerge merges. `None` if `edit` changed nothing.
    pub async fn doc_change<F>(
        &self,
        name: &str,
        message: Option<String>,
        edit: F,
    ) -> Result<Option<DocChanged>, ClientError>
    where
        F: FnOnce(
            &mut automerge::transaction::Transaction<'_>,
        ) -> Result<(), automerge::AutomergeError>,
    {
        let mut doc = self.doc_get(name, Consistency::Linearizable).await?;
        doc.set_actor(automerge::ActorId::random());
        let mut tx = doc.transaction();
        edit(&mut tx).map_err(|e| aspen_crdt::DocError::BadPatch {
            index: 0,
            reason: e.to_string(),
        })?;
        let (hash, _) = tx.commit_with(automerge::transaction::CommitOptions {
            message,
            time: Some(unix_secs()),
        });
        let Some(change) = hash.and_then(|h| {
            use automerge::ReadDoc;
            doc.get_change_by_hash(&h)
        }) else {
            return Ok(None);
        };
        self.doc_apply(name, vec![change.raw_bytes().to_vec()])
            .await
            .map(Some)
    }

    /// Applies a JSON patch (see [`aspen_crdt::patch`]) to a document as one change.
    pub async fn doc_patch(
        &self,
        name: &str,
        ops: &[aspen_crdt::patch::PatchOp],
        message: Option<String>,
    ) -> Result<Option<DocChanged>, ClientError> {
        let mut doc = self.doc_get(name, Consistency::Linearizable).await?;
        doc.set_actor(automerge::ActorId::random());
        match aspen_crdt::patch::apply(&mut doc, ops, message, unix_secs())? {
            Some(change) => self.doc_apply(name, vec![change]).await.map(Some),
            None => Ok(None),
        }
    }

    /// Up to `limit` documents in name order after `start_after`; `true` if more follow.
    pub async fn doc_list(
        &self,
        start_after: Option<String>,
        limit: u32,
        consistency: Consistency,
    ) -> Result<(Vec<DocSummary>, bool), ClientError> {
        let request = ClientRequest::Doc(DocRequest::List {
            start_after,
            limit,
            consistency,
        });
        match self.request(&request).await? {
            ClientResponse::Doc(DocResponse::List { docs, more }) => Ok((docs, more)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Deletes a document and everything it holds.
    pub async fn doc_delete(&self, name: &str) -> Result<(), ClientError> {
        match self
            .request(&ClientRequest::Doc(DocRequest::Delete {
                name: name.to_string(),
            }))
            .await?
        {
            ClientResponse::Doc(DocResponse::Done) => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sends `request`, retrying on other members until the deadline.
    async fn request(&self, request: &ClientRequest) -> Result<ClientResponse, ClientError> {
        self.request_from(request).await.map(|(_, r)| r)
    }

    /// Like [`Self::request`], also returning the member that answered.
    ///
    /// Members are asked one at a time, starting with the preferred one (the leader when
    /// known), skipping members that failed recently. A request safe to send twice that has
    /// no answer after `hedge_after` is also sent to the next member, and the first final
    /// answer wins; so a member that died (with our connection still open) costs about
    /// `hedge_after`, not `attempt_timeout`.
    async fn request_from(
        &self,
        request: &ClientRequest,
    ) -> Result<(NodeTicket, ClientResponse), ClientError> {
        use futures::stream::{FuturesUnordered, StreamExt};
        let inner = &self.inner;
        let start = tokio::time::Instant::now();
        let deadline = start + inner.options.deadline;
        let hedge = hedge_safe(request);
        let mut attempts = 0u32;
        let mut backoff = Duration::from_millis(20);
        let mut last = String::from("no member answered");
        let mut inflight = FuturesUnordered::new();
        let mut asked: Vec<[u8; 32]> = Vec::new();
        let mut next_hedge = start + inner.options.hedge_after;
        let unavailable = |attempts: u32, last: String| ClientError::Unavailable {
            attempts,
            elapsed: start.elapsed(),
            last,
        };
        if !self.has_live_connection() {
            // A fresh client: dial every member at once and start with the first that
            // answers, so a dead member listed first costs nothing.
            self.connect_first().await;
        }
        loop {
            if inflight.is_empty() {
                if attempts > 0 {
                    if tokio::time::Instant::now() + backoff >= deadline {
                        return Err(unavailable(attempts, last));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                let Some(target) = self.pick_target(&[]) else {
                    return Err(unavailable(attempts, "the client knows no member".into()));
                };
                attempts += 1;
                asked = vec![target.endpoint_id];
                next_hedge = tokio::time::Instant::now() + inner.options.hedge_after;
                inflight.push(self.timed_attempt(target, request));
            }
            let can_hedge = hedge && asked.len() < self.inner.members.lock().expect("lock").len();
            tokio::select! {
                Some((target, outcome)) = inflight.next() => {
                    asked.retain(|k| *k != target.endpoint_id);
                    match outcome {
                        // A hint naming the member that answered is no hint (a node that
                        // does not lead must never name itself): ask another member instead.
                        Ok(ClientResponse::Error(RpcError::NotLeader { leader: Some(leader) }))
                            if leader.endpoint_id != target.endpoint_id =>
                        {
                            self.prefer(leader);
                            last = format!("node {:016x} is not the leader", target.node_id());
                        }
                        Ok(ClientResponse::Error(e)) if e.is_retryable() => {
                            self.rotate_past(&target);
                            last = e.to_string();
                            // Other attempts may still be stuck (on a dead member): do not
                            // wait for them, ask again after a short backoff.
                            next_hedge = tokio::time::Instant::now() + backoff;
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                        Ok(ClientResponse::Error(e)) => return Err(ClientError::Rpc(e)),
                        Ok(response) => {
                            self.mark_up(&target);
                            return Ok((target, response));
                        }
                        Err(e) => {
                            self.forget(&target);
                            self.mark_down(&target);
                            self.rotate_past(&target);
                            last = e;
                            next_hedge = tokio::time::Instant::now() + backoff;
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_hedge), if can_hedge => {
                    // No answer yet: ask another member as well.
                    next_hedge += inner.options.hedge_after;
                    if let Some(target) = self.pick_target(&asked) {
                        attempts += 1;
                        asked.push(target.endpoint_id);
                        inflight.push(self.timed_attempt(target, request));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(unavailable(attempts, last));
                }
            }
        }
    }

    /// One attempt on `target`, bounded by `attempt_timeout`.
    async fn timed_attempt(
        &self,
        target: NodeTicket,
        request: &ClientRequest,
    ) -> (NodeTicket, Result<ClientResponse, String>) {
        let timeout = self.inner.options.attempt_timeout;
        let outcome = match tokio::time::timeout(timeout, self.attempt(&target, request)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer from {:016x} within {timeout:?}",
                target.node_id()
            )),
        };
        (target, outcome)
    }

    fn has_live_connection(&self) -> bool {
        self.inner
            .conns
            .lock()
            .expect("lock")
            .values()
            .any(|c| c.close_reason().is_none())
    }

    /// Dials every member at once; returns when the first connection is up (making that
    /// member the preferred one) or every dial failed. The other dials finish in the
    /// background and their connections join the pool.
    async fn connect_first(&self) {
        let members = self.members();
        if members.len() < 2 {
            return;
        }
        let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(members.len());
        for target in members {
            let client = self.clone();
            let first_tx = first_tx.clone();
            let task = tokio::spawn(async move {
                let ok = client.connection(&target).await.is_ok();
                if !ok {
                    client.mark_down(&target);
                }
                let _ = first_tx.send((target, ok)).await;
            });
            let mut background = self.inner.background.lock().expect("lock");
            background.retain(|t| !t.is_finished());
            background.push(task);
        }
        drop(first_tx);
        while let Some((target, ok)) = first_rx.recv().await {
            if ok {
                self.prefer_known(&target);
                return;
            }
        }
    }

    /// The member to ask next: the preferred one, else the next in order, skipping members
    /// in `exclude` and (unless nothing else is left) members that failed recently.
    fn pick_target(&self, exclude: &[[u8; 32]]) -> Option<NodeTicket> {
        let members = self.inner.members.lock().expect("lock");
        if members.is_empty() {
            return None;
        }
        let start = self.inner.preferred.load(Ordering::Relaxed) % members.len();
        let down = self.inner.down.lock().expect("lock");
        let recently_down = |m: &NodeTicket| {
            down.get(&m.endpoint_id)
                .is_some_and(|at| at.elapsed() < DOWN_FOR)
        };
        let candidates = || {
            (0..members.len())
                .map(|i| &members[(start + i) % members.len()])
                .filter(|m| !exclude.contains(&m.endpoint_id))
        };
        candidates()
            .find(|m| !recently_down(m))
            .or_else(|| candidates().next())
            .cloned()
    }

    fn mark_down(&self, target: &NodeTicket) {
        self.inner
            .down
            .lock()
            .expect("lock")
            .insert(target.endpoint_id, std::time::Instant::now());
    }

    fn mark_up(&self, target: &NodeTicket) {
        self.inner
            .down
            .lock()
            .expect("lock")
            .remove(&target.endpoint_id);
    }

    /// Moves the preference past `target` (if it is still the preferred member).
    fn rotate_past(&self, target: &NodeTicket) {
        let members = self.inner.members.lock().expect("lock");
        if members.is_empty() {
            return;
        }
        let current = self.inner.preferred.load(Ordering::Relaxed) % members.len();
        if members[current].endpoint_id == target.endpoint_id {
            self.inner
                .preferred
                .store((current + 1) % members.len(), Ordering::Relaxed);
        }
    }

    /// Prefers a member already in the list.
    fn prefer_known(&self, target: &NodeTicket) {
        let members = self.inner.members.lock().expect("lock");
        if let Some(i) = members
            .iter()
            .position(|m| m.endpoint_id == target.endpoint_id)
        {
            self.inner.preferred.store(i, Ordering::Relaxed);
        }
    }

    async fn attempt(
        &self,
        target: &NodeTicket,
        request: &ClientRequest,
    ) -> Result<ClientResponse, String> {
        let conn = match self.connection(target).await {
            Ok(c) => c,
            Err(ConnectError::Refused(e)) => return Ok(ClientResponse::Error(e)),
            Err(ConnectError::Transport(e)) => return Err(e),
        };
        exchange(&conn, request).await
    }

    async fn connection(&self, target: &NodeTicket) -> Result<Connection, ConnectError> {
        let inner = &self.inner;
        let cached = |inner: &Inner| {
            inner
                .conns
                .lock()
                .expect("lock")
                .get(&target.endpoint_id)
                .filter(|c| c.close_reason().is_none())
                .cloned()
        };
        if let Some(c) = cached(inner) {
            return Ok(c);
        }
        let gate = inner
            .dials
            .lock()
            .expect("lock")
            .entry(target.endpoint_id)
            .or_default()
            .clone();
        let _dialling = gate.lock().await;
        if let Some(c) = cached(inner) {
            return Ok(c);
        }
        let addr = addr_of(target)?;
        let conn = tokio::time::timeout(
            inner.options.connect_timeout,
            inner.endpoint.connect(addr, CLIENT_ALPN),
        )
        .await
        .map_err(|_| {
            format!(
                "connect to {:016x}: no answer within {:?}",
                target.node_id(),
                inner.options.connect_timeout
            )
        })?
        .map_err(|e| format!("connect to {:016x}: {e}", target.node_id()))?;
        if let Some(token) = &inner.options.token {
            // Once per connection, before anything else is sent on it.
            let present = ClientRequest::Auth(AuthRequest::PresentToken {
                token: token.clone(),
            });
            match exchange(&conn, &present).await? {
                ClientResponse::Auth(AuthResponse::Done) => {}
                ClientResponse::Error(e) => return Err(ConnectError::Refused(e)),
                other => return Err(ConnectError::Transport(format!("unexpected {other:?}"))),
            }
        }
        inner
            .conns
            .lock()
            .expect("lock")
            .insert(target.endpoint_id, conn.clone());
        Ok(conn)
    }

    fn forget(&self, target: &NodeTicket) {
        self.inner
            .conns
            .lock()
            .expect("lock")
            .remove(&target.endpoint_id);
    }

    fn rotate(&self) {
        self.inner.preferred.fetch_add(1, Ordering::Relaxed);
    }

    /// Asks `node` first from now on (a member named it the leader). Its addresses come from
    /// that member's view of the membership, which may be older than the client's (a leader
    /// that moved since): they are added to the ones the client knows, never put in their
    /// place, so a stale hint cannot cost the client a working address.
    fn prefer(&self, node: NodeTicket) {
        let mut members = self.inner.members.lock().expect("lock");
        let index = match members
            .iter()
            .position(|m| m.endpoint_id == node.endpoint_id)
        {
            Some(i) => {
                merge_addrs(&mut members[i], node);
                i
            }
            None => {
                members.push(node);
                members.len() - 1
            }
        };
        self.inner.preferred.store(index, Ordering::Relaxed);
    }
}

/// Adds `hint`'s addresses to `known`'s (the same member), the hint's first, at most
/// [`ticket::MAX_ADDRS_PER_NODE`] in all.
fn merge_addrs(known: &mut NodeTicket, hint: NodeTicket) {
    debug_assert_eq!(known.endpoint_id, hint.endpoint_id);
    let mut addrs = hint.addrs;
    for addr in known.addrs.drain(..) {
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    addrs.truncate(ticket::MAX_ADDRS_PER_NODE);
    known.addrs = addrs;
}

/// Whether sending `request` twice (to two members) is harmless: reads, writes carrying an
/// idempotency session, and Automerge changes (a change a document has is skipped).
fn hedge_safe(request: &ClientRequest) -> bool {
    use ClientRequest as R;
    match request {
        R::Kv(KvRequest::Write { commands }) => commands.iter().all(|c| c.session.is_some()),
        R::Kv(KvRequest::Range { .. } | KvRequest::Lease(_))
        | R::Cluster(
            ClusterRequest::Status | ClusterRequest::Identity | ClusterRequest::StateDigest,
        )
        | R::Auth(AuthRequest::WhoAmI | AuthRequest::List)
        | R::Doc(DocRequest::Get { .. } | DocRequest::List { .. } | DocRequest::Change { .. })
        | R::Blob(BlobRequest::Stat { .. } | BlobRequest::List { .. })
        | R::Ns(NsRequest::Get { .. } | NsRequest::List { .. } | NsRequest::Namespaces)
        | R::Fed(FedRequest::Exports | FedRequest::Follows | FedRequest::Mirrors) => true,
        _ => false,
    }
}

/// Why no connection to a node could be used.
enum ConnectError {
    /// The node refused what the client presented (a capability token): not worth retrying.
    Refused(RpcError),
    Transport(String),
}

impl From<String> for ConnectError {
    fn from(e: String) -> Self {
        ConnectError::Transport(e)
    }
}

/// One request and its response on a new bi-stream of `conn`.
async fn exchange(conn: &Connection, request: &ClientRequest) -> Result<ClientResponse, String> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("open stream: {e}"))?;
    wire::write_frame(&mut send, request, MAX_CLIENT_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| format!("finish: {e}"))?;
    wire::read_frame(&mut recv, MAX_CLIENT_FRAME)
        .await
        .map_err(|e| e.to_string())
}

/// The dialable address of a node.
fn addr_of(target: &NodeTicket) -> Result<EndpointAddr, String> {
    let id =
        EndpointId::from_bytes(&target.endpoint_id).map_err(|e| format!("bad node key: {e}"))?;
    let mut addr = EndpointAddr::new(id);
    for a in &target.addrs {
        addr = addr.with_ip_addr(*a);
    }
    Ok(addr)
}

fn unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(addrs: &[&str]) -> NodeTicket {
        NodeTicket {
            endpoint_id: [7; 32],
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    /// A leader hint from a member with an older view of the membership keeps the address
    /// the client already has, and puts the hint's first.
    #[test]
    fn a_stale_leader_hint_keeps_the_known_address() {
        let mut known = ticket(&["127.0.0.1:2000"]);
        merge_addrs(&mut known, ticket(&["127.0.0.1:1000"]));
        assert_eq!(known, ticket(&["127.0.0.1:1000", "127.0.0.1:2000"]));
        merge_addrs(&mut known, ticket(&["127.0.0.1:2000"]));
        assert_eq!(known, ticket(&["127.0.0.1:2000", "127.0.0.1:1000"]));
        let many: Vec<String> = (0..20).map(|i| format!("127.0.0.1:{}", 3000 + i)).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        merge_addrs(&mut known, ticket(&many));
        assert_eq!(known.addrs.len(), ticket::MAX_ADDRS_PER_NODE);
    }
}
