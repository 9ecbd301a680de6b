//! etcd's v3 gRPC API on the cluster's key space (`--etcd-api ADDR`), so etcdctl and etcd's
//! client libraries work against Aspen.
//!
//! Each etcd request becomes the Aspen request it means ([`aspen_etcd_api`] decides how) and
//! goes through the same checks as on the Aspen protocol: the caller's grants, the store's
//! limits, Raft for writes and a read barrier for linearizable reads. The services:
//! KV (`kv.rs`), Watch (`watch.rs`), Lease (`lease.rs`), Cluster, Maintenance and Auth
//! (`cluster.rs`), Lock and Election (`coordination.rs`).
//!
//! Who calls: etcd clients cannot prove an iroh key, so a caller presents an Aspen bearer
//! token (`aspen auth token issue --bearer`). etcd's own flow carries it: the client calls
//! `Authenticate` with any user name and the token as the password, and sends the token it
//! gets back (the same text) in the `token` metadata of every call. Default deny: a call
//! without a valid token is refused ("user name is empty" or "invalid auth token").
//!
//! Bounds: [`MAX_CONNECTIONS`] connections (more are closed at once), [`MAX_STREAMS`]
//! concurrent calls per connection, requests of at most [`MAX_REQUEST_BYTES`], and range
//! answers of at most `kv::MAX_RANGE_ANSWER_BYTES`.

mod cluster;
mod coordination;
mod kv;
mod lease;
mod watch;

pub use cluster::publish_addr;

use openraft::async_runtime::WatchReceiver;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use aspen_client::protocol::{ClientRequest, RpcError};
use aspen_etcd_api::pb::etcdserverpb::ResponseHeader;
use aspen_etcd_api::{revision, EtcdError};
use aspen_kv::api::Revision;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::Caller;
use super::NodeState;

/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 1024;
/// Calls (HTTP/2 streams) open at once on one connection.
pub const MAX_STREAMS: u32 = 256;
/// The largest request message: the store's largest batch, and some room.
pub const MAX_REQUEST_BYTES: usize = aspen_kv::limits::MAX_BATCH_BYTES + 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EtcdListenError {
    #[error("cannot listen for the etcd API on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Binds the etcd API's listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, EtcdListenError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| EtcdListenError::Bind(addr, e))
}

/// The state every etcd service holds. The node is held weakly: the listener must not keep
/// a stopped node alive.
#[derive(Clone)]
pub struct EtcdApi {
    node: Weak<NodeState>,
    tokens: Arc<TokenCache>,
}

/// The most verified tokens remembered (the cache is emptied when it is full).
const MAX_CACHED_TOKENS: usize = 4096;

/// Tokens already verified (signature chain, bearer audience), by their text: etcd clients
/// present the token on every call, and checking an Ed25519 chain each time would cost more
/// than most calls. Expiry and revocation are checked on every call anyway, as for tokens on
/// the Aspen protocol (`auth::Access`), so a cached token that expired or was revoked is
/// refused all the same.
#[derive(Default)]
struct TokenCache(std::sync::Mutex<std::collections::HashMap<String, super::auth::PresentedToken>>);

/// Serves the etcd API on `listener` until the node stops.
pub async fn serve(listener: TcpListener, node: Weak<NodeState>) {
    use aspen_etcd_api::pb::etcdserverpb::{
        auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
        lease_server::LeaseServer, maintenance_server::MaintenanceServer,
        watch_server::WatchServer,
    };
    use aspen_etcd_api::pb::v3electionpb::election_server::ElectionServer;
    use aspen_etcd_api::pb::v3lockpb::lock_server::LockServer;
    let Some(metrics) = node.upgrade().map(|n| n.cluster.metrics.clone()) else {
        return;
    };
    let api = EtcdApi {
        node,
        tokens: Arc::default(),
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let incoming = futures::stream::unfold(
        (listener, slots, metrics),
        |(listener, slots, metrics)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            metrics.etcd_refused.inc();
                            drop(stream);
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        metrics.etcd_connections.inc();
                        let conn = Connection {
                            stream,
                            _slot: slot,
                            metrics: metrics.clone(),
                        };
                        return Some((Ok::<_, std::io::Error>(conn), (listener, slots, metrics)));
                    }
                    Err(e) => {
                        // Out of file descriptors, usually: wait a moment rather than spin.
                        tracing::warn!("etcd API: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        },
    );
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(
            KvServer::new(api.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(WatchServer::new(api.clone()))
        .add_service(LeaseServer::new(api.clone()))
        .add_service(ClusterServer::new(api.clone()))
        .add_service(MaintenanceServer::new(api.clone()))
        .add_service(AuthServer::new(api.clone()))
        .add_service(LockServer::new(api.clone()))
        .add_service(ElectionServer::new(api.clone()))
        .serve_with_incoming(incoming)
        .await;
    if let Err(e) = result {
        tracing::warn!("etcd API stopped: {e}");
    }
}

/// One accepted connection, holding its slot until it closes.
struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    metrics: Arc<super::metrics::NodeMetrics>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.etcd_connections.dec();
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = <TcpStream as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl EtcdApi {
    fn node(&self) -> Result<Arc<NodeState>, EtcdError> {
        self.node
            .upgrade()
            .ok_or_else(|| EtcdError::Unavailable("the node is stopping".into()))
    }

    /// Runs one call: finds the node and the caller (its token), runs `f`, and records the
    /// answer in the node's metrics (operation `etcd_<op>`).
    async fn call<T, R, F, Fut>(
        &self,
        op: &'static str,
        request: tonic::Request<T>,
        f: F,
    ) -> Result<tonic::Response<R>, tonic::Status>
    where
        F: FnOnce(Arc<NodeState>, Caller, T) -> Fut,
        Fut: std::future::Future<Output = Result<R, EtcdError>>,
    {
        let started = Instant::now();
        let node = self.node()?;
        let result = match self.caller(&node, request.metadata()) {
            Ok(caller) => {
                crate::busy_poll::touch();
                let result = f(node.clone(), caller, request.into_inner()).await;
                crate::busy_poll::touch();
                result
            }
            Err(e) => {
                node.cluster.metrics.etcd_refused.inc();
                Err(e)
            }
        };
        node.cluster
            .metrics
            .answered(op, started.elapsed(), result.as_ref().err().map(error_kind));
        result.map(tonic::Response::new).map_err(|e| e.status())
    }
}

/// The kind label of an error, for the metrics.
fn error_kind(e: &EtcdError) -> &'static str {
    match e.code() {
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::OutOfRange => "out_of_range",
        tonic::Code::NotFound => "not_found",
        tonic::Code::FailedPrecondition => "failed_precondition",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::Unimplemented => "unimplemented",
        _ => "internal",
    }
}

impl EtcdApi {
    /// The caller of one call: the bearer token in its `token` metadata (or
    /// `authorization`, with or without `Bearer `), as etcd reads it.
    fn caller(
        &self,
        node: &NodeState,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Caller, EtcdError> {
        caller(node, metadata, &self.tokens)
    }
}

fn caller(
    node: &NodeState,
    metadata: &tonic::metadata::MetadataMap,
    tokens: &TokenCache,
) -> Result<Caller, EtcdError> {
    let text = metadata
        .get("token")
        .or_else(|| metadata.get("authorization"))
        .map(|v| v.to_str().map_err(|_| EtcdError::InvalidAuthToken))
        .transpose()?
        .map(|t| t.strip_prefix("Bearer ").unwrap_or(t).trim());
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return Err(EtcdError::UserEmpty);
    };
    let cached = tokens
        .0
        .lock()
        .expect("token cache lock")
        .get(text)
        .cloned();
    let token = match cached {
        Some(t) => t,
        None => {
            let t = verify_bearer(node, text).map_err(|_| EtcdError::InvalidAuthToken)?;
            let mut cache = tokens.0.lock().expect("token cache lock");
            if cache.len() >= MAX_CACHED_TOKENS {
                cache.clear();
            }
            cache.insert(text.to_string(), t.clone());
            t
        }
    };
    let caller = Caller::new(aspen_trust::BEARER_AUDIENCE);
    *caller.token.lock().expect("token lock") = Some(token);
    Ok(caller)
}

/// Checks a bearer token's text: its signatures, that it is a bearer token, its expiry and
/// the revocations this node knows.
fn verify_bearer(node: &NodeState, text: &str) -> Result<super::auth::PresentedToken, String> {
    super::auth::verify_bearer(text, &node.auth.policy(), super::identity::unix_now())
}

/// An Aspen error as etcd reports the same condition.
fn from_rpc(e: RpcError) -> EtcdError {
    match e {
        RpcError::NotLeader { .. } => EtcdError::NoLeader,
        RpcError::Unavailable(s) => EtcdError::Unavailable(s),
        RpcError::Limit(l) => l.into(),
        RpcError::Read(r) => r.into(),
        RpcError::Apply(a) => a.into(),
        RpcError::PermissionDenied { .. } => EtcdError::PermissionDenied,
        RpcError::Token(_) => EtcdError::InvalidAuthToken,
        RpcError::NotInitialized => EtcdError::Unavailable(RpcError::NotInitialized.to_string()),
        RpcError::BadRequest(s) => EtcdError::InvalidArgument(s),
        other => EtcdError::Internal(other.to_string()),
    }
}

impl NodeState {
    /// Checks that `caller` may make `request` (see [`NodeState::authorize`]).
    async fn etcd_authorize(
        &self,
        request: &ClientRequest,
        caller: &Caller,
    ) -> Result<(), EtcdError> {
        self.authorize(request, caller).await.map_err(from_rpc)
    }

    /// etcd's response header: the cluster, this member, the store's revision (etcd's
    /// numbering) and the Raft term.
    async fn etcd_header(&self, revision: Revision) -> ResponseHeader {
        let cluster_id = match self.cluster_secret.get() {
            Some(k) => Some(k.clone()),
            None => self.cluster_secret().await.ok().flatten(),
        }
        .map(|k| u64::from_be_bytes(k.public().to_bytes()[..8].try_into().expect("8 bytes")))
        .unwrap_or(0);
        ResponseHeader {
            cluster_id,
            member_id: self.cluster.id,
            revision: revision::to_etcd(revision),
            raft_term: self.cluster.raft.metrics().borrow_watched().current_term,
        }
    }

    /// The store revision this node has applied.
    fn applied_revision(&self) -> Revision {
        *self.cluster.sm.watch_revision().borrow()
    }
}
