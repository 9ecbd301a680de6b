//! Access control from the client's side: who am I, grants, roles, token revocation.
//!
//! Capability tokens are issued by the client itself (`aspen_trust::CapabilityToken::issue`
//! signs with the client's own key); only revocation needs the cluster.

use crate::protocol::{
    AuthListing, AuthRequest, AuthResponse, ClientRequest, ClientResponse, WhoAmI,
};
use crate::{Client, ClientError};

impl Client {
    /// The caller as the node sees it: the key QUIC proved, and what it may do.
    pub async fn whoami(&self) -> Result<WhoAmI, ClientError> {
        match self
            .request(&ClientRequest::Auth(AuthRequest::WhoAmI))
            .await?
        {
            ClientResponse::Auth(AuthResponse::WhoAmI(w)) => Ok(w),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Adds roles and permissions (`KIND:ACTION:PATTERN`) to `key`'s grant. Needs
    /// `cluster:admin`.
    pub async fn auth_grant(
        &self,
        key: [u8; 32],
        roles: Vec<String>,
        permissions: Vec<String>,
    ) -> Result<(), ClientError> {
        self.done(ClientRequest::Auth(AuthRequest::Grant {
            key,
            roles,
            permissions,
        }))
        .await
    }

    /// Removes roles and permissions from `key`'s grant (`all`: the whole grant). Needs
    /// `cluster:admin`.
    pub async fn auth_revoke(
        &self,
        key: [u8; 32],
        roles: Vec<String>,
        permissions: Vec<String>,
        all: bool,
    ) -> Result<(), ClientError> {
        self.done(ClientRequest::Auth(AuthRequest::Revoke {
            key,
            roles,
            permissions,
            all,
        }))
        .await
    }

    /// Creates or replaces a custom role. Needs `cluster:admin`.
    pub async fn role_create(
        &self,
        name: String,
        permissions: Vec<String>,
    ) -> Result<(), ClientError> {
        self.done(ClientRequest::Auth(AuthRequest::RoleCreate {
            name,
            permissions,
        }))
        .await
    }

    /// Every grant and custom role. Needs `cluster:admin`.
    pub async fn auth_list(&self) -> Result<AuthListing, ClientError> {
        match self
            .request(&ClientRequest::Auth(AuthRequest::List))
            .await?
        {
            ClientResponse::Auth(AuthResponse::List(l)) => Ok(l),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Revokes a token (the encoded `CapabilityToken`) and everything delegated from it, on
    /// every member. Needs `cluster:admin`, or to be an issuer in the token's chain.
    pub async fn token_revoke(&self, token: Vec<u8>) -> Result<(), ClientError> {
        self.done(ClientRequest::Auth(AuthRequest::TokenRevoke { token }))
            .await
    }

    /// Makes this client's key an admin, proven by the contacted node's bootstrap secret.
    pub async fn recover_admin(&self, secret: [u8; 32]) -> Result<(), ClientError> {
        self.done(ClientRequest::Auth(AuthRequest::Recover { secret }))
            .await
    }

    async fn done(&self, request: ClientRequest) -> Result<(), ClientError> {
        match self.request(&request).await? {
            ClientResponse::Auth(AuthResponse::Done) => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}
