//! A running Aspen node: the iroh endpoint, Raft over iroh, and the client service.
//!
//! ```text
//!  clients ──aspen/client/1──▶ ClientService ─┬─ writes ──▶ Proposer (batching) ──▶ Raft (leader)
//!                                            │             └─ or Forward ──▶ leader over aspen/raft/1
//!                                            └─ reads ───▶ read barrier (ReadIndex) ──▶ state machine
//!  members ─aspen/raft/1──▶ Peers (one connection per peer, both directions) ──▶ Raft RPCs
//! ```

mod admission;
pub mod auth;
pub mod blobs;
mod corrupt_blobs;
mod docs;
mod gate;
pub mod identity;
pub mod namespaces;
mod peers;
mod proposer;
pub mod publisher;
pub mod raft_protocol;
mod read_index;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aspen_client::protocol::{
    ClientRequest, ClientResponse, ClusterStatus, Consistency, MemberStatus, RpcError, CLIENT_ALPN,
    MAX_CLIENT_FRAME,
};
use aspen_client::ticket::node_id_of;
use aspen_client::wire::{read_frame, write_frame};
use aspen_client::{ClusterTicket, NodeTicket};
use aspen_kv::api::{Command, CommandResult};
use aspen_kv::limits::MAX_BATCH_COMMANDS;
use aspen_kv::{Member, NodeId, Raft, StateMachineStore};
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use iroh::{Endpoint, EndpointId, SecretKey};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::ChangeMembers;

use crate::config::{NodeConfig, TestFault};
use peers::{Peers, RaftNetworkOverIroh};
use proposer::{ProposeError, Proposer};
use raft_protocol::{RaftRequest, RaftResponse, RAFT_ALPN};
use read_index::ReadIndexBatcher;

/// File the node writes its own ticket to once it listens.
pub const NODE_TICKET_FILE: &str = "node.ticket";
/// File the node keeps the cluster's ticket in while it is a member.
pub const CLUSTER_TICKET_FILE: &str = "cluster.ticket";

/// How long a linearizable read or a forwarded call may wait for the leader.
const LEADER_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node checks that the membership records its current addresses.
const ADDRESS_CHECK_INTERVAL: Duration = Duration::from_secs(2);

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
}

/// Most members one `SetNetFaults` may isolate a node from (a cluster has at most 7).
const MAX_ISOLATED: usize = 16;

/// Everything a node's handlers share.
pub struct NodeState {
    pub id: NodeId,
    pub me: Member,
    pub raft: Raft,
    pub sm: StateMachineStore,
    peers: Arc<Peers>,
    proposer: Proposer,
    reads: ReadIndexBatcher,
    test_fault: Option<TestFault>,
    allow_fault_injection: bool,
    /// The cluster secret key, once applied (it never changes afterwards).
    cluster_secret: std::sync::OnceLock<aspen_trust::ClusterSecretKey>,
    /// Wakes the record publisher when what the record says may have changed.
    identity_changed: tokio::sync::Notify,
    /// Documents being compacted by this node.
    compactions: docs::Compactions,
    /// Automerge documents loaded on this node, kept between requests.
    doc_cache: Arc<aspen_crdt::cache::DocCache>,
    /// The node's blob store and replication state.
    pub blobs: blobs::BlobService,
    /// The node's iroh-docs engine (replicas of the cluster's namespaces).
    pub namespaces: namespaces::NamespaceService,
    /// The access-control policy this node enforces (grants, roles, revoked tokens).
    pub auth: auth::AuthService,
    /// Whom this node takes Raft traffic from before it is a member.
    admission: admission::Admission,
}

/// One leadership confirmation (ReadIndex) through openraft.
async fn confirm_read_index(raft: Raft) -> Result<Option<u64>, RpcError> {
    match raft.get_read_log_id().await {
        Ok((read, _applied)) => Ok(read.map(|l| l.index)),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
            Err(RpcError::NotLeader { leader: None })
        }
        Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => Err(
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
        let endpoint = bind_endpoint(&dir, config.bind, secret, &gate).await?;
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
        let (docs_protect, docs_protect_cb) = iroh_docs::engine::ProtectCallbackHandler::new();
        let blobs = blobs::BlobService::open(
            &dir.join("blobs"),
            sm.clone(),
            endpoint.clone(),
            &config.blobs,
            Some(docs_protect_cb),
        )
        .await
        .map_err(StartError::Blobs)?;
        let namespaces = namespaces::NamespaceService::start(
            &dir.join("namespaces"),
            endpoint.clone(),
            (*blobs.store).clone(),
            docs_protect,
        )
        .await
        .map_err(StartError::Blobs)?;
        let proposer = Proposer::spawn(raft.clone(), sm.clone());
        let reads = {
            let raft = raft.clone();
            ReadIndexBatcher::spawn(move || confirm_read_index(raft.clone()))
        };
        let state = Arc::new(NodeState {
            id,
            me,
            raft,
            sm,
            peers: peers.clone(),
            proposer,
            reads,
            test_fault: config.test_fault,
            allow_fault_injection: config.allow_fault_injection,
            cluster_secret: Default::default(),
            identity_changed: Default::default(),
            compactions: Default::default(),
            doc_cache: Default::default(),
            blobs,
            namespaces,
            auth: Default::default(),
            admission: admission::Admission::new(bootstrap_secret, config.join),
        });
        peers.set_node(Arc::downgrade(&state));
        let _ = gate.node.set(Arc::downgrade(&state));
        // The policy is in force before the first request is served.
        let auth_changes = state.sm.watch_system_prefix(auth::AUTH_PREFIX);
        state.auth.watch(auth_changes.clone());
        state
            .reload_policy()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;

        let router = Router::builder(endpoint.clone()).accept(RAFT_ALPN, RaftService { peers });
        let router = if config.test_fault == Some(TestFault::CorruptBlobSends) {
            router.accept(
                iroh_blobs::ALPN,
                corrupt_blobs::CorruptingProvider {
                    store: (*state.blobs.store).clone(),
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
            .accept(iroh_docs::ALPN, state.namespaces.docs.clone())
            .accept(
                CLIENT_ALPN,
                ClientService {
                    state: state.clone(),
                },
            )
            .spawn();

        let ticket = state.node_ticket();
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
        let tasks = vec![
            tokio::spawn(keep_cluster_ticket(state.clone(), dir.clone())),
            tokio::spawn(announce_address(state.clone())),
            tokio::spawn(publisher::run(state.clone(), dht.clone(), timing)),
            tokio::spawn(blobs::run_replication(state.clone())),
            tokio::spawn(namespaces::run_sync(state.clone())),
            tokio::spawn(namespaces::run_content_repair(state.clone())),
            tokio::spawn(auth::run_policy_reload(state.clone(), auth_changes)),
        ];
        tracing::info!(node = format!("{id:016x}"), addrs = ?state.me.addrs, "node listening");
        Ok(RunningNode {
            state,
            dht,
            router,
            tasks,
        })
    }

    pub fn node_ticket(&self) -> NodeTicket {
        self.state.node_ticket()
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
        let _ = self.state.raft.shutdown().await;
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
            if let Ok(ep) = node_endpoint(again, secret.clone(), gate).await {
                return Ok(ep);
            }
            tracing::info!("previous port {port} is taken; binding a new one");
        }
    }
    Ok(node_endpoint(bind, secret, gate).await?)
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
    pub fn node_ticket(&self) -> NodeTicket {
        ticket_of(&self.me)
    }

    fn members(&self) -> BTreeMap<NodeId, Member> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    }

    /// The node keys of the current members (no copy of their addresses).
    pub fn member_keys(&self) -> Vec<[u8; 32]> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let keys = m.membership().nodes().map(|(_, n)| n.endpoint_id).collect();
        keys
    }

    /// Whether the membership includes this node.
    pub fn is_member(&self) -> bool {
        self.members().contains_key(&self.id)
    }

    fn leader(&self) -> Option<(NodeId, Member)> {
        let metrics = self.raft.metrics().borrow().clone();
        let id = metrics.current_leader?;
        let member = metrics
            .membership_config
            .membership()
            .get_node(&id)?
            .clone();
        Some((id, member))
    }

    fn not_leader(&self) -> RpcError {
        RpcError::NotLeader {
            leader: self.leader().map(|(_, m)| ticket_of(&m)),
        }
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Proposes writes through the leader: locally if we lead, else forwarded once.
    async fn propose(&self, commands: Vec<Command>) -> Result<Vec<CommandResult>, RpcError> {
        if self.is_leader() {
            match self.proposer.propose(commands.clone()).await {
                Err(ProposeError::NotLeader(_)) => {} // Lost leadership meanwhile: forward below.
                other => return other.map_err(RpcError::from),
            }
        }
        match self.call_leader(RaftRequest::Forward(commands)).await? {
            RaftResponse::Forward(r) => r,
            other => Err(RpcError::Internal(format!(
                "unexpected forward response {other:?}"
            ))),
        }
    }

    /// One call to the leader (from a follower). Gives up as soon as this node sees the
    /// leadership change (the leader died or was deposed): the client retries against the
    /// new leader instead of waiting out the call's timeout.
    async fn call_leader(&self, request: RaftRequest) -> Result<RaftResponse, RpcError> {
        let Some((leader, member)) = self.leader() else {
            return Err(RpcError::Unavailable(
                "no leader (election in progress)".into(),
            ));
        };
        if leader == self.id {
            return Err(RpcError::Unavailable("leadership changing; retry".into()));
        }
        let mut metrics = self.raft.metrics();
        let leader_changed = async move {
            loop {
                if metrics.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if metrics.borrow().current_leader != Some(leader) {
                    return;
                }
            }
        };
        tokio::select! {
            r = self.peers.call(&member, &request, LEADER_CALL_TIMEOUT) => {
                r.map_err(|e| RpcError::Unavailable(format!("leader unreachable: {e}")))
            }
            _ = leader_changed => Err(RpcError::Unavailable(format!(
                "leader {leader:016x} was replaced while serving this request; retry"
            ))),
        }
    }

    /// Waits until this node's state machine reflects every write acknowledged before the
    /// call began (ReadIndex through the leader).
    async fn read_barrier(&self) -> Result<(), RpcError> {
        if self.test_fault == Some(TestFault::StaleReads) {
            return Ok(());
        }
        let index = if self.is_leader() {
            self.read_index().await?
        } else {
            match self.call_leader(RaftRequest::ReadIndex).await? {
                RaftResponse::ReadIndex(r) => r?,
                other => {
                    return Err(RpcError::Internal(format!(
                        "unexpected read-index response {other:?}"
                    )))
                }
            }
        };
        // Usually applied already: skip openraft's waiter (it clones metrics per check).
        let applied = self
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index);
        if let Some(index) = index.filter(|i| applied < Some(*i)) {
            self.raft
                .wait(Some(LEADER_CALL_TIMEOUT))
                .applied_index_at_least(Some(index), "read barrier")
                .await
                .map_err(|e| {
                    RpcError::Unavailable(format!("waiting to apply index {index}: {e}"))
                })?;
        }
        Ok(())
    }

    /// Leader only: a read index confirmed with a quorum after this call began (concurrent
    /// callers share confirmation rounds).
    async fn read_index(&self) -> Result<Option<u64>, RpcError> {
        match self.reads.read_index().await {
            Err(RpcError::NotLeader { .. }) => Err(self.not_leader()),
            other => other,
        }
    }

    async fn status(&self) -> Result<ClusterStatus, RpcError> {
        let metrics = self.raft.metrics().borrow().clone();
        let committed = self
            .raft
            .with_raft_state(|st| st.committed.map(|l| l.index))
            .await
            .unwrap_or(None);
        let store = self.sm.status().await?;
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, m)| MemberStatus {
                node_id: *id,
                node: ticket_of(m),
                voter: voters.contains(id),
            })
            .collect::<Vec<_>>();
        Ok(ClusterStatus {
            node_id: self.id,
            initialized: !members.is_empty(),
            leader: metrics.current_leader,
            term: metrics.current_term,
            commit_index: committed,
            applied_index: metrics.last_applied.map(|l| l.index),
            last_log_index: metrics.last_log_index,
            snapshot_index: metrics.snapshot.map(|l| l.index),
            revision: store.revision,
            compacted_revision: store.compacted,
            members,
        })
    }

    /// Checks a batch of writes; `from_client`: refuse system writes (only members may).
    fn validate(commands: &[Command], from_client: bool) -> Result<(), RpcError> {
        if from_client && commands.iter().any(|c| c.op.is_system()) {
            return Err(RpcError::BadRequest(
                "the system key space cannot be written by clients".into(),
            ));
        }
        if commands.is_empty() {
            return Err(RpcError::BadRequest("no commands".into()));
        }
        if commands.len() > MAX_BATCH_COMMANDS {
            return Err(RpcError::BadRequest(format!(
                "{} commands exceed the limit of {MAX_BATCH_COMMANDS}",
                commands.len()
            )));
        }
        for c in commands {
            c.op.validate()?;
        }
        Ok(())
    }

    /// Serves one client request from a caller whose access [`auth::Access::check`] has
    /// already checked against what the request needs; listings are filtered per item here.
    pub async fn handle_client(
        &self,
        request: ClientRequest,
        access: &auth::Access<'_>,
        blob_hashes: Vec<[u8; 32]>,
    ) -> ClientResponse {
        if let Err(e) = self.check_blob_hashes(access, &blob_hashes).await {
            return ClientResponse::Error(e);
        }
        let result = match request {
            ClientRequest::Write { commands } => match Self::validate(&commands, true) {
                Err(e) => Err(e),
                Ok(()) => self
                    .propose(commands)
                    .await
                    .map(|results| ClientResponse::Write { results }),
            },
            ClientRequest::Range {
                request,
                consistency,
            } => {
                async {
                    request.validate()?;
                    if consistency == Consistency::Linearizable {
                        self.read_barrier().await?;
                    }
                    Ok(ClientResponse::Range(self.sm.range(request).await?))
                }
                .await
            }
            ClientRequest::Status => self.status().await.map(ClientResponse::Status),
            ClientRequest::InitCluster
            | ClientRequest::InitNamedCluster { .. }
            | ClientRequest::AddMember { .. } => Err(RpcError::BadRequest(
                "this request carries no proof of who may claim the node; \
                 use `Init`/`Admit` with the node's bootstrap secret (aspen >= protocol 2)"
                    .into(),
            )),
            ClientRequest::Init { name, secret } => {
                self.init_with_secret(&name, &secret, access).await
            }
            ClientRequest::Admit { node, secret } => self.add_member(node, Some(secret)).await,
            ClientRequest::PresentToken { token } => self.present_token(&token, access),
            ClientRequest::WhoAmI => Ok(self.whoami(access)),
            ClientRequest::AuthGrant {
                key,
                roles,
                permissions,
            } => self.auth_grant(key, roles, permissions).await,
            ClientRequest::AuthRevoke {
                key,
                roles,
                permissions,
                all,
            } => self.auth_revoke(key, roles, permissions, all).await,
            ClientRequest::RoleCreate { name, permissions } => {
                self.role_create(name, permissions).await
            }
            ClientRequest::AuthList => Ok(ClientResponse::AuthList(self.auth.policy().listing())),
            ClientRequest::TokenRevoke { token } => self.token_revoke(&token, access).await,
            ClientRequest::Recover { secret } => self.recover_admin(&secret, access).await,
            ClientRequest::Identity => self.identity().await,
            ClientRequest::CreateInvite { valid_for_secs } => {
                self.create_invite(valid_for_secs).await
            }
            ClientRequest::Join { node, invite } => {
                if node.endpoint_id != access.key {
                    Err(RpcError::BadRequest(
                        "join refused: an invitation is used by the joining node itself \
                         (the ticket's key must be the caller's)"
                            .into(),
                    ))
                } else {
                    self.join(node, invite).await
                }
            }
            ClientRequest::RemoveMember { node_id } => self.remove_member(node_id).await,
            ClientRequest::SetNetFaults(faults) => {
                if faults.drop_per_mille > 1000 || faults.isolate_from.len() > MAX_ISOLATED {
                    Err(RpcError::BadRequest(format!(
                        "drop_per_mille is at most 1000 and isolate_from names at most \
                         {MAX_ISOLATED} members (got {} and {})",
                        faults.drop_per_mille,
                        faults.isolate_from.len()
                    )))
                } else if self.allow_fault_injection {
                    tracing::warn!(?faults, "injected network faults");
                    self.peers.set_faults(faults);
                    Ok(ClientResponse::Done)
                } else {
                    Err(RpcError::BadRequest(
                        "fault injection is not enabled on this node".into(),
                    ))
                }
            }
            ClientRequest::StateDigest => self
                .sm
                .state_digest()
                .await
                .map(ClientResponse::StateDigest)
                .map_err(RpcError::from),
            ClientRequest::DocCreate { name, incarnation } => {
                self.doc_create(name, incarnation).await
            }
            ClientRequest::DocChange { name, changes } => self.doc_change(name, changes).await,
            ClientRequest::DocGet { name, consistency } => self.doc_get(name, consistency).await,
            ClientRequest::DocList {
                start_after,
                limit,
                consistency,
            } => self
                .doc_list(start_after, limit, consistency)
                .await
                .map(|r| auth::filter_listing(r, access)),
            ClientRequest::DocDelete { name } => self.doc_delete(name).await,
            ClientRequest::BlobAdd { .. } => Err(RpcError::BadRequest(
                "BlobAdd must be followed by the blob's bytes on its stream".into(),
            )),
            ClientRequest::BlobStat { hash, consistency } => {
                self.blob_stat(hash, consistency).await
            }
            ClientRequest::BlobList {
                start_after,
                limit,
                consistency,
            } => self
                .blob_list(start_after, limit, consistency)
                .await
                .map(|r| auth::filter_listing(r, access)),
            ClientRequest::BlobTag { tag, hash } => self.blob_tag(tag, hash).await,
            ClientRequest::BlobUntag { tag } => self.blob_untag(tag).await,
            ClientRequest::BlobStats => self.blob_stats().await,
            ClientRequest::NsCreate => self.ns_create().await,
            ClientRequest::NsSet {
                namespace,
                key,
                value,
            } => self.ns_set(namespace, key, value).await,
            ClientRequest::NsGet { namespace, key } => self.ns_get(namespace, key).await,
            ClientRequest::NsList {
                namespace,
                prefix,
                limit,
            } => self.ns_list(namespace, prefix, limit).await,
            ClientRequest::NsNamespaces => self
                .ns_namespaces()
                .await
                .map(|r| auth::filter_listing(r, access)),
            ClientRequest::NsShare { namespace, write } => self.ns_share(namespace, write).await,
            ClientRequest::NsImport { ticket } => self.ns_import(ticket).await,
        };
        result.unwrap_or_else(ClientResponse::Error)
    }

    async fn init_cluster(&self, name: &str) -> Result<ClientResponse, RpcError> {
        if !self.members().is_empty() {
            return Err(RpcError::AlreadyInitialized);
        }
        if name.len() > aspen_trust::MAX_NAME_BYTES {
            return Err(RpcError::BadRequest(format!(
                "cluster name is {} bytes; the limit is {}",
                name.len(),
                aspen_trust::MAX_NAME_BYTES
            )));
        }
        let members = BTreeMap::from([(self.id, self.me.clone())]);
        self.raft.initialize(members).await.map_err(|e| match e {
            RaftError::APIError(openraft::error::InitializeError::NotAllowed(_)) => {
                RpcError::AlreadyInitialized
            }
            other => RpcError::Internal(other.to_string()),
        })?;
        self.raft
            .wait(Some(LEADER_CALL_TIMEOUT * 2))
            .current_leader(self.id, "init")
            .await
            .map_err(|e| RpcError::Unavailable(format!("not elected after init: {e}")))?;
        self.ensure_identity().await?;
        if !name.is_empty() {
            self.set_cluster_name(name).await?;
        }
        self.status().await.map(ClientResponse::Status)
    }

    fn require_leader(&self) -> Result<(), RpcError> {
        if self.members().is_empty() {
            return Err(RpcError::NotInitialized);
        }
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        Ok(())
    }

    /// Adds `node`: introduces this leader to it (with the node's bootstrap secret when the
    /// operator gave one; a node joining by invitation expects this cluster already), then
    /// learner, then voter.
    async fn add_member(
        &self,
        node: NodeTicket,
        secret: Option<[u8; 32]>,
    ) -> Result<ClientResponse, RpcError> {
        self.require_leader()?;
        if node.addrs.len() > aspen_client::ticket::MAX_ADDRS_PER_NODE {
            return Err(RpcError::BadRequest(format!(
                "{} addresses exceed the limit of {}",
                node.addrs.len(),
                aspen_client::ticket::MAX_ADDRS_PER_NODE
            )));
        }
        EndpointId::from_bytes(&node.endpoint_id)
            .map_err(|e| RpcError::BadRequest(format!("bad node key: {e}")))?;
        let id = node.node_id();
        let member = Member {
            endpoint_id: node.endpoint_id,
            addrs: node.addrs,
        };
        if let Some(existing) = self.members().get(&id) {
            if existing.endpoint_id != member.endpoint_id {
                return Err(RpcError::Membership(format!(
                    "node id {id:016x} is taken by another key"
                )));
            }
        }
        if !self.members().contains_key(&id) {
            self.introduce_to(&member, secret).await?;
        }
        // Catch the new node up as a learner first, so it never slows down the quorum.
        self.raft
            .add_learner(id, member, true)
            .await
            .map_err(|e| self.membership_error(e))?;
        let voters: BTreeSet<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .chain([id])
            .collect();
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| self.membership_error(e))?;
        Ok(ClientResponse::Done)
    }

    async fn remove_member(&self, node_id: NodeId) -> Result<ClientResponse, RpcError> {
        self.require_leader()?;
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let membership = membership.membership();
        if membership.get_node(&node_id).is_none() {
            return Err(RpcError::BadRequest(format!(
                "node {node_id:016x} is not a member"
            )));
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().filter(|v| *v != node_id).collect();
        if voters.is_empty() {
            return Err(RpcError::BadRequest("cannot remove the last voter".into()));
        }
        let change = if membership.voter_ids().any(|v| v == node_id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.membership_error(e))?;
        Ok(ClientResponse::Done)
    }

    fn membership_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> RpcError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => self.not_leader(),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                RpcError::Membership(e.to_string())
            }
            RaftError::Fatal(e) => RpcError::Unavailable(format!("raft stopped: {e}")),
        }
    }

    /// Whether `remote` may send this node Raft traffic: a member, or (while this node
    /// belongs to no cluster) a caller that introduced itself for the cluster it expects.
    pub fn is_raft_peer(&self, remote: &EndpointId) -> bool {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let mut nodes = membership.membership().nodes().peekable();
        if nodes.peek().is_none() {
            return self.admission.is_introduced(remote.as_bytes());
        }
        nodes.any(|(_, m)| m.endpoint_id == *remote.as_bytes())
    }

    /// Whether this node belongs to a cluster (its membership is not empty).
    pub fn is_initialized(&self) -> bool {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let initialized = membership.membership().nodes().next().is_some();
        initialized
    }

    /// Serves one node-to-node request from `remote` (`Peers::serve` has checked that it is
    /// a member or introduced, or that this is an `Introduce` from a stranger to a node that
    /// belongs to no cluster).
    pub async fn handle_raft(&self, remote: EndpointId, request: RaftRequest) -> RaftResponse {
        // An Arc of the current membership: no copy on this hot path.
        let membership = self.raft.metrics().borrow().membership_config.clone();
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
            RaftRequest::AppendEntries(rpc) => {
                RaftResponse::AppendEntries(self.raft.append_entries(rpc).await)
            }
            RaftRequest::Vote(rpc) => RaftResponse::Vote(self.raft.vote(rpc).await),
            RaftRequest::InstallSnapshot(rpc) => {
                RaftResponse::InstallSnapshot(self.raft.install_snapshot(rpc).await)
            }
            RaftRequest::Forward(commands) => {
                RaftResponse::Forward(match Self::validate(&commands, false) {
                    Err(e) => Err(e),
                    Ok(()) => self
                        .proposer
                        .propose(commands)
                        .await
                        .map_err(RpcError::from),
                })
            }
            RaftRequest::ReadIndex => RaftResponse::ReadIndex(self.read_index().await),
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
                if self.is_leader()
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
        let raft = self.raft.clone();
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
    let mut metrics = state.raft.metrics();
    let mut written = String::new();
    let mut seen = None;
    loop {
        let membership = metrics.borrow_and_update().membership_config.clone();
        let m = membership.membership();
        // Metrics change on every apply; the membership rarely does.
        if seen != Some(*membership.log_id()) && m.get_node(&state.id).is_some() {
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
                        seen = None; // Try again on the next change.
                        tracing::warn!("{e}")
                    }
                }
            }
        }
        if metrics.changed().await.is_err() {
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
        let members = state.members();
        let Some(recorded) = members.get(&state.id) else {
            continue;
        };
        if recorded.addrs == state.me.addrs {
            continue;
        }
        if state.is_leader() {
            state.update_address(state.id, state.me.clone());
            continue;
        }
        for (id, member) in members.iter().filter(|(id, _)| **id != state.id) {
            let hello = RaftRequest::Hello(state.me.clone());
            if let Err(e) = state
                .peers
                .call(member, &hello, Duration::from_secs(3))
                .await
            {
                tracing::debug!("hello to {id:016x} failed: {e}");
            }
        }
    }
}

/// `aspen/raft/1`: adopts member connections into the pool.
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

/// `aspen/client/1`: one request per bi-stream.
struct ClientService {
    state: Arc<NodeState>,
}

impl std::fmt::Debug for ClientService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientService")
    }
}

impl ProtocolHandler for ClientService {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        // The caller is the key the QUIC handshake proved, for the whole connection.
        let caller = Arc::new(auth::Caller::new(*conn.remote_id().as_bytes()));
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let state = self.state.clone();
            let caller = caller.clone();
            tokio::spawn(async move {
                // A stream that never delivers its request is dropped (keep-alives would
                // otherwise keep it open for as long as the caller likes).
                let read = tokio::time::timeout(
                    REQUEST_READ_TIMEOUT,
                    read_frame::<ClientRequest>(&mut recv, MAX_CLIENT_FRAME),
                );
                let response = match read.await {
                    Ok(Ok(request)) => state.serve_client(request, &caller, recv).await,
                    Ok(Err(e)) => {
                        ClientResponse::Error(RpcError::BadRequest(format!("bad frame: {e}")))
                    }
                    Err(_) => ClientResponse::Error(RpcError::BadRequest(format!(
                        "no complete request within {REQUEST_READ_TIMEOUT:?}"
                    ))),
                };
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
    /// Returns whether the policy changed.
    async fn catch_up_policy(&self) -> Result<bool, RpcError> {
        self.read_barrier().await?;
        if !self.auth.is_stale() {
            return Ok(false);
        }
        self.reload_policy().await?;
        Ok(true)
    }

    /// Authorizes one client request (the one place the client protocol checks access),
    /// then serves it.
    async fn serve_client(
        &self,
        request: ClientRequest,
        caller: &auth::Caller,
        recv: iroh::endpoint::RecvStream,
    ) -> ClientResponse {
        let members = self.member_keys();
        let needs = auth::needs(&request);
        let mut access = self
            .auth
            .access(caller, members.clone(), identity::unix_now());
        let blob_hashes = match access.check(&needs) {
            Ok(h) => h,
            // The policy here may lag behind what the cluster committed (a grant made through
            // another member, or entries replayed after a restart): catch up, then decide.
            Err(denied @ RpcError::PermissionDenied { .. }) => match self.catch_up_policy().await {
                Err(e) => {
                    return ClientResponse::Error(RpcError::Unavailable(format!(
                        "cannot confirm the access policy with the leader ({e}); retry"
                    )))
                }
                Ok(false) => return ClientResponse::Error(denied),
                Ok(true) => {
                    access = self.auth.access(caller, members, identity::unix_now());
                    match access.check(&needs) {
                        Ok(h) => h,
                        Err(e) => return ClientResponse::Error(e),
                    }
                }
            },
            Err(e) => return ClientResponse::Error(e),
        };
        match request {
            // The blob's bytes follow the request on the same stream.
            ClientRequest::BlobAdd { size, tag } => self
                .blob_add(size, tag, recv)
                .await
                .unwrap_or_else(ClientResponse::Error),
            request => self.handle_client(request, &access, blob_hashes).await,
        }
    }
}
