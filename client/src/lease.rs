//! Leases: grant, keep alive, inspect, revoke, and put keys that live only as long as one.
//!
//! A lease lives `ttl_secs` after it was granted or last kept alive; then the cluster's
//! leader deletes it and every key attached, at one revision (watchers see the deletes).
//! Grants and revocations are writes, so a retried one applies once. A keep-alive is
//! acknowledged only once the leader renewed the lease and confirmed it still leads, so an
//! acknowledged keep-alive sent at time t keeps the lease until at least t + TTL, across
//! leader changes (the new leader gives every lease its full TTL again).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aspen_kv::api::{ApplyError, LeaseId, PutOptions, WriteOp, WriteOutcome};
use aspen_kv::limits::MAX_LEASE_ID;
use tokio::sync::mpsc;

use crate::protocol::{
    ClientRequest, ClientResponse, KvRequest, KvResponse, LeaseRequest, LeaseResponse, LeaseStatus,
    RpcError,
};
use crate::{Client, ClientError, PutResult};

/// A granted lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl_secs: u64,
}

/// What a revocation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRevoked {
    /// The store revision after it (the revision of the deletes, if any).
    pub revision: u64,
    /// Keys deleted with the lease.
    pub deleted: u64,
}

/// One acknowledged keep-alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptAlive {
    /// When the keep-alive was sent: the lease lives at least until `sent_at + ttl`.
    pub sent_at: tokio::time::Instant,
    pub ttl_secs: u64,
}

/// Shortest interval between keep-alives of a [`KeepAlive`] stream.
const MIN_KEEP_ALIVE_INTERVAL: Duration = Duration::from_millis(500);

/// Keeps a lease alive until dropped: a `Stream` of acknowledged keep-alives, sent every
/// third of the TTL. A failed keep-alive is reported (`Err`) and retried; the stream ends
/// after the lease is found gone ([`ApplyError::LeaseNotFound`]).
pub struct KeepAlive {
    acks: mpsc::Receiver<Result<KeptAlive, ClientError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl futures::Stream for KeepAlive {
    type Item = Result<KeptAlive, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.acks.poll_recv(cx)
    }
}

/// Whether `e` says the lease no longer exists.
pub fn is_lease_gone(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Rpc(RpcError::Apply(ApplyError::LeaseNotFound { .. }))
            | ClientError::Apply(ApplyError::LeaseNotFound { .. })
    )
}

impl Client {
    /// Grants a lease of `ttl_secs`; `id` 0 picks a random id.
    pub async fn lease_grant(&self, ttl_secs: u64, id: LeaseId) -> Result<Lease, ClientError> {
        // Picked here, not by the node, so a retried grant is the same write (applied once).
        let id = if id == 0 {
            loop {
                let id = rand::random::<u64>() & MAX_LEASE_ID;
                if id != 0 {
                    break id;
                }
            }
        } else {
            id
        };
        match self.write(WriteOp::LeaseGrant { id, ttl_secs }).await? {
            WriteOutcome::LeaseGrant { id, ttl_secs, .. } => Ok(Lease { id, ttl_secs }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Revokes a lease now, deleting its keys.
    pub async fn lease_revoke(&self, id: LeaseId) -> Result<LeaseRevoked, ClientError> {
        match self.write(WriteOp::LeaseRevoke { id }).await? {
            WriteOutcome::LeaseRevoke {
                revision, deleted, ..
            } => Ok(LeaseRevoked { revision, deleted }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sets `key` to `value`, attached to lease `lease` (0: no lease).
    pub async fn put_with_lease(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        lease: LeaseId,
        prev_kv: bool,
    ) -> Result<PutResult, ClientError> {
        let op = WriteOp::PutWith {
            key,
            value,
            prev_kv,
            options: PutOptions {
                lease,
                ..Default::default()
            },
        };
        match self.write(op).await? {
            WriteOutcome::Put { revision, prev } => Ok(PutResult { revision, prev }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    async fn lease_request(&self, request: LeaseRequest) -> Result<LeaseResponse, ClientError> {
        match self
            .request(&ClientRequest::Kv(KvRequest::Lease(request)))
            .await?
        {
            ClientResponse::Kv(KvResponse::Lease(r)) => Ok(r),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// One keep-alive; the lease then lives at least `ttl` from when this was called.
    pub async fn lease_keep_alive_once(&self, id: LeaseId) -> Result<KeptAlive, ClientError> {
        let sent_at = tokio::time::Instant::now();
        match self.lease_request(LeaseRequest::KeepAlive { id }).await? {
            LeaseResponse::KeptAlive { ttl_secs, .. } => Ok(KeptAlive { sent_at, ttl_secs }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Keeps lease `id` alive until the returned stream is dropped (see [`KeepAlive`]).
    pub fn lease_keep_alive(&self, id: LeaseId) -> KeepAlive {
        let (tx, acks) = mpsc::channel(16);
        let client = self.clone();
        let task = tokio::spawn(async move {
            let mut interval = MIN_KEEP_ALIVE_INTERVAL;
            loop {
                let result = client.lease_keep_alive_once(id).await;
                let gone = result.as_ref().err().is_some_and(is_lease_gone);
                let next = match &result {
                    Ok(k) => {
                        interval =
                            (Duration::from_secs(k.ttl_secs) / 3).max(MIN_KEEP_ALIVE_INTERVAL);
                        k.sent_at + interval
                    }
                    // Failed (the request already retried until its deadline): try again soon.
                    Err(_) => tokio::time::Instant::now() + MIN_KEEP_ALIVE_INTERVAL.min(interval),
                };
                if tx.send(result).await.is_err() || gone {
                    return;
                }
                tokio::time::sleep_until(next).await;
            }
        });
        KeepAlive { acks, task }
    }

    /// The lease's TTL, time left (by the leader's clock) and, with `keys`, attached keys.
    pub async fn lease_time_to_live(
        &self,
        id: LeaseId,
        keys: bool,
    ) -> Result<LeaseStatus, ClientError> {
        match self
            .lease_request(LeaseRequest::TimeToLive { id, keys })
            .await?
        {
            LeaseResponse::TimeToLive(status) => Ok(status),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Every lease id, in order.
    pub async fn lease_list(&self) -> Result<Vec<LeaseId>, ClientError> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            match self.lease_request(LeaseRequest::List { after }).await? {
                LeaseResponse::List { ids, more } => {
                    after = ids.last().copied().unwrap_or(after);
                    all.extend(ids);
                    if !more {
                        return Ok(all);
                    }
                }
                other => return Err(ClientError::Protocol(format!("{other:?}"))),
            }
        }
    }
}
