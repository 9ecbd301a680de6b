//! An in-memory Raft network: several nodes in one process, with partitions and, for
//! simulation, seeded message faults.
//!
//! Messages are delivered by calling the target's `Raft` handle directly. With [`NetFaults`],
//! every message first waits a random (simulated) delay and may be dropped before delivery,
//! delivered twice, or have its response lost; all drawn from one seeded RNG, so a run on a
//! single-threaded runtime with paused time replays exactly.
//!
//! Failures are reported as `NetworkError`, never `Unreachable`: openraft backs off from
//! unreachable nodes with an unseeded `select!`, which would make simulations diverge.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::raft_types::{Member, NodeId, Raft, TypeConfig};

/// Message faults of a simulated network. Probabilities are per message, in `[0, 1]`.
#[derive(Clone, Debug, Default)]
pub struct NetFaults {
    /// The request is lost (the sender sees a network error).
    pub drop_request: f64,
    /// The request is delivered but the response is lost.
    pub drop_response: f64,
    /// The request is delivered twice (the copy after its own delay; its answer is ignored).
    pub duplicate: f64,
    /// Every message waits `min_delay..=max_delay` (simulated time) before delivery.
    pub min_delay: Duration,
    pub max_delay: Duration,
}

#[derive(Default)]
struct RouterState {
    nodes: BTreeMap<NodeId, Raft>,
    /// Nodes cut off from everyone.
    isolated: BTreeSet<NodeId>,
    /// Directed links that are cut: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    faults: Option<(NetFaults, StdRng)>,
}

/// What happens to one message.
struct Fate {
    delay: Duration,
    drop_request: bool,
    drop_response: bool,
    duplicate: Option<Duration>,
}

/// Routes RPCs between in-process nodes. Clone it to hand it to each node.
#[derive(Clone, Default)]
pub struct MemRouter {
    state: Arc<Mutex<RouterState>>,
}

fn network_error<E: std::error::Error>(msg: String) -> RPCError<NodeId, Member, E> {
    let e = std::io::Error::new(std::io::ErrorKind::ConnectionReset, msg);
    RPCError::Network(NetworkError::new(&e))
}

impl MemRouter {
    /// A reliable network (partitions only).
    pub fn new() -> Self {
        Self::default()
    }

    /// A network with seeded message faults.
    pub fn with_faults(faults: NetFaults, seed: u64) -> Self {
        let router = Self::default();
        router.lock().faults = Some((faults, StdRng::seed_from_u64(seed)));
        router
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The network factory for node `source`.
    pub fn network(&self, source: NodeId) -> MemNetwork {
        MemNetwork {
            router: self.clone(),
            source,
        }
    }

    pub fn register(&self, id: NodeId, raft: Raft) {
        self.lock().nodes.insert(id, raft);
    }

    pub fn unregister(&self, id: NodeId) -> Option<Raft> {
        self.lock().nodes.remove(&id)
    }

    /// Cuts `id` off from every other node (both directions) until [`Self::heal`].
    pub fn isolate(&self, id: NodeId) {
        self.lock().isolated.insert(id);
    }

    pub fn heal(&self, id: NodeId) {
        self.lock().isolated.remove(&id);
    }

    /// Cuts every link between different groups (both directions); links inside a group and
    /// to nodes in no group are untouched.
    pub fn partition(&self, groups: &[Vec<NodeId>]) {
        let mut s = self.lock();
        for (i, a) in groups.iter().enumerate() {
            for (j, b) in groups.iter().enumerate() {
                if i != j {
                    for &x in a {
                        for &y in b {
                            s.cut.insert((x, y));
                        }
                    }
                }
            }
        }
    }

    /// Cuts the link from `from` to `to` only (asymmetric partition).
    pub fn cut_link(&self, from: NodeId, to: NodeId) {
        self.lock().cut.insert((from, to));
    }

    /// Restores every link and isolated node.
    pub fn heal_all(&self) {
        let mut s = self.lock();
        s.cut.clear();
        s.isolated.clear();
    }

    fn fate(&self) -> Fate {
        let mut s = self.lock();
        let Some((f, rng)) = s.faults.as_mut() else {
            return Fate {
                delay: Duration::ZERO,
                drop_request: false,
                drop_response: false,
                duplicate: None,
            };
        };
        let delay = |rng: &mut StdRng| {
            let (lo, hi) = (
                f.min_delay.as_micros() as u64,
                f.max_delay.as_micros() as u64,
            );
            Duration::from_micros(rng.random_range(lo..=hi.max(lo)))
        };
        Fate {
            delay: delay(rng),
            drop_request: rng.random_bool(f.drop_request),
            drop_response: rng.random_bool(f.drop_response),
            duplicate: rng.random_bool(f.duplicate).then(|| delay(rng)),
        }
    }

    fn route<E: std::error::Error>(
        &self,
        source: NodeId,
        target: NodeId,
    ) -> Result<Raft, RPCError<NodeId, Member, E>> {
        let state = self.lock();
        if state.isolated.contains(&source)
            || state.isolated.contains(&target)
            || state.cut.contains(&(source, target))
        {
            return Err(network_error(format!("partitioned: {source} -> {target}")));
        }
        match state.nodes.get(&target) {
            Some(raft) => Ok(raft.clone()),
            None => Err(network_error(format!("node {target} is down"))),
        }
    }

    /// Delivers one RPC from `source` to `target` according to the network's faults.
    async fn call<Req, Resp, E, F, Fut>(
        &self,
        source: NodeId,
        target: NodeId,
        req: Req,
        deliver: F,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        E: std::error::Error + Send + 'static,
        F: Fn(Raft, Req) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Resp, RaftError<NodeId, E>>> + Send + 'static,
    {
        let fate = self.fate();
        if !fate.delay.is_zero() {
            tokio::time::sleep(fate.delay).await;
        }
        let raft = self.route(source, target)?;
        if fate.drop_request {
            return Err(network_error("request lost".into()));
        }
        if let Some(extra) = fate.duplicate {
            let (router, copy) = (self.clone(), req.clone());
            let deliver_copy = deliver(raft.clone(), copy);
            tokio::spawn(async move {
                tokio::time::sleep(extra).await;
                // The copy, too, only crosses an intact link.
                if router.route::<E>(source, target).is_ok() {
                    let _ = deliver_copy.await;
                }
            });
        }
        let resp = deliver(raft, req)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))?;
        if fate.drop_response {
            return Err(network_error("response lost".into()));
        }
        Ok(resp)
    }
}

/// Node `source`'s view of the in-memory network.
pub struct MemNetwork {
    router: MemRouter,
    source: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for MemNetwork {
    type Network = MemConnection;

    async fn new_client(&mut self, target: NodeId, _node: &Member) -> MemConnection {
        MemConnection {
            router: self.router.clone(),
            source: self.source,
            target,
        }
    }
}

/// A "connection" from one in-memory node to another.
pub struct MemConnection {
    router: MemRouter,
    source: NodeId,
    target: NodeId,
}

impl RaftNetwork<TypeConfig> for MemConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.router
            .call(self.source, self.target, rpc, |raft, rpc| async move {
                raft.append_entries(rpc).await
            })
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.router
            .call(self.source, self.target, rpc, |raft, rpc| async move {
                raft.install_snapshot(rpc).await
            })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.router
            .call(self.source, self.target, rpc, |raft, rpc| async move {
                raft.vote(rpc).await
            })
            .await
    }
}
