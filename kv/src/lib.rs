//! Aspen's replicated key-value store.
//!
//! openraft drives replication; this crate provides what openraft asks of an application: a
//! durable log ([`LogStore`]) and a state machine ([`StateMachineStore`]) over redb (`log.redb` and `state.redb`),
//! the MVCC key space with etcd-like revisions, idempotent client sessions, and file-backed
//! snapshots. It knows nothing about the network: the `node` crate implements openraft's
//! network traits over iroh, and [`testing`] provides an in-memory network for multi-node
//! tests in one process.
//!
//! Start at [`api`] for what clients can do, [`storage`] for how it is kept.

// openraft's trait methods return its `StorageError` (large, not ours to box).
#![allow(clippy::result_large_err)]

pub mod api;
pub mod lessor;
pub mod limits;
pub mod metrics;
pub mod raft_runtime;
pub mod raft_types;
pub mod read_index;
pub mod storage;
pub mod testing;

pub use lessor::Lessor;
pub use metrics::StorageMetrics;
pub use raft_types::{Member, NodeId, Raft, TypeConfig};
pub use read_index::{ReadIndex, ReadIndexError};
pub use storage::{
    open, open_with_backends, set_activity_hook, IoMode, LogStore, StateDigest, StateMachineStore,
    StoreStatus, SystemView,
};

/// The openraft configuration Aspen runs with, validated.
///
/// Heartbeats every 100 ms, elections after 500-1000 ms of silence: quick failover on a LAN
/// while tolerating a loaded 2-core machine.
///
/// `snapshot_every`: log entries between snapshots; `keep_after_snapshot`: entries kept in the
/// log behind a snapshot (a follower lagging further behind is sent the snapshot).
pub fn raft_config(
    snapshot_every: u64,
    keep_after_snapshot: u64,
) -> std::sync::Arc<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "aspen".into(),
        heartbeat_interval: 100,
        election_timeout_min: 500,
        election_timeout_max: 1000,
        // Few entries per AppendEntries: each entry is a batch of up to MAX_BATCH_BYTES.
        max_payload_entries: 16,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: keep_after_snapshot,
        snapshot_max_chunk_size: 1024 * 1024,
        // A restarted leader runs an election (a new term) instead of resuming its old term.
        // Resuming is unsafe here: a leader replicates entries before its own flush, so a
        // crash can lose entries followers hold, and resuming the term would reuse their log
        // ids for different entries (simulation seed 16662).
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    std::sync::Arc::new(
        config
            .validate()
            .expect("the built-in raft configuration is valid"),
    )
}
