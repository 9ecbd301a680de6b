//! The openraft type configuration: what a log entry, a node and a snapshot are.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::api::{Batch, BatchResponse};
use crate::storage::SnapshotFile;

/// A Raft node id. Aspen derives it from the node's public key (see the `node` crate).
pub type NodeId = u64;

/// How to reach a cluster member. Deliberately transport-neutral (the store does not know
/// iroh): the node crate interprets `endpoint_id` as an iroh endpoint id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member's public key (32 bytes).
    pub endpoint_id: [u8; 32],
    /// Direct addresses it listens on (may change between restarts).
    pub addrs: Vec<SocketAddr>,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.endpoint_id[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "@{:?}", self.addrs)
    }
}

openraft::declare_raft_types!(
    /// Aspen's Raft types.
    pub TypeConfig:
        D = Batch,
        R = BatchResponse,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
