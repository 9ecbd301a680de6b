//! An in-memory Raft network: several nodes in one process, with partitions and, for
//! simulation, seeded message faults.
//!
//! Messages are delivered by calling the target's `Raft` handle directly. With [`NetFaults`],
//! every message first waits a random (simulated) delay and may be dropped before delivery,
//! delivered twice, or have its response lost; all drawn from one seeded RNG, so a run on a
//! single-threaded runtime with paused time replays exactly.
//!
//! Failures are reported as `NetworkError`, never `Unreachable` (openraft retries the former
//! at once and backs off from the latter). A snapshot travels as bytes and is written into a
//! file of the receiver's, as a stream over a real network would be.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::RaftNetworkV2;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::raft_types::{Member, NodeId, Raft, Snapshot, SnapshotMeta, TypeConfig, Vote};
use crate::storage::SnapshotFile;
use crate::StateMachineStore;

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
    /// Each node's Raft and state machine (a snapshot sent to it is received into a file of
    /// its state machine's).
    nodes: BTreeMap<NodeId, (Raft, StateMachineStore)>,
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

fn network_error(msg: String) -> RPCError<TypeConfig> {
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

    pub fn register(&self, id: NodeId, raft: Raft, sm: StateMachineStore) {
        self.lock().nodes.insert(id, (raft, sm));
    }

    pub fn unregister(&self, id: NodeId) -> Option<Raft> {
        self.lock().nodes.remove(&id).map(|(raft, _)| raft)
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

    fn route(
        &self,
        source: NodeId,
        target: NodeId,
    ) -> Result<(Raft, StateMachineStore), RPCError<TypeConfig>> {
        let state = self.lock();
        if state.isolated.contains(&source)
            || state.isolated.contains(&target)
            || state.cut.contains(&(source, target))
        {
            return Err(network_error(format!("partitioned: {source} -> {target}")));
        }
        match state.nodes.get(&target) {
            Some(node) => Ok(node.clone()),
            None => Err(network_error(format!("node {target} is down"))),
        }
    }

    /// Delivers one RPC from `source` to `target` according to the network's faults.
    /// The target's failures (it is shutting down) also come back as network errors: the
    /// sender retries, as it would over a real network.
    async fn call<Req, Resp, E, F, Fut>(
        &self,
        source: NodeId,
        target: NodeId,
        req: Req,
        deliver: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        E: std::fmt::Display + Send + 'static,
        F: Fn((Raft, StateMachineStore), Req) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Resp, E>> + Send + 'static,
    {
        let fate = self.fate();
        if !fate.delay.is_zero() {
            tokio::time::sleep(fate.delay).await;
        }
        let node = self.route(source, target)?;
        if fate.drop_request {
            return Err(network_error("request lost".into()));
        }
        if let Some(extra) = fate.duplicate {
            let (router, copy) = (self.clone(), req.clone());
            let deliver_copy = deliver(node.clone(), copy);
            tokio::spawn(async move {
                tokio::time::sleep(extra).await;
                // The copy, too, only crosses an intact link.
                if router.route(source, target).is_ok() {
                    let _ = deliver_copy.await;
                }
            });
        }
        let resp = deliver(node, req)
            .await
            .map_err(|e| network_error(format!("node {target} failed: {e}")))?;
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

impl RaftNetworkV2<TypeConfig> for MemConnection {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.router
            .call(self.source, self.target, rpc, |(raft, _), rpc| async move {
                raft.append_entries(rpc).await
            })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.router
            .call(self.source, self.target, rpc, |(raft, _), rpc| async move {
                raft.vote(rpc).await
            })
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // The snapshot travels as bytes (simulation snapshots are small); the receiver writes
        // them into a file of its own, as a stream over a real network would.
        let Snapshot {
            meta,
            snapshot: mut from,
        } = snapshot;
        let mut bytes = Vec::new();
        {
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            let read = async {
                from.seek(std::io::SeekFrom::Start(0)).await?;
                from.read_to_end(&mut bytes).await
            };
            read.await.map_err(|e| {
                StreamingError::StorageError(openraft::StorageError::from_io_error(
                    openraft::ErrorSubject::Snapshot(Some(meta.signature())),
                    openraft::ErrorVerb::Read,
                    e,
                ))
            })?;
        }
        let deliver =
            |(raft, sm): (Raft, StateMachineStore),
             (vote, meta, bytes): (Vote, SnapshotMeta, Arc<Vec<u8>>)| async move {
                let received = async {
                    use tokio::io::AsyncWriteExt;
                    let mut to = sm.begin_receiving_snapshot().await?;
                    to.write_all(&bytes).await?;
                    Ok::<_, std::io::Error>(to)
                };
                let to = received.await.map_err(|e| e.to_string())?;
                raft.install_full_snapshot(vote, Snapshot { meta, snapshot: to })
                    .await
                    .map_err(|e| e.to_string())
            };
        Ok(self
            .router
            .call(
                self.source,
                self.target,
                (vote, meta, Arc::new(bytes)),
                deliver,
            )
            .await?)
    }
}
