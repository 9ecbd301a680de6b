//! The client protocol, `aspen/client/2`: one request and one response per QUIC bi-stream.
//!
//! Every message is one frame (see [`crate::wire`]). Enum variants are only ever appended;
//! golden-bytes tests pin the encoding.
//!
//! Version 2 (access control): the caller is the key the QUIC handshake proved, and every
//! request needs a permission (see the node's `server/auth.rs`). `InitCluster`,
//! `InitNamedCluster` and `AddMember` are refused in version 2: they carried no proof that
//! the caller may claim the node; `Init` and `Admit` carry the node's bootstrap secret.

use serde::{Deserialize, Serialize};

use aspen_kv::api::{Command, CommandResult, LimitError, RangeRequest, RangeResponse, ReadError};
use aspen_kv::{NodeId, StateDigest};

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

/// A client request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Writes; any node accepts them and forwards to the leader.
    Write { commands: Vec<Command> },
    /// A read of a key or a range.
    Range {
        request: RangeRequest,
        consistency: Consistency,
    },
    /// The contacted node's view of the cluster.
    Status,
    /// Make the contacted (uninitialized) node a one-member cluster.
    InitCluster,
    /// Add a node as a learner, then promote it to voter. Leader only.
    AddMember { node: NodeTicket },
    /// Remove a node from the cluster. Leader only.
    RemoveMember { node_id: NodeId },
    /// A digest of the contacted node's local state (to compare replicas).
    StateDigest,
    /// Sets the contacted node's injected network faults (replacing earlier ones). Refused
    /// unless the node runs with the hidden `--unsafe-allow-fault-injection` flag.
    SetNetFaults(NetFaults),
    /// The cluster's identity as the contacted node holds it, with the node's certificate.
    Identity,
    /// Like `InitCluster`, naming the cluster (the name is published in its DHT record).
    InitNamedCluster { name: String },
    /// Leader only: creates a single-use invitation for one node to join, valid this long.
    CreateInvite { valid_for_secs: u64 },
    /// Leader only: adds `node` (learner, then voter) if `invite` is a valid, unused (or used
    /// by this same node) invitation. A node without an invitation is refused.
    Join { node: NodeTicket, invite: [u8; 32] },
    /// Creates an empty Automerge document. `incarnation` (random, chosen by the client) makes
    /// a retried create succeed instead of finding "its own" document already there.
    DocCreate { name: String, incarnation: [u8; 16] },
    /// Commits raw Automerge changes to a document (any node; through Raft).
    DocChange { name: String, changes: Vec<Vec<u8>> },
    /// A document as stored: its compacted snapshot and pending changes.
    DocGet {
        name: String,
        consistency: Consistency,
    },
    /// Documents in name order, after `start_after`.
    DocList {
        start_after: Option<String>,
        limit: u32,
        consistency: Consistency,
    },
    /// Deletes a document and all it holds.
    DocDelete { name: String },
    /// Stores a blob on the contacted node: this frame, then exactly `size` raw bytes on the
    /// same stream, then the end of the stream. The node hashes what it receives (BLAKE3),
    /// records itself as a holder and, with `tag`, references the blob under that name, all
    /// in one transaction through Raft. Without a tag the blob is garbage-collected after the
    /// grace period unless tagged meanwhile.
    BlobAdd { size: u64, tag: Option<String> },
    /// What the cluster knows of one blob: size, tags, holders.
    BlobStat {
        hash: [u8; 32],
        consistency: Consistency,
    },
    /// Tags in name order, after `start_after`.
    BlobList {
        start_after: Option<String>,
        limit: u32,
        consistency: Consistency,
    },
    /// Points `tag` at a blob (replacing what it named). The contacted node first makes sure
    /// it holds a complete copy, fetching it from a holder if need be.
    BlobTag { tag: String, hash: [u8; 32] },
    /// Removes a tag.
    BlobUntag { tag: String },
    /// The contacted node's blob store: what it holds, fetches, verification failures.
    BlobStats,
    /// Creates an iroh-docs namespace (writable) that every member hosts a replica of.
    NsCreate,
    /// Sets `key` to `value` in a namespace, as the contacted node's author.
    NsSet {
        namespace: [u8; 32],
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// The latest entry for `key` (over all authors) and its content, on the contacted node.
    NsGet { namespace: [u8; 32], key: Vec<u8> },
    /// The latest entry per key, in key order, for keys starting with `prefix`.
    NsList {
        namespace: [u8; 32],
        prefix: Vec<u8>,
        limit: u32,
    },
    /// The namespaces the cluster hosts.
    NsNamespaces,
    /// A ticket to the namespace naming every member (read-only unless `write`).
    NsShare { namespace: [u8; 32], write: bool },
    /// Hosts the namespace of an iroh-docs ticket (read-only tickets give read-only replicas)
    /// on every member, syncing with the peers it names.
    NsImport { ticket: String },
    /// Makes the contacted (uninitialized) node a one-member cluster, the caller its first
    /// admin. `secret` is the node's bootstrap secret (`DATA_DIR/bootstrap.secret`): only
    /// someone who can read the node's data directory may claim it.
    Init { name: String, secret: [u8; 32] },
    /// Adds `node` (learner, then voter). `secret` is the new node's bootstrap secret: the
    /// leader shows it to the node, which then accepts Raft traffic from this cluster.
    Admit { node: NodeTicket, secret: [u8; 32] },
    /// Presents a capability token for the rest of this connection (once per connection).
    PresentToken { token: Vec<u8> },
    /// Who the node thinks the caller is, and what the caller may do.
    WhoAmI,
    /// Adds roles and permissions (text `KIND:ACTION:PATTERN`) to a key's grant.
    AuthGrant {
        key: [u8; 32],
        roles: Vec<String>,
        permissions: Vec<String>,
    },
    /// Removes roles and permissions from a key's grant; with `all`, the whole grant.
    AuthRevoke {
        key: [u8; 32],
        roles: Vec<String>,
        permissions: Vec<String>,
        all: bool,
    },
    /// Creates (or replaces) a custom role.
    RoleCreate {
        name: String,
        permissions: Vec<String>,
    },
    /// Every grant and custom role.
    AuthList,
    /// Revokes a capability token (and every token delegated from it) on every member until
    /// it expires. Allowed to `cluster:admin` and to every issuer in the token's chain.
    TokenRevoke { token: Vec<u8> },
    /// Makes the caller an admin, proven by the contacted node's bootstrap secret (recovery
    /// of a lost admin key by someone who can read a member's data directory).
    Recover { secret: [u8; 32] },
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

/// A response; `Error` can answer any request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    Write {
        results: Vec<CommandResult>,
    },
    Range(RangeResponse),
    Status(ClusterStatus),
    Error(RpcError),
    Done,
    StateDigest(StateDigest),
    Identity(ClusterIdentity),
    /// A new invitation: the secret token (shown once) and when it expires (Unix seconds).
    Invite {
        token: [u8; 32],
        expires_at: u64,
    },
    /// `added`: hashes of the changes the document did not have yet. `heads`: the document's
    /// heads right after they were committed.
    DocChanged {
        added: Vec<[u8; 32]>,
        heads: Vec<[u8; 32]>,
    },
    /// A document: load `snapshot` (a saved Automerge document, if compacted), then apply
    /// `changes`.
    Doc {
        snapshot: Option<Vec<u8>>,
        changes: Vec<Vec<u8>>,
    },
    DocList {
        docs: Vec<DocSummary>,
        more: bool,
    },
    /// A blob was stored: its hash and size, and what the tag named before, if anything.
    BlobAdded {
        hash: [u8; 32],
        size: u64,
        previous: Option<[u8; 32]>,
    },
    BlobInfo(BlobInfo),
    BlobList {
        tags: Vec<BlobTagSummary>,
        more: bool,
    },
    /// A tag was set; what it named before, if anything.
    BlobTagged {
        previous: Option<[u8; 32]>,
    },
    BlobStats(BlobStoreStats),
    Namespace {
        id: [u8; 32],
    },
    NsSet {
        hash: [u8; 32],
    },
    /// The entry (if any) and its content (if the node has it).
    NsValue {
        entry: Option<NsEntry>,
        value: Option<Vec<u8>>,
    },
    NsEntries {
        entries: Vec<NsEntry>,
        more: bool,
    },
    Namespaces(Vec<NamespaceSummary>),
    NsTicket {
        ticket: String,
    },
    WhoAmI(WhoAmI),
    AuthList(AuthListing),
}

/// The caller as a node sees it (`ClientRequest::WhoAmI`).
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

/// Every grant and custom role (`ClientRequest::AuthList`).
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
    /// Blobs fetched from other members, and their bytes.
    pub fetched: u64,
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

/// What a node says about the cluster it serves (`ClientRequest::Identity`).
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
}

impl RpcError {
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

    /// The wire encoding is stable: these bytes must never change for these messages.
    #[test]
    fn golden_bytes() {
        let put = ClientRequest::Write {
            commands: vec![Command {
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
            }],
        };
        assert_eq!(
            postcard::to_allocvec(&put).unwrap(),
            [0, 1, 1, 1, 2, 1, 0, 1, b'k', 1, b'v', 0]
        );
        let get = ClientRequest::Range {
            request: RangeRequest::key(b"k".to_vec()),
            consistency: Consistency::Serializable,
        };
        assert_eq!(
            postcard::to_allocvec(&get).unwrap(),
            [1, 1, b'k', 0, 0, 0, 1]
        );
        assert_eq!(postcard::to_allocvec(&ClientRequest::Status).unwrap(), [2]);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::RemoveMember { node_id: 5 }).unwrap(),
            [5, 5]
        );
        let err = ClientResponse::Error(RpcError::NotLeader { leader: None });
        assert_eq!(postcard::to_allocvec(&err).unwrap(), [3, 0, 0]);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::StateDigest).unwrap(),
            [6]
        );
        let digest = ClientResponse::StateDigest(aspen_kv::StateDigest {
            applied_index: Some(3),
            revision: 2,
            keys: 1,
            hash: [7; 32],
        });
        let faults = ClientRequest::SetNetFaults(NetFaults {
            isolate_from: vec![1],
            drop_per_mille: 2,
            max_delay_ms: 3,
        });
        assert_eq!(postcard::to_allocvec(&faults).unwrap(), [7, 1, 1, 2, 3]);
        let mut expected = vec![5, 1, 3, 2, 1];
        expected.extend([7; 32]);
        assert_eq!(postcard::to_allocvec(&digest).unwrap(), expected);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::Identity).unwrap(),
            [8]
        );
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::InitNamedCluster { name: "a".into() }).unwrap(),
            [9, 1, b'a']
        );
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::CreateInvite {
                valid_for_secs: 300
            })
            .unwrap(),
            [10, 0xac, 0x02]
        );
        let join = ClientRequest::Join {
            node: NodeTicket {
                endpoint_id: [1; 32],
                addrs: vec![],
            },
            invite: [2; 32],
        };
        let mut expected = vec![11];
        expected.extend(
            postcard::to_allocvec(&NodeTicket {
                endpoint_id: [1; 32],
                addrs: vec![],
            })
            .unwrap(),
        );
        expected.extend([2; 32]);
        assert_eq!(postcard::to_allocvec(&join).unwrap(), expected);
        let identity = ClientResponse::Identity(ClusterIdentity {
            cluster_key: [3; 32],
            name: "n".into(),
            certificate: vec![4],
            record: None,
        });
        let mut expected = vec![6];
        expected.extend([3; 32]);
        expected.extend([1, b'n', 1, 4, 0]);
        assert_eq!(postcard::to_allocvec(&identity).unwrap(), expected);
        let invite = ClientResponse::Invite {
            token: [5; 32],
            expires_at: 1,
        };
        let mut expected = vec![7];
        expected.extend([5; 32]);
        expected.push(1);
        assert_eq!(postcard::to_allocvec(&invite).unwrap(), expected);

        let mut expected = vec![12, 1, b'd'];
        expected.extend([6; 16]);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::DocCreate {
                name: "d".into(),
                incarnation: [6; 16]
            })
            .unwrap(),
            expected
        );
        let change = ClientRequest::DocChange {
            name: "d".into(),
            changes: vec![vec![1, 2]],
        };
        assert_eq!(
            postcard::to_allocvec(&change).unwrap(),
            [13, 1, b'd', 1, 2, 1, 2]
        );
        let get = ClientRequest::DocGet {
            name: "d".into(),
            consistency: Consistency::Linearizable,
        };
        assert_eq!(postcard::to_allocvec(&get).unwrap(), [14, 1, b'd', 0]);
        let list = ClientRequest::DocList {
            start_after: Some("a".into()),
            limit: 5,
            consistency: Consistency::Serializable,
        };
        assert_eq!(
            postcard::to_allocvec(&list).unwrap(),
            [15, 1, 1, b'a', 5, 1]
        );
        let delete = ClientRequest::DocDelete { name: "d".into() };
        assert_eq!(postcard::to_allocvec(&delete).unwrap(), [16, 1, b'd']);
        let changed = ClientResponse::DocChanged {
            added: vec![[1; 32]],
            heads: vec![],
        };
        let mut expected = vec![8, 1];
        expected.extend([1; 32]);
        expected.push(0);
        assert_eq!(postcard::to_allocvec(&changed).unwrap(), expected);
        let doc = ClientResponse::Doc {
            snapshot: None,
            changes: vec![vec![9]],
        };
        assert_eq!(postcard::to_allocvec(&doc).unwrap(), [9, 0, 1, 1, 9]);
        let listed = ClientResponse::DocList {
            docs: vec![DocSummary {
                name: "d".into(),
                created_at_ms: 1,
            }],
            more: true,
        };
        assert_eq!(
            postcard::to_allocvec(&listed).unwrap(),
            [10, 1, 1, b'd', 1, 1]
        );
        let err = ClientResponse::Error(RpcError::Doc(aspen_crdt::DocError::NotFound("d".into())));
        assert_eq!(postcard::to_allocvec(&err).unwrap(), [3, 9, 1, 1, b'd']);

        let add = ClientRequest::BlobAdd {
            size: 300,
            tag: Some("t".into()),
        };
        assert_eq!(
            postcard::to_allocvec(&add).unwrap(),
            [17, 0xac, 0x02, 1, 1, b't']
        );
        let mut expected = vec![18];
        expected.extend([4; 32]);
        expected.push(1);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::BlobStat {
                hash: [4; 32],
                consistency: Consistency::Serializable
            })
            .unwrap(),
            expected
        );
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::BlobList {
                start_after: None,
                limit: 2,
                consistency: Consistency::Linearizable
            })
            .unwrap(),
            [19, 0, 2, 0]
        );
        let mut expected = vec![20, 1, b't'];
        expected.extend([5; 32]);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::BlobTag {
                tag: "t".into(),
                hash: [5; 32]
            })
            .unwrap(),
            expected
        );
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::BlobUntag { tag: "t".into() }).unwrap(),
            [21, 1, b't']
        );
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::BlobStats).unwrap(),
            [22]
        );
        let mut expected = vec![11];
        expected.extend([6; 32]);
        expected.extend([7, 0]);
        assert_eq!(
            postcard::to_allocvec(&ClientResponse::BlobAdded {
                hash: [6; 32],
                size: 7,
                previous: None
            })
            .unwrap(),
            expected
        );
        let info = ClientResponse::BlobInfo(BlobInfo {
            hash: [1; 32],
            size: Some(2),
            tags: vec!["t".into()],
            holders: vec![3],
            local: true,
        });
        let mut expected = vec![12];
        expected.extend([1; 32]);
        expected.extend([1, 2, 1, 1, b't', 1, 3, 1]);
        assert_eq!(postcard::to_allocvec(&info).unwrap(), expected);
        let list = ClientResponse::BlobList {
            tags: vec![BlobTagSummary {
                tag: "t".into(),
                hash: [2; 32],
                size: 3,
                created_at_ms: 4,
                replicas: 5,
            }],
            more: false,
        };
        let mut expected = vec![13, 1, 1, b't'];
        expected.extend([2; 32]);
        expected.extend([3, 4, 5, 0]);
        assert_eq!(postcard::to_allocvec(&list).unwrap(), expected);
        assert_eq!(
            postcard::to_allocvec(&ClientResponse::BlobTagged { previous: None }).unwrap(),
            [14, 0]
        );
        let stats = ClientResponse::BlobStats(BlobStoreStats {
            node_id: 1,
            blobs: 2,
            bytes: 3,
            replicas_target: 4,
            fetched: 5,
            fetched_bytes: 6,
            fetch_failures: 7,
            verify_failures: 8,
            gc_deleted: 9,
        });
        assert_eq!(
            postcard::to_allocvec(&stats).unwrap(),
            [15, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        );
        let err = ClientResponse::Error(RpcError::Blob(aspen_blobs::BlobError::TagNotFound(
            "t".into(),
        )));
        assert_eq!(postcard::to_allocvec(&err).unwrap(), [3, 10, 2, 1, b't']);

        assert_eq!(
            postcard::to_allocvec(&ClientRequest::NsCreate).unwrap(),
            [23]
        );
        let mut expected = vec![24];
        expected.extend([1; 32]);
        expected.extend([1, b'k', 1, b'v']);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::NsSet {
                namespace: [1; 32],
                key: b"k".to_vec(),
                value: b"v".to_vec()
            })
            .unwrap(),
            expected
        );
        let mut expected = vec![25];
        expected.extend([1; 32]);
        expected.extend([1, b'k']);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::NsGet {
                namespace: [1; 32],
                key: b"k".to_vec()
            })
            .unwrap(),
            expected
        );
        let mut expected = vec![26];
        expected.extend([1; 32]);
        expected.extend([0, 3]);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::NsList {
                namespace: [1; 32],
                prefix: vec![],
                limit: 3
            })
            .unwrap(),
            expected
        );
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::NsNamespaces).unwrap(),
            [27]
        );
        let mut expected = vec![28];
        expected.extend([1; 32]);
        expected.push(1);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::NsShare {
                namespace: [1; 32],
                write: true
            })
            .unwrap(),
            expected
        );
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::NsImport { ticket: "t".into() }).unwrap(),
            [29, 1, b't']
        );
        let entry = NsEntry {
            key: b"k".to_vec(),
            author: [2; 32],
            hash: [3; 32],
            size: 4,
            timestamp_us: 5,
        };
        let mut expected = vec![18, 1, 1, b'k'];
        expected.extend([2; 32]);
        expected.extend([3; 32]);
        expected.extend([4, 5, 1, 1, b'v']);
        assert_eq!(
            postcard::to_allocvec(&ClientResponse::NsValue {
                entry: Some(entry),
                value: Some(b"v".to_vec())
            })
            .unwrap(),
            expected
        );
        let mut expected = vec![20, 1];
        expected.extend([7; 32]);
        expected.extend([1, 8]);
        assert_eq!(
            postcard::to_allocvec(&ClientResponse::Namespaces(vec![NamespaceSummary {
                id: [7; 32],
                writable: true,
                created_at_ms: 8
            }]))
            .unwrap(),
            expected
        );
        let err = ClientResponse::Error(RpcError::Namespace(NamespaceError::EmptyKey));
        assert_eq!(postcard::to_allocvec(&err).unwrap(), [3, 11, 6]);

        // Protocol 2: access control.
        let mut expected = vec![30, 1, b'n'];
        expected.extend([1; 32]);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::Init {
                name: "n".into(),
                secret: [1; 32]
            })
            .unwrap(),
            expected
        );
        let node = NodeTicket {
            endpoint_id: [2; 32],
            addrs: vec![],
        };
        let mut expected = vec![31];
        expected.extend(postcard::to_allocvec(&node).unwrap());
        expected.extend([3; 32]);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::Admit {
                node,
                secret: [3; 32]
            })
            .unwrap(),
            expected
        );
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::PresentToken { token: vec![9] }).unwrap(),
            [32, 1, 9]
        );
        assert_eq!(postcard::to_allocvec(&ClientRequest::WhoAmI).unwrap(), [33]);
        let mut expected = vec![34];
        expected.extend([4; 32]);
        expected.extend([1, 1, b'r', 1, 1, b'p']);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::AuthGrant {
                key: [4; 32],
                roles: vec!["r".into()],
                permissions: vec!["p".into()]
            })
            .unwrap(),
            expected
        );
        let mut expected = vec![35];
        expected.extend([4; 32]);
        expected.extend([0, 0, 1]);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::AuthRevoke {
                key: [4; 32],
                roles: vec![],
                permissions: vec![],
                all: true
            })
            .unwrap(),
            expected
        );
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::RoleCreate {
                name: "r".into(),
                permissions: vec!["p".into()]
            })
            .unwrap(),
            [36, 1, b'r', 1, 1, b'p']
        );
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::AuthList).unwrap(),
            [37]
        );
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::TokenRevoke { token: vec![7] }).unwrap(),
            [38, 1, 7]
        );
        let mut expected = vec![39];
        expected.extend([5; 32]);
        assert_eq!(
            postcard::to_allocvec(&ClientRequest::Recover { secret: [5; 32] }).unwrap(),
            expected
        );
        let mut expected = vec![22];
        expected.extend([6; 32]);
        expected.extend([1, 1, 1, b'a', 1, 1, b'p', 0]);
        assert_eq!(
            postcard::to_allocvec(&ClientResponse::WhoAmI(WhoAmI {
                key: [6; 32],
                member: true,
                roles: vec!["a".into()],
                permissions: vec!["p".into()],
                token: None
            }))
            .unwrap(),
            expected
        );
        assert_eq!(
            postcard::to_allocvec(&ClientResponse::AuthList(AuthListing {
                grants: vec![],
                roles: vec![],
                revoked_tokens: vec![]
            }))
            .unwrap(),
            [23, 0, 0, 0]
        );
        let mut expected = vec![3, 12];
        expected.extend([8; 32]);
        expected.extend([1, b'x']);
        assert_eq!(
            postcard::to_allocvec(&ClientResponse::Error(RpcError::PermissionDenied {
                caller: [8; 32],
                needed: "x".into()
            }))
            .unwrap(),
            expected
        );
        assert_eq!(
            postcard::to_allocvec(&ClientResponse::Error(RpcError::Token("t".into()))).unwrap(),
            [3, 13, 1, b't']
        );
        assert_eq!(
            postcard::to_allocvec(&ClientResponse::Error(RpcError::Namespace(
                NamespaceError::TooMany { max: 2 }
            )))
            .unwrap(),
            [3, 11, 9, 2]
        );
        assert_eq!(
            postcard::to_allocvec(&ClientResponse::Error(RpcError::Doc(
                aspen_crdt::DocError::Inflates { index: 1, max: 2 }
            )))
            .unwrap(),
            [3, 9, 10, 1, 2]
        );
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::wire::decode_body::<ClientRequest>(&bytes);
            let _ = crate::wire::decode_body::<ClientResponse>(&bytes);
        }
    }
}
