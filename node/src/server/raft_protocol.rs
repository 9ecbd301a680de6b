//! The node-to-node protocol, `aspen/raft/1`: Raft RPCs plus the few calls members make to
//! each other (forwarded writes, read index, lease keep-alives, address announcements). One request and one
//! response per bi-stream, each one frame. Variants are only ever appended.
//!
//! Only members are heard: a node that belongs to a cluster drops a connection from any other
//! key before reading a byte of it. A node that belongs to no cluster yet reads only
//! [`RaftRequest::Introduce`] (at most [`MAX_INTRODUCE_FRAME`] bytes) from strangers, and
//! serves a caller once it proved, with a certificate from the cluster key, that it speaks for
//! the cluster the node was told to join (by `--join KEY`, or by its bootstrap secret).

use aspen_client::RpcError;
use aspen_kv::api::{Command, CommandResult, LeaseId};
use aspen_kv::{Member, NodeId, TypeConfig};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

/// ALPN of the node-to-node protocol.
pub const RAFT_ALPN: &[u8] = b"aspen/raft/1";
/// Largest frame: 16 entries of up to MAX_BATCH_BYTES each, or a snapshot chunk, plus
/// overhead.
pub const MAX_RAFT_FRAME: usize = 96 * 1024 * 1024;
/// Largest frame a node reads from a caller that is not (yet) a member: an `Introduce`.
pub const MAX_INTRODUCE_FRAME: usize = 1024;

#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Writes a follower received from clients, to be proposed by the leader.
    Forward(Vec<Command>),
    /// Leader: confirm leadership and return the index reads must wait for.
    ReadIndex,
    /// "I am this member, reachable here": sent after a restart so peers learn new addresses.
    Hello(Member),
    /// "I speak for the cluster whose key signed `certificate` (for my key)". Sent to a node
    /// that is not a member yet. With `secret` (the node's bootstrap secret, which the
    /// operator gave `cluster add`), the node adopts that cluster; without, the node accepts
    /// it only for the cluster it already expects (`--join KEY`, or an earlier introduction).
    Introduce {
        certificate: Vec<u8>,
        secret: Option<[u8; 32]>,
    },
    /// Leader: a lease call that only the leader's lease clock can answer.
    Lease(LeaderLeaseCall),
}

impl RaftRequest {
    /// Whether this message is worth keeping the worker awake for (busy polling): anything
    /// but a heartbeat (AppendEntries without entries), which an idle cluster sends every
    /// 100 ms.
    pub fn is_busy_work(&self) -> bool {
        !matches!(self, RaftRequest::AppendEntries(r) if r.entries.is_empty())
    }
}

/// What a follower asks the leader's lease clock on a client's behalf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaderLeaseCall {
    /// Renew the lease, confirm leadership, answer its TTL in seconds.
    KeepAlive(LeaseId),
    /// Time left on the lease, in milliseconds.
    Remaining(LeaseId),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RaftResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Forward(Result<Vec<CommandResult>, RpcError>),
    ReadIndex(Result<Option<u64>, RpcError>),
    Hello,
    /// The caller is not a member of this node's cluster.
    Refused(String),
    /// This node belongs to no cluster yet and does not know the caller: introduce yourself.
    NotIntroduced,
    Introduced,
    /// Seconds (keep-alive) or milliseconds (time left).
    Lease(Result<u64, RpcError>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_bytes() {
        assert_eq!(postcard::to_allocvec(&RaftRequest::ReadIndex).unwrap(), [4]);
        assert_eq!(
            postcard::to_allocvec(&RaftRequest::Forward(vec![])).unwrap(),
            [3, 0]
        );
        assert_eq!(
            postcard::to_allocvec(&RaftResponse::ReadIndex(Ok(Some(7)))).unwrap(),
            [4, 0, 1, 7]
        );
        assert_eq!(
            postcard::to_allocvec(&RaftResponse::Refused("x".into())).unwrap(),
            [6, 1, b'x']
        );
        assert_eq!(
            postcard::to_allocvec(&RaftRequest::Introduce {
                certificate: vec![1],
                secret: None
            })
            .unwrap(),
            [6, 1, 1, 0]
        );
        assert_eq!(
            postcard::to_allocvec(&RaftResponse::NotIntroduced).unwrap(),
            [7]
        );
        assert_eq!(
            postcard::to_allocvec(&RaftRequest::Lease(LeaderLeaseCall::KeepAlive(5))).unwrap(),
            [7, 0, 5]
        );
        assert_eq!(
            postcard::to_allocvec(&RaftRequest::Lease(LeaderLeaseCall::Remaining(5))).unwrap(),
            [7, 1, 5]
        );
        assert_eq!(
            postcard::to_allocvec(&RaftResponse::Lease(Ok(9))).unwrap(),
            [9, 0, 9]
        );
    }

    #[test]
    fn heartbeats_do_not_keep_the_worker_awake() {
        let append = |entries| {
            RaftRequest::AppendEntries(AppendEntriesRequest {
                vote: openraft::Vote::new(3, 1),
                prev_log_id: None,
                entries,
                leader_commit: None,
            })
        };
        assert!(!append(vec![]).is_busy_work(), "a heartbeat");
        let entry = aspen_kv::raft_types::Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), 1),
            payload: openraft::EntryPayload::Blank,
        };
        assert!(append(vec![entry]).is_busy_work(), "entries to store");
        assert!(RaftRequest::ReadIndex.is_busy_work());
        assert!(RaftRequest::Forward(vec![]).is_busy_work());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = aspen_client::wire::decode_body::<RaftRequest>(&bytes);
            let _ = aspen_client::wire::decode_body::<RaftResponse>(&bytes);
        }
    }
}
