//! iroh-docs namespaces through the SDK: multi-writer, eventually consistent key sets that
//! every member of the cluster hosts a replica of.

use crate::protocol::{
    check_ns_key, ClientRequest, ClientResponse, NamespaceError, NamespaceSummary, NsEntry,
    NsRequest, NsResponse, MAX_NS_VALUE_BYTES,
};
use crate::{Client, ClientError};

impl Client {
    /// Creates a writable namespace hosted by every member; returns its id.
    pub async fn ns_create(&self) -> Result<[u8; 32], ClientError> {
        match self.request(&ClientRequest::Ns(NsRequest::Create)).await? {
            ClientResponse::Ns(NsResponse::Created { id }) => Ok(id),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sets `key` to `value` as the answering member's author; returns the content hash.
    pub async fn ns_set(
        &self,
        namespace: [u8; 32],
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<[u8; 32], ClientError> {
        check_ns_key(&key)?;
        if value.len() > MAX_NS_VALUE_BYTES {
            return Err(NamespaceError::ValueTooLarge {
                len: value.len(),
                max: MAX_NS_VALUE_BYTES,
            }
            .into());
        }
        let request = ClientRequest::Ns(NsRequest::Set {
            namespace,
            key,
            value,
        });
        match self.request(&request).await? {
            ClientResponse::Ns(NsResponse::Set { hash }) => Ok(hash),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The latest entry for `key` on the answering member, and its content if that member
    /// has it.
    pub async fn ns_get(
        &self,
        namespace: [u8; 32],
        key: Vec<u8>,
    ) -> Result<(Option<NsEntry>, Option<Vec<u8>>), ClientError> {
        check_ns_key(&key)?;
        match self
            .request(&ClientRequest::Ns(NsRequest::Get { namespace, key }))
            .await?
        {
            ClientResponse::Ns(NsResponse::Value { entry, value }) => Ok((entry, value)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Up to `limit` entries (latest per key) whose keys start with `prefix`.
    pub async fn ns_list(
        &self,
        namespace: [u8; 32],
        prefix: Vec<u8>,
        limit: u32,
    ) -> Result<(Vec<NsEntry>, bool), ClientError> {
        let request = ClientRequest::Ns(NsRequest::List {
            namespace,
            prefix,
            limit,
        });
        match self.request(&request).await? {
            ClientResponse::Ns(NsResponse::Entries { entries, more }) => Ok((entries, more)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The namespaces the cluster hosts.
    pub async fn ns_namespaces(&self) -> Result<Vec<NamespaceSummary>, ClientError> {
        match self
            .request(&ClientRequest::Ns(NsRequest::Namespaces))
            .await?
        {
            ClientResponse::Ns(NsResponse::Namespaces(list)) => Ok(list),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// A ticket to the namespace naming every member; read-only unless `write`.
    pub async fn ns_share(&self, namespace: [u8; 32], write: bool) -> Result<String, ClientError> {
        match self
            .request(&ClientRequest::Ns(NsRequest::Share { namespace, write }))
            .await?
        {
            ClientResponse::Ns(NsResponse::Ticket { ticket }) => Ok(ticket),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Hosts the namespace of an iroh-docs ticket on every member; returns its id.
    pub async fn ns_import(&self, ticket: &str) -> Result<[u8; 32], ClientError> {
        let request = ClientRequest::Ns(NsRequest::Import {
            ticket: ticket.trim().to_string(),
        });
        match self.request(&request).await? {
            ClientResponse::Ns(NsResponse::Created { id }) => Ok(id),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}
