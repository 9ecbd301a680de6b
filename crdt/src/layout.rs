//! Where a document lives in the system key space, and the encodings of its records.
//!
//! ```text
//! crdt/m/<name>                          DocMeta (one per document; listing scans these)
//! crdt/d/<len u8><name>c<change hash>    one pending Automerge change (raw bytes)
//! crdt/d/<len u8><name>h                 SnapshotHeader of the compacted snapshot, if any
//! crdt/d/<len u8><name>s<chunk u16 BE>   the snapshot's bytes, in chunks
//! ```
//!
//! The length byte makes a document's data prefix unique: no other document's keys start
//! with it, so a prefix scan or delete never strays into a neighbour (`a` and `a/b`).
//! Records are postcard with a version byte first; golden-bytes tests pin them.

use serde::{Deserialize, Serialize};

use crate::{ChangeHash, DocError, DocName};

/// Prefix of every document's metadata key.
pub const META_PREFIX: &[u8] = b"crdt/m/";
/// Prefix of every document's data keys.
pub const DATA_PREFIX: &[u8] = b"crdt/d/";

const CHANGE_TAG: u8 = b'c';
const HEADER_TAG: u8 = b'h';
const CHUNK_TAG: u8 = b's';

/// Version of [`DocMeta`] and [`SnapshotHeader`] encodings.
pub const RECORD_VERSION: u8 = 1;

pub fn meta_key(name: &DocName) -> Vec<u8> {
    [META_PREFIX, name.as_str().as_bytes()].concat()
}

/// Every data key of the document starts with this.
pub fn data_prefix(name: &DocName) -> Vec<u8> {
    let bytes = name.as_str().as_bytes();
    let len = u8::try_from(bytes.len()).expect("names are at most 128 bytes");
    let mut key = DATA_PREFIX.to_vec();
    key.push(len);
    key.extend_from_slice(bytes);
    key
}

pub fn change_key(name: &DocName, hash: &ChangeHash) -> Vec<u8> {
    let mut key = data_prefix(name);
    key.push(CHANGE_TAG);
    key.extend_from_slice(hash);
    key
}

pub fn header_key(name: &DocName) -> Vec<u8> {
    let mut key = data_prefix(name);
    key.push(HEADER_TAG);
    key
}

pub fn chunk_key(name: &DocName, chunk: u16) -> Vec<u8> {
    let mut key = data_prefix(name);
    key.push(CHUNK_TAG);
    key.extend_from_slice(&chunk.to_be_bytes());
    key
}

/// What a data key under a document's prefix is.
#[derive(Debug, PartialEq, Eq)]
pub enum DataKey {
    Change(ChangeHash),
    Header,
    Chunk(u16),
}

/// Parses the part of a data key after the document's prefix.
pub fn parse_data_key(rest: &[u8]) -> Option<DataKey> {
    match rest.split_first()? {
        (&CHANGE_TAG, hash) => Some(DataKey::Change(hash.try_into().ok()?)),
        (&HEADER_TAG, []) => Some(DataKey::Header),
        (&CHUNK_TAG, chunk) => Some(DataKey::Chunk(u16::from_be_bytes(chunk.try_into().ok()?))),
        _ => None,
    }
}

/// A document's metadata. `incarnation` tells a re-created document from a deleted one of
/// the same name: every write requires the metadata it was planned against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocMeta {
    pub version: u8,
    pub incarnation: [u8; 16],
    /// Leader time of the proposal that created it (ms since the Unix epoch).
    pub created_at_ms: u64,
}

/// The compacted snapshot: `chunks` chunks holding `len` bytes whose BLAKE3 is `hash`, the
/// saved Automerge document with `changes` changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub version: u8,
    pub chunks: u16,
    pub len: u64,
    pub hash: [u8; 32],
    pub changes: u64,
}

pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    postcard::to_allocvec(record).expect("records always encode")
}

/// Decodes a stored record of document `name`; anything malformed is `Corrupt`.
pub fn decode<T: for<'a> Deserialize<'a>>(
    name: &str,
    what: &str,
    bytes: &[u8],
) -> Result<T, DocError> {
    let corrupt = |reason: String| DocError::Corrupt {
        name: name.to_string(),
        reason: format!("{what}: {reason}"),
    };
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| corrupt(e.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

impl DocMeta {
    pub fn decode(name: &str, bytes: &[u8]) -> Result<Self, DocError> {
        let meta: DocMeta = decode(name, "metadata", bytes)?;
        if meta.version != RECORD_VERSION {
            return Err(DocError::Corrupt {
                name: name.into(),
                reason: format!("metadata version {} is not {RECORD_VERSION}", meta.version),
            });
        }
        Ok(meta)
    }
}

impl SnapshotHeader {
    pub fn decode(name: &str, bytes: &[u8]) -> Result<Self, DocError> {
        let header: SnapshotHeader = decode(name, "snapshot header", bytes)?;
        let bad = |reason: String| DocError::Corrupt {
            name: name.into(),
            reason,
        };
        if header.version != RECORD_VERSION {
            return Err(bad(format!(
                "snapshot header version {} is not {RECORD_VERSION}",
                header.version
            )));
        }
        if header.chunks as usize > crate::limits::MAX_SNAPSHOT_CHUNKS
            || header.len > crate::limits::MAX_DOC_BYTES as u64
        {
            return Err(bad(format!(
                "snapshot of {} bytes in {} chunks exceeds the limits",
                header.len, header.chunks
            )));
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_keys_and_records() {
        let name = DocName::new("a/b").unwrap();
        assert_eq!(meta_key(&name), b"crdt/m/a/b");
        assert_eq!(header_key(&name), b"crdt/d/\x03a/bh");
        assert_eq!(chunk_key(&name, 258), b"crdt/d/\x03a/bs\x01\x02");
        let mut change = b"crdt/d/\x03a/bc".to_vec();
        change.extend([7; 32]);
        assert_eq!(change_key(&name, &[7; 32]), change);
        let meta = DocMeta {
            version: 1,
            incarnation: [9; 16],
            created_at_ms: 300,
        };
        let mut expected = vec![1];
        expected.extend([9; 16]);
        expected.extend([0xac, 0x02]);
        assert_eq!(encode(&meta), expected);
        let header = SnapshotHeader {
            version: 1,
            chunks: 2,
            len: 5,
            hash: [4; 32],
            changes: 3,
        };
        let mut expected = vec![1, 2, 5];
        expected.extend([4; 32]);
        expected.push(3);
        assert_eq!(encode(&header), expected);
    }

    #[test]
    fn data_prefixes_never_overlap() {
        let a = data_prefix(&DocName::new("a").unwrap());
        let ab = data_prefix(&DocName::new("a/b").unwrap());
        assert!(!ab.starts_with(&a) && !a.starts_with(&ab));
        assert_eq!(parse_data_key(b"h"), Some(DataKey::Header));
        assert_eq!(parse_data_key(b"s\x00\x01"), Some(DataKey::Chunk(1)));
        assert_eq!(parse_data_key(b"s\x00"), None);
        assert_eq!(parse_data_key(b"c\x00"), None);
        assert_eq!(parse_data_key(b"x"), None);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_records_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = DocMeta::decode("d", &bytes);
            let _ = SnapshotHeader::decode("d", &bytes);
            let _ = parse_data_key(&bytes);
        }

        #[test]
        fn records_round_trip(incarnation in any::<[u8; 16]>(), at in any::<u64>(), chunks in 0u16..16, len in 0u64..1000, changes in any::<u64>()) {
            let meta = DocMeta { version: 1, incarnation, created_at_ms: at };
            prop_assert_eq!(DocMeta::decode("d", &encode(&meta)).unwrap(), meta);
            let header = SnapshotHeader { version: 1, chunks, len, hash: [1; 32], changes };
            prop_assert_eq!(SnapshotHeader::decode("d", &encode(&header)).unwrap(), header);
        }
    }
}
