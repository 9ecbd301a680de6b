//! Automerge documents kept in an Aspen cluster.
//!
//! A document lives in the replicated system key space (invisible to kv clients) as the set
//! of its Automerge changes plus, from time to time, a compacted snapshot that replaces the
//! changes it covers. Every write is a [`aspen_kv::api::SystemTxn`] that goes through Raft, so
//! every replica holds the same changes and computes the same heads; nothing Automerge does
//! runs inside the state machine's apply. What this crate decides, and the node only carries
//! out:
//!
//! - the key layout ([`layout`]) and the documents' names ([`DocName`]);
//! - what a stored document is and how to load it ([`StoredDoc`]), and how a node keeps
//!   loaded documents between requests ([`cache`]);
//! - which changes may be committed ([`plan_changes`], and [`plan_batch`] for several
//!   requests at once: they parse, their dependencies are
//!   present, the document stays within [`limits`]), and the transactions that create,
//!   compact and delete documents;
//! - the JSON forms users see: a document's JSON view, its history, and a small patch
//!   language that becomes an Automerge change ([`patch`]).
//!
//! Changes are applied with Automerge's own merge, so changes made concurrently through
//! different nodes (or by any other Automerge implementation) merge as Automerge merges them.

pub mod cache;
pub mod layout;
pub mod limits;
mod name;
pub mod patch;
mod stored;
pub mod view;

pub use name::DocName;
pub use stored::{
    assemble, changes_in, load_saved, parse_change, plan_batch, plan_changes, plan_compaction,
    plan_create, plan_delete, plan_import, plan_replace, read_doc, received_changes, split_chunks,
    Accepted, BatchPlan, ChangePlan, Compaction, Merged, StoredDoc,
};

use serde::{Deserialize, Serialize};

/// An Automerge change hash (SHA-256 of the change), as raw bytes.
pub type ChangeHash = [u8; 32];

/// Why a document request was refused. Serialised on the client protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DocError {
    #[error("invalid document name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("no document named {0:?}")]
    NotFound(String),
    #[error("a document named {0:?} already exists")]
    Exists(String),
    #[error("change {index} is not a valid Automerge change: {reason}")]
    InvalidChange { index: usize, reason: String },
    #[error("change {index} is {len} bytes, the limit is {max}")]
    ChangeTooLarge {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("{len} changes in one request, the limit is {max}")]
    TooManyChanges { len: usize, max: usize },
    #[error(
        "change {change} depends on changes the document does not have: {}",
        missing.join(", ")
    )]
    MissingDependencies {
        change: String,
        missing: Vec<String>,
    },
    #[error("the document would hold {len} bytes, the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("patch operation {index}: {reason}")]
    BadPatch { index: usize, reason: String },
    #[error("stored document {name:?} is corrupt: {reason}")]
    Corrupt { name: String, reason: String },
    /// A compressed change that would inflate past the change limit (a decompression bomb,
    /// or simply too large once uncompressed).
    #[error("change {index} inflates to more than {max} bytes, the limit for a change")]
    Inflates { index: usize, max: usize },
    /// Not one saved document (a document chunk, as `save` writes it), or one whose columns
    /// inflate past [`limits::MAX_DOC_INFLATED_BYTES`].
    #[error("not an acceptable saved document: {0}")]
    InvalidDocument(String),
}

/// Hex form of a change hash, as Automerge tools print it.
pub fn hash_hex(hash: &ChangeHash) -> String {
    hex::encode(hash)
}
