//! The key-value service: writes go through Raft (batched by the proposer, or forwarded to
//! the leader); reads are served from this node's state machine, after a read barrier unless
//! the caller asked for a serializable read.

use aspen_client::protocol::{Consistency, KvRequest, KvResponse, RpcError};

use super::ClusterHandle;

pub struct KvService {
    cluster: ClusterHandle,
}

impl KvService {
    pub fn new(cluster: ClusterHandle) -> Self {
        KvService { cluster }
    }

    /// Serves one key-value request (access already checked).
    pub async fn handle(&self, request: KvRequest) -> Result<KvResponse, RpcError> {
        match request {
            KvRequest::Write { commands } => {
                ClusterHandle::validate(&commands, true)?;
                let results = self.cluster.propose(commands).await?;
                Ok(KvResponse::Write { results })
            }
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
        }
    }
}
