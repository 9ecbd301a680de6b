//! The client protocol, `aspen/client/2`: one request and one response per QUIC bi-stream.
//!
//! Every message is one frame (see [`crate::wire`]). A request names its service (kv,
//! cluster, doc, blob, ns, auth) and then the request within it; each service answers with
//! its own response enum or with [`ClientResponse::Error`], so a node can never answer a
//! key-value read with, say, a blob listing. Enum variants are only ever appended;
//! golden-bytes tests pin the encoding.
//!
//! Version 2 (access control): the caller is the key the QUIC handshake proved, and every
//! request needs a permission (see the node's `server/auth.rs`). Initializing a node and
//! admitting a member carry the node's bootstrap secret (version 1's requests for these
//! carried no proof that the caller may claim the node and are gone).

use serde::{Deserialize, Serialize};

use aspen_kv::api::{
    ApplyError, Command, CommandResult, Event, Key, LeaseId, LimitError, RangeRequest,
    RangeResponse, ReadError, Revision,
};
use aspen_kv::{NodeId, StateDigest};
pub use aspen_sync::{Resource, ResourceKind};

use crate::ticket::NodeTicket;

/// ALPN of the client protocol.
pub const CLIENT_ALPN: &[u8] = b"aspen/client/2";
/// Largest client request or response frame: one maximal value plus generous overhead, or a
/// full page of a range read.
pub const MAX_CLIENT_FRAME: usize = 64 * 1024 * 1024;

/// How a read is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Consistency {
    /// Linearizable: confirmed with the leader (ReadIndex) before reading. The default.
    #[default]
    Linearizable,
    /// Serializable: the contacted node's local state, possibly stale, never torn.
    Serializable,
}

impl Consistency {
    /// `Serializable` if `serializable`, else the default `Linearizable` (CLI flag helper).
    pub fn serializable_if(serializable: bool) -> Self {
        if serializable {
            Consistency::Serializable
        } else {
            Consistency::Linearizable
        }
    }
}

/// A client request: one service's request. Each service answers with its own response
/// type (a [`KvRequest`] with a [`KvResponse`], and so on) or with [`ClientResponse::Error`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    Kv(KvRequest),
    Cluster(ClusterRequest),
    Doc(DocRequest),
    Blob(BlobRequest),
    Ns(NsRequest),
    Auth(AuthRequest),
    Fed(FedRequest),
}

/// The key-value store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvRequest {
    /// Writes; any node accepts them and forwards to the leader. → [`KvResponse::Write`]
    Write { commands: Vec<Command> },
    /// A read of a key or a range. → [`KvResponse::Range`]
    Range {
        request: RangeRequest,
        consistency: Consistency,
    },
    /// Retired (one watch per stream): refused; open a [`KvRequest::Watches`] stream. Kept
    /// so that the tags after it keep their values.
    Watch(WatchRequest),
    /// Leases: keep alive, inspect, list (they are granted and revoked with writes:
    /// [`aspen_kv::api::WriteOp::LeaseGrant`], [`aspen_kv::api::WriteOp::LeaseRevoke`]).
    /// → [`KvResponse::Lease`]
    Lease(LeaseRequest),
    /// Makes this stream a watch stream: after this frame the client sends
    /// [`WatchControl`] frames (create and cancel watches, each with an id the client
    /// picks) and the node sends [`KvResponse::Watched`] frames until either side closes it.
    /// One stream carries every watch of a connection, at most
    /// [`MAX_WATCHES_PER_CONNECTION`] at once. A reader that leaves frames unread for long
    /// (30 s) has the stream reset, cancelling its watches as too slow.
    Watches,
}

/// What a client sends on a [`KvRequest::Watches`] stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchControl {
    /// Starts watch `id` (an id not in use on this stream). The node answers
    /// [`WatchMessage::Created`] then its updates, or [`WatchMessage::Refused`].
    Create { id: u64, request: WatchRequest },
    /// Stops watch `id`; nothing more is sent for it.
    Cancel { id: u64 },
}

/// Most watches one client connection may have open at once (each is a QUIC stream); the
/// next one is refused with [`RpcError::TooManyWatches`].
pub const MAX_WATCHES_PER_CONNECTION: usize = 4096;

/// Most lease ids one [`LeaseRequest::List`] returns (continue with `after`).
pub const MAX_LEASES_PER_LIST: usize = 10_000;

/// A lease request. Leases are granted and revoked with writes (idempotent across retries
/// like any write; a grant with id 0 gets one picked by the node). Keys are attached with a
/// put that names the lease ([`aspen_kv::api::WriteOp::PutWith`]); when the lease ends
/// (revoked, or not kept alive for its time to live) they are deleted, at one revision, with
/// watch events like any delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseRequest {
    /// Restarts the lease's time to live, from now. Acknowledged only by the leader, after it
    /// confirmed its leadership: the lease then lives at least `ttl_secs` from when this
    /// request was sent. → [`LeaseResponse::KeptAlive`]
    KeepAlive { id: LeaseId },
    /// The lease's time to live, time left, and attached keys when `keys` (those the caller
    /// may read). → [`LeaseResponse::TimeToLive`]
    TimeToLive { id: LeaseId, keys: bool },
    /// Lease ids after `after`, in order, at most [`MAX_LEASES_PER_LIST`].
    /// → [`LeaseResponse::List`]
    List { after: LeaseId },
}

/// The answer to a [`LeaseRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseResponse {
    KeptAlive { id: LeaseId, ttl_secs: u64 },
    TimeToLive(LeaseStatus),
    List { ids: Vec<LeaseId>, more: bool },
}

/// A lease as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub id: LeaseId,
    /// The time to live it was granted with.
    pub ttl_secs: u64,
    /// Time left before it expires, by the leader's clock.
    pub remaining_ms: u64,
    /// Keys attached.
    pub key_count: u64,
    /// The attached keys, when asked for (only those the caller may read).
    pub keys: Vec<Key>,
}

/// What a watch follows: the events of keys in `[start, end)` (or of the key `start` when
/// `end` is `None`; an empty `end` means "to the end of the key space"), from revision `from`
/// (0: from the next revision) or, resuming inside a revision, after key `after` in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    pub start: Key,
    pub end: Option<Key>,
    pub from: Revision,
    pub after: Option<Key>,
    /// Also send each key's value before the event.
    pub prev_kv: bool,
    /// Send `Progress` after this long without events (0: never; at most
    /// [`MAX_PROGRESS_EVERY_MS`]).
    pub progress_every_ms: u64,
}

/// Longest progress interval a watch may ask for (a day; longer ones are refused).
pub const MAX_PROGRESS_EVERY_MS: u64 = 24 * 60 * 60 * 1000;

/// One frame of a watch stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchMessage {
    /// The watch runs: its events start at revision `from`; `revision` is the node's current
    /// revision.
    Created { from: Revision, revision: Revision },
    /// Events in revision order, each revision's events together, except that a revision
    /// too large for one frame comes in several with `fragment` set on all but the last.
    /// `revision`: the node's revision when they were read.
    Events {
        events: Vec<Event>,
        revision: Revision,
        fragment: bool,
    },
    /// Nothing changed in the range up to `revision` (sent when asked for).
    Progress { revision: Revision },
    /// The watch ended: the stream closes after this.
    Canceled(WatchCanceled),
    /// The watch was not created (a bad request, no permission, too many watches, an id in
    /// use); nothing more is sent for it.
    Refused(RpcError),
}

/// Why a watch ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WatchCanceled {
    /// The watch's next revision was compacted away (it started too far back, or fell behind
    /// a compaction): events would be missing, so none are skipped silently.
    #[error("revision {requested} is compacted (compacted up to {compacted}): restart the watch from a newer revision after reading the current state")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    /// The node could not read its store.
    #[error("the node cannot read its store: {0}")]
    Storage(String),
}

/// Membership and the cluster's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterRequest {
    /// The contacted node's view of the cluster. → [`ClusterResponse::Status`]
    Status,
    /// The cluster's identity as the contacted node holds it, with the node's certificate.
    /// → [`ClusterResponse::Identity`]
    Identity,
    /// Makes the contacted (uninitialized) node a one-member cluster, the caller its first
    /// admin. `secret` is the node's bootstrap secret (`DATA_DIR/bootstrap.secret`): only
    /// someone who can read the node's data directory may claim it.
    /// → [`ClusterResponse::Status`]
    Init { name: String, secret: [u8; 32] },
    /// Adds `node` (learner, then voter). `secret` is the new node's bootstrap secret: the
    /// leader shows it to the node, which then accepts Raft traffic from this cluster.
    /// → `Done`
    Admit { node: NodeTicket, secret: [u8; 32] },
    /// Leader only: creates a single-use invitation for one node to join, valid this long.
    /// → [`ClusterResponse::Invite`]
    CreateInvite { valid_for_secs: u64 },
    /// Leader only: adds `node` (learner, then voter) if `invite` is a valid, unused (or used
    /// by this same node) invitation, and `node` is the caller. → `Done`
    Join { node: NodeTicket, invite: [u8; 32] },
    /// Removes a node from the cluster. Leader only. → `Done`
    RemoveMember { node_id: NodeId },
    /// A digest of the contacted node's local state (to compare replicas).
    /// → [`ClusterResponse::StateDigest`]
    StateDigest,
    /// Sets the contacted node's injected network faults (replacing earlier ones). Refused
    /// unless the node runs with the hidden `--unsafe-allow-fault-injection` flag. → `Done`
    SetNetFaults(NetFaults),
}

/// Automerge documents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DocRequest {
    /// Creates an empty Automerge document. `incarnation` (random, chosen by the client) makes
    /// a retried create succeed instead of finding "its own" document already there. → `Done`
    Create { name: String, incarnation: [u8; 16] },
    /// Commits raw Automerge changes to a document (any node; through Raft).
    /// → [`DocResponse::Changed`]
    Change { name: String, changes: Vec<Vec<u8>> },
    /// A document as stored: its compacted snapshot and pending changes. → [`DocResponse::Doc`]
    Get {
        name: String,
        consistency: Consistency,
    },
    /// Documents in name order, after `start_after`. → [`DocResponse::List`]
    List {
        start_after: Option<String>,
        limit: u32,
        consistency: Consistency,
    },
    /// Deletes a document and all it holds. → `Done`
    Delete { name: String },
}

/// Blobs (iroh-blobs) and their tags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobRequest {
    /// Stores a blob on the contacted node: this frame, then exactly `size` raw bytes on the
    /// same stream, then the end of the stream. The node hashes what it receives (BLAKE3),
    /// records itself as a holder and, with `tag`, references the blob under that name, all
    /// in one transaction through Raft. Without a tag the blob is garbage-collected after the
    /// grace period unless tagged meanwhile. → [`BlobResponse::Added`]
    Add { size: u64, tag: Option<String> },
    /// What the cluster knows of one blob: size, tags, holders. → [`BlobResponse::Info`]
    Stat {
        hash: [u8; 32],
        consistency: Consistency,
    },
    /// Tags in name order, after `start_after`. → [`BlobResponse::List`]
    List {
        start_after: Option<String>,
        limit: u32,
        consistency: Consistency,
    },
    /// Points `tag` at a blob (replacing what it named). The contacted node first makes sure
    /// it holds a complete copy, fetching it from a holder if need be.
    /// → [`BlobResponse::Tagged`]
    Tag { tag: String, hash: [u8; 32] },
    /// Removes a tag. → `Done`
    Untag { tag: String },
    /// The contacted node's blob store: what it holds, fetches, verification failures.
    /// → [`BlobResponse::Stats`]
    Stats,
}

/// iroh-docs namespaces hosted by the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsRequest {
    /// Creates an iroh-docs namespace (writable) that every member hosts a replica of.
    /// → [`NsResponse::Created`]
    Create,
    /// Sets `key` to `value` in a namespace, as the contacted node's author.
    /// → [`NsResponse::Set`]
    Set {
        namespace: [u8; 32],
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// The latest entry for `key` (over all authors) and its content, on the contacted node.
    /// → [`NsResponse::Value`]
    Get { namespace: [u8; 32], key: Vec<u8> },
    /// The latest entry per key, in key order, for keys starting with `prefix`.
    /// → [`NsResponse::Entries`]
    List {
        namespace: [u8; 32],
        prefix: Vec<u8>,
        limit: u32,
    },
    /// The namespaces the cluster hosts. → [`NsResponse::Namespaces`]
    Namespaces,
    /// A ticket to the namespace naming every member (read-only unless `write`).
    /// → [`NsResponse::Ticket`]
    Share { namespace: [u8; 32], write: bool },
    /// Hosts the namespace of an iroh-docs ticket (read-only tickets give read-only replicas)
    /// on every member, syncing with the peers it names. → [`NsResponse::Created`]
    Import { ticket: String },
}

/// Access control: grants, roles, tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthRequest {
    /// Presents a capability token for the rest of this connection (once per connection).
    /// → `Done`
    PresentToken { token: Vec<u8> },
    /// Who the node thinks the caller is, and what the caller may do.
    /// → [`AuthResponse::WhoAmI`]
    WhoAmI,
    /// Adds roles and permissions (text `KIND:ACTION:PATTERN`) to a key's grant. → `Done`
    Grant {
        key: [u8; 32],
        roles: Vec<String>,
        permissions: Vec<String>,
    },
    /// Removes roles and permissions from a key's grant; with `all`, the whole grant.
    /// → `Done`
    Revoke {
        key: [u8; 32],
        roles: Vec<String>,
        permissions: Vec<String>,
        all: bool,
    },
    /// Creates (or replaces) a custom role. → `Done`
    RoleCreate {
        name: String,
        permissions: Vec<String>,
    },
    /// Every grant and custom role. → [`AuthResponse::List`]
    List,
    /// Revokes a capability token (and every token delegated from it) on every member until
    /// it expires. Allowed to `cluster:admin` and to every issuer in the token's chain.
    /// → `Done`
    TokenRevoke { token: Vec<u8> },
    /// Makes the caller an admin, proven by the contacted node's bootstrap secret (recovery
    /// of a lost admin key by someone who can read a member's data directory). → `Done`
    Recover { secret: [u8; 32] },
}

/// Federation: what this cluster lets other clusters pull.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FedRequest {
    /// Exports `resource` to these clusters (by cluster key) too, and to any cluster with
    /// `public`. → `Done`
    Export {
        resource: Resource,
        to: Vec<[u8; 32]>,
        public: bool,
    },
    /// Stops exporting `resource` to these clusters (and to anyone, with `public`); with
    /// `all`, removes the export. → `Done`
    Unexport {
        resource: Resource,
        to: Vec<[u8; 32]>,
        public: bool,
        all: bool,
    },
    /// Every export, in key order. → [`FedResponse::Exports`]
    Exports,
    /// Pulls `resource` from the cluster with key `origin` from now on, into the local
    /// resource `into` (a document name; `None`: a name derived from the origin). `hints`:
    /// origin nodes to dial besides those of its DHT record. → `Done`
    Follow {
        origin: [u8; 32],
        resource: Resource,
        into: Option<String>,
        hints: Vec<NodeTicket>,
    },
    /// Stops following (what was pulled stays). → `Done`
    Unfollow {
        origin: [u8; 32],
        resource: Resource,
    },
    /// Every follow, with its state. → [`FedResponse::Follows`]
    Follows,
    /// Pulls now: every follow, or those of one origin, or one follow. Answers once those
    /// pulls have finished (each one's outcome is in the listing). → [`FedResponse::Follows`]
    Sync {
        origin: Option<[u8; 32]>,
        resource: Option<Resource>,
    },
    /// Serves this cluster's verified copy of `origin`'s followed `resource` to these
    /// clusters too (and to any cluster with `public`), as a mirror. → `Done`
    Mirror {
        origin: [u8; 32],
        resource: Resource,
        to: Vec<[u8; 32]>,
        public: bool,
    },
    /// Stops mirroring to these clusters (and to anyone, with `public`); with `all`, stops
    /// mirroring the resource. → `Done`
    Unmirror {
        origin: [u8; 32],
        resource: Resource,
        to: Vec<[u8; 32]>,
        public: bool,
        all: bool,
    },
    /// Every mirror policy, in key order. → [`FedResponse::Mirrors`]
    Mirrors,
    /// Sets the mirrors a follow pulls from when its origin is unreachable (tried in this
    /// order, before the mirrors the DHT names; empty: none). → `Done`
    Via {
        origin: [u8; 32],
        resource: Resource,
        via: Vec<ViaMirror>,
    },
    /// [`FedRequest::Follow`] with the mirrors to try when the origin is unreachable, set
    /// in the same step (so the first pull already knows them). → `Done`
    FollowVia {
        origin: [u8; 32],
        resource: Resource,
        into: Option<String>,
        hints: Vec<NodeTicket>,
        via: Vec<ViaMirror>,
    },
}

/// A mirror named for a follow ([`FedRequest::Via`]): its cluster key, and nodes of it to
/// dial besides those of its DHT record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViaMirror {
    pub cluster: [u8; 32],
    pub nodes: Vec<NodeTicket>,
}

/// Network faults a node injects into its own member-to-member traffic (fault tests only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetFaults {
    /// Members this node neither sends to nor answers: a partition between it and them.
    pub isolate_from: Vec<NodeId>,
    /// Of the remaining outgoing requests, this many per thousand are lost (sent, then
    /// treated as unanswered).
    pub drop_per_mille: u16,
    /// Every outgoing request waits a random 0..=this many milliseconds first.
    pub max_delay_ms: u32,
}

/// A response: the answering service's response, or an error (which can answer anything).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    Kv(KvResponse),
    Cluster(ClusterResponse),
    Doc(DocResponse),
    Blob(BlobResponse),
    Ns(NsResponse),
    Auth(AuthResponse),
    Error(RpcError),
    Fed(FedResponse),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResponse {
    Write {
        results: Vec<CommandResult>,
    },
    Range(RangeResponse),
    Watch(WatchMessage),
    Lease(LeaseResponse),
    /// A frame of watch `id` on a [`KvRequest::Watches`] stream.
    Watched {
        id: u64,
        message: WatchMessage,
    },
}

// A status is built and moved once per request: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterResponse {
    Done,
    Status(ClusterStatus),
    Identity(ClusterIdentity),
    /// A new invitation: the secret token (shown once) and when it expires (Unix seconds).
    Invite {
        token: [u8; 32],
        expires_at: u64,
    },
    StateDigest(StateDigest),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DocResponse {
    Done,
    /// `added`: hashes of the changes the document did not have yet. `heads`: the document's
    /// heads right after they were committed.
    Changed {
        added: Vec<[u8; 32]>,
        heads: Vec<[u8; 32]>,
    },
    /// A document: load `snapshot` (a saved Automerge document, if compacted), then apply
    /// `changes`.
    Doc {
        snapshot: Option<Vec<u8>>,
        changes: Vec<Vec<u8>>,
    },
    List {
        docs: Vec<DocSummary>,
        more: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobResponse {
    Done,
    /// A blob was stored: its hash and size, and what the tag named before, if anything.
    Added {
        hash: [u8; 32],
        size: u64,
        previous: Option<[u8; 32]>,
    },
    Info(BlobInfo),
    List {
        tags: Vec<BlobTagSummary>,
        more: bool,
    },
    /// A tag was set; what it named before, if anything.
    Tagged {
        previous: Option<[u8; 32]>,
    },
    Stats(BlobStoreStats),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsResponse {
    /// A namespace the cluster now hosts (created or imported).
    Created {
        id: [u8; 32],
    },
    /// An entry was written: its content hash.
    Set {
        hash: [u8; 32],
    },
    /// The entry (if any) and its content (if the node has it).
    Value {
        entry: Option<NsEntry>,
        value: Option<Vec<u8>>,
    },
    Entries {
        entries: Vec<NsEntry>,
        more: bool,
    },
    Namespaces(Vec<NamespaceSummary>),
    Ticket {
        ticket: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FedResponse {
    Done,
    Exports(Vec<ExportSummary>),
    Follows(Vec<FollowSummary>),
    Mirrors(Vec<MirrorSummary>),
}

/// One mirror policy (`FedRequest::Mirrors`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorSummary {
    pub origin: [u8; 32],
    pub resource: Resource,
    /// Any cluster may pull the copy from here.
    pub public: bool,
    /// The cluster keys that may pull it from here.
    pub to: Vec<[u8; 32]>,
    pub created_at_ms: u64,
}

/// What the last pull that tried a mirror found there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorReport {
    /// The mirror's cluster key.
    pub cluster: [u8; 32],
    /// It served verified data.
    pub ok: bool,
    /// Why it was refused or skipped (empty when ok).
    pub detail: String,
    /// When (Unix ms).
    pub at_ms: u64,
}

/// One follow and how its pulls go (`FedRequest::Follows`, `FedRequest::Sync`). The pull
/// state is the leader's; a new leader starts with an empty one (only `seq` is replicated).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowSummary {
    pub origin: [u8; 32],
    pub resource: Resource,
    /// Where the pulled data goes (a local document name).
    pub into: String,
    pub created_at_ms: u64,
    /// Seq of the last verified manifest (0: nothing pulled yet).
    pub seq: u64,
    /// When the origin signed that manifest (Unix ms, the origin's clock; 0 if none).
    pub manifest_issued_at_ms: u64,
    /// Last pull that verified and committed (Unix ms; 0: none since this leader took over).
    pub last_success_ms: u64,
    /// Last pull attempt (Unix ms; 0: none yet).
    pub last_attempt_ms: u64,
    /// Next scheduled pull (Unix ms; 0: not scheduled on this leader yet).
    pub next_attempt_ms: u64,
    /// Failures since the last success.
    pub failures: u32,
    /// Why the last attempt failed (cleared by a success).
    pub last_error: Option<String>,
    /// The mirrors named for it (`--via`), in the order they are tried (after the DHT's
    /// mirrors only if one failed when last tried).
    pub via: Vec<[u8; 32]>,
    /// The mirror the last success came from (None: the origin, or no success yet).
    pub last_source: Option<[u8; 32]>,
    /// What each mirror served the last time a pull tried it (mirrors are tried while the
    /// origin is unreachable); at most 8, the most recently tried.
    pub mirrors: Vec<MirrorReport>,
}

/// One export (`FedRequest::Exports`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSummary {
    pub resource: Resource,
    /// Any cluster may pull it.
    pub public: bool,
    /// The cluster keys that may pull it.
    pub to: Vec<[u8; 32]>,
    pub created_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthResponse {
    Done,
    WhoAmI(WhoAmI),
    List(AuthListing),
}

/// The caller as a node sees it (`AuthRequest::WhoAmI`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The caller's public key, as the QUIC handshake proved it.
    pub key: [u8; 32],
    /// Whether the key is a member node of the cluster (members may do everything).
    pub member: bool,
    /// Roles and permissions granted to the key itself.
    pub roles: Vec<String>,
    pub permissions: Vec<String>,
    /// A token presented on this connection: its root issuer, permissions and expiry.
    pub token: Option<TokenSummary>,
}

/// A capability token a caller presented.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSummary {
    pub root_issuer: [u8; 32],
    pub permissions: Vec<String>,
    pub expires_at: u64,
}

/// One key's grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSummary {
    pub key: [u8; 32],
    pub roles: Vec<String>,
    pub permissions: Vec<String>,
}

/// One custom role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSummary {
    pub name: String,
    pub permissions: Vec<String>,
}

/// Every grant and custom role (`AuthRequest::List`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthListing {
    pub grants: Vec<GrantSummary>,
    pub roles: Vec<RoleSummary>,
    /// Revoked token hashes still in force, with their expiry.
    pub revoked_tokens: Vec<([u8; 32], u64)>,
}

/// One iroh-docs entry: the latest value some author set for a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsEntry {
    pub key: Vec<u8>,
    pub author: [u8; 32],
    /// BLAKE3 hash and size of the content.
    pub hash: [u8; 32],
    pub size: u64,
    /// When it was set (microseconds since the Unix epoch, the author's clock).
    pub timestamp_us: u64,
}

/// A namespace the cluster hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceSummary {
    pub id: [u8; 32],
    /// Whether the cluster holds the namespace's write capability.
    pub writable: bool,
    pub created_at_ms: u64,
}

/// Why an iroh-docs namespace request was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NamespaceError {
    #[error("invalid namespace id {0:?}: expected 64 hex digits")]
    BadId(String),
    #[error("the cluster hosts no namespace {0}")]
    Unknown(String),
    #[error("namespace {0} is read-only here (imported from a read ticket)")]
    ReadOnly(String),
    #[error("invalid namespace ticket: {0}")]
    BadTicket(String),
    #[error("key of {len} bytes exceeds the limit of {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value of {len} bytes exceeds the limit of {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("keys must not be empty")]
    EmptyKey,
    #[error("the content of this entry ({0}) has not reached this node yet")]
    ContentUnavailable(String),
    #[error("iroh-docs failed: {0}")]
    Store(String),
    #[error("the cluster hosts the maximum of {max} namespaces")]
    TooMany { max: usize },
}

/// Longest iroh-docs key accepted.
pub const MAX_NS_KEY_BYTES: usize = 4096;
/// Largest iroh-docs value set in one request.
pub const MAX_NS_VALUE_BYTES: usize = 16 * 1024 * 1024;
/// Most entries one list request returns.
pub const MAX_NS_LIST: usize = 1000;

/// Checks an iroh-docs key against the limits (the SDK and the node both do).
pub fn check_ns_key(key: &[u8]) -> Result<(), NamespaceError> {
    if key.is_empty() {
        return Err(NamespaceError::EmptyKey);
    }
    if key.len() > MAX_NS_KEY_BYTES {
        return Err(NamespaceError::KeyTooLarge {
            len: key.len(),
            max: MAX_NS_KEY_BYTES,
        });
    }
    Ok(())
}

/// Parses a namespace id from 64 hex digits.
pub fn parse_namespace_id(s: &str) -> Result<[u8; 32], NamespaceError> {
    let s = s.trim();
    let mut out = [0u8; 32];
    if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
        return Err(NamespaceError::BadId(s.chars().take(80).collect()));
    }
    Ok(out)
}

/// What the cluster knows of one blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    pub hash: [u8; 32],
    /// Known once a tag or a holder records it.
    pub size: Option<u64>,
    pub tags: Vec<String>,
    /// Members recorded as holding a complete, verified copy.
    pub holders: Vec<NodeId>,
    /// Whether the contacted node's store has every chunk of it.
    pub local: bool,
}

/// One tag, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobTagSummary {
    pub tag: String,
    pub hash: [u8; 32],
    pub size: u64,
    pub created_at_ms: u64,
    /// Members recorded as holding the blob.
    pub replicas: u32,
}

/// A node's blob store and replication counters (since it started).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobStoreStats {
    pub node_id: NodeId,
    /// Complete blobs in the store, and their bytes.
    pub blobs: u64,
    pub bytes: u64,
    /// The number of members that should hold each referenced blob.
    pub replicas_target: u32,
    /// Blobs fetched from other nodes (members, or another cluster's for federation).
    pub fetched: u64,
    /// Blob bytes received by fetches, attempts cut short included (so a resumed transfer
    /// shows what it cost).
    pub fetched_bytes: u64,
    /// Fetch attempts that failed (unreachable holder, holder without the blob, ...).
    pub fetch_failures: u64,
    /// Fetches stopped because a holder sent data that did not match the hash.
    pub verify_failures: u64,
    /// Unreferenced blobs deleted after the grace period.
    pub gc_deleted: u64,
}

/// One document, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSummary {
    pub name: String,
    /// When it was created (ms since the Unix epoch, the creating node's clock).
    pub created_at_ms: u64,
}

/// What a node says about the cluster it serves (`ClusterRequest::Identity`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    /// The cluster's Ed25519 public key.
    pub cluster_key: [u8; 32],
    pub name: String,
    /// The answering node's certificate from the cluster key
    /// (`aspen_trust::NodeCertificate::encode`).
    pub certificate: Vec<u8>,
    /// The cluster's last published DHT record (`aspen_trust::SignedRecord::encode`), if any.
    pub record: Option<Vec<u8>>,
}

/// One member, as reported by `Status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub node_id: NodeId,
    pub node: NodeTicket,
    pub voter: bool,
}

/// The contacted node's view of its cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    pub initialized: bool,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub last_log_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub revision: u64,
    pub compacted_revision: u64,
    pub members: Vec<MemberStatus>,
    /// What the node has done since it started.
    pub figures: NodeFigures,
}

/// Key figures of one node since it started (its Prometheus metrics, `--metrics`, have
/// the full detail).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFigures {
    pub uptime_secs: u64,
    /// Client requests answered, and how many of them with an error.
    pub requests: u64,
    pub request_errors: u64,
    /// Raft entries and client commands applied to the state machine.
    pub applied_entries: u64,
    pub applied_commands: u64,
    /// Durable Raft log commits, and their mean duration in microseconds.
    pub log_flushes: u64,
    pub log_flush_mean_us: u64,
    /// Automerge changes committed through this node.
    pub doc_changes: u64,
    /// Blob bytes received, and sent on iroh-blobs connections this node served.
    pub blob_bytes_in: u64,
    pub blob_bytes_out: u64,
    /// Watches open on this node.
    pub watches: u64,
    /// Where the node serves Prometheus metrics, if it does.
    pub metrics_addr: Option<String>,
    /// Where the node serves automerge-repo's WebSocket protocol, if it does.
    pub automerge_repo_addr: Option<String>,
    /// automerge-repo connections open on the node.
    pub automerge_repo_connections: u64,
    /// Where the node serves etcd's v3 gRPC API, if it does.
    pub etcd_api_addr: Option<String>,
    /// etcd API connections open on the node.
    pub etcd_api_connections: u64,
}

impl ClientRequest {
    /// A short stable name for what the request does (`kv_put`, `doc_change`, ...), the
    /// `op` label of the node's request metrics.
    pub fn operation(&self) -> &'static str {
        use aspen_kv::api::WriteOp;
        match self {
            ClientRequest::Kv(r) => match r {
                KvRequest::Write { commands } => match commands.as_slice() {
                    [one] => match &one.op {
                        WriteOp::Put { .. } | WriteOp::PutWith { .. } => "kv_put",
                        WriteOp::Delete { .. } => "kv_delete",
                        WriteOp::Compact { .. } => "kv_compact",
                        WriteOp::Txn(_) | WriteOp::TxnTree(_) => "kv_txn",
                        WriteOp::LeaseGrant { .. } => "lease_grant",
                        WriteOp::LeaseRevoke { .. } => "lease_revoke",
                        WriteOp::System(_)
                        | WriteOp::SystemTxn(_)
                        | WriteOp::LeaseExpire { .. } => "kv_system",
                    },
                    _ => "kv_write_batch",
                },
                KvRequest::Range { .. } => "kv_range",
                KvRequest::Watch(_) => "kv_watch",
                KvRequest::Watches => "kv_watches",
                KvRequest::Lease(LeaseRequest::KeepAlive { .. }) => "lease_keepalive",
                KvRequest::Lease(LeaseRequest::TimeToLive { .. }) => "lease_ttl",
                KvRequest::Lease(LeaseRequest::List { .. }) => "lease_list",
            },
            ClientRequest::Cluster(r) => match r {
                ClusterRequest::Status => "cluster_status",
                ClusterRequest::Identity => "cluster_identity",
                ClusterRequest::Init { .. } => "cluster_init",
                ClusterRequest::Admit { .. } => "cluster_admit",
                ClusterRequest::CreateInvite { .. } => "cluster_invite",
                ClusterRequest::Join { .. } => "cluster_join",
                ClusterRequest::RemoveMember { .. } => "cluster_remove_member",
                ClusterRequest::StateDigest => "cluster_state_digest",
                ClusterRequest::SetNetFaults(_) => "cluster_net_faults",
            },
            ClientRequest::Doc(r) => match r {
                DocRequest::Create { .. } => "doc_create",
                DocRequest::Change { .. } => "doc_change",
                DocRequest::Get { .. } => "doc_get",
                DocRequest::List { .. } => "doc_list",
                DocRequest::Delete { .. } => "doc_delete",
            },
            ClientRequest::Blob(r) => match r {
                BlobRequest::Add { .. } => "blob_add",
                BlobRequest::Stat { .. } => "blob_stat",
                BlobRequest::List { .. } => "blob_list",
                BlobRequest::Tag { .. } => "blob_tag",
                BlobRequest::Untag { .. } => "blob_untag",
                BlobRequest::Stats => "blob_stats",
            },
            ClientRequest::Ns(r) => match r {
                NsRequest::Create => "ns_create",
                NsRequest::Set { .. } => "ns_set",
                NsRequest::Get { .. } => "ns_get",
                NsRequest::List { .. } => "ns_list",
                NsRequest::Namespaces => "ns_namespaces",
                NsRequest::Share { .. } => "ns_share",
                NsRequest::Import { .. } => "ns_import",
            },
            ClientRequest::Auth(r) => match r {
                AuthRequest::PresentToken { .. } => "auth_present_token",
                AuthRequest::WhoAmI => "auth_whoami",
                AuthRequest::Grant { .. } => "auth_grant",
                AuthRequest::Revoke { .. } => "auth_revoke",
                AuthRequest::RoleCreate { .. } => "auth_role_create",
                AuthRequest::List => "auth_list",
                AuthRequest::TokenRevoke { .. } => "auth_token_revoke",
                AuthRequest::Recover { .. } => "auth_recover",
            },
            ClientRequest::Fed(r) => match r {
                FedRequest::Export { .. } => "fed_export",
                FedRequest::Unexport { .. } => "fed_unexport",
                FedRequest::Exports => "fed_exports",
                FedRequest::Follow { .. } => "fed_follow",
                FedRequest::Unfollow { .. } => "fed_unfollow",
                FedRequest::Follows => "fed_follows",
                FedRequest::Sync { .. } => "fed_sync",
                FedRequest::Mirror { .. } => "fed_mirror",
                FedRequest::Unmirror { .. } => "fed_unmirror",
                FedRequest::Mirrors => "fed_mirrors",
                FedRequest::Via { .. } => "fed_via",
                FedRequest::FollowVia { .. } => "fed_follow_via",
            },
        }
    }
}

/// An error the server reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RpcError {
    /// This node cannot serve the request; the leader (if known) can.
    #[error("not the leader (leader: {})", leader.as_ref().map(|l| format!("{:016x}", l.node_id())).unwrap_or_else(|| "unknown".into()))]
    NotLeader { leader: Option<NodeTicket> },
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(
        "this node is not part of a cluster yet (run `aspen cluster init` or `aspen cluster add`)"
    )]
    NotInitialized,
    #[error("this node is already part of a cluster")]
    AlreadyInitialized,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("membership change failed: {0}")]
    Membership(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Doc(#[from] aspen_crdt::DocError),
    #[error(transparent)]
    Blob(#[from] aspen_blobs::BlobError),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// The caller (the key its QUIC connection proved) lacks the permission this request needs.
    #[error("permission denied: key {} lacks {needed}", hex::encode(caller))]
    PermissionDenied { caller: [u8; 32], needed: String },
    /// A presented capability token was refused.
    #[error("token refused: {0}")]
    Token(String),
    /// The state machine refused the request (a lease that does not exist, for example).
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The connection already has the most watches open it may.
    #[error(
        "this connection already has {max} watches open; close some or open another connection"
    )]
    TooManyWatches { max: usize },
}

impl RpcError {
    /// A short stable name for the kind of error (`not_leader`, `permission_denied`, ...),
    /// the `kind` label of the node's error metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RpcError::NotLeader { .. } => "not_leader",
            RpcError::Unavailable(_) => "unavailable",
            RpcError::Limit(_) => "limit",
            RpcError::Read(_) => "read",
            RpcError::NotInitialized => "not_initialized",
            RpcError::AlreadyInitialized => "already_initialized",
            RpcError::BadRequest(_) => "bad_request",
            RpcError::Membership(_) => "membership",
            RpcError::Internal(_) => "internal",
            RpcError::Doc(_) => "doc",
            RpcError::Blob(_) => "blob",
            RpcError::Namespace(_) => "namespace",
            RpcError::PermissionDenied { .. } => "permission_denied",
            RpcError::Token(_) => "token",
            RpcError::Apply(_) => "apply",
            RpcError::TooManyWatches { .. } => "too_many_watches",
        }
    }

    /// Worth retrying elsewhere or later (leader change, election in progress).
    pub fn is_retryable(&self) -> bool {
        matches!(self, RpcError::NotLeader { .. } | RpcError::Unavailable(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aspen_kv::api::{Session, WriteOp};
    use proptest::prelude::*;

    /// Concatenates byte pieces (expected encodings are easier to read in parts).
    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn encoded<T: Serialize>(message: &T) -> Vec<u8> {
        postcard::to_allocvec(message).unwrap()
    }

    /// The wire encoding is stable: these bytes must never change for these messages. The
    /// first byte names the service, the second the request or response within it.
    #[test]
    fn golden_bytes_requests() {
        let node = NodeTicket {
            endpoint_id: [2; 32],
            addrs: vec![],
        };
        let node_bytes = encoded(&node);
        let put = Command {
            session: Some(Session {
                client_id: 1,
                seq: 2,
                acked_below: 1,
            }),
            op: WriteOp::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                prev_kv: false,
            },
        };
        use AuthRequest as A;
        use BlobRequest as B;
        use ClientRequest as R;
        use ClusterRequest as C;
        use DocRequest as D;
        use KvRequest as K;
        use NsRequest as N;
        let table: Vec<(ClientRequest, Vec<u8>)> = vec![
            (
                R::Kv(K::Write {
                    commands: vec![put],
                }),
                vec![0, 0, 1, 1, 1, 2, 1, 0, 1, b'k', 1, b'v', 0],
            ),
            (
                R::Kv(K::Lease(LeaseRequest::KeepAlive { id: 7 })),
                vec![0, 3, 0, 7],
            ),
            (
                R::Kv(K::Lease(LeaseRequest::TimeToLive { id: 7, keys: true })),
                vec![0, 3, 1, 7, 1],
            ),
            (
                R::Kv(K::Lease(LeaseRequest::List { after: 2 })),
                vec![0, 3, 2, 2],
            ),
            (
                R::Kv(K::Watch(WatchRequest {
                    start: b"a".to_vec(),
                    end: Some(vec![]),
                    from: 7,
                    after: None,
                    prev_kv: true,
                    progress_every_ms: 9,
                })),
                vec![0, 2, 1, b'a', 1, 0, 7, 0, 1, 9],
            ),
            (
                R::Kv(K::Range {
                    request: RangeRequest::key(b"k".to_vec()),
                    consistency: Consistency::Serializable,
                }),
                vec![0, 1, 1, b'k', 0, 0, 0, 1],
            ),
            (R::Cluster(C::Status), vec![1, 0]),
            (R::Cluster(C::Identity), vec![1, 1]),
            (
                R::Cluster(C::Init {
                    name: "n".into(),
                    secret: [1; 32],
                }),
                cat(&[&[1, 2, 1, b'n'], &[1; 32]]),
            ),
            (
                R::Cluster(C::Admit {
                    node: node.clone(),
                    secret: [3; 32],
                }),
                cat(&[&[1, 3], &node_bytes, &[3; 32]]),
            ),
            (
                R::Cluster(C::CreateInvite {
                    valid_for_secs: 300,
                }),
                vec![1, 4, 0xac, 0x02],
            ),
            (
                R::Cluster(C::Join {
                    node: node.clone(),
                    invite: [2; 32],
                }),
                cat(&[&[1, 5], &node_bytes, &[2; 32]]),
            ),
            (R::Cluster(C::RemoveMember { node_id: 5 }), vec![1, 6, 5]),
            (R::Cluster(C::StateDigest), vec![1, 7]),
            (
                R::Cluster(C::SetNetFaults(NetFaults {
                    isolate_from: vec![1],
                    drop_per_mille: 2,
                    max_delay_ms: 3,
                })),
                vec![1, 8, 1, 1, 2, 3],
            ),
            (
                R::Doc(D::Create {
                    name: "d".into(),
                    incarnation: [6; 16],
                }),
                cat(&[&[2, 0, 1, b'd'], &[6; 16]]),
            ),
            (
                R::Doc(D::Change {
                    name: "d".into(),
                    changes: vec![vec![1, 2]],
                }),
                vec![2, 1, 1, b'd', 1, 2, 1, 2],
            ),
            (
                R::Doc(D::Get {
                    name: "d".into(),
                    consistency: Consistency::Linearizable,
                }),
                vec![2, 2, 1, b'd', 0],
            ),
            (
                R::Doc(D::List {
                    start_after: Some("a".into()),
                    limit: 5,
                    consistency: Consistency::Serializable,
                }),
                vec![2, 3, 1, 1, b'a', 5, 1],
            ),
            (R::Doc(D::Delete { name: "d".into() }), vec![2, 4, 1, b'd']),
            (
                R::Blob(B::Add {
                    size: 300,
                    tag: Some("t".into()),
                }),
                vec![3, 0, 0xac, 0x02, 1, 1, b't'],
            ),
            (
                R::Blob(B::Stat {
                    hash: [4; 32],
                    consistency: Consistency::Serializable,
                }),
                cat(&[&[3, 1], &[4; 32], &[1]]),
            ),
            (
                R::Blob(B::List {
                    start_after: None,
                    limit: 2,
                    consistency: Consistency::Linearizable,
                }),
                vec![3, 2, 0, 2, 0],
            ),
            (
                R::Blob(B::Tag {
                    tag: "t".into(),
                    hash: [5; 32],
                }),
                cat(&[&[3, 3, 1, b't'], &[5; 32]]),
            ),
            (R::Blob(B::Untag { tag: "t".into() }), vec![3, 4, 1, b't']),
            (R::Blob(B::Stats), vec![3, 5]),
            (R::Ns(N::Create), vec![4, 0]),
            (
                R::Ns(N::Set {
                    namespace: [1; 32],
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                }),
                cat(&[&[4, 1], &[1; 32], &[1, b'k', 1, b'v']]),
            ),
            (
                R::Ns(N::Get {
                    namespace: [1; 32],
                    key: b"k".to_vec(),
                }),
                cat(&[&[4, 2], &[1; 32], &[1, b'k']]),
            ),
            (
                R::Ns(N::List {
                    namespace: [1; 32],
                    prefix: vec![],
                    limit: 3,
                }),
                cat(&[&[4, 3], &[1; 32], &[0, 3]]),
            ),
            (R::Ns(N::Namespaces), vec![4, 4]),
            (
                R::Ns(N::Share {
                    namespace: [1; 32],
                    write: true,
                }),
                cat(&[&[4, 5], &[1; 32], &[1]]),
            ),
            (R::Ns(N::Import { ticket: "t".into() }), vec![4, 6, 1, b't']),
            (
                R::Auth(A::PresentToken { token: vec![9] }),
                vec![5, 0, 1, 9],
            ),
            (R::Auth(A::WhoAmI), vec![5, 1]),
            (
                R::Auth(A::Grant {
                    key: [4; 32],
                    roles: vec!["r".into()],
                    permissions: vec!["p".into()],
                }),
                cat(&[&[5, 2], &[4; 32], &[1, 1, b'r', 1, 1, b'p']]),
            ),
            (
                R::Auth(A::Revoke {
                    key: [4; 32],
                    roles: vec![],
                    permissions: vec![],
                    all: true,
                }),
                cat(&[&[5, 3], &[4; 32], &[0, 0, 1]]),
            ),
            (
                R::Auth(A::RoleCreate {
                    name: "r".into(),
                    permissions: vec!["p".into()],
                }),
                vec![5, 4, 1, b'r', 1, 1, b'p'],
            ),
            (R::Auth(A::List), vec![5, 5]),
            (R::Auth(A::TokenRevoke { token: vec![7] }), vec![5, 6, 1, 7]),
            (
                R::Auth(A::Recover { secret: [5; 32] }),
                cat(&[&[5, 7], &[5; 32]]),
            ),
            (
                R::Fed(FedRequest::Export {
                    resource: Resource::doc("d"),
                    to: vec![[6; 32]],
                    public: false,
                }),
                cat(&[&[6, 0, 0, 1, b'd', 1], &[6; 32], &[0]]),
            ),
            (
                R::Fed(FedRequest::Unexport {
                    resource: Resource::blob("t/"),
                    to: vec![],
                    public: true,
                    all: false,
                }),
                vec![6, 1, 1, 2, b't', b'/', 0, 1, 0],
            ),
            (R::Fed(FedRequest::Exports), vec![6, 2]),
            (
                R::Fed(FedRequest::Follow {
                    origin: [6; 32],
                    resource: Resource::doc("d"),
                    into: Some("e".into()),
                    hints: vec![node.clone()],
                }),
                cat(&[&[6, 3], &[6; 32], &[0, 1, b'd', 1, 1, b'e', 1], &node_bytes]),
            ),
            (
                R::Fed(FedRequest::Unfollow {
                    origin: [6; 32],
                    resource: Resource::doc("d"),
                }),
                cat(&[&[6, 4], &[6; 32], &[0, 1, b'd']]),
            ),
            (R::Fed(FedRequest::Follows), vec![6, 5]),
            (
                R::Fed(FedRequest::Sync {
                    origin: None,
                    resource: None,
                }),
                vec![6, 6, 0, 0],
            ),
            (
                R::Fed(FedRequest::Mirror {
                    origin: [6; 32],
                    resource: Resource::doc("d"),
                    to: vec![],
                    public: true,
                }),
                cat(&[&[6, 7], &[6; 32], &[0, 1, b'd', 0, 1]]),
            ),
            (
                R::Fed(FedRequest::Unmirror {
                    origin: [6; 32],
                    resource: Resource::doc("d"),
                    to: vec![],
                    public: false,
                    all: true,
                }),
                cat(&[&[6, 8], &[6; 32], &[0, 1, b'd', 0, 0, 1]]),
            ),
            (R::Fed(FedRequest::Mirrors), vec![6, 9]),
            (
                R::Fed(FedRequest::Via {
                    origin: [6; 32],
                    resource: Resource::doc("d"),
                    via: vec![ViaMirror {
                        cluster: [7; 32],
                        nodes: vec![],
                    }],
                }),
                cat(&[&[6, 10], &[6; 32], &[0, 1, b'd', 1], &[7; 32], &[0]]),
            ),
            (
                R::Fed(FedRequest::FollowVia {
                    origin: [6; 32],
                    resource: Resource::doc("d"),
                    into: None,
                    hints: vec![],
                    via: vec![ViaMirror {
                        cluster: [7; 32],
                        nodes: vec![],
                    }],
                }),
                cat(&[&[6, 11], &[6; 32], &[0, 1, b'd', 0, 0, 1], &[7; 32], &[0]]),
            ),
        ];
        for (message, expected) in table {
            assert_eq!(encoded(&message), expected, "{message:?}");
            let back: ClientRequest = crate::wire::decode_body(&expected).unwrap();
            assert_eq!(back, message);
        }
    }

    #[test]
    fn golden_bytes_responses() {
        use ClientResponse as R;
        let entry = NsEntry {
            key: b"k".to_vec(),
            author: [2; 32],
            hash: [3; 32],
            size: 4,
            timestamp_us: 5,
        };
        let table: Vec<(ClientResponse, Vec<u8>)> = vec![
            (R::Kv(KvResponse::Write { results: vec![] }), vec![0, 0, 0]),
            (
                R::Kv(KvResponse::Watch(WatchMessage::Created {
                    from: 3,
                    revision: 2,
                })),
                vec![0, 2, 0, 3, 2],
            ),
            (
                R::Kv(KvResponse::Watch(WatchMessage::Events {
                    events: vec![Event {
                        kind: aspen_kv::api::EventKind::Delete,
                        kv: aspen_kv::api::KeyValue {
                            key: b"k".to_vec(),
                            value: vec![],
                            create_revision: 0,
                            mod_revision: 4,
                            version: 0,
                            lease: 0,
                        },
                        prev_kv: None,
                    }],
                    revision: 5,
                    fragment: true,
                })),
                vec![0, 2, 1, 1, 1, 1, b'k', 0, 0, 4, 0, 0, 0, 5, 1],
            ),
            (
                R::Kv(KvResponse::Watch(WatchMessage::Progress { revision: 6 })),
                vec![0, 2, 2, 6],
            ),
            (
                R::Kv(KvResponse::Watch(WatchMessage::Canceled(
                    WatchCanceled::Compacted {
                        requested: 1,
                        compacted: 2,
                    },
                ))),
                vec![0, 2, 3, 0, 1, 2],
            ),
            (R::Cluster(ClusterResponse::Done), vec![1, 0]),
            (
                R::Cluster(ClusterResponse::Identity(ClusterIdentity {
                    cluster_key: [3; 32],
                    name: "n".into(),
                    certificate: vec![4],
                    record: None,
                })),
                cat(&[&[1, 2], &[3; 32], &[1, b'n', 1, 4, 0]]),
            ),
            (
                R::Cluster(ClusterResponse::Invite {
                    token: [5; 32],
                    expires_at: 1,
                }),
                cat(&[&[1, 3], &[5; 32], &[1]]),
            ),
            (
                R::Cluster(ClusterResponse::StateDigest(aspen_kv::StateDigest {
                    applied_index: Some(3),
                    revision: 2,
                    keys: 1,
                    hash: [7; 32],
                })),
                cat(&[&[1, 4, 1, 3, 2, 1], &[7; 32]]),
            ),
            (R::Doc(DocResponse::Done), vec![2, 0]),
            (
                R::Doc(DocResponse::Changed {
                    added: vec![[1; 32]],
                    heads: vec![],
                }),
                cat(&[&[2, 1, 1], &[1; 32], &[0]]),
            ),
            (
                R::Doc(DocResponse::Doc {
                    snapshot: None,
                    changes: vec![vec![9]],
                }),
                vec![2, 2, 0, 1, 1, 9],
            ),
            (
                R::Doc(DocResponse::List {
                    docs: vec![DocSummary {
                        name: "d".into(),
                        created_at_ms: 1,
                    }],
                    more: true,
                }),
                vec![2, 3, 1, 1, b'd', 1, 1],
            ),
            (
                R::Blob(BlobResponse::Added {
                    hash: [6; 32],
                    size: 7,
                    previous: None,
                }),
                cat(&[&[3, 1], &[6; 32], &[7, 0]]),
            ),
            (
                R::Blob(BlobResponse::Info(BlobInfo {
                    hash: [1; 32],
                    size: Some(2),
                    tags: vec!["t".into()],
                    holders: vec![3],
                    local: true,
                })),
                cat(&[&[3, 2], &[1; 32], &[1, 2, 1, 1, b't', 1, 3, 1]]),
            ),
            (
                R::Blob(BlobResponse::List {
                    tags: vec![BlobTagSummary {
                        tag: "t".into(),
                        hash: [2; 32],
                        size: 3,
                        created_at_ms: 4,
                        replicas: 5,
                    }],
                    more: false,
                }),
                cat(&[&[3, 3, 1, 1, b't'], &[2; 32], &[3, 4, 5, 0]]),
            ),
            (
                R::Blob(BlobResponse::Tagged { previous: None }),
                vec![3, 4, 0],
            ),
            (
                R::Blob(BlobResponse::Stats(BlobStoreStats {
                    node_id: 1,
                    blobs: 2,
                    bytes: 3,
                    replicas_target: 4,
                    fetched: 5,
                    fetched_bytes: 6,
                    fetch_failures: 7,
                    verify_failures: 8,
                    gc_deleted: 9,
                })),
                vec![3, 5, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            ),
            (
                R::Ns(NsResponse::Created { id: [7; 32] }),
                cat(&[&[4, 0], &[7; 32]]),
            ),
            (
                R::Ns(NsResponse::Value {
                    entry: Some(entry),
                    value: Some(b"v".to_vec()),
                }),
                cat(&[&[4, 2, 1, 1, b'k'], &[2; 32], &[3; 32], &[4, 5, 1, 1, b'v']]),
            ),
            (
                R::Ns(NsResponse::Namespaces(vec![NamespaceSummary {
                    id: [7; 32],
                    writable: true,
                    created_at_ms: 8,
                }])),
                cat(&[&[4, 4, 1], &[7; 32], &[1, 8]]),
            ),
            (
                R::Auth(AuthResponse::WhoAmI(WhoAmI {
                    key: [6; 32],
                    member: true,
                    roles: vec!["a".into()],
                    permissions: vec!["p".into()],
                    token: None,
                })),
                cat(&[&[5, 1], &[6; 32], &[1, 1, 1, b'a', 1, 1, b'p', 0]]),
            ),
            (
                R::Auth(AuthResponse::List(AuthListing {
                    grants: vec![],
                    roles: vec![],
                    revoked_tokens: vec![],
                })),
                vec![5, 2, 0, 0, 0],
            ),
            (
                R::Error(RpcError::NotLeader { leader: None }),
                vec![6, 0, 0],
            ),
            (
                R::Error(RpcError::Doc(aspen_crdt::DocError::NotFound("d".into()))),
                vec![6, 9, 1, 1, b'd'],
            ),
            (
                R::Error(RpcError::Doc(aspen_crdt::DocError::Inflates {
                    index: 1,
                    max: 2,
                })),
                vec![6, 9, 10, 1, 2],
            ),
            (
                R::Error(RpcError::Blob(aspen_blobs::BlobError::TagNotFound(
                    "t".into(),
                ))),
                vec![6, 10, 2, 1, b't'],
            ),
            (
                R::Error(RpcError::Namespace(NamespaceError::EmptyKey)),
                vec![6, 11, 6],
            ),
            (
                R::Error(RpcError::Namespace(NamespaceError::TooMany { max: 2 })),
                vec![6, 11, 9, 2],
            ),
            (
                R::Error(RpcError::PermissionDenied {
                    caller: [8; 32],
                    needed: "x".into(),
                }),
                cat(&[&[6, 12], &[8; 32], &[1, b'x']]),
            ),
            (R::Error(RpcError::Token("t".into())), vec![6, 13, 1, b't']),
            (
                R::Error(RpcError::Apply(ApplyError::LeaseNotFound { id: 7 })),
                vec![6, 14, 5, 7],
            ),
            (
                R::Error(RpcError::TooManyWatches { max: 2 }),
                vec![6, 15, 2],
            ),
            (
                R::Kv(KvResponse::Lease(LeaseResponse::KeptAlive {
                    id: 1,
                    ttl_secs: 2,
                })),
                vec![0, 3, 0, 1, 2],
            ),
            (
                R::Kv(KvResponse::Lease(LeaseResponse::TimeToLive(LeaseStatus {
                    id: 1,
                    ttl_secs: 2,
                    remaining_ms: 3,
                    key_count: 1,
                    keys: vec![b"k".to_vec()],
                }))),
                vec![0, 3, 1, 1, 2, 3, 1, 1, 1, b'k'],
            ),
            (
                R::Kv(KvResponse::Lease(LeaseResponse::List {
                    ids: vec![9],
                    more: false,
                })),
                vec![0, 3, 2, 1, 9, 0],
            ),
            (R::Fed(FedResponse::Done), vec![7, 0]),
            (
                R::Fed(FedResponse::Exports(vec![ExportSummary {
                    resource: Resource::ns(&[1; 32]),
                    public: true,
                    to: vec![],
                    created_at_ms: 3,
                }])),
                cat(&[&[7, 1, 1, 2, 64], "01".repeat(32).as_bytes(), &[1, 0, 3]]),
            ),
            (
                R::Fed(FedResponse::Follows(vec![FollowSummary {
                    origin: [2; 32],
                    resource: Resource::doc("d"),
                    into: "e".into(),
                    created_at_ms: 1,
                    seq: 2,
                    manifest_issued_at_ms: 3,
                    last_success_ms: 4,
                    last_attempt_ms: 5,
                    next_attempt_ms: 6,
                    failures: 7,
                    last_error: Some("x".into()),
                    via: vec![[3; 32]],
                    last_source: None,
                    mirrors: vec![MirrorReport {
                        cluster: [4; 32],
                        ok: false,
                        detail: "y".into(),
                        at_ms: 8,
                    }],
                }])),
                cat(&[
                    &[7, 2, 1],
                    &[2; 32],
                    &[0, 1, b'd', 1, b'e', 1, 2, 3, 4, 5, 6, 7, 1, 1, b'x', 1],
                    &[3; 32],
                    &[0, 1],
                    &[4; 32],
                    &[0, 1, b'y', 8],
                ]),
            ),
            (
                R::Fed(FedResponse::Mirrors(vec![MirrorSummary {
                    origin: [2; 32],
                    resource: Resource::doc("d"),
                    public: false,
                    to: vec![[3; 32]],
                    created_at_ms: 4,
                }])),
                cat(&[&[7, 3, 1], &[2; 32], &[0, 1, b'd', 0, 1], &[3; 32], &[4]]),
            ),
        ];
        for (message, expected) in table {
            assert_eq!(encoded(&message), expected, "{message:?}");
            let back: ClientResponse = crate::wire::decode_body(&expected).unwrap();
            assert_eq!(back, message);
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::wire::decode_body::<ClientRequest>(&bytes);
            let _ = crate::wire::decode_body::<ClientResponse>(&bytes);
            let _ = crate::wire::decode_body::<WatchControl>(&bytes);
        }

        #[test]
        fn watch_controls_round_trip(id in any::<u64>(), from in any::<u64>(), start in proptest::collection::vec(any::<u8>(), 0..16), cancel in any::<bool>()) {
            let control = if cancel {
                WatchControl::Cancel { id }
            } else {
                WatchControl::Create {
                    id,
                    request: WatchRequest {
                        start,
                        end: None,
                        from,
                        after: None,
                        prev_kv: false,
                        progress_every_ms: 0,
                    },
                }
            };
            let back: WatchControl = crate::wire::decode_body(&encoded(&control)).unwrap();
            prop_assert_eq!(back, control);
        }
    }

    #[test]
    fn golden_bytes_watch_streams() {
        assert_eq!(encoded(&ClientRequest::Kv(KvRequest::Watches)), [0, 4]);
        assert_eq!(encoded(&WatchControl::Cancel { id: 3 }), [1, 3]);
        let create = WatchControl::Create {
            id: 2,
            request: WatchRequest {
                start: b"k".to_vec(),
                end: None,
                from: 0,
                after: None,
                prev_kv: false,
                progress_every_ms: 5,
            },
        };
        assert_eq!(encoded(&create), [0, 2, 1, b'k', 0, 0, 0, 0, 5]);
        let watched = ClientResponse::Kv(KvResponse::Watched {
            id: 9,
            message: WatchMessage::Progress { revision: 4 },
        });
        assert_eq!(encoded(&watched), [0, 4, 9, 2, 4]);
        let refused = WatchMessage::Refused(RpcError::TooManyWatches { max: 1 });
        assert_eq!(encoded(&refused), [4, 15, 1]);
    }
}
