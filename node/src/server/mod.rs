//! A running Aspen node: the iroh endpoint, Raft over iroh, and the client service.
//!
//! ```text
//!  clients ──aspen/client/1──▶ ClientService ─┬─ writes ──▶ Proposer (batching) ──▶ Raft (leader)
//!                                            │             └─ or Forward ──▶ leader over aspen/raft/2
//!                                            └─ reads ───▶ read barrier (ReadIndex) ──▶ state machine
//!  members ─aspen/raft/2──▶ Peers (one connection per peer, both directions) ──▶ Raft RPCs
//! ```

mod admission;
pub mod auth;
pub mod automerge_repo;
pub mod blobs;
pub mod cluster;
mod compaction;
mod docs;
pub mod etcd;
mod faulty_blobs;
mod federation;
mod gate;
pub mod identity;
mod kv;
mod leases;
mod membership;
pub mod metrics;
pub mod namespaces;
mod peers;
mod proposer;
pub mod publisher;
pub mod raft_protocol;
mod read_index;
mod watch;

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aspen_client::protocol::{
    ClientRequest, ClientResponse, RpcError, CLIENT_ALPN, MAX_CLIENT_FRAME,
};
use aspen_client::ticket::node_id_of;
use aspen_client::wire::{read_frame, write_frame};
use aspen_client::{ClusterTicket, NodeTicket};
use aspen_kv::{Member, NodeId, Raft};
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use iroh::{Endpoint, EndpointId, SecretKey};
use openraft::error::{LinearizableReadError, RaftError};
use openraft::ChangeMembers;

use crate::config::{NodeConfig, TestFault};
pub use cluster::ClusterHandle;
use peers::{Peers, RaftNetworkOverIroh};
use raft_protocol::{RaftRequest, RaftResponse, RAFT_ALPN};

/// File the node writes its own ticket to once it listens.
pub const NODE_TICKET_FILE: &str = "node.ticket";
/// File the node keeps the cluster's ticket in while it is a member.
pub const CLUSTER_TICKET_FILE: &str = "cluster.ticket";

/// How long a linearizable read or a forwarded call may wait for the leader.
const LEADER_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node checks that the membership records its current addresses.
const ADDRESS_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How soon a failed write of `cluster.ticket` is tried again.
const TICKET_RETRY: Duration = Duration::from_secs(2);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error(transparent)]
    Key(#[from] crate::keyfile::KeyError),
    #[error(transparent)]
    Endpoint(#[from] aspen_client::endpoint::EndpointError),
    #[error(transparent)]
    Store(#[from] aspen_kv::storage::OpenError),
    #[error("raft failed to start: {0}")]
    Raft(String),
    #[error("cannot write {0}: {1}")]
    Ticket(PathBuf, std::io::Error),
    #[error("cannot start the DHT client: {0}")]
    Dht(aspen_discovery::DhtError),
    /// The blob store or the iroh-docs engine could not start.
    #[error("{0}")]
    Blobs(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    AutomergeRepo(#[from] automerge_repo::RepoListenError),
    #[error(transparent)]
    Etcd(#[from] etcd::EtcdListenError),
    #[error(transparent)]
    Joining(#[from] admission::JoiningFileError),
}

/// A node: the cluster handle and one handler per client service (kv, cluster, doc, blob,
/// ns, auth). The cluster service (membership and identity, `membership.rs`,
/// `identity.rs`) is the node itself; every other service holds only the
/// [`ClusterHandle`] and what it owns.
pub struct NodeState {
    /// Membership, leader, proposals and read points: what every service holds.
    pub cluster: ClusterHandle,
    allow_fault_injection: bool,
    /// The cluster secret key, once applied (it never changes afterwards).
    cluster_secret: std::sync::OnceLock<aspen_trust::ClusterSecretKey>,
    /// Wakes the record publisher when what the record says may have changed.
    identity_changed: tokio::sync::Notify,
    /// The key-value store.
    pub kv: kv::KvService,
    /// Automerge documents.
    pub docs: docs::DocService,
    /// Federation: exports, follows and the leader's pulls.
    pub fed: federation::FedService,
    /// The node's blob store and replication state.
    pub blobs: Arc<blobs::BlobService>,
    /// The node's iroh-docs engine (replicas of the cluster's namespaces).
    pub namespaces: Arc<namespaces::NamespaceService>,
    /// The access-control policy this node enforces (grants, roles, revoked tokens).
    pub auth: auth::AuthService,
    /// Whom this node takes Raft traffic from before it is a member.
    admission: Arc<admission::Admission>,
    /// automerge-repo apps connected to this node (`--automerge-repo`).
    pub repo: Arc<automerge_repo::RepoHub>,
    /// Held while this node changes the membership: a client's retry of a slow
    /// `cluster add` waits for the first attempt instead of colliding with it.
    membership_changes: tokio::sync::Mutex<()>,
}

/// One leadership confirmation (ReadIndex) through openraft, never below what the leader had
/// in its log when its leadership served its first read ([`aspen_kv::ReadIndex`]).
async fn confirm_read_index(reads: &aspen_kv::ReadIndex) -> Result<Option<u64>, RpcError> {
    match reads.confirm().await {
        Ok(index) => Ok(index),
        Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_))) => {
            Err(RpcError::NotLeader { leader: None })
        }
        Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(e))) => Err(
            RpcError::Unavailable(format!("leader cannot reach a quorum: {e}")),
        ),
        Err(RaftError::Fatal(e)) => Err(RpcError::Unavailable(format!("raft stopped: {e}"))),
    }
}

/// A started node. Drop or [`RunningNode::shutdown`] to stop it.
pub struct RunningNode {
    pub state: Arc<NodeState>,
    /// The node's DHT client, when the DHT is on.
    pub dht: Option<aspen_discovery::ClusterDht>,
    router: Router,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Starts a node: key, store, endpoint, Raft, protocol handlers, ticket files.
    pub async fn start(config: &NodeConfig) -> Result<RunningNode, StartError> {
        let dir = config.data_dir.clone();
        let key = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir).map_err(|e| StartError::DataDir(dir.clone(), e))?;
                // Keys and the replicated cluster secret live here: owner only.
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                        .map_err(|e| StartError::DataDir(dir.clone(), e))?;
                }
                Ok::<_, StartError>((
                    crate::keyfile::load_or_create(&dir)?,
                    crate::keyfile::load_or_create_bootstrap_secret(&dir)?,
                ))
            })
            .await
            .map_err(|e| StartError::Raft(e.to_string()))??
        };
        let (key, bootstrap_secret) = key;
        let secret = SecretKey::from_bytes(&key.secret_bytes());
        let gate = gate::PeerGate::default();
        // Addresses of other clusters' nodes that federation reached (iroh's own dials by
        // id, gossip's, look there; nothing else is ever looked up).
        let fed_addrs = iroh::address_lookup::MemoryLookup::new();
        let endpoint = bind_endpoint(&dir, config.bind, secret, &gate, &fed_addrs).await?;
        let addrs = listen_addrs(&endpoint, config.bind);
        let me = Member {
            endpoint_id: key.public(),
            addrs,
        };
        let id = node_id_of(&me.endpoint_id);

        let store_dir = dir.join("store");
        let (log, sm) = tokio::task::spawn_blocking(move || aspen_kv::open(&store_dir))
            .await
            .map_err(|e| StartError::Raft(e.to_string()))??;
        let peers = Peers::new(endpoint.clone());
        let network = RaftNetworkOverIroh {
            peers: peers.clone(),
        };
        let raft = Raft::new(
            id,
            aspen_kv::raft_config(config.snapshot_every, config.keep_log_after_snapshot),
            network,
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let cluster = ClusterHandle::new(id, me, raft, sm, peers.clone(), config.test_fault);
        let (docs_protect, docs_protect_cb) = iroh_docs::engine::ProtectCallbackHandler::new();
        let blobs = blobs::BlobService::open(
            &dir.join("blobs"),
            cluster.clone(),
            endpoint.clone(),
            &config.blobs,
            Some(docs_protect_cb),
        )
        .await
        .map_err(StartError::Blobs)?;
        let blobs = Arc::new(blobs);
        let namespaces = namespaces::NamespaceService::start(
            &dir.join("namespaces"),
            cluster.clone(),
            endpoint.clone(),
            blobs.clone(),
            docs_protect,
        )
        .await
        .map_err(StartError::Blobs)?;
        let joining = match config.join {
            Some(key) => Some(key),
            None => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || admission::load_joining(&dir))
                    .await
                    .map_err(|e| StartError::Raft(e.to_string()))??
            }
        };
        let admission = Arc::new(
            admission::Admission::new(bootstrap_secret, joining).persisted_in(dir.clone()),
        );
        let state = Arc::new(NodeState {
            kv: kv::KvService::new(cluster.clone()),
            docs: docs::DocService::new(cluster.clone()),
            fed: federation::FedService::new(cluster.clone()),
            auth: auth::AuthService::new(cluster.clone(), admission.clone()),
            cluster,
            allow_fault_injection: config.allow_fault_injection,
            cluster_secret: Default::default(),
            identity_changed: Default::default(),
            blobs,
            namespaces: Arc::new(namespaces),
            admission,
            repo: Arc::new(automerge_repo::RepoHub::new(id)),
            membership_changes: Default::default(),
        });
        peers.set_node(Arc::downgrade(&state));
        let _ = gate.node.set(Arc::downgrade(&state));
        // The policy is in force before the first request is served.
        let auth_changes = state.cluster.sm.watch_system_prefix(auth::AUTH_PREFIX);
        state.auth.watch(auth_changes.clone());
        state
            .auth
            .reload_policy()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;

        let router = Router::builder(endpoint.clone()).accept(RAFT_ALPN, RaftService { peers });
        let blob_fault = match config.test_fault {
            Some(TestFault::CorruptBlobSends) => Some(faulty_blobs::Fault::Corrupt),
            Some(TestFault::StallBlobSends) => Some(faulty_blobs::Fault::Stall),
            _ => None,
        };
        let router = if let Some(fault) = blob_fault {
            router.accept(
                iroh_blobs::ALPN,
                faulty_blobs::FaultyProvider {
                    store: (*state.blobs.store).clone(),
                    fault,
                },
            )
        } else {
            router.accept(
                iroh_blobs::ALPN,
                gate::GatedBlobs {
                    store: (*state.blobs.store).clone(),
                    node: gate.node.clone(),
                },
            )
        };
        let router = router
            .accept(iroh_gossip::ALPN, state.namespaces.gossip.clone())
            .accept(
                iroh_docs::ALPN,
                gate::GatedDocs {
                    docs: state.namespaces.docs.clone(),
                    sync: state.namespaces.sync.clone(),
                    node: gate.node.clone(),
                },
            )
            .accept(
                aspen_federation::FEDERATION_ALPN,
                federation::origin::FederationOrigin::new(state.clone()),
            )
            .accept(
                CLIENT_ALPN,
                ClientService {
                    state: state.clone(),
                    open: Default::default(),
                },
            )
            .spawn();

        let ticket = state.cluster.node_ticket();
        write_atomically(dir.join(NODE_TICKET_FILE), ticket.to_string()).await?;
        let dht = match config.dht.dht_config() {
            // Binds a socket and may resolve bootstrap host names: off the executor.
            Some(c) => Some(
                tokio::task::spawn_blocking(move || aspen_discovery::ClusterDht::start(&c))
                    .await
                    .map_err(|e| StartError::Raft(e.to_string()))?
                    .map_err(StartError::Dht)?,
            ),
            None => None,
        };
        let timing = publisher::PublishTiming {
            republish_interval: Duration::from_secs(config.dht.republish_interval_secs),
            record_validity: Duration::from_secs(config.dht.record_validity_secs),
        };
        let mut tasks = vec![
            tokio::spawn(keep_cluster_ticket(state.clone(), dir.clone())),
            tokio::spawn(announce_address(state.clone())),
            tokio::spawn(publisher::run(state.clone(), dht.clone(), timing)),
            tokio::spawn(blobs::run_replication(state.blobs.clone())),
            tokio::spawn(namespaces::run_sync(state.namespaces.clone())),
            tokio::spawn(namespaces::run_content_repair(state.namespaces.clone())),
            tokio::spawn(auth::run_policy_reload(state.clone(), auth_changes)),
            tokio::spawn(leases::run_clock(state.cluster.clone())),
            tokio::spawn(compaction::run(
                state.cluster.clone(),
                config.auto_compaction()?,
            )),
            tokio::spawn(federation::follower::run(
                state.clone(),
                state.fed.pulls.clone(),
                endpoint.clone(),
                aspen_discovery::Resolver::new(
                    dht.clone(),
                    Some(aspen_discovery::RecordCache::new(dir.join("records"))),
                ),
                dht.clone(),
                fed_addrs.clone(),
                config.federation.schedule(),
            )),
            tokio::spawn(federation::triggers::run_origin(
                state.clone(),
                state.namespaces.gossip.clone(),
                fed_addrs,
            )),
            tokio::spawn(federation::triggers::run_follower(
                state.clone(),
                state.namespaces.gossip.clone(),
                state.fed.pulls.clone(),
            )),
        ];
        if let Some(addr) = config.metrics {
            let token = match &config.metrics_token_file {
                Some(path) => Some(metrics::read_token(path).await?),
                None => None,
            };
            let listener = metrics::bind(addr, token.as_deref()).await?;
            let bound = listener
                .local_addr()
                .map_err(|e| metrics::MetricsError::Bind(addr, e))?;
            let _ = state.cluster.metrics.serving.set(bound);
            tracing::info!(%bound, "serving metrics");
            tasks.push(tokio::spawn(metrics::serve(
                listener,
                Arc::downgrade(&state),
                token,
            )));
        }
        if let Some(addr) = config.automerge_repo {
            let listener = automerge_repo::bind(addr).await?;
            let bound = listener
                .local_addr()
                .map_err(|e| automerge_repo::RepoListenError::Bind(addr, e))?;
            let _ = state.cluster.metrics.repo_serving.set(bound);
            tracing::info!(%bound, "serving automerge-repo");
            tasks.push(tokio::spawn(automerge_repo::serve(
                listener,
                Arc::downgrade(&state),
                state.repo.clone(),
            )));
            tasks.push(tokio::spawn(automerge_repo::run_refresh(
                Arc::downgrade(&state),
                state.repo.clone(),
            )));
        }
        if let Some(addr) = config.etcd_api {
            let listener = etcd::bind(addr).await?;
            let bound = listener
                .local_addr()
                .map_err(|e| etcd::EtcdListenError::Bind(addr, e))?;
            let _ = state.cluster.metrics.etcd_serving.set(bound);
            tracing::info!(%bound, "serving the etcd API");
            tasks.push(tokio::spawn(etcd::serve(listener, Arc::downgrade(&state))));
            tasks.push(tokio::spawn(etcd::publish_addr(
                Arc::downgrade(&state),
                bound,
            )));
        }
        if let Some(dht) = &dht {
            tasks.push(tokio::spawn(federation::mirror::run_announcer(
                state.clone(),
                dht.clone(),
            )));
        }
        tracing::info!(node = format!("{id:016x}"), addrs = ?state.cluster.me.addrs, "node listening");
        Ok(RunningNode {
            state,
            dht,
            router,
            tasks,
        })
    }

    pub fn node_ticket(&self) -> NodeTicket {
        self.state.cluster.node_ticket()
    }

    /// The node's iroh endpoint (its key is the node key).
    pub fn endpoint(&self) -> Endpoint {
        self.router.endpoint().clone()
    }

    /// Stops Raft and closes the endpoint.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.state.cluster.raft.shutdown().await;
        let _ = self.router.shutdown().await;
    }
}

/// Most concurrent bi-streams one connection may open (client requests, blob requests, Raft
/// calls); QUIC refuses more until some finish.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// A request stream (client or Raft) whose request frame has not fully arrived after this
/// long is dropped.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no traffic (keep-alives included) for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The node endpoint: offline, with the access gate and per-connection limits.
async fn node_endpoint(
    bind: SocketAddr,
    secret: SecretKey,
    gate: &gate::PeerGate,
    addrs: &iroh::address_lookup::MemoryLookup,
) -> Result<Endpoint, aspen_client::endpoint::EndpointError> {
    use iroh::endpoint::{QuicTransportConfig, VarInt};
    let transport = QuicTransportConfig::builder()
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION))
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("a small timeout fits")))
        .build();
    aspen_client::endpoint::offline_builder(bind, Some(secret), vec![])?
        .transport_config(transport)
        .hooks(gate.clone())
        .address_lookup(addrs.clone())
        .bind()
        .await
        .map_err(|e| aspen_client::endpoint::EndpointError::Bind(bind, format!("{e:#}")))
}

/// Binds the endpoint. With port 0, first tries the port of the previous run (from
/// `node.ticket`), so a restarted node keeps its address whenever the OS allows.
async fn bind_endpoint(
    dir: &Path,
    bind: SocketAddr,
    secret: SecretKey,
    gate: &gate::PeerGate,
    addrs: &iroh::address_lookup::MemoryLookup,
) -> Result<Endpoint, StartError> {
    if bind.port() == 0 {
        let previous = tokio::fs::read_to_string(dir.join(NODE_TICKET_FILE))
            .await
            .ok()
            .and_then(|t| t.parse::<NodeTicket>().ok())
            .and_then(|t| {
                t.addrs
                    .iter()
                    .find(|a| a.is_ipv4() == bind.is_ipv4())
                    .map(|a| a.port())
            });
        if let Some(port) = previous {
            let again = SocketAddr::new(bind.ip(), port);
            if let Ok(ep) = node_endpoint(again, secret.clone(), gate, addrs).await {
                return Ok(ep);
            }
            tracing::info!("previous port {port} is taken; binding a new one");
        }
    }
    Ok(node_endpoint(bind, secret, gate, addrs).await?)
}

/// The addresses to advertise: the bound sockets, with unspecified IPs (0.0.0.0, ::)
/// replaced by the interface addresses iroh found.
fn listen_addrs(endpoint: &Endpoint, bind: SocketAddr) -> Vec<SocketAddr> {
    let bound = endpoint.bound_sockets();
    if !bind.ip().is_unspecified() {
        return bound;
    }
    let mut found: Vec<SocketAddr> = endpoint.addr().ip_addrs().copied().collect();
    if found.is_empty() {
        let port = bound.first().map(|a| a.port()).unwrap_or(bind.port());
        found.push(SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), port));
    }
    found.truncate(aspen_client::ticket::MAX_ADDRS_PER_NODE);
    found
}

/// Replaces `path` with `contents` (write to a temporary file, then rename), off the executor.
async fn write_atomically(path: PathBuf, contents: String) -> Result<(), StartError> {
    tokio::task::spawn_blocking(move || {
        let tmp = path.with_extension("tmp");
        let err = |e| StartError::Ticket(path.clone(), e);
        std::fs::write(&tmp, format!("{contents}\n")).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    })
    .await
    .map_err(|e| StartError::Raft(e.to_string()))?
}

fn ticket_of(member: &Member) -> NodeTicket {
    NodeTicket {
        endpoint_id: member.endpoint_id,
        addrs: member.addrs.clone(),
    }
}

impl NodeState {
    /// Serves one client request from a caller whose access [`NodeState::authorize`] has
    /// already checked against what the request needs (blobs named by hash included): each
    /// service's handler answers its own requests; listings are filtered per item
    /// afterwards.
    pub async fn handle_client(
        &self,
        request: ClientRequest,
        access: &auth::Access<'_>,
        recv: iroh::endpoint::RecvStream,
    ) -> ClientResponse {
        let result = match request {
            ClientRequest::Kv(r) => self.kv.handle(r, access).await.map(ClientResponse::Kv),
            ClientRequest::Cluster(r) => self
                .handle_cluster(r, access)
                .await
                .map(ClientResponse::Cluster),
            ClientRequest::Doc(r) => self.docs.handle(r).await.map(ClientResponse::Doc),
            ClientRequest::Blob(r) => self.blobs.handle(r, recv).await.map(ClientResponse::Blob),
            ClientRequest::Ns(r) => self.namespaces.handle(r).await.map(ClientResponse::Ns),
            ClientRequest::Auth(r) => self.auth.handle(r, access).await.map(ClientResponse::Auth),
            ClientRequest::Fed(r) => self.fed.handle(r).await.map(ClientResponse::Fed),
        };
        match result {
            Ok(response) => auth::filter_listing(response, access),
            Err(e) => ClientResponse::Error(e),
        }
    }
}

impl NodeState {
    /// Whether `remote` may send this node Raft traffic: a member, or (while this node
    /// belongs to no cluster) a caller that introduced itself for the cluster it expects.
    pub fn is_raft_peer(&self, remote: &EndpointId) -> bool {
        let membership = self.cluster.membership();
        let mut nodes = membership.membership().nodes().peekable();
        if nodes.peek().is_none() {
            return self.admission.is_introduced(remote.as_bytes());
        }
        nodes.any(|(_, m)| m.endpoint_id == *remote.as_bytes())
    }

    /// Whether this node belongs to a cluster (its membership is not empty).
    pub fn is_initialized(&self) -> bool {
        let membership = self.cluster.membership();
        let initialized = membership.membership().nodes().next().is_some();
        initialized
    }

    /// Receives a snapshot from member `remote`: the `bytes` bytes that follow its header on
    /// `body`, into a new file of the state machine's, then installs it through openraft.
    /// The file is removed unless it was installed.
    pub async fn receive_snapshot(
        &self,
        remote: EndpointId,
        vote: aspen_kv::raft_types::Vote,
        meta: aspen_kv::raft_types::SnapshotMeta,
        bytes: u64,
        body: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> RaftResponse {
        use tokio::io::AsyncReadExt;
        if !self.is_raft_peer(&remote) {
            return RaftResponse::Refused(format!(
                "{} is not a member of this cluster",
                remote.fmt_short()
            ));
        }
        let mut file = match self.cluster.sm.begin_receiving_snapshot().await {
            Ok(file) => file,
            Err(e) => return RaftResponse::InstallSnapshot(Err(e.to_string())),
        };
        let path = file.path().to_path_buf();
        let copied = tokio::io::copy(&mut body.take(bytes), &mut file).await;
        let result = match copied {
            Ok(n) if n == bytes => self
                .cluster
                .raft
                .install_full_snapshot(
                    vote,
                    aspen_kv::raft_types::Snapshot {
                        meta,
                        snapshot: file,
                    },
                )
                .await
                .map_err(|e| e.to_string()),
            Ok(n) => Err(format!("the snapshot ended after {n} of {bytes} bytes")),
            Err(e) => Err(format!("receiving the snapshot: {e}")),
        };
        // Installed, the file was moved into place; otherwise it is of no use.
        if let Err(e) = tokio::fs::remove_file(&path).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
        RaftResponse::InstallSnapshot(result)
    }

    /// Serves one node-to-node request from `remote` (`Peers::serve` has checked that it is
    /// a member or introduced, or that this is an `Introduce` from a stranger to a node that
    /// belongs to no cluster).
    pub async fn handle_raft(&self, remote: EndpointId, request: RaftRequest) -> RaftResponse {
        // An Arc of the current membership: no copy on this hot path.
        let membership = self.cluster.membership();
        let members = membership.membership();
        let initialized = members.nodes().next().is_some();
        if let RaftRequest::Introduce {
            certificate,
            secret,
        } = &request
        {
            if initialized {
                // A member of a cluster already: introductions change nothing.
                return RaftResponse::Introduced;
            }
            return match self.admission.introduce(
                remote.as_bytes(),
                certificate,
                secret.as_ref(),
                identity::unix_now(),
            ) {
                Ok(cluster) => {
                    if let (Some(_), Some(dir)) = (secret, self.admission.dir()) {
                        // Durable before the introducer goes on to make this node a member.
                        let dir = dir.to_path_buf();
                        let saved = tokio::task::spawn_blocking(move || {
                            admission::save_joining(&dir, &cluster)
                        })
                        .await;
                        let failure = match saved {
                            Ok(Ok(())) => None,
                            Ok(Err(e)) => Some(e.to_string()),
                            Err(e) => Some(e.to_string()),
                        };
                        if let Some(e) = failure {
                            tracing::error!("cannot record the cluster being joined: {e}");
                            return RaftResponse::Refused(format!(
                                "introduction not recorded: {e}"
                            ));
                        }
                    }
                    tracing::info!(peer = %remote.fmt_short(), %cluster, "introduced: taking raft traffic from this cluster");
                    RaftResponse::Introduced
                }
                Err(e) => {
                    tracing::warn!(peer = %remote.fmt_short(), "introduction refused: {e}");
                    RaftResponse::Refused(format!("introduction refused: {e}"))
                }
            };
        }
        if !self.is_raft_peer(&remote) {
            return if initialized {
                RaftResponse::Refused(format!(
                    "{} is not a member of this cluster",
                    remote.fmt_short()
                ))
            } else {
                RaftResponse::NotIntroduced
            };
        }
        match request {
            RaftRequest::Introduce { .. } => RaftResponse::Introduced,
            RaftRequest::AppendEntries(rpc)
                if !initialized
                    && !rpc.entries.is_empty()
                    && self.cluster.test_fault == Some(TestFault::CrashBeforeFirstEntry) =>
            {
                tracing::warn!("test fault: exiting before storing the first log entries");
                std::process::exit(137)
            }
            RaftRequest::AppendEntries(rpc) => RaftResponse::AppendEntries(
                self.cluster
                    .raft
                    .append_entries(rpc)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            RaftRequest::Vote(rpc) => {
                RaftResponse::Vote(self.cluster.raft.vote(rpc).await.map_err(|e| e.to_string()))
            }
            RaftRequest::InstallSnapshot { .. } => {
                // `Peers::serve` hands a snapshot, which comes with its bytes, to
                // `receive_snapshot`; this is a header without them.
                RaftResponse::Refused("a snapshot header without its bytes".into())
            }
            RaftRequest::Forward(commands) => {
                RaftResponse::Forward(match ClusterHandle::validate(&commands, false) {
                    Err(e) => Err(e),
                    Ok(()) => self.cluster.propose_here(commands).await,
                })
            }
            RaftRequest::ReadIndex => RaftResponse::ReadIndex(self.cluster.read_index().await),
            RaftRequest::Lease(call) => RaftResponse::Lease(if self.cluster.is_leader() {
                self.cluster.lease_call_here(call).await
            } else {
                Err(self.cluster.not_leader())
            }),
            RaftRequest::Hello(member) => {
                if member.endpoint_id != *remote.as_bytes() {
                    return RaftResponse::Refused("hello for another node's key".into());
                }
                if member.addrs.len() > aspen_client::ticket::MAX_ADDRS_PER_NODE {
                    return RaftResponse::Refused(format!(
                        "{} addresses exceed the limit of {}",
                        member.addrs.len(),
                        aspen_client::ticket::MAX_ADDRS_PER_NODE
                    ));
                }
                let id = node_id_of(&member.endpoint_id);
                if self.cluster.is_leader()
                    && members
                        .get_node(&id)
                        .is_some_and(|m| m.addrs != member.addrs)
                {
                    self.update_address(id, member);
                }
                RaftResponse::Hello
            }
        }
    }

    /// Leader: records a member's new addresses in the membership (replicated).
    fn update_address(&self, id: NodeId, member: Member) {
        let raft = self.cluster.raft.clone();
        tokio::spawn(async move {
            tracing::info!(node = format!("{id:016x}"), addrs = ?member.addrs, "member moved; updating membership");
            let change = ChangeMembers::SetNodes(BTreeMap::from([(id, member)]));
            if let Err(e) = raft.change_membership(change, false).await {
                tracing::warn!("could not record new address of {id:016x}: {e}");
            }
        });
    }
}

/// Keeps `cluster.ticket` equal to the current membership while this node is a member.
async fn keep_cluster_ticket(state: Arc<NodeState>, dir: PathBuf) {
    // Server metrics: woken by membership and role changes, not by every apply.
    let mut metrics = state.cluster.raft.server_metrics();
    let mut written = String::new();
    let mut seen = None;
    loop {
        let mut failed = false;
        let membership = metrics.borrow_and_update().membership_config.clone();
        let m = membership.membership();
        // The role or leader can change without the membership.
        if seen != Some(*membership.log_id()) && m.get_node(&state.cluster.id).is_some() {
            seen = Some(*membership.log_id());
            let mut ids: Vec<NodeId> = m.voter_ids().collect();
            ids.extend(m.learner_ids());
            let members = ids
                .iter()
                .filter_map(|id| m.get_node(id))
                .map(ticket_of)
                .collect();
            let ticket = ClusterTicket { members }.to_string();
            if ticket != written {
                match write_atomically(dir.join(CLUSTER_TICKET_FILE), ticket.clone()).await {
                    Ok(()) => written = ticket,
                    Err(e) => {
                        seen = None; // Try again on the next change, or after a pause.
                        failed = true;
                        tracing::warn!("{e}")
                    }
                }
            }
        }
        // A failed write is tried again after a pause: server metrics may not change again
        // for a long time.
        let pause = if failed { TICKET_RETRY } else { Duration::MAX };
        if let Ok(Err(_)) = tokio::time::timeout(pause, metrics.changed()).await {
            return;
        }
    }
}

/// After a restart on new addresses, tells the members where we are until the membership
/// records it.
async fn announce_address(state: Arc<NodeState>) {
    let mut tick = tokio::time::interval(ADDRESS_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        // The *committed* membership: an address change this node appended as leader but
        // that a new leader never received does not count (the others would keep dialling
        // the old address and this node would stop announcing itself).
        let id = state.cluster.id;
        let committed = state
            .cluster
            .raft
            .with_raft_state(move |s| s.membership_state.committed().get_node(&id).cloned())
            .await;
        let Ok(Some(recorded)) = committed else {
            continue;
        };
        if recorded.addrs == state.cluster.me.addrs {
            continue;
        }
        let members = state.cluster.members();
        if state.cluster.is_leader() {
            state.update_address(state.cluster.id, state.cluster.me.clone());
            continue;
        }
        for (id, member) in members.iter().filter(|(id, _)| **id != state.cluster.id) {
            let hello = RaftRequest::Hello(state.cluster.me.clone());
            if let Err(e) = state
                .cluster
                .peers
                .call(member, &hello, Duration::from_secs(3))
                .await
            {
                tracing::debug!("hello to {id:016x} failed: {e}");
            }
        }
    }
}

/// `aspen/raft/2`: adopts member connections into the pool.
#[derive(Debug)]
struct RaftService {
    peers: Arc<Peers>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Peers")
    }
}

impl ProtocolHandler for RaftService {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        self.peers.adopt(conn);
        Ok(())
    }
}

/// Most client connections one key may hold open on a node at once; the next one is closed
/// as soon as it is accepted (a client needs one per member, the load generator `--conns`).
pub const MAX_CONNECTIONS_PER_KEY: usize = 64;
/// QUIC application close code of a connection over [`MAX_CONNECTIONS_PER_KEY`].
pub const CLOSE_TOO_MANY_CONNECTIONS: u32 = 0x10;

/// `aspen/client/2`: one request per bi-stream.
struct ClientService {
    state: Arc<NodeState>,
    open: Arc<ConnectionCounts>,
}

/// Open connections per caller key, up to a limit.
struct ConnectionCounts {
    limit: usize,
    open: std::sync::Mutex<std::collections::HashMap<[u8; 32], usize>>,
}

impl Default for ConnectionCounts {
    fn default() -> Self {
        ConnectionCounts::with_limit(MAX_CONNECTIONS_PER_KEY)
    }
}

/// One counted connection; gives its slot back when dropped.
struct ConnectionSlot {
    counts: Arc<ConnectionCounts>,
    key: [u8; 32],
}

impl ConnectionCounts {
    fn with_limit(limit: usize) -> Self {
        ConnectionCounts {
            limit,
            open: Default::default(),
        }
    }

    fn take(self: &Arc<Self>, key: [u8; 32]) -> Option<ConnectionSlot> {
        let mut open = self.open.lock().expect("lock");
        let n = open.entry(key).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            counts: self.clone(),
            key,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().expect("lock");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl std::fmt::Debug for ClientService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientService")
    }
}

impl ProtocolHandler for ClientService {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        // The caller is the key the QUIC handshake proved, for the whole connection.
        let key = *conn.remote_id().as_bytes();
        let Some(_slot) = self.open.take(key) else {
            tracing::debug!(caller = %hex::encode(key), "too many connections from one key");
            conn.close(
                CLOSE_TOO_MANY_CONNECTIONS.into(),
                b"too many connections from this key",
            );
            return Ok(());
        };
        let caller = Arc::new(auth::Caller::new(key));
        // Watches open on this connection (all its watch streams together).
        let watches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let state = self.state.clone();
            let caller = caller.clone();
            let watches = watches.clone();
            tokio::spawn(async move {
                // A stream that never delivers its request is dropped (keep-alives would
                // otherwise keep it open for as long as the caller likes).
                let read = tokio::time::timeout(
                    REQUEST_READ_TIMEOUT,
                    read_frame::<ClientRequest>(&mut recv, MAX_CLIENT_FRAME),
                );
                let (op, arrived) = ("bad_request", std::time::Instant::now());
                let (op, response) = match read.await {
                    Ok(Ok(request @ ClientRequest::Kv(aspen_client::KvRequest::Watches))) => {
                        // A watch stream keeps the stream; each watch on it is authorized
                        // as it is created.
                        match state.authorize(&request, &caller).await {
                            Ok(_) => {
                                // On the watch thread; stopped if this task is dropped.
                                let serving = watch::AbortOnDropHandle::new(
                                    watch::spawn_watch_task(watch::serve_watches(
                                        state.clone(),
                                        caller,
                                        watches,
                                        send,
                                        recv,
                                    )),
                                );
                                let _ = serving.await;
                                return;
                            }
                            Err(e) => ("kv_watches", ClientResponse::Error(e)),
                        }
                    }
                    Ok(Ok(request)) => {
                        let op = request.operation();
                        (op, state.serve_client(request, &caller, recv).await)
                    }
                    Ok(Err(e)) => (
                        op,
                        ClientResponse::Error(RpcError::BadRequest(format!("bad frame: {e}"))),
                    ),
                    Err(_) => (
                        op,
                        ClientResponse::Error(RpcError::BadRequest(format!(
                            "no complete request within {REQUEST_READ_TIMEOUT:?}"
                        ))),
                    ),
                };
                state
                    .cluster
                    .metrics
                    .served(op, arrived.elapsed(), &response);
                if let Err(e) = write_frame(&mut send, &response, MAX_CLIENT_FRAME).await {
                    tracing::debug!("cannot answer client: {e}");
                }
                let _ = send.finish();
            });
        }
        Ok(())
    }
}

impl NodeState {
    /// After a denial: catches up with the leader (a read barrier, coalesced with other
    /// reads) and reloads the policy if an `auth/` write applied since it was loaded.
    /// Strangers are denied here, so its wait for an election is bounded node-wide
    /// ([`cluster::ClusterHandle::read_barrier_for_stranger`]).
    async fn catch_up_policy(&self) -> Result<(), RpcError> {
        self.cluster.read_barrier_for_stranger().await?;
        if self.auth.is_stale() {
            self.auth.reload_policy().await?;
        }
        Ok(())
    }

    /// Authorizes one client request (the one place the client protocol checks access),
    /// then serves it.
    async fn serve_client(
        &self,
        request: ClientRequest,
        caller: &auth::Caller,
        recv: iroh::endpoint::RecvStream,
    ) -> ClientResponse {
        if let Err(e) = self.authorize(&request, caller).await {
            return ClientResponse::Error(e);
        }
        crate::busy_poll::touch();
        let access = self
            .auth
            .access(caller, self.cluster.member_keys(), identity::unix_now());
        let response = self.handle_client(request, &access, recv).await;
        // The caller's next request is likely on its way.
        crate::busy_poll::touch();
        response
    }

    /// Checks that `caller` may make `request`, catching up with the leader's policy once
    /// before refusing. Blobs named by hash are readable through some tag that names them,
    /// which the blob index (replicated state too) decides.
    async fn authorize(
        &self,
        request: &ClientRequest,
        caller: &auth::Caller,
    ) -> Result<(), RpcError> {
        let needs = auth::needs(request);
        let decide = || async {
            let access = self
                .auth
                .access(caller, self.cluster.member_keys(), identity::unix_now());
            let blob_hashes = access.check(&needs)?;
            self.blobs.check_readable(&access, &blob_hashes).await
        };
        match decide().await {
            // The policy and the blob index here may lag behind what the cluster committed
            // (a grant or a tag made through another member, or entries replayed after a
            // restart): catch up, then decide. Decide again even if nothing was reloaded
            // here: the background reload (an `auth/` write applied) may have put a newer
            // policy in force meanwhile.
            Err(RpcError::PermissionDenied { .. }) => match self.catch_up_policy().await {
                Err(e) => Err(RpcError::Unavailable(format!(
                    "cannot confirm the access policy with the leader ({e}); retry"
                ))),
                Ok(()) => decide().await,
            },
            other => other,
        }
    }
}
