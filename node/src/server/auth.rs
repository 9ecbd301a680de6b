//! Access control for every request a node serves: who is calling, and may they do this.
//!
//! The caller is always the key the QUIC handshake proved (`Connection::remote_id`), never a
//! claim inside a message. What a key may do is its *grant* (roles and `KIND:ACTION:PATTERN`
//! permissions), kept in the replicated system key space so every member enforces the same
//! policy and it survives restarts:
//!
//! ```text
//! auth/g/<key, 32 bytes>    StoredGrant: role names and permissions (text form)
//! auth/r/<role name>        StoredRole: a custom role's permissions
//! auth/x/<token hash>       revoked capability token: u64 expiry (Unix seconds, big-endian)
//! ```
//!
//! Each node keeps the parsed policy in memory ([`AuthService`]) and reloads it whenever an
//! applied write touches `auth/` (a system prefix watch), so a check costs a hash lookup and
//! a grant or revocation takes effect on a member as soon as it applies it.
//!
//! Members of the cluster (their node keys) may do everything: they hold the cluster secret
//! and can propose any write through Raft anyway. A capability token presented on a
//! connection adds what its leaf allows, but never more than its root issuer holds *now*.
//!
//! Default deny: a key with no grant and no token can call only the few requests that reveal
//! nothing private or carry their own proof (see [`Need::Open`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use aspen_client::protocol::{
    AuthListing, AuthRequest, AuthResponse, BlobRequest, BlobResponse, ClientRequest,
    ClientResponse, ClusterRequest, DocRequest, DocResponse, GrantSummary, KvRequest, LeaseRequest,
    NsRequest, NsResponse, RoleSummary, RpcError, TokenSummary,
};
use aspen_kv::api::{Command, SystemOp, SystemTxn, TxnOp, WriteOp};
use aspen_trust::{Action, BuiltinRole, CapabilityToken, Kind, Permission, VerifiedToken};
use serde::{Deserialize, Serialize};

use super::admission::Admission;
use super::{ClusterHandle, NodeState};

/// Prefix of every access-control key.
pub const AUTH_PREFIX: &[u8] = b"auth/";
/// `auth/g/<key>`: a key's grant.
pub const GRANT_PREFIX: &[u8] = b"auth/g/";
/// `auth/r/<name>`: a custom role.
pub const ROLE_PREFIX: &[u8] = b"auth/r/";
/// `auth/x/<hash>`: a revoked token.
pub const REVOKED_PREFIX: &[u8] = b"auth/x/";

/// Most keys with a grant (bounds the policy every member holds in memory).
pub const MAX_GRANTS: usize = 10_000;
/// Most custom roles.
pub const MAX_ROLES: usize = 256;
/// Most roles named in one grant.
pub const MAX_ROLES_PER_GRANT: usize = 16;
/// Most revoked tokens remembered at once (each until it expires).
pub const MAX_REVOKED: usize = 10_000;

/// A grant as stored: role names and permissions in their text form, so the stored format
/// does not depend on how permissions are encoded in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredGrant {
    pub roles: Vec<String>,
    pub permissions: Vec<String>,
}

/// A custom role as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRole {
    pub permissions: Vec<String>,
}

pub fn grant_key(key: &[u8; 32]) -> Vec<u8> {
    [GRANT_PREFIX, key.as_slice()].concat()
}

pub fn role_key(name: &str) -> Vec<u8> {
    [ROLE_PREFIX, name.as_bytes()].concat()
}

pub fn revoked_key(hash: &[u8; 32]) -> Vec<u8> {
    [REVOKED_PREFIX, hash.as_slice()].concat()
}

/// The access-control state one node enforces, parsed from the system key space.
#[derive(Debug, Default)]
pub struct Policy {
    grants: HashMap<[u8; 32], StoredGrant>,
    roles: BTreeMap<String, Vec<Permission>>,
    revoked: HashMap<[u8; 32], u64>,
    /// Each granted key's permissions, roles expanded.
    effective: HashMap<[u8; 32], Vec<Permission>>,
}

impl Policy {
    /// Builds the policy from every `auth/` system key. Entries that do not parse are
    /// skipped with a warning (they were checked when written; this only guards against a
    /// newer writer).
    pub fn from_entries(entries: Vec<(Vec<u8>, Vec<u8>)>) -> Policy {
        let mut policy = Policy::default();
        for (key, value) in entries {
            if let Some(k) = key.strip_prefix(GRANT_PREFIX) {
                let (Ok(k), Ok(g)) = (
                    <[u8; 32]>::try_from(k),
                    postcard::from_bytes::<StoredGrant>(&value),
                ) else {
                    tracing::warn!("skipping an unreadable grant record");
                    continue;
                };
                policy.grants.insert(k, g);
            } else if let Some(name) = key.strip_prefix(ROLE_PREFIX) {
                let (Ok(name), Ok(role)) = (
                    String::from_utf8(name.to_vec()),
                    postcard::from_bytes::<StoredRole>(&value),
                ) else {
                    tracing::warn!("skipping an unreadable role record");
                    continue;
                };
                let perms = role
                    .permissions
                    .iter()
                    .filter_map(|p| p.parse::<Permission>().ok())
                    .collect();
                policy.roles.insert(name, perms);
            } else if let Some(h) = key.strip_prefix(REVOKED_PREFIX) {
                let (Ok(h), Ok(exp)) = (<[u8; 32]>::try_from(h), <[u8; 8]>::try_from(&value[..]))
                else {
                    tracing::warn!("skipping an unreadable revocation record");
                    continue;
                };
                policy.revoked.insert(h, u64::from_be_bytes(exp));
            }
        }
        let effective = policy
            .grants
            .iter()
            .map(|(k, g)| (*k, policy.expand(g)))
            .collect();
        policy.effective = effective;
        policy
    }

    /// A grant's permissions with its roles expanded (unknown roles grant nothing).
    fn expand(&self, grant: &StoredGrant) -> Vec<Permission> {
        let mut out: Vec<Permission> = grant
            .permissions
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        for role in &grant.roles {
            out.extend(self.role_permissions(role).unwrap_or_default());
        }
        out
    }

    /// A built-in or custom role's permissions.
    pub fn role_permissions(&self, name: &str) -> Option<Vec<Permission>> {
        match name.parse::<BuiltinRole>() {
            Ok(b) => Some(b.permissions()),
            Err(_) => self.roles.get(name).cloned(),
        }
    }

    pub fn permissions_of(&self, key: &[u8; 32]) -> &[Permission] {
        self.effective.get(key).map_or(&[], Vec::as_slice)
    }

    pub fn grant_of(&self, key: &[u8; 32]) -> Option<&StoredGrant> {
        self.grants.get(key)
    }

    pub fn is_revoked(&self, hash: &[u8; 32]) -> bool {
        self.revoked.contains_key(hash)
    }

    pub fn grant_count(&self) -> usize {
        self.grants.len()
    }

    pub fn role_count(&self) -> usize {
        self.roles.len()
    }

    pub fn revoked_count(&self) -> usize {
        self.revoked.len()
    }

    /// Revocations whose token has expired (safe to forget).
    pub fn expired_revocations(&self, now: u64) -> Vec<[u8; 32]> {
        self.revoked
            .iter()
            .filter(|(_, exp)| **exp <= now)
            .map(|(h, _)| *h)
            .collect()
    }

    pub fn listing(&self) -> AuthListing {
        let mut grants: Vec<GrantSummary> = self
            .grants
            .iter()
            .map(|(k, g)| GrantSummary {
                key: *k,
                roles: g.roles.clone(),
                permissions: g.permissions.clone(),
            })
            .collect();
        grants.sort_by_key(|g| g.key);
        let mut revoked_tokens: Vec<([u8; 32], u64)> =
            self.revoked.iter().map(|(h, e)| (*h, *e)).collect();
        revoked_tokens.sort();
        AuthListing {
            grants,
            roles: self
                .roles
                .iter()
                .map(|(name, perms)| RoleSummary {
                    name: name.clone(),
                    permissions: perms.iter().map(|p| p.to_string()).collect(),
                })
                .collect(),
            revoked_tokens,
        }
    }
}

/// What a request needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Anyone: the request reveals only public facts (the cluster identity, the caller's own
    /// key) or carries its own proof (a bootstrap secret, an invitation, a token).
    Open,
    /// A permission on one resource name (a kv key, a document name, a blob tag, a namespace
    /// id in hex; empty for `cluster`).
    One(Kind, Action, Vec<u8>),
    /// A permission on every key of `[start, end)` (etcd's convention for `end`).
    Range(Kind, Action, Vec<u8>, Option<Vec<u8>>),
    /// Reading a blob by its hash: `blob:read` on some tag that names it (checked by the
    /// blob service, which knows the tags).
    BlobHash([u8; 32]),
    /// Some permission of this kind and action (listings, filtered per item afterwards).
    AnyOf(Kind, Action),
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Need::Open => f.write_str("nothing"),
            Need::One(Kind::Cluster, a, _) => write!(f, "cluster:{a}:*"),
            Need::One(k, a, name) => write!(f, "{k}:{a}:{}", name.escape_ascii()),
            Need::Range(k, a, start, end) => match end {
                None => write!(f, "{k}:{a}:{}", start.escape_ascii()),
                Some(e) if e.is_empty() => {
                    write!(f, "{k}:{a} on every key from '{}'", start.escape_ascii())
                }
                Some(e) => write!(
                    f,
                    "{k}:{a} on every key in ['{}', '{}')",
                    start.escape_ascii(),
                    e.escape_ascii()
                ),
            },
            Need::BlobHash(h) => write!(f, "blob:read on a tag naming {}", hex::encode(h)),
            Need::AnyOf(k, a) => write!(f, "{k}:{a} on something"),
        }
    }
}

fn cluster(action: Action) -> Need {
    Need::One(Kind::Cluster, action, Vec::new())
}

fn ns(action: Action, id: &[u8; 32]) -> Need {
    Need::One(Kind::Ns, action, hex::encode(id).into_bytes())
}

/// What each write command needs (kv keys; compaction is a cluster-wide act).
fn command_needs(command: &Command, out: &mut Vec<Need>) {
    match &command.op {
        WriteOp::Put { key, .. } | WriteOp::PutWith { key, .. } => {
            out.push(Need::One(Kind::Kv, Action::Write, key.clone()))
        }
        // Anyone who may write some key may hold leases; revoking one also needs write
        // access to each key attached (checked by the key-value service, which reads them).
        WriteOp::LeaseGrant { .. } | WriteOp::LeaseRevoke { .. } => {
            out.push(Need::AnyOf(Kind::Kv, Action::Write))
        }
        WriteOp::Delete { start, end, .. } => out.push(Need::Range(
            Kind::Kv,
            Action::Write,
            start.clone(),
            end.clone(),
        )),
        WriteOp::Compact { .. } => out.push(cluster(Action::Admin)),
        WriteOp::Txn(txn) => txn_needs(txn, out),
        // Every node of the tree, whichever branches run (as for a plain transaction).
        WriteOp::TxnTree(tree) => {
            for txn in &tree.nodes {
                txn_needs(txn, out);
            }
            // A comparison over a key range reads the whole range.
            for r in &tree.ranges {
                if let Some(c) = tree
                    .nodes
                    .get(r.node as usize)
                    .and_then(|t| t.compare.get(r.compare as usize))
                {
                    out.push(Need::Range(
                        Kind::Kv,
                        Action::Read,
                        c.key.clone(),
                        Some(r.end.clone()),
                    ));
                }
            }
        }
        // Refused from clients anyway (the client service checks); members only.
        WriteOp::System(_) | WriteOp::SystemTxn(SystemTxn { .. }) | WriteOp::LeaseExpire { .. } => {
            out.push(cluster(Action::Admin))
        }
    }
}

/// A transaction reads the keys it compares and writes those of both branches.
fn txn_needs(txn: &aspen_kv::api::Txn, out: &mut Vec<Need>) {
    for c in &txn.compare {
        out.push(Need::One(Kind::Kv, Action::Read, c.key.clone()));
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            TxnOp::Put { key, .. } | TxnOp::PutWith { key, .. } => {
                out.push(Need::One(Kind::Kv, Action::Write, key.clone()))
            }
            TxnOp::Delete { start, end, .. } => out.push(Need::Range(
                Kind::Kv,
                Action::Write,
                start.clone(),
                end.clone(),
            )),
            // Its own node is checked on its own.
            TxnOp::Nested(_) => {}
        }
    }
}

/// Every permission `request` needs: the one place each service's requests map to
/// permissions (a new request kind does not compile until it is added here).
pub fn needs(request: &ClientRequest) -> Vec<Need> {
    let mut out = Vec::new();
    match request {
        ClientRequest::Kv(r) => kv_needs(r, &mut out),
        ClientRequest::Cluster(r) => out.push(cluster_needs(r)),
        ClientRequest::Doc(r) => out.push(doc_needs(r)),
        ClientRequest::Blob(r) => blob_needs(r, &mut out),
        ClientRequest::Ns(r) => out.push(ns_needs(r)),
        ClientRequest::Auth(r) => out.push(auth_needs(r)),
        // Exports are the cluster's policy towards other clusters.
        ClientRequest::Fed(_) => out.push(cluster(Action::Admin)),
    }
    out
}

fn kv_needs(request: &KvRequest, out: &mut Vec<Need>) {
    match request {
        KvRequest::Write { commands } => {
            for c in commands {
                command_needs(c, out);
            }
        }
        KvRequest::Range { request, .. } => out.push(Need::Range(
            Kind::Kv,
            Action::Read,
            request.start.clone(),
            request.end.clone(),
        )),
        KvRequest::Watch(watch) => out.push(Need::Range(
            Kind::Kv,
            Action::Read,
            watch.start.clone(),
            watch.end.clone(),
        )),
        // Each watch on the stream is authorized for its range as it is created.
        KvRequest::Watches => out.push(Need::AnyOf(Kind::Kv, Action::Read)),
        // A lease is kept alive by whoever holds it; its keys were written under write access.
        KvRequest::Lease(LeaseRequest::KeepAlive { .. }) => {
            out.push(Need::AnyOf(Kind::Kv, Action::Write))
        }
        KvRequest::Lease(LeaseRequest::TimeToLive { .. } | LeaseRequest::List { .. }) => {
            out.push(Need::AnyOf(Kind::Kv, Action::Read))
        }
    }
}

fn cluster_needs(request: &ClusterRequest) -> Need {
    use ClusterRequest as R;
    match request {
        R::Status | R::StateDigest => cluster(Action::Read),
        R::RemoveMember { .. } | R::SetNetFaults(_) | R::CreateInvite { .. } | R::Admit { .. } => {
            cluster(Action::Admin)
        }
        // Public (published on the DHT), or proven by what the request carries: the node's
        // bootstrap secret, an invitation bound to the caller's key.
        R::Identity | R::Init { .. } | R::Join { .. } => Need::Open,
    }
}

fn doc_needs(request: &DocRequest) -> Need {
    use DocRequest as R;
    match request {
        R::Create { name, .. } | R::Change { name, .. } | R::Delete { name } => {
            Need::One(Kind::Doc, Action::Write, name.as_bytes().to_vec())
        }
        R::Get { name, .. } => Need::One(Kind::Doc, Action::Read, name.as_bytes().to_vec()),
        R::List { .. } => Need::AnyOf(Kind::Doc, Action::Read),
    }
}

fn blob_needs(request: &BlobRequest, out: &mut Vec<Need>) {
    use BlobRequest as R;
    match request {
        R::Stats => out.push(cluster(Action::Read)),
        // An untagged upload is kept only for the GC grace: still needs blob write somewhere.
        R::Add { tag, .. } => out.push(Need::One(
            Kind::Blob,
            Action::Write,
            tag.as_ref()
                .map(|t| t.as_bytes().to_vec())
                .unwrap_or_default(),
        )),
        R::Stat { hash, .. } => out.push(Need::BlobHash(*hash)),
        R::List { .. } => out.push(Need::AnyOf(Kind::Blob, Action::Read)),
        // Naming a blob under a tag must not become a way to read a blob one cannot read.
        R::Tag { tag, hash } => {
            out.push(Need::One(
                Kind::Blob,
                Action::Write,
                tag.as_bytes().to_vec(),
            ));
            out.push(Need::BlobHash(*hash));
        }
        R::Untag { tag } => out.push(Need::One(
            Kind::Blob,
            Action::Write,
            tag.as_bytes().to_vec(),
        )),
    }
}

fn ns_needs(request: &NsRequest) -> Need {
    use NsRequest as R;
    match request {
        R::Create => Need::One(Kind::Ns, Action::Write, Vec::new()),
        R::Set { namespace, .. } => ns(Action::Write, namespace),
        R::Get { namespace, .. } | R::List { namespace, .. } => ns(Action::Read, namespace),
        R::Namespaces => Need::AnyOf(Kind::Ns, Action::Read),
        // Sharing write access hands out the namespace's secret: an admin act.
        R::Share { namespace, write } => {
            if *write {
                cluster(Action::Admin)
            } else {
                ns(Action::Read, namespace)
            }
        }
        R::Import { .. } => Need::One(Kind::Ns, Action::Admin, Vec::new()),
    }
}

fn auth_needs(request: &AuthRequest) -> Need {
    use AuthRequest as R;
    match request {
        R::Grant { .. } | R::Revoke { .. } | R::RoleCreate { .. } | R::List => {
            cluster(Action::Admin)
        }
        // Proven by what the request carries (a bootstrap secret, a token), about the
        // caller itself, or checked by the handler (token revocation by its issuers).
        R::Recover { .. } | R::PresentToken { .. } | R::WhoAmI | R::TokenRevoke { .. } => {
            Need::Open
        }
    }
}

/// A token presented on one connection, verified when presented and re-checked (expiry,
/// revocation) on every request.
#[derive(Clone, Debug)]
pub struct PresentedToken {
    pub verified: VerifiedToken,
}

/// One client connection's caller.
#[derive(Debug)]
pub struct Caller {
    /// The key QUIC proved.
    pub key: [u8; 32],
    pub token: Mutex<Option<PresentedToken>>,
}

impl Caller {
    pub fn new(key: [u8; 32]) -> Self {
        Caller {
            key,
            token: Mutex::new(None),
        }
    }
}

/// What one caller may do right now: the node's policy, membership and the caller's token,
/// resolved once per request.
pub struct Access<'a> {
    pub key: [u8; 32],
    pub member: bool,
    /// The node keys of the current members.
    members: Vec<[u8; 32]>,
    policy: Arc<Policy>,
    token: Option<PresentedToken>,
    now: u64,
    caller: &'a Caller,
}

impl Access<'_> {
    /// Whether the caller may do `action` on the resource `name` of `kind`.
    pub fn may(&self, kind: Kind, action: Action, name: &[u8]) -> bool {
        self.member
            || aspen_trust::any_allows(self.policy.permissions_of(&self.key), kind, action, name)
            || self.token_allows(|perms| aspen_trust::any_allows(perms, kind, action, name))
    }

    fn may_range(&self, kind: Kind, action: Action, start: &[u8], end: Option<&[u8]>) -> bool {
        let check =
            |perms: &[Permission]| aspen_trust::any_allows_range(perms, kind, action, start, end);
        self.member || check(self.policy.permissions_of(&self.key)) || self.token_allows(check)
    }

    /// Whether the caller holds any permission of `kind` at least `action`.
    pub fn may_any(&self, kind: Kind, action: Action) -> bool {
        let check =
            |perms: &[Permission]| perms.iter().any(|p| p.kind == kind && p.action >= action);
        self.member || check(self.policy.permissions_of(&self.key)) || self.token_allows(check)
    }

    /// The token's leaf allows it AND its root issuer holds it now (or is a member).
    fn token_allows(&self, check: impl Fn(&[Permission]) -> bool) -> bool {
        let Some(t) = &self.token else {
            return false;
        };
        let v = &t.verified;
        if v.expires_at <= self.now || v.hashes.iter().any(|h| self.policy.is_revoked(h)) {
            return false;
        }
        check(&v.permissions)
            && (self.is_member_key(&v.root_issuer)
                || check(self.policy.permissions_of(&v.root_issuer)))
    }

    fn is_member_key(&self, key: &[u8; 32]) -> bool {
        self.members.contains(key)
    }

    /// Checks every need that can be decided from permissions alone. `BlobHash` needs are
    /// returned for the blob service to decide (it knows which tags name a hash).
    pub fn check(&self, needs: &[Need]) -> Result<Vec<[u8; 32]>, RpcError> {
        let mut hashes = Vec::new();
        for need in needs {
            let ok = match need {
                Need::Open => true,
                Need::One(k, a, name) => self.may(*k, *a, name),
                Need::Range(k, a, start, end) => self.may_range(*k, *a, start, end.as_deref()),
                Need::AnyOf(k, a) => self.may_any(*k, *a),
                Need::BlobHash(h) => {
                    // Decided by the blob service unless the caller reads every blob.
                    if !self.is_any_blob_reader() {
                        hashes.push(*h);
                    }
                    true
                }
            };
            if !ok {
                return Err(self.denied(need));
            }
        }
        Ok(hashes)
    }

    /// `blob:read:*`: may read every blob whatever its tags.
    fn is_any_blob_reader(&self) -> bool {
        let any = Permission {
            kind: Kind::Blob,
            action: Action::Read,
            pattern: aspen_trust::Pattern::Any,
        };
        let check = |perms: &[Permission]| perms.iter().any(|p| any.narrows(p));
        self.member || check(self.policy.permissions_of(&self.key)) || self.token_allows(check)
    }

    pub fn denied(&self, need: &Need) -> RpcError {
        RpcError::PermissionDenied {
            caller: self.key,
            needed: need.to_string(),
        }
    }

    pub fn token_summary(&self) -> Option<TokenSummary> {
        self.token.as_ref().map(|t| TokenSummary {
            root_issuer: t.verified.root_issuer,
            permissions: t
                .verified
                .permissions
                .iter()
                .map(|p| p.to_string())
                .collect(),
            expires_at: t.verified.expires_at,
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn caller(&self) -> &Caller {
        self.caller
    }
}

/// A node's copy of the access-control policy.
pub struct AuthService {
    cluster: ClusterHandle,
    /// Holds this node's bootstrap secret (`Recover` and `Init` prove they know it).
    admission: Arc<Admission>,
    policy: RwLock<Arc<Policy>>,
    /// Bumped by the state machine whenever an `auth/` write applies on this node.
    changes: std::sync::OnceLock<tokio::sync::watch::Receiver<u64>>,
    /// The value of `changes` the policy in force was loaded at.
    loaded: std::sync::atomic::AtomicU64,
    /// Held for a whole reload: two overlapping reloads could otherwise leave the older
    /// scan in force under the newer counter (looking fresh while stale).
    reloading: tokio::sync::Mutex<()>,
}

impl AuthService {
    pub fn new(cluster: ClusterHandle, admission: Arc<Admission>) -> Self {
        AuthService {
            cluster,
            admission,
            policy: Default::default(),
            changes: Default::default(),
            loaded: Default::default(),
            reloading: Default::default(),
        }
    }

    /// Serves one access-control request (access already checked).
    pub async fn handle(
        &self,
        request: AuthRequest,
        access: &Access<'_>,
    ) -> Result<AuthResponse, RpcError> {
        match request {
            AuthRequest::PresentToken { token } => self.present_token(&token, access),
            AuthRequest::WhoAmI => Ok(self.whoami(access)),
            AuthRequest::Grant {
                key,
                roles,
                permissions,
            } => self.grant(key, roles, permissions).await,
            AuthRequest::Revoke {
                key,
                roles,
                permissions,
                all,
            } => self.revoke(key, roles, permissions, all).await,
            AuthRequest::RoleCreate { name, permissions } => {
                self.role_create(name, permissions).await
            }
            AuthRequest::List => Ok(AuthResponse::List(self.policy().listing())),
            AuthRequest::TokenRevoke { token } => self.token_revoke(&token, access).await,
            AuthRequest::Recover { secret } => self.recover_admin(&secret, access).await,
        }
    }

    /// Connects the policy to the state machine's `auth/` prefix watch (once, at start).
    pub fn watch(&self, changes: tokio::sync::watch::Receiver<u64>) {
        let _ = self.changes.set(changes);
    }

    /// Whether an `auth/` write applied after the policy in force was loaded.
    pub fn is_stale(&self) -> bool {
        self.changes
            .get()
            .is_some_and(|c| *c.borrow() != self.loaded.load(std::sync::atomic::Ordering::Acquire))
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().expect("policy lock").clone()
    }

    pub fn replace(&self, policy: Policy) {
        *self.policy.write().expect("policy lock") = Arc::new(policy);
    }

    /// Resolves what `caller` may do, given the members' node keys and the current time.
    pub fn access<'a>(&self, caller: &'a Caller, members: Vec<[u8; 32]>, now: u64) -> Access<'a> {
        Access {
            key: caller.key,
            member: members.contains(&caller.key),
            members,
            policy: self.policy(),
            token: caller.token.lock().expect("token lock").clone(),
            now,
            caller,
        }
    }
}

/// Verifies a token presented by `presenter` against the policy's revocations.
pub fn verify_token(
    bytes: &[u8],
    presenter: &[u8; 32],
    policy: &Policy,
    now: u64,
) -> Result<PresentedToken, RpcError> {
    let token = CapabilityToken::decode(bytes).map_err(|e| RpcError::Token(e.to_string()))?;
    let verified = token
        .verify(presenter, now, |h| policy.is_revoked(h))
        .map_err(|e| RpcError::Token(e.to_string()))?;
    Ok(PresentedToken { verified })
}

/// Verifies a bearer token given as text (the listeners for callers that cannot prove a key:
/// automerge-repo, the etcd API): its chain, that its audience is [`aspen_trust::BEARER_AUDIENCE`],
/// its expiry and the policy's revocations.
pub fn verify_bearer(text: &str, policy: &Policy, now: u64) -> Result<PresentedToken, String> {
    let token: CapabilityToken = text.parse().map_err(|e| format!("token: {e}"))?;
    verify_token(&token.encode(), &aspen_trust::BEARER_AUDIENCE, policy, now)
        .map_err(|e| e.to_string())
}

/// Checks a grant request's roles and permissions, returning the permissions parsed.
pub fn check_grant_parts(
    policy: &Policy,
    roles: &[String],
    permissions: &[String],
) -> Result<Vec<Permission>, RpcError> {
    if roles.len() > MAX_ROLES_PER_GRANT {
        return Err(RpcError::BadRequest(format!(
            "{} roles exceed the limit of {MAX_ROLES_PER_GRANT} per grant",
            roles.len()
        )));
    }
    if permissions.len() > aspen_trust::MAX_PERMISSIONS {
        return Err(RpcError::BadRequest(format!(
            "{} permissions exceed the limit of {}",
            permissions.len(),
            aspen_trust::MAX_PERMISSIONS
        )));
    }
    for r in roles {
        if policy.role_permissions(r).is_none() {
            return Err(RpcError::BadRequest(format!(
                "unknown role '{}' (built-in: admin, readwrite, readonly; or create it with `aspen auth role create`)",
                r.escape_default()
            )));
        }
    }
    permissions
        .iter()
        .map(|p| {
            p.parse::<Permission>()
                .map_err(|e| RpcError::BadRequest(format!("invalid permission '{p}': {e}")))
        })
        .collect()
}

/// A system transaction that sets `key`'s grant to `new` (or deletes it), on condition that
/// it still holds `old` (concurrent edits of one grant never lose each other's changes).
pub fn grant_txn(
    key: &[u8; 32],
    old: Option<&StoredGrant>,
    new: Option<&StoredGrant>,
) -> SystemTxn {
    let k = grant_key(key);
    let encode = |g: &StoredGrant| postcard::to_allocvec(g).expect("grants encode");
    SystemTxn {
        require: vec![(k.clone(), old.map(encode))],
        writes: vec![match new {
            Some(g) => SystemOp::Put {
                key: k,
                value: encode(g),
            },
            None => SystemOp::Delete { key: k },
        }],
    }
}

/// Keeps only the items of a listing the caller may read (documents, blob tags, namespaces).
pub fn filter_listing(response: ClientResponse, access: &Access<'_>) -> ClientResponse {
    match response {
        ClientResponse::Doc(DocResponse::List { mut docs, more }) => {
            docs.retain(|d| access.may(Kind::Doc, Action::Read, d.name.as_bytes()));
            ClientResponse::Doc(DocResponse::List { docs, more })
        }
        ClientResponse::Blob(BlobResponse::List { mut tags, more }) => {
            tags.retain(|t| access.may(Kind::Blob, Action::Read, t.tag.as_bytes()));
            ClientResponse::Blob(BlobResponse::List { tags, more })
        }
        ClientResponse::Ns(NsResponse::Namespaces(mut list)) => {
            list.retain(|n| access.may(Kind::Ns, Action::Read, hex::encode(n.id).as_bytes()));
            ClientResponse::Ns(NsResponse::Namespaces(list))
        }
        other => other,
    }
}

/// Reloads the node's policy whenever an applied write touches `auth/`; the leader also
/// forgets revocations of tokens that have expired (they are invalid anyway).
pub async fn run_policy_reload(
    state: Arc<NodeState>,
    mut changes: tokio::sync::watch::Receiver<u64>,
) {
    let mut prune = tokio::time::interval(REVOCATION_PRUNE_INTERVAL);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                if let Err(e) = state.auth.reload_policy().await {
                    tracing::warn!("cannot reload the access policy: {e}");
                }
            }
            _ = prune.tick() => {
                if state.cluster.is_leader() {
                    state.auth.prune_revocations().await;
                }
            }
        }
    }
}

/// How often the leader looks for revocations of expired tokens.
const REVOCATION_PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// How often a grant update is retried when a concurrent update of the same grant won.
const GRANT_UPDATE_ATTEMPTS: usize = 8;

fn system_txn(txn: SystemTxn) -> Command {
    Command {
        session: None,
        op: WriteOp::SystemTxn(txn),
    }
}

fn parse_key(key: &[u8; 32]) -> Result<(), RpcError> {
    iroh::PublicKey::from_bytes(key).map(|_| ()).map_err(|_| {
        RpcError::BadRequest(format!("{} is not an Ed25519 public key", hex::encode(key)))
    })
}

impl AuthService {
    /// Reads every `auth/` key and puts the parsed policy in force on this node.
    pub async fn reload_policy(&self) -> Result<(), RpcError> {
        let _one_at_a_time = self.reloading.lock().await;
        // Read the change counter before the scan: a write landing in between makes the
        // policy look stale, never fresh.
        let seen = self.changes.get().map(|c| *c.borrow());
        let entries = self
            .cluster
            .sm
            .system_scan(
                AUTH_PREFIX.to_vec(),
                MAX_GRANTS + MAX_ROLES + MAX_REVOKED + 1,
            )
            .await?;
        self.replace(Policy::from_entries(entries));
        if let Some(seen) = seen {
            self.loaded
                .store(seen, std::sync::atomic::Ordering::Release);
        }
        Ok(())
    }

    pub async fn prune_revocations(&self) {
        let expired = self.policy().expired_revocations(identity_now());
        if expired.is_empty() {
            return;
        }
        let txn = SystemTxn {
            require: vec![],
            writes: expired
                .iter()
                .take(aspen_kv::limits::MAX_SYSTEM_TXN_OPS)
                .map(|h| SystemOp::Delete {
                    key: revoked_key(h),
                })
                .collect(),
        };
        if let Err(e) = self.cluster.propose(vec![system_txn(txn)]).await {
            tracing::debug!("cannot prune expired revocations: {e}");
        }
    }

    /// The caller proves it can read this node's data directory.
    pub(super) fn check_bootstrap_secret(
        &self,
        secret: &[u8; 32],
        access: &Access<'_>,
    ) -> Result<(), RpcError> {
        if self.admission.secret_matches(secret) {
            return Ok(());
        }
        Err(RpcError::PermissionDenied {
            caller: access.key,
            needed: "this node's bootstrap secret (DATA_DIR/bootstrap.secret)".into(),
        })
    }

    /// `Recover`: the caller proved it can read this member's data directory.
    async fn recover_admin(
        &self,
        secret: &[u8; 32],
        access: &Access<'_>,
    ) -> Result<AuthResponse, RpcError> {
        self.check_bootstrap_secret(secret, access)?;
        if self.cluster.members().is_empty() {
            return Err(RpcError::NotInitialized);
        }
        self.make_admin(access.key).await?;
        tracing::warn!(admin = %hex::encode(access.key), "admin granted with this node's bootstrap secret (recovery)");
        Ok(AuthResponse::Done)
    }

    pub(super) async fn make_admin(&self, key: [u8; 32]) -> Result<(), RpcError> {
        self.update_grant(key, |g| {
            if !g.roles.iter().any(|r| r == "admin") {
                g.roles.push("admin".into());
            }
            Ok(true)
        })
        .await
    }

    /// Reads `key`'s grant (after a read barrier), changes it with `edit` (false: delete it),
    /// and writes it back on condition nobody changed it meanwhile; retried on conflict.
    async fn update_grant(
        &self,
        key: [u8; 32],
        edit: impl Fn(&mut StoredGrant) -> Result<bool, RpcError>,
    ) -> Result<(), RpcError> {
        parse_key(&key)?;
        for _ in 0..GRANT_UPDATE_ATTEMPTS {
            self.cluster.read_barrier().await?;
            let stored = self.cluster.sm.system_get(grant_key(&key)).await?;
            let old: Option<StoredGrant> = match &stored {
                Some(b) => Some(
                    postcard::from_bytes(b)
                        .map_err(|e| RpcError::Internal(format!("stored grant: {e}")))?,
                ),
                None => None,
            };
            if old.is_none() && self.policy().grant_count() >= MAX_GRANTS {
                return Err(RpcError::BadRequest(format!(
                    "{MAX_GRANTS} keys have grants; the limit is {MAX_GRANTS}"
                )));
            }
            let mut new = old.clone().unwrap_or_default();
            let keep = edit(&mut new)?;
            let new =
                (keep && !(new.roles.is_empty() && new.permissions.is_empty())).then_some(new);
            if new == old {
                return Ok(());
            }
            let txn = grant_txn(&key, old.as_ref(), new.as_ref());
            txn.validate()?;
            let results = self.cluster.propose(vec![system_txn(txn)]).await?;
            match results.into_iter().next() {
                Some(Ok(aspen_kv::api::WriteOutcome::SystemTxn { applied: true, .. })) => {
                    // In force here before the caller hears back.
                    self.reload_policy().await?;
                    return Ok(());
                }
                Some(Ok(_)) => continue, // Someone else changed the grant: read it again.
                Some(Err(e)) => return Err(RpcError::Internal(format!("grant update: {e}"))),
                None => return Err(RpcError::Internal("grant update: no result".into())),
            }
        }
        Err(RpcError::Unavailable(
            "the grant kept changing concurrently; retry".into(),
        ))
    }

    async fn grant(
        &self,
        key: [u8; 32],
        roles: Vec<String>,
        permissions: Vec<String>,
    ) -> Result<AuthResponse, RpcError> {
        if roles.is_empty() && permissions.is_empty() {
            return Err(RpcError::BadRequest(
                "grant what? name a role or a permission".into(),
            ));
        }
        if key == aspen_trust::BEARER_AUDIENCE {
            return Err(RpcError::BadRequest(
                "the zero key stands for bearer-token callers and cannot hold a grant: \
                 issue a bearer token instead (`aspen auth token issue --bearer`)"
                    .into(),
            ));
        }
        // Roles created through another member just now must be known here.
        self.cluster.read_barrier().await?;
        self.reload_policy().await?;
        let parsed = check_grant_parts(&self.policy(), &roles, &permissions)?;
        self.update_grant(key, |g| {
            for r in &roles {
                if !g.roles.contains(r) {
                    g.roles.push(r.clone());
                }
            }
            for p in &parsed {
                let text = p.to_string();
                if !g.permissions.contains(&text) {
                    g.permissions.push(text);
                }
            }
            if g.roles.len() > MAX_ROLES_PER_GRANT
                || g.permissions.len() > aspen_trust::MAX_PERMISSIONS
            {
                return Err(RpcError::BadRequest(format!(
                    "a grant holds at most {MAX_ROLES_PER_GRANT} roles and {} permissions",
                    aspen_trust::MAX_PERMISSIONS
                )));
            }
            Ok(true)
        })
        .await?;
        Ok(AuthResponse::Done)
    }

    async fn revoke(
        &self,
        key: [u8; 32],
        roles: Vec<String>,
        permissions: Vec<String>,
        all: bool,
    ) -> Result<AuthResponse, RpcError> {
        if !all && roles.is_empty() && permissions.is_empty() {
            return Err(RpcError::BadRequest(
                "revoke what? name roles or permissions, or revoke the whole grant".into(),
            ));
        }
        let parsed: Vec<String> = permissions
            .iter()
            .map(|p| {
                p.parse::<Permission>()
                    .map(|p| p.to_string())
                    .map_err(|e| RpcError::BadRequest(format!("invalid permission '{p}': {e}")))
            })
            .collect::<Result<_, _>>()?;
        self.update_grant(key, |g| {
            if all {
                return Ok(false);
            }
            g.roles.retain(|r| !roles.contains(r));
            g.permissions.retain(|p| !parsed.contains(p));
            Ok(true)
        })
        .await?;
        Ok(AuthResponse::Done)
    }

    async fn role_create(
        &self,
        name: String,
        permissions: Vec<String>,
    ) -> Result<AuthResponse, RpcError> {
        aspen_trust::check_role_name(&name)
            .map_err(|e| RpcError::BadRequest(format!("invalid role name: {e}")))?;
        if name.parse::<BuiltinRole>().is_ok() {
            return Err(RpcError::BadRequest(format!(
                "'{name}' is a built-in role and cannot be redefined"
            )));
        }
        if permissions.is_empty() {
            return Err(RpcError::BadRequest(
                "a role needs at least one permission".into(),
            ));
        }
        let parsed = check_grant_parts(&self.policy(), &[], &permissions)?;
        let policy = self.policy();
        if policy.role_permissions(&name).is_none() && policy.role_count() >= MAX_ROLES {
            return Err(RpcError::BadRequest(format!(
                "{MAX_ROLES} custom roles exist; the limit is {MAX_ROLES}"
            )));
        }
        let role = StoredRole {
            permissions: parsed.iter().map(|p| p.to_string()).collect(),
        };
        let txn = SystemTxn {
            require: vec![],
            writes: vec![SystemOp::Put {
                key: role_key(&name),
                value: postcard::to_allocvec(&role).expect("roles encode"),
            }],
        };
        txn.validate()?;
        self.cluster.propose(vec![system_txn(txn)]).await?;
        self.reload_policy().await?;
        Ok(AuthResponse::Done)
    }

    fn present_token(&self, token: &[u8], access: &Access<'_>) -> Result<AuthResponse, RpcError> {
        if access.key == aspen_trust::BEARER_AUDIENCE {
            // No one holds that key's secret; a connection claiming it proved nothing.
            return Err(RpcError::Token(
                "bearer tokens are accepted only by the automerge-repo listener".into(),
            ));
        }
        let presented = verify_token(token, &access.key, &self.policy(), identity_now())?;
        *access.caller().token.lock().expect("token lock") = Some(presented);
        Ok(AuthResponse::Done)
    }

    fn whoami(&self, access: &Access<'_>) -> AuthResponse {
        let grant = access
            .policy()
            .grant_of(&access.key)
            .cloned()
            .unwrap_or_default();
        AuthResponse::WhoAmI(aspen_client::protocol::WhoAmI {
            key: access.key,
            member: access.member,
            roles: grant.roles,
            permissions: grant.permissions,
            token: access.token_summary(),
        })
    }

    /// Revokes a token and everything delegated from it. Admins may revoke any token; an
    /// issuer in its chain may revoke it too (the token itself proves who issued it).
    async fn token_revoke(
        &self,
        token: &[u8],
        access: &Access<'_>,
    ) -> Result<AuthResponse, RpcError> {
        let token = CapabilityToken::decode(token).map_err(|e| RpcError::Token(e.to_string()))?;
        let admin = access.may(Kind::Cluster, Action::Admin, b"");
        // An issuer may revoke what it issued, if it holds a grant (a key without one issues
        // nothing that works, and must not fill the revocation list with its own tokens).
        let issuer = token.links().iter().any(|l| l.issuer == access.key)
            && !access.policy().permissions_of(&access.key).is_empty();
        if !admin && !issuer {
            return Err(RpcError::PermissionDenied {
                caller: access.key,
                needed: "cluster:admin:*, or to have issued the token".into(),
            });
        }
        // Only genuine tokens are remembered; an expired one needs no revocation.
        match token.verify(&token.audience(), identity_now(), |_| false) {
            Ok(_) => {}
            Err(aspen_trust::TokenError::Expired { .. }) => return Ok(AuthResponse::Done),
            Err(aspen_trust::TokenError::NotYetValid { .. }) => {}
            Err(e) => return Err(RpcError::Token(e.to_string())),
        }
        if self.policy().revoked_count() >= MAX_REVOKED {
            return Err(RpcError::BadRequest(format!(
                "{MAX_REVOKED} revocations are in force; the limit is {MAX_REVOKED}"
            )));
        }
        let txn = SystemTxn {
            require: vec![],
            writes: vec![SystemOp::Put {
                key: revoked_key(&token.hash()),
                value: chain_expiry(&token).to_be_bytes().to_vec(),
            }],
        };
        self.cluster.propose(vec![system_txn(txn)]).await?;
        self.reload_policy().await?;
        Ok(AuthResponse::Done)
    }
}

/// When a token stops being valid anyway: the earliest expiry in its chain.
pub fn chain_expiry(token: &CapabilityToken) -> u64 {
    token
        .links()
        .iter()
        .map(|l| l.expires_at)
        .min()
        .unwrap_or(0)
}

fn identity_now() -> u64 {
    super::identity::unix_now()
}
