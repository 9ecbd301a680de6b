//! The cluster's identity and its invitations, kept in the replicated system key space.
//!
//! The cluster secret key is created once, by the leader, with a put-if-absent through Raft:
//! whichever leader proposes first wins, and every member applies the same key, so any member
//! can sign for the cluster. Clients can neither read nor write system keys (the client
//! service refuses system writes, and reads only ever see the MVCC key space).
//!
//! An invitation is a random 32-byte token shown once to the operator; the cluster stores only
//! its BLAKE3 hash, with an expiry and, once used, the endpoint id of the node that used it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aspen_client::protocol::{ClusterIdentity, ClusterResponse, RpcError};
use aspen_client::NodeTicket;
use aspen_kv::api::{Command, SystemWrite, WriteOp, WriteOutcome};
use aspen_trust::{ClusterSecretKey, NodeCertificate, SignedRecord, MAX_NAME_BYTES};
use serde::{Deserialize, Serialize};

use super::NodeState;

/// System key of the cluster's secret key (32 bytes).
pub const SECRET_KEY: &[u8] = b"cluster/secret-key";
/// System key of the cluster's name (UTF-8).
pub const NAME_KEY: &[u8] = b"cluster/name";
/// System key of the last record the leader published (`SignedRecord::encode`).
pub const RECORD_KEY: &[u8] = b"cluster/record";
/// Prefix of invitations: `invite/<hex BLAKE3 of the token>` -> postcard(`Invite`).
pub const INVITE_PREFIX: &str = "invite/";

/// How long a node certificate handed to a client is valid.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest an invitation may be valid.
pub const MAX_INVITE_VALIDITY: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Most unexpired invitations at once (bounds the system key space).
pub const MAX_OPEN_INVITES: usize = 64;

/// An invitation as stored (the token itself is never stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Invite {
    /// Unix seconds.
    expires_at: u64,
    /// The endpoint id of the node that joined with it.
    used_by: Option<[u8; 32]>,
}

/// Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix milliseconds.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn invite_key(token: &[u8; 32]) -> Vec<u8> {
    format!("{INVITE_PREFIX}{}", blake3::hash(token).to_hex()).into_bytes()
}

fn system(write: SystemWrite) -> Command {
    Command {
        session: None,
        op: WriteOp::System(write),
    }
}

impl NodeState {
    /// The cluster secret key, once this node has applied it.
    pub async fn cluster_secret(&self) -> Result<Option<ClusterSecretKey>, RpcError> {
        if let Some(k) = self.cluster_secret.get() {
            return Ok(Some(k.clone()));
        }
        let Some(bytes) = self.cluster.sm.system_get(SECRET_KEY.to_vec()).await? else {
            return Ok(None);
        };
        let bytes: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| RpcError::Internal("stored cluster key is not 32 bytes".into()))?;
        // Set once, never changed: the put-if-absent makes the first key the only one.
        Ok(Some(
            self.cluster_secret
                .get_or_init(|| ClusterSecretKey::from_bytes(&bytes))
                .clone(),
        ))
    }

    /// Creates the cluster identity if it does not exist yet (through Raft, put-if-absent:
    /// concurrent or repeated calls agree on one key). Returns the key in force.
    pub async fn ensure_identity(&self) -> Result<ClusterSecretKey, RpcError> {
        if let Some(k) = self.cluster_secret().await? {
            return Ok(k);
        }
        let fresh = ClusterSecretKey::generate();
        let results = self
            .cluster
            .propose(vec![system(SystemWrite::put_if_absent(
                SECRET_KEY.to_vec(),
                fresh.to_bytes().to_vec(),
            ))])
            .await?;
        match results.into_iter().next() {
            Some(Ok(WriteOutcome::System {
                current: Some(bytes),
                written,
                ..
            })) => {
                let bytes: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| RpcError::Internal("stored cluster key is not 32 bytes".into()))?;
                let key = ClusterSecretKey::from_bytes(&bytes);
                if written {
                    tracing::info!(cluster = %key.public(), "created the cluster identity");
                }
                Ok(key)
            }
            other => Err(RpcError::Internal(format!(
                "unexpected result creating the cluster key: {other:?}"
            ))),
        }
    }

    /// Names the cluster (published in its next record).
    pub async fn set_cluster_name(&self, name: &str) -> Result<(), RpcError> {
        if name.len() > MAX_NAME_BYTES {
            return Err(RpcError::BadRequest(format!(
                "cluster name is {} bytes; the limit is {MAX_NAME_BYTES}",
                name.len()
            )));
        }
        self.cluster
            .propose(vec![system(SystemWrite {
                key: NAME_KEY.to_vec(),
                expect: None,
                new: Some(name.as_bytes().to_vec()),
            })])
            .await?;
        self.identity_changed.notify_one();
        Ok(())
    }

    pub async fn cluster_name(&self) -> Result<String, RpcError> {
        let name = self.cluster.sm.system_get(NAME_KEY.to_vec()).await?;
        Ok(String::from_utf8_lossy(&name.unwrap_or_default()).into_owned())
    }

    /// The last record the cluster published, as replicated.
    pub async fn published_record(&self) -> Result<Option<SignedRecord>, RpcError> {
        match self.cluster.sm.system_get(RECORD_KEY.to_vec()).await? {
            None => Ok(None),
            Some(bytes) => SignedRecord::decode(&bytes)
                .map(Some)
                .map_err(|e| RpcError::Internal(format!("stored cluster record: {e}"))),
        }
    }

    /// `ClientRequest::Cluster(ClusterRequest::Identity)`: the public identity and this node's certificate.
    pub async fn identity(&self) -> Result<ClusterResponse, RpcError> {
        if self.cluster.members().is_empty() {
            return Err(RpcError::NotInitialized);
        }
        let Some(secret) = self.cluster_secret().await? else {
            return Err(RpcError::Unavailable(
                "the cluster identity is not created yet (the leader creates it)".into(),
            ));
        };
        let certificate = NodeCertificate::issue(
            &secret,
            self.cluster.me.endpoint_id,
            unix_now() + NODE_CERT_VALIDITY.as_secs(),
        );
        Ok(ClusterResponse::Identity(ClusterIdentity {
            cluster_key: secret.public().to_bytes(),
            name: self.cluster_name().await?,
            certificate: certificate.encode().to_vec(),
            record: self.published_record().await?.map(|r| r.encode()),
        }))
    }

    /// `ClientRequest::Cluster(ClusterRequest::CreateInvite)` (leader only).
    pub async fn create_invite(&self, valid_for_secs: u64) -> Result<ClusterResponse, RpcError> {
        self.cluster.require_leader()?;
        if valid_for_secs == 0 || valid_for_secs > MAX_INVITE_VALIDITY.as_secs() {
            return Err(RpcError::BadRequest(format!(
                "an invitation is valid for 1 s to {} s (asked {valid_for_secs} s)",
                MAX_INVITE_VALIDITY.as_secs()
            )));
        }
        let now = unix_now();
        let open = self
            .cluster
            .sm
            .system_scan(INVITE_PREFIX.as_bytes().to_vec(), usize::MAX)
            .await?
            .into_iter()
            .filter_map(|(_, v)| postcard::from_bytes::<Invite>(&v).ok())
            .filter(|i| i.used_by.is_none() && i.expires_at > now)
            .count();
        if open >= MAX_OPEN_INVITES {
            return Err(RpcError::BadRequest(format!(
                "{open} unused invitations are open; the limit is {MAX_OPEN_INVITES}"
            )));
        }
        let mut expired: Vec<Command> = self
            .cluster
            .sm
            .system_scan(INVITE_PREFIX.as_bytes().to_vec(), usize::MAX)
            .await?
            .into_iter()
            .filter(|(_, v)| postcard::from_bytes::<Invite>(v).is_ok_and(|i| i.expires_at <= now))
            .map(|(key, v)| {
                system(SystemWrite {
                    key,
                    expect: Some(Some(v)),
                    new: None,
                })
            })
            .take(MAX_OPEN_INVITES)
            .collect();
        let token: [u8; 32] = rand::random();
        let expires_at = now + valid_for_secs;
        let invite = Invite {
            expires_at,
            used_by: None,
        };
        let value = postcard::to_allocvec(&invite).expect("encodable");
        expired.push(system(SystemWrite::put_if_absent(
            invite_key(&token),
            value,
        )));
        let results = self.cluster.propose(expired).await?;
        match results.last() {
            Some(Ok(WriteOutcome::System { written: true, .. })) => {
                Ok(ClusterResponse::Invite { token, expires_at })
            }
            other => Err(RpcError::Internal(format!(
                "unexpected result storing the invitation: {other:?}"
            ))),
        }
    }

    /// `ClientRequest::Cluster(ClusterRequest::Join)` (leader only): consumes the invitation, then adds the node.
    pub async fn join(
        &self,
        node: NodeTicket,
        token: [u8; 32],
    ) -> Result<ClusterResponse, RpcError> {
        self.cluster.require_leader()?;
        if self
            .cluster
            .members()
            .values()
            .any(|m| m.endpoint_id == node.endpoint_id)
        {
            return Ok(ClusterResponse::Done); // Already in: a retried join.
        }
        let key = invite_key(&token);
        let refused = |why: &str| RpcError::BadRequest(format!("join refused: {why}"));
        // Read the invitation after a read barrier, so a just-created one is seen.
        self.cluster.read_barrier().await?;
        let Some(stored) = self.cluster.sm.system_get(key.clone()).await? else {
            return Err(refused("unknown invitation"));
        };
        let invite: Invite = postcard::from_bytes(&stored)
            .map_err(|e| RpcError::Internal(format!("stored invitation: {e}")))?;
        match invite.used_by {
            Some(user) if user != node.endpoint_id => {
                return Err(refused("invitation already used by another node"))
            }
            // This node's own earlier attempt: finish adding it (while the invitation lasts).
            Some(_) if invite.expires_at <= unix_now() => {
                return Err(refused("invitation expired"))
            }
            Some(_) => {}
            None => {
                if invite.expires_at <= unix_now() {
                    return Err(refused("invitation expired"));
                }
                let used = Invite {
                    used_by: Some(node.endpoint_id),
                    ..invite
                };
                let results = self
                    .cluster
                    .propose(vec![system(SystemWrite {
                        key,
                        expect: Some(Some(stored)),
                        new: Some(postcard::to_allocvec(&used).expect("encodable")),
                    })])
                    .await?;
                match results.first() {
                    Some(Ok(WriteOutcome::System { written: true, .. })) => {}
                    Some(Ok(WriteOutcome::System { written: false, .. })) => {
                        return Err(refused("invitation used concurrently"))
                    }
                    other => {
                        return Err(RpcError::Internal(format!(
                            "unexpected result consuming the invitation: {other:?}"
                        )))
                    }
                }
            }
        }
        tracing::info!(node = %hex::encode(&node.endpoint_id[..8]), "admitting invited node");
        self.add_member(node, None).await
    }
}
