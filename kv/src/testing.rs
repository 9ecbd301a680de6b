//! An in-memory Raft network: several nodes in one process, with controllable partitions.
//!
//! Used by this crate's tests and by anything that wants a multi-node cluster without sockets.
//! Messages are delivered by calling the target's `Raft` handle directly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::raft_types::{Member, NodeId, Raft, TypeConfig};

#[derive(Default)]
struct RouterState {
    nodes: BTreeMap<NodeId, Raft>,
    /// Nodes cut off from everyone.
    isolated: BTreeSet<NodeId>,
}

/// Routes RPCs between in-process nodes. Clone it to hand it to each node.
#[derive(Clone, Default)]
pub struct MemRouter {
    state: Arc<Mutex<RouterState>>,
}

impl MemRouter {
    pub fn new() -> Self {
        Self::default()
    }

    /// The network factory for node `source`.
    pub fn network(&self, source: NodeId) -> MemNetwork {
        MemNetwork {
            router: self.clone(),
            source,
        }
    }

    pub fn register(&self, id: NodeId, raft: Raft) {
        self.state
            .lock()
            .expect("router lock")
            .nodes
            .insert(id, raft);
    }

    pub fn unregister(&self, id: NodeId) -> Option<Raft> {
        self.state.lock().expect("router lock").nodes.remove(&id)
    }

    /// Cuts `id` off from every other node (both directions) until [`Self::heal`].
    pub fn isolate(&self, id: NodeId) {
        self.state.lock().expect("router lock").isolated.insert(id);
    }

    pub fn heal(&self, id: NodeId) {
        self.state.lock().expect("router lock").isolated.remove(&id);
    }

    fn route<E: std::error::Error>(
        &self,
        source: NodeId,
        target: NodeId,
    ) -> Result<Raft, RPCError<NodeId, Member, E>> {
        let state = self.state.lock().expect("router lock");
        if state.isolated.contains(&source) || state.isolated.contains(&target) {
            let e = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "partitioned");
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        match state.nodes.get(&target) {
            Some(raft) => Ok(raft.clone()),
            None => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("node {target} is down"),
                );
                Err(RPCError::Network(NetworkError::new(&e)))
            }
        }
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
        let raft = self.router.route(self.source, self.target)?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let raft = self.router.route(self.source, self.target)?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let raft = self.router.route(self.source, self.target)?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}
