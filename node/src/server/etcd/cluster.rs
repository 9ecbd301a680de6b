//! etcd's Cluster, Maintenance and Auth services: what maps onto Aspen, and clear refusals
//! for what does not (membership is changed with `aspen cluster`, access with `aspen auth`).

use aspen_etcd_api::pb::etcdserverpb::{
    auth_server::Auth, cluster_server::Cluster, maintenance_server::Maintenance, AlarmRequest,
    AlarmResponse, AuthDisableRequest, AuthDisableResponse, AuthEnableRequest, AuthEnableResponse,
    AuthStatusRequest, AuthStatusResponse, AuthUserAddRequest, AuthUserAddResponse,
    AuthenticateRequest, AuthenticateResponse, Member, MemberAddRequest, MemberAddResponse,
    MemberListRequest, MemberListResponse, MemberPromoteRequest, MemberPromoteResponse,
    MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
    StatusRequest, StatusResponse,
};
use aspen_etcd_api::EtcdError;
use openraft::async_runtime::WatchReceiver;
use tonic::{Request, Response, Status};

use super::super::NodeState;
use super::{verify_bearer, EtcdApi};

/// The etcd API version Aspen answers to (`etcdctl endpoint status` shows it).
pub const ETCD_API_VERSION: &str = "3.5.0";

/// System keys `etcd/addr/<node id, 16 hex digits>`: the address each member serves the etcd
/// API on, so that any member's member list names every member's client URL (etcd clients
/// find the other endpoints there).
const ADDR_PREFIX: &str = "etcd/addr/";

fn addr_key(id: aspen_kv::NodeId) -> Vec<u8> {
    format!("{ADDR_PREFIX}{id:016x}").into_bytes()
}

/// Records this member's etcd API address in the replicated system key space, retrying until
/// the node is a member of a cluster with a leader; then returns. Runs once per start (a
/// restart on another port records the new address).
pub async fn publish_addr(node: std::sync::Weak<NodeState>, addr: std::net::SocketAddr) {
    use aspen_kv::api::{Command, SystemWrite, WriteOp};
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        let Some(state) = node.upgrade() else {
            return;
        };
        let key = addr_key(state.cluster.id);
        let wanted = addr.to_string().into_bytes();
        let ready = state.is_initialized() && state.cluster.leader().is_some();
        if ready {
            match state.cluster.sm.system_get(key.clone()).await {
                Ok(Some(current)) if current == wanted => return,
                Ok(_) => {
                    let write = Command {
                        session: None,
                        op: WriteOp::System(SystemWrite {
                            key,
                            expect: None,
                            new: Some(wanted),
                        }),
                    };
                    match state.cluster.propose(vec![write]).await {
                        Ok(_) => return,
                        Err(e) => tracing::debug!("etcd API: recording this member's address: {e}"),
                    }
                }
                Err(e) => tracing::debug!("etcd API: reading this member's address: {e}"),
            }
        }
        drop(state);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
}

fn membership_refused() -> Status {
    EtcdError::Unsupported(
        "members are added and removed with `aspen cluster add` and `aspen cluster remove`".into(),
    )
    .status()
}

fn users_refused() -> Status {
    EtcdError::Unsupported(
        "users and roles are Aspen grants: `aspen auth grant`, then `aspen auth token issue \
         --bearer`; present the token as the password (etcdctl --user NAME:TOKEN)"
            .into(),
    )
    .status()
}

#[tonic::async_trait]
impl Cluster for EtcdApi {
    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        self.call(
            "etcd_member_list",
            request,
            |node, _caller, _req| async move {
                let own = node.cluster.metrics.etcd_serving.get().copied();
                let membership = node.cluster.membership();
                let mut members = Vec::new();
                for (id, m) in membership.membership().nodes() {
                    // This member's own address as it serves now; the others' as recorded.
                    let client = match own.filter(|_| *id == node.cluster.id) {
                        Some(a) => Some(a.to_string()),
                        None => node
                            .cluster
                            .sm
                            .system_get(addr_key(*id))
                            .await
                            .map_err(|e| EtcdError::Internal(e.to_string()))?
                            .map(|a| String::from_utf8_lossy(&a).into_owned()),
                    };
                    members.push(Member {
                        id: *id,
                        name: format!("{id:016x}"),
                        peer_ur_ls: m.addrs.iter().map(|a| format!("quic://{a}")).collect(),
                        client_ur_ls: client
                            .map(|a| vec![format!("http://{a}")])
                            .unwrap_or_default(),
                        is_learner: !membership.membership().voter_ids().any(|v| v == *id),
                    });
                }
                Ok(MemberListResponse {
                    header: Some(node.etcd_header(node.applied_revision()).await),
                    members,
                })
            },
        )
        .await
    }

    async fn member_add(
        &self,
        _: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(membership_refused())
    }

    async fn member_remove(
        &self,
        _: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(membership_refused())
    }

    async fn member_update(
        &self,
        _: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(membership_refused())
    }

    async fn member_promote(
        &self,
        _: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(membership_refused())
    }
}

#[tonic::async_trait]
impl Maintenance for EtcdApi {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.call("etcd_status", request, |node, _caller, _req| async move {
            let metrics = node.cluster.raft.metrics().borrow_watched().clone();
            let voter = node
                .cluster
                .membership()
                .membership()
                .voter_ids()
                .any(|v| v == node.cluster.id);
            let db_size = tokio::fs::metadata(node.cluster.sm.db_path())
                .await
                .map(|m| m.len() as i64)
                .unwrap_or(0);
            Ok(StatusResponse {
                header: Some(node.etcd_header(node.applied_revision()).await),
                version: ETCD_API_VERSION.into(),
                db_size,
                db_size_in_use: db_size,
                leader: crate::server::cluster::known_leader(
                    metrics.current_leader,
                    metrics.state.is_leader(),
                    node.cluster.id,
                )
                .unwrap_or(0),
                raft_index: metrics.last_log_index.unwrap_or(0),
                raft_term: metrics.current_term,
                raft_applied_index: metrics.last_applied.map_or(0, |l| l.index),
                errors: Vec::new(),
                is_learner: !voter,
                storage_version: String::new(),
                db_size_quota: 0,
                downgrade_info: None,
            })
        })
        .await
    }

    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        // Aspen raises no etcd alarms (no space quota, no corruption alarm): the list is
        // empty, and there is nothing to activate or disarm.
        self.call("etcd_alarm", request, |node, _caller, _req| async move {
            Ok(AlarmResponse {
                header: Some(node.etcd_header(node.applied_revision()).await),
                alarms: Vec::new(),
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl Auth for EtcdApi {
    /// Exchanges a bearer token (the password; any user name) for itself: etcd's clients
    /// then present it on every call.
    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let node = self.node()?;
        let req = request.into_inner();
        if let Err(e) = verify_bearer(&node, req.password.trim()) {
            tracing::debug!("etcd API: authentication refused: {e}");
            node.cluster.metrics.etcd_refused.inc();
            return Err(EtcdError::AuthFailed.status());
        }
        Ok(Response::new(AuthenticateResponse {
            header: Some(node.etcd_header(node.applied_revision()).await),
            token: req.password.trim().to_string(),
        }))
    }

    async fn auth_status(
        &self,
        request: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        self.call(
            "etcd_auth_status",
            request,
            |node, _caller, _req| async move {
                Ok(AuthStatusResponse {
                    header: Some(node.etcd_header(node.applied_revision()).await),
                    enabled: true,
                    auth_revision: 0,
                })
            },
        )
        .await
    }

    async fn auth_enable(
        &self,
        request: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        // Always on: enabling it again changes nothing.
        self.call(
            "etcd_auth_enable",
            request,
            |node, _caller, _req| async move {
                Ok(AuthEnableResponse {
                    header: Some(node.etcd_header(node.applied_revision()).await),
                })
            },
        )
        .await
    }

    async fn auth_disable(
        &self,
        _: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        Err(EtcdError::Unsupported(
            "authentication cannot be turned off: every caller presents a bearer token".into(),
        )
        .status())
    }

    async fn user_add(
        &self,
        _: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        Err(users_refused())
    }
}
