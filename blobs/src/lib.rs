//! Blobs kept in an Aspen cluster: what the replicated key space says about them.
//!
//! The bytes of a blob live in each node's iroh-blobs store, addressed by their BLAKE3 hash.
//! What every member must agree on lives in the replicated system key space and goes
//! through Raft:
//!
//! - **tags** ([`TagName`] → hash): the references. A blob is kept while a tag names it;
//!   once none does, each node deletes its copy after a grace period.
//! - **replica records** (hash, node → size): which members hold a complete, verified copy.
//!   A node writes its own record only after its store has every chunk of the blob.
//!
//! From these, [`placement`] decides which members should fetch a referenced blob so that
//! a configured number of members hold it. This crate decides; the node (iroh-blobs store,
//! fetching, garbage collection) carries out.

pub mod layout;
pub mod limits;
mod name;
pub mod placement;

pub use layout::{read_index, BlobIndex, ReplicaRecord, TagRecord};
pub use name::TagName;

use serde::{Deserialize, Serialize};

/// A blob's BLAKE3 hash, as raw bytes.
pub type BlobHash = [u8; 32];

/// Why a blob request was refused. Serialised on the client protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BlobError {
    #[error("invalid blob hash {0:?}: expected 64 hex digits (a BLAKE3 hash)")]
    BadHash(String),
    #[error("invalid tag name {name:?}: {reason}")]
    BadTagName { name: String, reason: String },
    #[error("no tag named {0:?}")]
    TagNotFound(String),
    #[error("no member holds blob {0}")]
    NotFound(String),
    #[error("a blob of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("upload ended after {got} of {expected} bytes")]
    Truncated { expected: u64, got: u64 },
    #[error("upload sent more than the {expected} bytes it announced")]
    TooLong { expected: u64 },
    #[error("the node stored hash {stored} but the client sent data hashing to {sent}")]
    HashMismatch { stored: String, sent: String },
    #[error("could not fetch blob {hash} from any holder: {reason}")]
    Unavailable { hash: String, reason: String },
    #[error("blob store error: {0}")]
    Store(String),
    #[error("corrupt blob record: {0}")]
    CorruptRecord(String),
}

/// Hex form of a blob hash (64 digits), as `aspen blob add` prints it.
pub fn hash_hex(hash: &BlobHash) -> String {
    hex::encode(hash)
}

/// Parses a blob hash from 64 hex digits.
pub fn parse_hash(s: &str) -> Result<BlobHash, BlobError> {
    let s = s.trim();
    let mut out = [0u8; 32];
    if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
        return Err(BlobError::BadHash(s.chars().take(80).collect()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip_and_bad_ones_are_refused() {
        let h = [0xab; 32];
        assert_eq!(parse_hash(&hash_hex(&h)).unwrap(), h);
        assert!(matches!(parse_hash("abc"), Err(BlobError::BadHash(_))));
        assert!(matches!(
            parse_hash(&"g".repeat(64)),
            Err(BlobError::BadHash(_))
        ));
        assert!(matches!(
            parse_hash(&"a".repeat(66)),
            Err(BlobError::BadHash(_))
        ));
    }
}
