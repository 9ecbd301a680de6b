//! Every size limit of the store, as named constants.
//!
//! Limits are checked before anything is allocated or proposed; a violation is a typed
//! [`crate::api::LimitError`], never a panic and never a silent truncation. The state machine
//! checks them again at apply time so that a buggy or malicious proposer cannot make replicas
//! diverge.

/// Largest key, in bytes.
pub const MAX_KEY_BYTES: usize = 4 * 1024;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most commands one Raft entry (a batch) may carry.
pub const MAX_BATCH_COMMANDS: usize = 1024;
/// Most key and value bytes one Raft entry (a batch) may carry. A single command may exceed
/// this on its own (one maximal value); it then forms a batch by itself.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Most key-values one range read returns; larger scans continue with `more`.
pub const MAX_RANGE_LIMIT: u64 = 10_000;
/// Most key and value bytes one range read returns (at least one key-value is always
/// returned); larger scans continue with `more`, so a page always fits a client frame.
pub const MAX_RANGE_BYTES: usize = 16 * 1024 * 1024;
/// Requests one client may have applied but not yet acknowledged (its idempotency window).
pub const MAX_SESSION_WINDOW: u64 = 100_000;
/// A client whose last request is older than this (by the leader's clock) loses its
/// idempotency records, so memory stays bounded when clients vanish. A retry after that long
/// is applied again.
pub const SESSION_IDLE_EXPIRY_MS: u64 = 24 * 60 * 60 * 1000;
/// Most idle clients forgotten while applying one batch (bounds the work of one apply).
pub const MAX_SESSION_EXPIRIES_PER_BATCH: usize = 64;
/// Most operations in one transaction: its comparisons plus the larger of its two branches.
pub const MAX_TXN_OPS: usize = 128;
/// Most comparisons and operations in all the nodes of one transaction tree together.
pub const MAX_TXN_TREE_OPS: usize = 1024;
/// Deepest nesting of a transaction's outcome that decodes. A tree has at most
/// [`MAX_TXN_OPS`] nodes, so no true outcome nests deeper; postcard has no recursion limit of
/// its own, and an answer nested a million deep would overflow the decoder's stack.
pub const MAX_OUTCOME_DEPTH: usize = MAX_TXN_OPS;
/// Most keys that may exist in a comparison's key range when a transaction is applied (each
/// is read; a larger range is refused, the same way on every replica).
pub const MAX_COMPARE_RANGE_KEYS: usize = 10_000;
/// Largest encoded row in a snapshot file.
pub const MAX_SNAPSHOT_ROW_BYTES: usize = MAX_KEY_BYTES + MAX_VALUE_BYTES + 1024;
/// Most requirements plus writes in one system transaction.
pub const MAX_SYSTEM_TXN_OPS: usize = 2048;
/// Most key and value bytes one system transaction carries (a compacted document of up to
/// 16 chunks of one maximal value, plus the keys it replaces).
pub const MAX_SYSTEM_TXN_BYTES: usize = 20 * 1024 * 1024;
/// A page of watch events stops at the first revision boundary after this many key and
/// value bytes (a single revision over it is split into fragments).
pub const MAX_CHANGES_BYTES: usize = 4 * 1024 * 1024;
/// A page of watch events stops at the first revision boundary after this many changed keys
/// were looked at (most of them may be outside the watched range).
pub const MAX_CHANGES_SCANNED: usize = 16 * 1024;
/// Largest lease id (etcd's ids are positive 64-bit signed integers; so are ours).
pub const MAX_LEASE_ID: u64 = i64::MAX as u64;
/// Shortest lease time to live: a few election timeouts, so a leader change (which extends
/// every lease by its full TTL) fits inside it.
pub const MIN_LEASE_TTL_SECS: u64 = 2;
/// Longest lease time to live (etcd's limit, about 285 years).
pub const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;
/// Most leases a store holds (the leader keeps each one's deadline in memory).
pub const MAX_LEASES: u64 = 100_000;
/// Most keys attached to one lease (its expiry deletes them all in one apply).
pub const MAX_KEYS_PER_LEASE: u64 = 10_000;
/// Most expired leases the leader proposes to revoke in one batch.
pub const MAX_EXPIRIES_PER_BATCH: usize = 256;
