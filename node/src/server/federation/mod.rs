//! Federation: the client requests that manage it (exports, follows, mirrors, sync,
//! status), the origin side of `aspen/federation/1` ([`origin`]), a mirror's side of it
//! ([`mirror`]) and the follower's pulls ([`follower`]).
//!
//! The policy decisions are `aspen_federation`'s; this reads the stored export or follow
//! after a read barrier and writes the edited one with a system transaction that requires
//! the old value (retried when a concurrent edit won), like grants.

pub mod follower;
pub mod mirror;
pub mod origin;
pub mod triggers;

use std::sync::Arc;
use std::time::Duration;

use aspen_client::protocol::{
    ExportSummary, FedRequest, FedResponse, FollowSummary, MirrorSummary, Resource, RpcError,
    ViaMirror,
};
use aspen_client::NodeTicket;
use aspen_federation::{
    edit_export, export_key, follow_key, follow_state_key, local_name, mirror_key, resource_of_key,
    Export, ExportEdit, Follow, Hint, Via, EXPORT_PREFIX, FOLLOW_PREFIX, MAX_EXPORTS, MAX_FOLLOWS,
    MAX_MIRRORS, MAX_VIA, MIRROR_PREFIX,
};
use aspen_kv::api::{SystemOp, SystemTxn};
use aspen_trust::ClusterKey;

use super::ClusterHandle;
use follower::{FollowId, Pulls};

/// How long `fed sync` waits for the pulls it started before answering (under the client's
/// per-attempt timeout; the CLI then polls the follows until they are done).
const SYNC_WAIT: Duration = Duration::from_secs(3);

/// How often an export edit is retried when a concurrent edit of the same export won.
const EDIT_ATTEMPTS: usize = 8;

pub struct FedService {
    cluster: ClusterHandle,
    /// The leader's pull status, shared with the follower task.
    pub pulls: Arc<Pulls>,
    /// Nodes of other clusters that proved their cluster in a federation hello.
    pub peers: FedPeers,
}

/// Most federation peers remembered at once (expired ones make room first).
pub const MAX_FED_PEERS: usize = 4096;

/// Nodes of other clusters that proved, in a federation hello, which cluster they speak
/// for, until their certificate expires: the blob gate admits them for the blobs of tags
/// exported to that cluster (they fetch them over iroh-blobs, which carries no certificate).
#[derive(Default)]
pub struct FedPeers(std::sync::Mutex<std::collections::HashMap<[u8; 32], (ClusterKey, u64)>>);

impl FedPeers {
    pub fn remember(&self, node: [u8; 32], cluster: ClusterKey, expires_at: u64, now: u64) {
        let mut peers = self.0.lock().expect("lock");
        if peers.len() >= MAX_FED_PEERS && !peers.contains_key(&node) {
            peers.retain(|_, (_, expires)| *expires > now);
            if peers.len() >= MAX_FED_PEERS {
                return;
            }
        }
        peers.insert(node, (cluster, expires_at));
    }

    /// The cluster `node` proved, if its proof is still valid at `now`.
    pub fn cluster_of(&self, node: &[u8; 32], now: u64) -> Option<ClusterKey> {
        self.0
            .lock()
            .expect("lock")
            .get(node)
            .filter(|(_, expires)| *expires > now)
            .map(|(cluster, _)| *cluster)
    }
}

impl FedService {
    pub fn new(cluster: ClusterHandle) -> Self {
        FedService {
            cluster,
            pulls: Default::default(),
            peers: Default::default(),
        }
    }

    /// Serves one federation request (access already checked).
    pub async fn handle(&self, request: FedRequest) -> Result<FedResponse, RpcError> {
        match request {
            FedRequest::Export {
                resource,
                to,
                public,
            } => {
                self.edit(&resource, None, ExportEdit::Add { to, public })
                    .await?;
                Ok(FedResponse::Done)
            }
            FedRequest::Unexport {
                resource,
                to,
                public,
                all,
            } => {
                self.edit(&resource, None, ExportEdit::Remove { to, public, all })
                    .await?;
                Ok(FedResponse::Done)
            }
            FedRequest::Mirror {
                origin,
                resource,
                to,
                public,
            } => {
                let origin = origin_key(&origin)?;
                self.cluster.read_barrier().await?;
                if self
                    .cluster
                    .sm
                    .system_get(follow_key(&origin, &resource))
                    .await?
                    .is_none()
                {
                    return Err(RpcError::BadRequest(format!(
                        "{resource} of cluster {origin} is not followed: a cluster mirrors only \
                         what it follows (aspen fed follow first)"
                    )));
                }
                self.edit(&resource, Some(&origin), ExportEdit::Add { to, public })
                    .await?;
                Ok(FedResponse::Done)
            }
            FedRequest::Unmirror {
                origin,
                resource,
                to,
                public,
                all,
            } => {
                let origin = origin_key(&origin)?;
                self.edit(
                    &resource,
                    Some(&origin),
                    ExportEdit::Remove { to, public, all },
                )
                .await?;
                Ok(FedResponse::Done)
            }
            FedRequest::Mirrors => Ok(FedResponse::Mirrors(self.mirrors().await?)),
            FedRequest::Via {
                origin,
                resource,
                via,
            } => {
                self.set_via(origin, resource, via).await?;
                Ok(FedResponse::Done)
            }
            FedRequest::Exports => Ok(FedResponse::Exports(self.exports().await?)),
            FedRequest::Follow {
                origin,
                resource,
                into,
                hints,
            } => {
                self.follow(origin, resource, into, hints, None).await?;
                Ok(FedResponse::Done)
            }
            FedRequest::FollowVia {
                origin,
                resource,
                into,
                hints,
                via,
            } => {
                let via = self.checked_via(&origin, via).await?;
                self.follow(origin, resource, into, hints, Some(via))
                    .await?;
                Ok(FedResponse::Done)
            }
            FedRequest::Unfollow { origin, resource } => {
                self.unfollow(origin, resource).await?;
                Ok(FedResponse::Done)
            }
            FedRequest::Follows => Ok(FedResponse::Follows(self.follows(None).await?)),
            FedRequest::Sync { origin, resource } => {
                Ok(FedResponse::Follows(self.sync(origin, resource).await?))
            }
        }
    }

    async fn follow(
        &self,
        origin: [u8; 32],
        resource: Resource,
        into: Option<String>,
        hints: Vec<NodeTicket>,
        new_via: Option<Vec<Via>>,
    ) -> Result<(), RpcError> {
        let origin = origin_key(&origin)?;
        let into = local_name(&origin, &resource, into.as_deref())
            .map_err(|e| RpcError::BadRequest(e.to_string()))?;
        match resource.kind {
            aspen_sync::ResourceKind::Doc => {
                aspen_crdt::DocName::new(into.clone())?;
            }
            // Hosted under its own id (checked by `local_name`).
            aspen_sync::ResourceKind::Ns => {}
            aspen_sync::ResourceKind::Blob => {
                // A prefix: with one more character it must make a valid tag.
                aspen_blobs::TagName::new(format!("{into}x"))?;
            }
        }
        let hints = hints_of(hints)?;
        let key = follow_key(&origin, &resource);
        for _ in 0..EDIT_ATTEMPTS {
            self.cluster.read_barrier().await?;
            let stored = self.cluster.sm.system_get(key.clone()).await?;
            let (created_at_ms, via) = match stored.as_deref().map(Follow::decode) {
                Some(Ok(old)) => (old.created_at_ms, old.via),
                Some(Err(e)) => return Err(internal(e)),
                None => {
                    let count = self
                        .cluster
                        .sm
                        .system_scan(FOLLOW_PREFIX.to_vec(), MAX_FOLLOWS + 1)
                        .await?
                        .len();
                    if count >= MAX_FOLLOWS {
                        return Err(RpcError::BadRequest(format!(
                            "{MAX_FOLLOWS} resources are followed; the limit is {MAX_FOLLOWS}"
                        )));
                    }
                    (super::identity::unix_now() * 1000, Vec::new())
                }
            };
            let follow = Follow {
                into: into.clone(),
                hints: hints.clone(),
                created_at_ms,
                via: new_via.clone().unwrap_or(via),
            };
            let txn = SystemTxn {
                require: vec![(key.clone(), stored)],
                writes: vec![SystemOp::Put {
                    key: key.clone(),
                    value: follow.encode(),
                }],
            };
            txn.validate()?;
            if self.cluster.propose_system_txn(txn).await? {
                tracing::info!(%origin, %resource, into, "following");
                self.pulls.force(&[(origin.to_bytes(), resource.clone())]);
                return Ok(());
            }
        }
        Err(RpcError::Unavailable(
            "the follow kept changing concurrently; retry".into(),
        ))
    }

    async fn unfollow(&self, origin: [u8; 32], resource: Resource) -> Result<(), RpcError> {
        let origin = origin_key(&origin)?;
        let key = follow_key(&origin, &resource);
        self.cluster.read_barrier().await?;
        if self.cluster.sm.system_get(key.clone()).await?.is_none() {
            return Err(RpcError::BadRequest(format!(
                "{resource} of cluster {origin} is not followed"
            )));
        }
        // A mirror serves only what it follows: the mirror policy goes with the follow.
        let txn = SystemTxn {
            require: vec![],
            writes: vec![
                SystemOp::Delete { key },
                SystemOp::Delete {
                    key: follow_state_key(&origin, &resource),
                },
                SystemOp::Delete {
                    key: mirror_key(&origin, &resource),
                },
                SystemOp::Delete {
                    key: aspen_federation::follow_tags_key(&origin, &resource),
                },
            ],
        };
        self.cluster.propose_system_txn(txn).await?;
        tracing::info!(%origin, %resource, "unfollowed");
        Ok(())
    }

    /// Every follow (or those `only` selects) with the leader's pull status. Leader only:
    /// the status lives there.
    async fn follows(
        &self,
        only: Option<&(dyn Fn(&FollowId) -> bool + Sync)>,
    ) -> Result<Vec<FollowSummary>, RpcError> {
        self.cluster.require_leader()?;
        self.cluster.read_barrier().await?;
        let follows = follower::list_follows(&self.cluster)
            .await
            .map_err(internal)?;
        let mut out = Vec::new();
        for (origin, resource, follow, _) in follows {
            let id = (origin.to_bytes(), resource.clone());
            if only.is_some_and(|f| !f(&id)) {
                continue;
            }
            let (_, accepted) = follower::accepted_manifest(&self.cluster, &origin, &resource)
                .await
                .map_err(internal)?;
            out.push(follower::summary(
                &origin,
                &resource,
                &follow,
                accepted.as_ref().map(|(m, _)| m),
                &self.pulls.status_of(&id),
            ));
        }
        Ok(out)
    }

    /// Pulls now and waits (briefly) for the pulls to finish.
    async fn sync(
        &self,
        origin: Option<[u8; 32]>,
        resource: Option<Resource>,
    ) -> Result<Vec<FollowSummary>, RpcError> {
        self.cluster.require_leader()?;
        let selects = |id: &FollowId| {
            origin.is_none_or(|o| o == id.0) && resource.as_ref().is_none_or(|r| *r == id.1)
        };
        let ids: Vec<FollowId> = self
            .follows(Some(&selects))
            .await?
            .into_iter()
            .map(|f| (f.origin, f.resource))
            .collect();
        if ids.is_empty() && (origin.is_some() || resource.is_some()) {
            return Err(RpcError::BadRequest("no follow matches".into()));
        }
        let since = super::identity::unix_now_ms();
        self.pulls.force(&ids);
        self.pulls.wait_attempted(&ids, since, SYNC_WAIT).await;
        self.follows(Some(&selects)).await
    }

    /// Every export, in key order (after a read barrier).
    async fn exports(&self) -> Result<Vec<ExportSummary>, RpcError> {
        self.cluster.read_barrier().await?;
        let entries = self
            .cluster
            .sm
            .system_scan(EXPORT_PREFIX.to_vec(), MAX_EXPORTS + 1)
            .await?;
        entries
            .into_iter()
            .map(|(key, value)| {
                let resource = resource_of_key(&key).map_err(internal)?;
                let export = Export::decode(&value).map_err(internal)?;
                Ok(ExportSummary {
                    resource,
                    public: export.public,
                    to: export.to,
                    created_at_ms: export.created_at_ms,
                })
            })
            .collect()
    }

    /// Every mirror policy, in key order (after a read barrier).
    async fn mirrors(&self) -> Result<Vec<MirrorSummary>, RpcError> {
        self.cluster.read_barrier().await?;
        let policies = mirror::mirror_policies(&self.cluster)
            .await
            .map_err(internal)?;
        Ok(policies
            .into_iter()
            .map(|(origin, resource, policy)| MirrorSummary {
                origin: origin.to_bytes(),
                resource,
                public: policy.public,
                to: policy.to,
                created_at_ms: policy.created_at_ms,
            })
            .collect())
    }

    /// Sets the mirrors a follow pulls from when its origin is unreachable.
    async fn set_via(
        &self,
        origin: [u8; 32],
        resource: Resource,
        via: Vec<ViaMirror>,
    ) -> Result<(), RpcError> {
        let checked = self.checked_via(&origin, via).await?;
        let origin = origin_key(&origin)?;
        let key = follow_key(&origin, &resource);
        for _ in 0..EDIT_ATTEMPTS {
            self.cluster.read_barrier().await?;
            let stored = self.cluster.sm.system_get(key.clone()).await?;
            let Some(old) = stored
                .as_deref()
                .map(Follow::decode)
                .transpose()
                .map_err(internal)?
            else {
                return Err(RpcError::BadRequest(format!(
                    "{resource} of cluster {origin} is not followed"
                )));
            };
            let follow = Follow {
                via: checked.clone(),
                ..old
            };
            let txn = SystemTxn {
                require: vec![(key.clone(), stored)],
                writes: vec![SystemOp::Put {
                    key: key.clone(),
                    value: follow.encode(),
                }],
            };
            txn.validate()?;
            if self.cluster.propose_system_txn(txn).await? {
                tracing::info!(%origin, %resource, mirrors = checked.len(), "follow mirrors set");
                return Ok(());
            }
        }
        Err(RpcError::Unavailable(
            "the follow kept changing concurrently; retry".into(),
        ))
    }

    /// The mirrors named for a follow of `origin`'s resource, checked: within bounds, real
    /// cluster keys, neither the origin nor this cluster; duplicates dropped.
    async fn checked_via(
        &self,
        origin: &[u8; 32],
        via: Vec<ViaMirror>,
    ) -> Result<Vec<Via>, RpcError> {
        let origin = origin_key(origin)?;
        if via.len() > MAX_VIA {
            return Err(RpcError::BadRequest(format!(
                "{} mirrors named; a follow takes at most {MAX_VIA}",
                via.len()
            )));
        }
        let own = self.cluster_key().await?;
        let mut checked: Vec<Via> = Vec::new();
        for v in via {
            let cluster = origin_key(&v.cluster)?;
            if cluster == origin {
                return Err(RpcError::BadRequest(
                    "the origin itself is not a mirror of its resource".into(),
                ));
            }
            if Some(cluster) == own {
                return Err(RpcError::BadRequest(
                    "this cluster cannot be a mirror for itself".into(),
                ));
            }
            if checked.iter().any(|c| c.cluster == v.cluster) {
                continue;
            }
            checked.push(Via {
                cluster: v.cluster,
                nodes: hints_of(v.nodes)?,
            });
        }
        Ok(checked)
    }

    /// This cluster's key (None before the identity exists).
    async fn cluster_key(&self) -> Result<Option<ClusterKey>, RpcError> {
        Ok(self
            .cluster
            .sm
            .system_get(super::identity::SECRET_KEY.to_vec())
            .await?
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .map(|b| aspen_trust::ClusterSecretKey::from_bytes(&b).public()))
    }

    /// Edits the export of `resource` (`mirror_of`: None), or the mirror policy of
    /// `mirror_of`'s `resource`; both are [`Export`]s, edited the same way.
    async fn edit(
        &self,
        resource: &Resource,
        mirror_of: Option<&ClusterKey>,
        edit: ExportEdit,
    ) -> Result<(), RpcError> {
        let (key, prefix, limit, what) = match mirror_of {
            None => (export_key(resource), EXPORT_PREFIX, MAX_EXPORTS, "exported"),
            Some(origin) => (
                mirror_key(origin, resource),
                MIRROR_PREFIX,
                MAX_MIRRORS,
                "mirrored",
            ),
        };
        for _ in 0..EDIT_ATTEMPTS {
            self.cluster.read_barrier().await?;
            let stored = self.cluster.sm.system_get(key.clone()).await?;
            let old = stored
                .as_deref()
                .map(Export::decode)
                .transpose()
                .map_err(internal)?;
            if old.is_none() && matches!(edit, ExportEdit::Remove { .. }) {
                return Err(RpcError::BadRequest(format!("{resource} is not {what}")));
            }
            if old.is_none() {
                let count = self
                    .cluster
                    .sm
                    .system_scan(prefix.to_vec(), limit + 1)
                    .await?
                    .len();
                if count >= limit {
                    return Err(RpcError::BadRequest(format!(
                        "{limit} resources are {what}; the limit is {limit}"
                    )));
                }
            }
            let now_ms = super::identity::unix_now() * 1000;
            let new = edit_export(resource, old.as_ref(), &edit, now_ms)
                .map_err(|e| RpcError::BadRequest(e.to_string()))?;
            if new == old {
                return Ok(());
            }
            let txn = SystemTxn {
                require: vec![(key.clone(), stored)],
                writes: vec![match &new {
                    Some(export) => SystemOp::Put {
                        key: key.clone(),
                        value: export.encode(),
                    },
                    None => SystemOp::Delete { key: key.clone() },
                }],
            };
            txn.validate()?;
            if self.cluster.propose_system_txn(txn).await? {
                tracing::info!(%resource, ?new, what, "export or mirror policy changed");
                return Ok(());
            }
        }
        Err(RpcError::Unavailable(
            "the export kept changing concurrently; retry".into(),
        ))
    }
}

fn internal(e: impl std::fmt::Display) -> RpcError {
    RpcError::Internal(format!("stored federation state: {e}"))
}

/// Dialing hints from node tickets, within the follow's bounds.
fn hints_of(tickets: Vec<NodeTicket>) -> Result<Vec<Hint>, RpcError> {
    use aspen_federation::follows::{MAX_HINTS, MAX_HINT_ADDRS};
    if tickets.len() > MAX_HINTS {
        return Err(RpcError::BadRequest(format!(
            "{} nodes named; the limit is {MAX_HINTS}",
            tickets.len()
        )));
    }
    if let Some(t) = tickets.iter().find(|t| t.addrs.len() > MAX_HINT_ADDRS) {
        return Err(RpcError::BadRequest(format!(
            "node {} has {} addresses; the limit is {MAX_HINT_ADDRS}",
            hex::encode(t.endpoint_id),
            t.addrs.len()
        )));
    }
    Ok(tickets
        .into_iter()
        .map(|t| Hint {
            node: t.endpoint_id,
            addrs: t.addrs,
        })
        .collect())
}

fn origin_key(bytes: &[u8; 32]) -> Result<ClusterKey, RpcError> {
    ClusterKey::from_bytes(bytes)
        .map_err(|_| RpcError::BadRequest(format!("{} is not a cluster key", hex::encode(bytes))))
}
