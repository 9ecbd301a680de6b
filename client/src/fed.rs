//! Federation through the SDK: what this cluster exports to other clusters, and what it
//! follows (pulls) from them.

use crate::protocol::{
    ClientRequest, ClientResponse, ExportSummary, FedRequest, FedResponse, FollowSummary,
    MirrorSummary, Resource, ViaMirror,
};
use crate::{Client, ClientError, NodeTicket};

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

impl Client {
    /// Follows `resource` of the cluster with key `origin`: the leader pulls it on an interval
    /// (and on [`Client::fed_sync`]) into the local resource `into` (`None`: a name derived
    /// from the origin). `hints`: origin nodes to dial besides its DHT record (from a cluster
    /// ticket). Needs `cluster:admin`.
    pub async fn fed_follow(
        &self,
        origin: [u8; 32],
        resource: Resource,
        into: Option<String>,
        hints: Vec<NodeTicket>,
    ) -> Result<(), ClientError> {
        self.fed_done(FedRequest::Follow {
            origin,
            resource,
            into,
            hints,
        })
        .await
    }

    /// [`Client::fed_follow`], with the mirrors to pull from when the origin is unreachable
    /// (tried in this order, before those the DHT names), set in the same step. Needs
    /// `cluster:admin`.
    pub async fn fed_follow_via(
        &self,
        origin: [u8; 32],
        resource: Resource,
        into: Option<String>,
        hints: Vec<NodeTicket>,
        via: Vec<ViaMirror>,
    ) -> Result<(), ClientError> {
        self.fed_done(FedRequest::FollowVia {
            origin,
            resource,
            into,
            hints,
            via,
        })
        .await
    }

    /// Stops following (what was pulled stays). Needs `cluster:admin`.
    pub async fn fed_unfollow(
        &self,
        origin: [u8; 32],
        resource: Resource,
    ) -> Result<(), ClientError> {
        self.fed_done(FedRequest::Unfollow { origin, resource })
            .await
    }

    /// Every follow and how its pulls go. Needs `cluster:admin`.
    pub async fn fed_follows(&self) -> Result<Vec<FollowSummary>, ClientError> {
        self.fed_listing(FedRequest::Follows).await
    }

    /// Pulls now (every follow, one origin's, or one) and answers once those pulls finished,
    /// with every follow's state. Needs `cluster:admin`.
    pub async fn fed_sync(
        &self,
        origin: Option<[u8; 32]>,
        resource: Option<Resource>,
    ) -> Result<Vec<FollowSummary>, ClientError> {
        self.fed_listing(FedRequest::Sync { origin, resource })
            .await
    }

    async fn fed_listing(&self, request: FedRequest) -> Result<Vec<FollowSummary>, ClientError> {
        match self.request(&ClientRequest::Fed(request)).await? {
            ClientResponse::Fed(FedResponse::Follows(list)) => Ok(list),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}

impl Client {
    /// Serves this cluster's verified copy of `origin`'s followed `resource` to the clusters
    /// with these keys (and to any cluster with `public`), as a mirror: readers that cannot
    /// reach the origin pull it from here and check it against the origin's key. Needs
    /// `cluster:admin`.
    pub async fn fed_mirror(
        &self,
        origin: [u8; 32],
        resource: Resource,
        to: Vec<[u8; 32]>,
        public: bool,
    ) -> Result<(), ClientError> {
        self.fed_done(FedRequest::Mirror {
            origin,
            resource,
            to,
            public,
        })
        .await
    }

    /// Stops mirroring to these clusters (and to anyone, with `public`); with `all`, stops
    /// mirroring it. Needs `cluster:admin`.
    pub async fn fed_unmirror(
        &self,
        origin: [u8; 32],
        resource: Resource,
        to: Vec<[u8; 32]>,
        public: bool,
        all: bool,
    ) -> Result<(), ClientError> {
        self.fed_done(FedRequest::Unmirror {
            origin,
            resource,
            to,
            public,
            all,
        })
        .await
    }

    /// Every mirror policy of the cluster. Needs `cluster:admin`.
    pub async fn fed_mirrors(&self) -> Result<Vec<MirrorSummary>, ClientError> {
        match self
            .request(&ClientRequest::Fed(FedRequest::Mirrors))
            .await?
        {
            ClientResponse::Fed(FedResponse::Mirrors(list)) => Ok(list),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sets the mirrors a follow pulls from when its origin is unreachable (in this order,
    /// before those the DHT names). Needs `cluster:admin`.
    pub async fn fed_via(
        &self,
        origin: [u8; 32],
        resource: Resource,
        via: Vec<ViaMirror>,
    ) -> Result<(), ClientError> {
        self.fed_done(FedRequest::Via {
            origin,
            resource,
            via,
        })
        .await
    }
}
