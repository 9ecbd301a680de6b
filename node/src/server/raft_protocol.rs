//! The node-to-node protocol, `aspen/raft/2`: Raft RPCs plus the few calls members make to
//! each other (forwarded writes, read index, lease keep-alives, address announcements). One
//! request and one response per bi-stream, each one frame, except a snapshot: its request
//! frame is followed on the same stream by the snapshot's bytes. Variants are only ever
//! appended.
//!
//! Version 2 carries openraft 0.10's messages; `aspen/raft/1` carried 0.9's (different
//! encodings), so nodes of the two versions do not talk to each other at all rather than
//! misread each other: a cluster is upgraded all at once.
//!
//! Only members are heard: a node that belongs to a cluster drops a connection from any other
//! key before reading a byte of it. A node that belongs to no cluster yet reads only
//! [`RaftRequest::Introduce`] (at most [`MAX_INTRODUCE_FRAME`] bytes) from strangers, and
//! serves a caller once it proved, with a certificate from the cluster key, that it speaks for
//! the cluster the node was told to join (by `--join KEY`, or by its bootstrap secret).

use aspen_client::RpcError;
use aspen_kv::api::{Command, CommandResult, LeaseId};
use aspen_kv::raft_types::{SnapshotMeta, Vote};
use aspen_kv::{Member, TypeConfig};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

/// ALPN of the node-to-node protocol.
pub const RAFT_ALPN: &[u8] = b"aspen/raft/2";
/// Largest frame: 16 entries of up to MAX_BATCH_BYTES each, plus overhead.
pub const MAX_RAFT_FRAME: usize = 96 * 1024 * 1024;
/// Largest frame a node reads from a caller that is not (yet) a member: an `Introduce`.
pub const MAX_INTRODUCE_FRAME: usize = 1024;

#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    /// A whole snapshot from the leader: this frame, then exactly `bytes` bytes of the
    /// snapshot file on the same stream.
    InstallSnapshot {
        vote: Vote,
        meta: SnapshotMeta,
        bytes: u64,
    },
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
    /// The error: why the receiving node could not take it (it is shutting down, say).
    AppendEntries(Result<AppendEntriesResponse<TypeConfig>, String>),
    Vote(Result<VoteResponse<TypeConfig>, String>),
    InstallSnapshot(Result<SnapshotResponse<TypeConfig>, String>),
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
    fn a_snapshot_header_is_stable() {
        let header = RaftRequest::InstallSnapshot {
            vote: Vote::new_committed(2, 1),
            meta: SnapshotMeta {
                last_log_id: Some(aspen_kv::raft_types::log_id(2, 1, 9)),
                last_membership: Default::default(),
            },
            bytes: 300,
        };
        // variant, vote (term, node, committed), meta (some log id: term, node, index;
        // membership: no log id, no configs, no nodes; openraft's reserved, empty snapshot
        // id), length (varint 300).
        assert_eq!(
            postcard::to_allocvec(&header).unwrap(),
            [2, 2, 1, 1, 1, 2, 1, 9, 0, 0, 0, 0, 172, 2]
        );
    }

    #[test]
    fn heartbeats_do_not_keep_the_worker_awake() {
        let append = |entries| {
            RaftRequest::AppendEntries(AppendEntriesRequest {
                vote: Vote::new(3, 1),
                prev_log_id: None,
                entries,
                leader_commit: None,
            })
        };
        assert!(!append(vec![]).is_busy_work(), "a heartbeat");
        let entry = aspen_kv::raft_types::Entry {
            log_id: aspen_kv::raft_types::log_id(3, 1, 1),
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
