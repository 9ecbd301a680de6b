//! Federation: what moves between clusters, who may pull it, and when.
//!
//! - [`exports`]: the origin's policy of which resources other clusters may pull, and which
//!   clusters (by cluster key, or anyone);
//! - [`protocol`]: `aspen/federation/1`, its messages and the "who is calling" check (a node
//!   certificate whose node id is the QUIC-proven key);
//! - [`follows`]: the resources this cluster pulls from others, and the last manifest it
//!   accepted for each;
//! - [`schedule`]: when a follow is pulled next (interval with jitter, capped backoff).
//! - [`mirrors`]: serving a followed resource onward, verified against its origin's key.
//! - [`announce`]: announcements of new manifests (push triggers): the gossip topic, the
//!   check a follower makes before it acts, and the per-origin rate limit after it.
//!
//! Policy lives in the system key space, replicated through Raft, so every member enforces
//! the same and a new leader continues where the old one stopped. This crate decides (key
//! layout, validation, edits, timing); the node does the I/O and the proposing.

pub mod announce;
pub mod exports;
pub mod follows;
pub mod mirrors;
pub mod protocol;
pub mod schedule;

pub use exports::{
    edit_export, export_key, resource_of_key, Export, ExportEdit, ExportError, EXPORT_PREFIX,
    MAX_EXPORTS, MAX_EXPORT_TARGETS,
};
pub use follows::{
    follow_key, follow_state_key, follow_tags_key, local_name, origin_manifest_key,
    parse_follow_key, Follow, FollowError, Hint, Via, FOLLOW_PREFIX, FOLLOW_STATE_PREFIX,
    FOLLOW_TAGS_PREFIX, MAX_FOLLOWS, MAX_VIA, ORIGIN_MANIFEST_PREFIX,
};
pub use mirrors::{
    directory_topic, mirror_key, parse_mirror_key, MAX_MIRRORS, MAX_MIRRORS_TRIED, MIRROR_PREFIX,
};
pub use protocol::{
    caller_cluster, check_welcome, FedCall, FedError, FedReply, Hello, HelloReply, FEDERATION_ALPN,
    MAX_CALL_FRAME, MAX_CHANGES_PAGE_BYTES, MAX_FED_TAGS, MAX_REPLY_FRAME, MAX_SNAPSHOT_BYTES,
};
pub use schedule::PullSchedule;
