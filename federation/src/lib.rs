//! Federation: what moves between clusters and who may pull it.
//!
//! Built so far: **exports** ([`exports`]), the origin's policy of which resources other
//! clusters may pull and which clusters (by cluster key, or anyone). Exports live in the
//! system key space, so they are replicated through Raft and every member enforces the same
//! policy. This crate decides (key layout, validation, edits); the node reads and proposes.
//! The federation protocol, follows and the pull scheduler (issue P6) build on it.

pub mod exports;

pub use exports::{
    edit_export, export_key, resource_of_key, Export, ExportEdit, ExportError, EXPORT_PREFIX,
    MAX_EXPORTS, MAX_EXPORT_TARGETS,
};
