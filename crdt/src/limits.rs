//! Every bound on documents, as named constants (checked before anything is proposed).

use aspen_kv::limits::MAX_VALUE_BYTES;

/// Longest document name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Largest single Automerge change.
pub const MAX_CHANGE_BYTES: usize = MAX_VALUE_BYTES;
/// Most changes one request may submit.
pub const MAX_CHANGES_PER_REQUEST: usize = 256;
/// Most bytes one request may submit (all its changes together).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Most changes one node commits to one document in one transaction (requests that arrive
/// together are checked and committed together, up to this many changes and
/// [`MAX_REQUEST_BYTES`] in all; a single request always goes alone if it is larger).
pub const MAX_BATCH_CHANGES: usize = 1024;
/// Most bytes a stored document may hold: its snapshot plus its pending changes.
pub const MAX_DOC_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes the compressed columns of one saved document may inflate to (all together)
/// before Automerge is given it.
pub const MAX_DOC_INFLATED_BYTES: usize = 4 * MAX_DOC_BYTES;
/// A compacted snapshot is stored in chunks of at most this many bytes (one system value).
pub const SNAPSHOT_CHUNK_BYTES: usize = MAX_VALUE_BYTES;
/// Most chunks a snapshot may have.
pub const MAX_SNAPSHOT_CHUNKS: usize = MAX_DOC_BYTES.div_ceil(SNAPSHOT_CHUNK_BYTES);
/// A document is compacted once it has this many pending changes...
pub const COMPACT_AFTER_CHANGES: usize = 128;
/// ...or this many bytes of pending changes.
pub const COMPACT_AFTER_BYTES: usize = 256 * 1024;
/// Most pending changes one compaction deletes (changes it covers but leaves are harmless
/// duplicates, removed by the next compaction).
pub const MAX_COMPACTED_CHANGES: usize = 1024;
/// Most documents one list request returns.
pub const MAX_LIST_LIMIT: usize = 1000;
