//! The cluster service: initializing a node, admitting and removing members, invitations,
//! the cluster's identity and status, and (tests only) injected network faults. Unlike the
//! other services it is the node itself: membership is what the Raft instance, the
//! admission of new peers and the published identity all hang on.

use std::collections::{BTreeMap, BTreeSet};

use aspen_client::protocol::{ClusterRequest, ClusterResponse, NetFaults, RpcError};
use aspen_client::NodeTicket;
use aspen_kv::{Member, NodeId, TypeConfig};
use iroh::EndpointId;
use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;

use super::identity::unix_now;
use super::peers::PeerError;
use super::raft_protocol::{RaftRequest, RaftResponse};

/// Longest `cluster add` waits for a new member to receive the log before it becomes a voter.
const LEARNER_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(60);
use super::{auth, NodeState, LEADER_CALL_TIMEOUT};

/// How often a leader tries to introduce its cluster to a node it is adding.
const INTRODUCE_ATTEMPTS: u32 = 3;

/// Most members one `SetNetFaults` may isolate a node from (a cluster has at most 7).
const MAX_ISOLATED: usize = 16;

impl NodeState {
    /// Serves one cluster request (access already checked).
    pub(super) async fn handle_cluster(
        &self,
        request: ClusterRequest,
        access: &auth::Access<'_>,
    ) -> Result<ClusterResponse, RpcError> {
        use ClusterRequest as R;
        match request {
            R::Status => self.cluster.status().await.map(ClusterResponse::Status),
            R::Identity => self.identity().await,
            R::Init { name, secret } => {
                self.auth.check_bootstrap_secret(&secret, access)?;
                let status = self.init_cluster(&name).await?;
                self.auth.make_admin(access.key).await?;
                tracing::info!(admin = %hex::encode(access.key), "cluster initialized; first admin granted");
                Ok(status)
            }
            R::Admit { node, secret } => self.add_member(node, Some(secret)).await,
            R::CreateInvite { valid_for_secs } => self.create_invite(valid_for_secs).await,
            R::Join { node, invite } => {
                if node.endpoint_id != access.key {
                    return Err(RpcError::BadRequest(
                        "join refused: an invitation is used by the joining node itself \
                         (the ticket's key must be the caller's)"
                            .into(),
                    ));
                }
                self.join(node, invite).await
            }
            R::RemoveMember { node_id } => self.remove_member(node_id).await,
            R::StateDigest => Ok(ClusterResponse::StateDigest(
                self.cluster.sm.state_digest().await?,
            )),
            R::SetNetFaults(faults) => self.set_net_faults(faults),
        }
    }

    fn set_net_faults(&self, faults: NetFaults) -> Result<ClusterResponse, RpcError> {
        if faults.drop_per_mille > 1000 || faults.isolate_from.len() > MAX_ISOLATED {
            return Err(RpcError::BadRequest(format!(
                "drop_per_mille is at most 1000 and isolate_from names at most \
                 {MAX_ISOLATED} members (got {} and {})",
                faults.drop_per_mille,
                faults.isolate_from.len()
            )));
        }
        if !self.allow_fault_injection {
            return Err(RpcError::BadRequest(
                "fault injection is not enabled on this node".into(),
            ));
        }
        tracing::warn!(?faults, "injected network faults");
        self.cluster.peers.set_faults(faults);
        Ok(ClusterResponse::Done)
    }

    async fn init_cluster(&self, name: &str) -> Result<ClusterResponse, RpcError> {
        if !self.cluster.members().is_empty() {
            return Err(RpcError::AlreadyInitialized);
        }
        if name.len() > aspen_trust::MAX_NAME_BYTES {
            return Err(RpcError::BadRequest(format!(
                "cluster name is {} bytes; the limit is {}",
                name.len(),
                aspen_trust::MAX_NAME_BYTES
            )));
        }
        let members = BTreeMap::from([(self.cluster.id, self.cluster.me.clone())]);
        self.cluster
            .raft
            .initialize(members)
            .await
            .map_err(|e| match e {
                RaftError::APIError(openraft::error::InitializeError::NotAllowed(_)) => {
                    RpcError::AlreadyInitialized
                }
                other => RpcError::Internal(other.to_string()),
            })?;
        self.cluster
            .raft
            .wait(Some(LEADER_CALL_TIMEOUT * 2))
            .current_leader(self.cluster.id, "init")
            .await
            .map_err(|e| RpcError::Unavailable(format!("not elected after init: {e}")))?;
        self.ensure_identity().await?;
        if !name.is_empty() {
            self.set_cluster_name(name).await?;
        }
        self.cluster.status().await.map(ClusterResponse::Status)
    }

    /// Adds `node`: introduces this leader to it (with the node's bootstrap secret when the
    /// operator gave one; a node joining by invitation expects this cluster already), then
    /// learner, then voter.
    pub(super) async fn add_member(
        &self,
        node: NodeTicket,
        secret: Option<[u8; 32]>,
    ) -> Result<ClusterResponse, RpcError> {
        self.cluster.require_leader()?;
        if node.addrs.len() > aspen_client::ticket::MAX_ADDRS_PER_NODE {
            return Err(RpcError::BadRequest(format!(
                "{} addresses exceed the limit of {}",
                node.addrs.len(),
                aspen_client::ticket::MAX_ADDRS_PER_NODE
            )));
        }
        EndpointId::from_bytes(&node.endpoint_id)
            .map_err(|e| RpcError::BadRequest(format!("bad node key: {e}")))?;
        let id = node.node_id();
        let member = Member {
            endpoint_id: node.endpoint_id,
            addrs: node.addrs,
        };
        // One change at a time: a client that gave up waiting retries, and its retry must
        // find the first attempt's result rather than a change in progress.
        let _one_at_a_time = self.membership_changes.lock().await;
        if let Some(existing) = self.cluster.members().get(&id) {
            if existing.endpoint_id != member.endpoint_id {
                return Err(RpcError::Membership(format!(
                    "node id {id:016x} is taken by another key"
                )));
            }
        }
        if self
            .cluster
            .membership()
            .membership()
            .voter_ids()
            .any(|v| v == id)
        {
            // Added already (a retry of an add that finished).
            return Ok(ClusterResponse::Done);
        }
        if !self.cluster.members().contains_key(&id) {
            self.introduce_to(&member, secret).await?;
        }
        // Catch the new node up as a learner first, so it never slows down the quorum.
        self.previous_change_committed().await?;
        let added = self
            .cluster
            .raft
            .add_learner(id, member, true)
            .await
            .map_err(|e| self.membership_error(e))?;
        // openraft's blocking add returns once the learner is within its lag threshold
        // (5,000 entries), which a young cluster always is, even before the learner holds
        // anything: wait until it holds the entry that added it.
        let target = added.log_id.index;
        self.cluster
            .raft
            .wait(Some(LEARNER_CATCH_UP))
            .metrics(
                |m| {
                    m.replication.as_ref().is_none_or(|r| {
                        r.get(&id)
                            .copied()
                            .flatten()
                            .is_some_and(|l| l.index >= target)
                    })
                },
                "the new member to hold the log",
            )
            .await
            .map_err(|e| {
                RpcError::Unavailable(format!(
                    "node {id:016x} was added as a learner but did not receive the log within \
                     {LEARNER_CATCH_UP:?} ({e}); run the same `aspen cluster add` again to \
                     finish once it is reachable"
                ))
            })?;
        let voters: BTreeSet<NodeId> = self
            .cluster
            .membership()
            .membership()
            .voter_ids()
            .chain([id])
            .collect();
        self.cluster
            .raft
            .change_membership(voters, false)
            .await
            .map_err(|e| self.membership_error(e))?;
        Ok(ClusterResponse::Done)
    }

    async fn remove_member(&self, node_id: NodeId) -> Result<ClusterResponse, RpcError> {
        self.cluster.require_leader()?;
        let _one_at_a_time = self.membership_changes.lock().await;
        let membership = self.cluster.membership();
        let membership = membership.membership();
        if membership.get_node(&node_id).is_none() {
            return Err(RpcError::BadRequest(format!(
                "node {node_id:016x} is not a member"
            )));
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().filter(|v| *v != node_id).collect();
        if voters.is_empty() {
            return Err(RpcError::BadRequest("cannot remove the last voter".into()));
        }
        self.previous_change_committed().await?;
        let change = if membership.voter_ids().any(|v| v == node_id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
        };
        self.cluster
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.membership_error(e))?;
        Ok(ClusterResponse::Done)
    }

    /// Waits (at most [`LEADER_CALL_TIMEOUT`]) until the leader's latest membership is
    /// committed: openraft refuses a change while the previous one is not (after a leader
    /// change, its first membership entry is committed with its first entries).
    async fn previous_change_committed(&self) -> Result<(), RpcError> {
        self.cluster
            .raft
            .wait(Some(LEADER_CALL_TIMEOUT))
            .metrics(
                |m| m.committed_membership_config.log_id() == m.membership_config.log_id(),
                "the previous membership change to commit",
            )
            .await
            .map(|_| ())
            .map_err(|e| {
                RpcError::Unavailable(format!(
                    "the previous membership change is not committed yet ({e}); try again"
                ))
            })
    }

    fn membership_error(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> RpcError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => self.cluster.not_leader(),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                RpcError::Membership(e.to_string())
            }
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(e)) => RpcError::Unavailable(
                format!("the change was discarded by a leader change ({e}); try again"),
            ),
            RaftError::APIError(ClientWriteError::PreconditionFailed(e)) => {
                RpcError::Membership(e.to_string())
            }
            RaftError::Fatal(e) => RpcError::Unavailable(format!("raft stopped: {e}")),
        }
    }

    /// This node's certificate from the cluster key (to introduce itself to a new node).
    pub async fn own_certificate(&self) -> Result<Vec<u8>, RpcError> {
        let Some(secret) = self.cluster_secret().await? else {
            return Err(RpcError::Unavailable(
                "the cluster identity is not created yet".into(),
            ));
        };
        Ok(aspen_trust::NodeCertificate::issue(
            &secret,
            self.cluster.me.endpoint_id,
            unix_now() + super::identity::NODE_CERT_VALIDITY.as_secs(),
        )
        .encode()
        .to_vec())
    }

    /// Leader: shows a node that is about to be added that this cluster speaks to it.
    pub(super) async fn introduce_to(
        &self,
        member: &aspen_kv::Member,
        secret: Option<[u8; 32]>,
    ) -> Result<(), RpcError> {
        let introduce = RaftRequest::Introduce {
            certificate: self.own_certificate().await?,
            secret,
        };
        // An introduction may be repeated: a lost one (a lossy link) is tried again.
        let mut attempt = 1;
        loop {
            let result = self
                .cluster
                .peers
                .call(member, &introduce, super::LEADER_CALL_TIMEOUT)
                .await;
            return match result {
                Ok(RaftResponse::Introduced) => Ok(()),
                Ok(RaftResponse::Refused(why)) | Err(PeerError::Refused(_, why)) => Err(
                    RpcError::Membership(format!("the node refused this cluster: {why}")),
                ),
                Ok(other) => Err(RpcError::Internal(format!(
                    "unexpected answer to an introduction: {other:?}"
                ))),
                Err(e) if attempt < INTRODUCE_ATTEMPTS => {
                    tracing::debug!("introduction attempt {attempt} failed: {e}");
                    attempt += 1;
                    continue;
                }
                Err(e) => Err(RpcError::Membership(format!(
                    "cannot introduce this cluster to the node ({attempt} attempts): {e}"
                ))),
            };
        }
    }
}
