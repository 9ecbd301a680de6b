//! Federation through the SDK: what this cluster exports to other clusters.

use crate::protocol::{
    ClientRequest, ClientResponse, ExportSummary, FedRequest, FedResponse, Resource,
};
use crate::{Client, ClientError};

impl Client {
    /// Exports `resource` to the clusters with these keys, and to any cluster with `public`
    /// (added to what the export already allows). Needs `cluster:admin`.
    pub async fn fed_export(
        &self,
        resource: Resource,
        to: Vec<[u8; 32]>,
        public: bool,
    ) -> Result<(), ClientError> {
        self.fed_done(FedRequest::Export {
            resource,
            to,
            public,
        })
        .await
    }

    /// Stops exporting `resource` to these clusters (and to anyone, with `public`); with
    /// `all`, removes the export. Needs `cluster:admin`.
    pub async fn fed_unexport(
        &self,
        resource: Resource,
        to: Vec<[u8; 32]>,
        public: bool,
        all: bool,
    ) -> Result<(), ClientError> {
        self.fed_done(FedRequest::Unexport {
            resource,
            to,
            public,
            all,
        })
        .await
    }

    /// Every export of the cluster. Needs `cluster:admin`.
    pub async fn fed_exports(&self) -> Result<Vec<ExportSummary>, ClientError> {
        match self
            .request(&ClientRequest::Fed(FedRequest::Exports))
            .await?
        {
            ClientResponse::Fed(FedResponse::Exports(list)) => Ok(list),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    async fn fed_done(&self, request: FedRequest) -> Result<(), ClientError> {
        match self.request(&ClientRequest::Fed(request)).await? {
            ClientResponse::Fed(FedResponse::Done) => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}
