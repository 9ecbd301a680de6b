//! The key-value service: writes go through Raft (batched by the proposer, or forwarded to
//! the leader); reads are served from this node's state machine, after a read barrier unless
//! the caller asked for a serializable read. Watches are served on their own streams
//! (`watch.rs`), leases by `leases.rs`.

use aspen_client::protocol::{Consistency, KvRequest, KvResponse, RpcError};

use super::auth::Access;
use super::ClusterHandle;

pub struct KvService {
    cluster: ClusterHandle,
}

impl KvService {
    pub fn new(cluster: ClusterHandle) -> Self {
        KvService { cluster }
    }

    /// Serves one key-value request (access already checked, except for what a lease
    /// revocation deletes, which is checked here).
    pub async fn handle(
        &self,
        request: KvRequest,
        access: &Access<'_>,
    ) -> Result<KvResponse, RpcError> {
        match request {
            KvRequest::Write { mut commands } => {
                super::leases::assign_lease_ids(&mut commands);
                ClusterHandle::validate(&commands, true)?;
                super::leases::check_revokes(&self.cluster, &commands, access).await?;
                let results = self.cluster.propose(commands).await?;
                Ok(KvResponse::Write { results })
            }
            KvRequest::Lease(request) => Ok(KvResponse::Lease(
                super::leases::handle(&self.cluster, request, access).await?,
            )),
            KvRequest::Range {
                request,
                consistency,
            } => {
                request.validate()?;
                if consistency == Consistency::Linearizable {
                    self.cluster.read_barrier().await?;
                }
                Ok(KvResponse::Range(self.cluster.sm.range(request).await?))
            }
            KvRequest::Watch(_) => Err(RpcError::BadRequest(
                "one watch per stream is retired: open a watch stream (KvRequest::Watches)".into(),
            )),
            KvRequest::Watches => Err(RpcError::BadRequest(
                "a watch stream is served on its own stream".into(),
            )),
        }
    }
}
