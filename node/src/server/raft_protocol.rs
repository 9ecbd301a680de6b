//! The node-to-node protocol, `aspen/raft/1`: Raft RPCs plus the few calls members make to
//! each other (forwarded writes, read index, address announcements). One request and one
//! response per bi-stream, each one frame. Variants are only ever appended.

use aspen_client::RpcError;
use aspen_kv::api::{Command, CommandResult};
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
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = aspen_client::wire::decode_body::<RaftRequest>(&bytes);
            let _ = aspen_client::wire::decode_body::<RaftResponse>(&bytes);
        }
    }
}
