//! etcd's Lease service: grant, revoke, keep-alive (a stream), time to live, and the list.
//!
//! Leases are Aspen's own (`aspen lease`): the leader keeps their deadlines, a keep-alive is
//! acknowledged only after it confirmed its leadership. etcd's answers for a lease that does
//! not exist are kept: a keep-alive answers a time to live of 0, a time-to-live query -1.

use std::pin::Pin;

use aspen_client::protocol::{KvRequest, KvResponse, LeaseRequest, LeaseResponse};
use aspen_etcd_api::pb::etcdserverpb::{
    lease_server::Lease, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use aspen_etcd_api::EtcdError;
use aspen_kv::api::{LeaseId, WriteOp, WriteOutcome};
use aspen_kv::limits::{MAX_LEASES, MIN_LEASE_TTL_SECS};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::EtcdApi;

/// Keep-alives one stream may have waiting for their answer (a client sends one every third
/// of the TTL; more in flight means a client that does not read its answers).
const MAX_KEEPALIVES_IN_FLIGHT: usize = 16;

/// The answers of one keep-alive stream.
type KeepAliveAnswers =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

/// A lease id from etcd's signed number (etcd's ids are positive).
fn lease_id(id: i64) -> Result<LeaseId, EtcdError> {
    u64::try_from(id).map_err(|_| EtcdError::LeaseNotFound)
}

#[tonic::async_trait]
impl Lease for EtcdApi {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        self.call(
            "etcd_lease_grant",
            request,
            |node, caller, req| async move {
                let id = u64::try_from(req.id).map_err(|_| {
                    EtcdError::InvalidArgument(format!("lease id {} is negative", req.id))
                })?;
                // etcd raises a time to live below its minimum to the minimum.
                let ttl_secs = u64::try_from(req.ttl).unwrap_or(0).max(MIN_LEASE_TTL_SECS);
                let outcome = node
                    .etcd_write(&caller, WriteOp::LeaseGrant { id, ttl_secs })
                    .await?;
                let WriteOutcome::LeaseGrant {
                    revision,
                    id,
                    ttl_secs,
                    ..
                } = outcome
                else {
                    return Err(EtcdError::Internal(format!(
                        "a grant was answered {outcome:?}"
                    )));
                };
                Ok(LeaseGrantResponse {
                    header: Some(node.etcd_header(revision).await),
                    id: id as i64,
                    ttl: ttl_secs as i64,
                    error: String::new(),
                })
            },
        )
        .await
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        self.call(
            "etcd_lease_revoke",
            request,
            |node, caller, req| async move {
                let id = lease_id(req.id)?;
                let outcome = node
                    .etcd_write(&caller, WriteOp::LeaseRevoke { id })
                    .await?;
                Ok(LeaseRevokeResponse {
                    header: Some(node.etcd_header(outcome.revision()).await),
                })
            },
        )
        .await
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveAnswers>, Status> {
        let node = self.node()?;
        let caller = match self.caller(&node, request.metadata()) {
            Ok(c) => std::sync::Arc::new(c),
            Err(e) => {
                node.cluster.metrics.etcd_refused.inc();
                return Err(e.status());
            }
        };
        let weak = self.node.clone();
        let requests = request.into_inner();
        // Each keep-alive in order; a stream ends at the first error.
        let answers = requests
            .map(move |req| {
                let (weak, caller) = (weak.clone(), caller.clone());
                async move {
                    let req = req?;
                    let node = weak.upgrade().ok_or_else(|| {
                        EtcdError::Unavailable("the node is stopping".into()).status()
                    })?;
                    let id = lease_id(req.id).map_err(|e| e.status())?;
                    let ttl = match node
                        .etcd_kv(&caller, KvRequest::Lease(LeaseRequest::KeepAlive { id }))
                        .await
                    {
                        Ok(KvResponse::Lease(LeaseResponse::KeptAlive { ttl_secs, .. })) => {
                            ttl_secs as i64
                        }
                        Err(EtcdError::LeaseNotFound) => 0,
                        Ok(other) => {
                            return Err(EtcdError::Internal(format!(
                                "a keep-alive was answered {other:?}"
                            ))
                            .status())
                        }
                        Err(e) => return Err(e.status()),
                    };
                    Ok(LeaseKeepAliveResponse {
                        header: Some(node.etcd_header(node.applied_revision()).await),
                        id: req.id,
                        ttl,
                    })
                }
            })
            .buffered(MAX_KEEPALIVES_IN_FLIGHT);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        self.call("etcd_lease_ttl", request, |node, caller, req| async move {
            let id = lease_id(req.id)?;
            let answer = node
                .etcd_kv(
                    &caller,
                    KvRequest::Lease(LeaseRequest::TimeToLive { id, keys: req.keys }),
                )
                .await;
            let header = Some(node.etcd_header(node.applied_revision()).await);
            match answer {
                Ok(KvResponse::Lease(LeaseResponse::TimeToLive(status))) => {
                    Ok(LeaseTimeToLiveResponse {
                        header,
                        id: req.id,
                        // etcd rounds the time left up to whole seconds.
                        ttl: status.remaining_ms.div_ceil(1000) as i64,
                        granted_ttl: status.ttl_secs as i64,
                        keys: status.keys,
                    })
                }
                Err(EtcdError::LeaseNotFound) => Ok(LeaseTimeToLiveResponse {
                    header,
                    id: req.id,
                    ttl: -1,
                    granted_ttl: 0,
                    keys: Vec::new(),
                }),
                Ok(other) => Err(EtcdError::Internal(format!(
                    "a time-to-live query was answered {other:?}"
                ))),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.call(
            "etcd_lease_leases",
            request,
            |node, caller, _req| async move {
                let mut leases = Vec::new();
                let mut after = 0;
                loop {
                    let answer = node
                        .etcd_kv(&caller, KvRequest::Lease(LeaseRequest::List { after }))
                        .await?;
                    let KvResponse::Lease(LeaseResponse::List { ids, more }) = answer else {
                        return Err(EtcdError::Internal(format!(
                            "a lease list was answered {answer:?}"
                        )));
                    };
                    leases.extend(ids.iter().map(|id| LeaseStatus { id: *id as i64 }));
                    match ids.last() {
                        Some(last) if more && (leases.len() as u64) < MAX_LEASES => after = *last,
                        _ => break,
                    }
                }
                Ok(LeaseLeasesResponse {
                    header: Some(node.etcd_header(node.applied_revision()).await),
                    leases,
                })
            },
        )
        .await
    }
}
