//! How data moves between Aspen clusters and is verified, with no policy (who may pull what
//! is `federation`'s business).
//!
//! The unit of trust is the [`SignedManifest`]: the origin cluster's signed statement of what
//! one exported resource holds (Automerge heads, a blob tag list, an iroh-docs namespace
//! state). A follower verifies the manifest against the origin's key, then the data against
//! the manifest, so whoever serves the data (the origin, or later a mirror) cannot change it,
//! and a manifest never goes backwards ([`check_successor`]).

pub mod doc_exchange;
pub mod manifest;

pub use doc_exchange::{changes_since, ChangesPage, DocPull, ExchangeError, Pulled, MAX_HAVE};
pub use manifest::{
    check_successor, BlobTagList, ContentDigest, Manifest, ManifestError, NamespaceState,
    NsEntryState, Resource, ResourceKind, SignedManifest, MAX_HEADS, MAX_MANIFEST_BYTES,
    MAX_RESOURCE_NAME_BYTES,
};
