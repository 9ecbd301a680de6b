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
        AsyncRuntime = crate::raft_runtime::AspenRuntime,
);

pub type Raft = openraft::Raft<TypeConfig, crate::StateMachineStore>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type CommittedLeaderId = openraft::type_config::alias::CommittedLeaderIdOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type EntryPayload = openraft::type_config::alias::EntryPayloadOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>;
pub type StorageError = openraft::StorageError<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, Member>;

/// A log id from its term and index (Aspen's leader ids are `(term, node)`; the node part
/// of a committed leader id is the leader that proposed the entry).
pub fn log_id(term: u64, node: NodeId, index: u64) -> LogId {
    openraft::LogId {
        leader_id: CommittedLeaderId {
            term,
            node_id: node,
        },
        index,
    }
}
