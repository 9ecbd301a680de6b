//! The federation service, so far its exports: which resources other clusters may pull, and
//! which clusters. The policy decisions are `aspen_federation`'s; this reads the stored
//! export after a read barrier and writes the edited one with a system transaction that
//! requires the old value (retried when a concurrent edit won), like grants.

use aspen_client::protocol::{ExportSummary, FedRequest, FedResponse, Resource, RpcError};
use aspen_federation::{
    edit_export, export_key, resource_of_key, Export, ExportEdit, EXPORT_PREFIX, MAX_EXPORTS,
};
use aspen_kv::api::{SystemOp, SystemTxn};

use super::ClusterHandle;

/// How often an export edit is retried when a concurrent edit of the same export won.
const EDIT_ATTEMPTS: usize = 8;

pub struct FedService {
    cluster: ClusterHandle,
}

impl FedService {
    pub fn new(cluster: ClusterHandle) -> Self {
        FedService { cluster }
    }

    /// Serves one federation request (access already checked).
    pub async fn handle(&self, request: FedRequest) -> Result<FedResponse, RpcError> {
        match request {
            FedRequest::Export {
                resource,
                to,
                public,
            } => {
                self.edit(&resource, ExportEdit::Add { to, public }).await?;
                Ok(FedResponse::Done)
            }
            FedRequest::Unexport {
                resource,
                to,
                public,
                all,
            } => {
                self.edit(&resource, ExportEdit::Remove { to, public, all })
                    .await?;
                Ok(FedResponse::Done)
            }
            FedRequest::Exports => Ok(FedResponse::Exports(self.exports().await?)),
        }
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

    async fn edit(&self, resource: &Resource, edit: ExportEdit) -> Result<(), RpcError> {
        let key = export_key(resource);
        for _ in 0..EDIT_ATTEMPTS {
            self.cluster.read_barrier().await?;
            let stored = self.cluster.sm.system_get(key.clone()).await?;
            let old = stored
                .as_deref()
                .map(Export::decode)
                .transpose()
                .map_err(internal)?;
            if old.is_none() && matches!(edit, ExportEdit::Remove { .. }) {
                return Err(RpcError::BadRequest(format!("{resource} is not exported")));
            }
            if old.is_none() {
                let count = self
                    .cluster
                    .sm
                    .system_scan(EXPORT_PREFIX.to_vec(), MAX_EXPORTS + 1)
                    .await?
                    .len();
                if count >= MAX_EXPORTS {
                    return Err(RpcError::BadRequest(format!(
                        "{MAX_EXPORTS} resources are exported; the limit is {MAX_EXPORTS}"
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
                tracing::info!(%resource, ?new, "export changed");
                return Ok(());
            }
        }
        Err(RpcError::Unavailable(
            "the export kept changing concurrently; retry".into(),
        ))
    }
}

fn internal(e: impl std::fmt::Display) -> RpcError {
    RpcError::Internal(format!("stored export: {e}"))
}
