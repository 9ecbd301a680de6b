//! Bounds on blobs and their records, checked before anything is allocated or stored.

/// Longest tag name, in bytes.
pub const MAX_TAG_BYTES: usize = 255;
/// Largest blob one upload may announce (1 TiB).
pub const MAX_BLOB_BYTES: u64 = 1 << 40;
/// Most tags one list request returns.
pub const MAX_LIST_LIMIT: usize = 1000;
/// Members that hold a referenced blob, unless configured otherwise.
pub const DEFAULT_REPLICAS: usize = 3;
/// A cluster has at most 7 members, so more replicas than this mean nothing.
pub const MAX_REPLICAS: usize = 7;
