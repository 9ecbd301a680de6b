//! Where blob references live in the system key space, and the encodings of their records.
//!
//! ```text
//! blob/t/<tag>                          TagRecord: the hash the tag names, its size
//! blob/r/<hash, 32 bytes><node u64 BE>  ReplicaRecord: this member holds a complete copy
//! ```
//!
//! A blob's replica keys share the 39-byte prefix `blob/r/<hash>`, so one prefix scan finds
//! its holders. Records are postcard with a version byte first; golden-bytes tests pin them.

use std::collections::{BTreeMap, BTreeSet};

use aspen_kv::api::{ReadError, SystemOp};
use aspen_kv::storage::SystemView;
use aspen_kv::NodeId;
use serde::{Deserialize, Serialize};

use crate::{BlobError, BlobHash, TagName};

/// Prefix of every blob key (tags and replica records).
pub const BLOB_PREFIX: &[u8] = b"blob/";
/// Prefix of every tag key.
pub const TAG_PREFIX: &[u8] = b"blob/t/";
/// Prefix of every replica record key.
pub const REPLICA_PREFIX: &[u8] = b"blob/r/";
/// Version of the record encodings.
pub const RECORD_VERSION: u8 = 1;

pub fn tag_key(tag: &TagName) -> Vec<u8> {
    [TAG_PREFIX, tag.as_str().as_bytes()].concat()
}

/// Every replica key of `hash` starts with this.
pub fn replica_prefix(hash: &BlobHash) -> Vec<u8> {
    [REPLICA_PREFIX, hash.as_slice()].concat()
}

pub fn replica_key(hash: &BlobHash, node: NodeId) -> Vec<u8> {
    let mut key = replica_prefix(hash);
    key.extend_from_slice(&node.to_be_bytes());
    key
}

/// The hash and node of a replica key, if it is one.
pub fn parse_replica_key(key: &[u8]) -> Option<(BlobHash, NodeId)> {
    let rest = key.strip_prefix(REPLICA_PREFIX)?;
    if rest.len() != 40 {
        return None;
    }
    let hash: BlobHash = rest[..32].try_into().ok()?;
    let node = NodeId::from_be_bytes(rest[32..].try_into().ok()?);
    Some((hash, node))
}

/// What a tag names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub hash: BlobHash,
    pub size: u64,
    /// When the tag was set (ms since the Unix epoch, the setting node's clock).
    pub created_at_ms: u64,
}

/// A member's claim that it holds a complete, verified copy of a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub size: u64,
    /// When the member finished storing it (ms since the Unix epoch, its clock).
    pub since_ms: u64,
}

fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    out.extend(postcard::to_allocvec(record).expect("records always encode"));
    out
}

fn decode<T: for<'a> Deserialize<'a>>(what: &str, bytes: &[u8]) -> Result<T, BlobError> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, body)) => match postcard::take_from_bytes(body) {
            Ok((record, [])) => Ok(record),
            Ok(_) => Err(BlobError::CorruptRecord(format!("{what}: trailing bytes"))),
            Err(e) => Err(BlobError::CorruptRecord(format!("{what}: {e}"))),
        },
        Some((v, _)) => Err(BlobError::CorruptRecord(format!(
            "{what}: unknown record version {v}"
        ))),
        None => Err(BlobError::CorruptRecord(format!("{what}: empty record"))),
    }
}

impl TagRecord {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, BlobError> {
        decode("tag record", bytes)
    }
}

impl ReplicaRecord {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, BlobError> {
        decode("replica record", bytes)
    }
}

/// Sets `tag` to name a blob.
pub fn put_tag(tag: &TagName, record: &TagRecord) -> SystemOp {
    SystemOp::Put {
        key: tag_key(tag),
        value: record.encode(),
    }
}

/// Records that `node` holds a complete copy of `hash`.
pub fn put_replica(hash: &BlobHash, node: NodeId, record: &ReplicaRecord) -> SystemOp {
    SystemOp::Put {
        key: replica_key(hash, node),
        value: record.encode(),
    }
}

/// Withdraws `node`'s claim to hold `hash`.
pub fn delete_replica(hash: &BlobHash, node: NodeId) -> SystemOp {
    SystemOp::Delete {
        key: replica_key(hash, node),
    }
}

/// Everything the key space says about blobs, read in one consistent view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlobIndex {
    pub tags: BTreeMap<TagName, TagRecord>,
    pub replicas: BTreeMap<BlobHash, BTreeMap<NodeId, ReplicaRecord>>,
}

impl BlobIndex {
    /// Every blob some tag names, with its size.
    pub fn referenced(&self) -> BTreeMap<BlobHash, u64> {
        self.tags.values().map(|t| (t.hash, t.size)).collect()
    }

    /// The tags naming `hash`.
    pub fn tags_of(&self, hash: &BlobHash) -> Vec<TagName> {
        self.tags
            .iter()
            .filter(|(_, t)| &t.hash == hash)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The members recorded as holding `hash`.
    pub fn holders(&self, hash: &BlobHash) -> BTreeSet<NodeId> {
        self.replicas
            .get(hash)
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The size of `hash` as its tags or replica records give it.
    pub fn size_of(&self, hash: &BlobHash) -> Option<u64> {
        self.tags
            .values()
            .find(|t| &t.hash == hash)
            .map(|t| t.size)
            .or_else(|| {
                self.replicas
                    .get(hash)
                    .and_then(|r| r.values().next())
                    .map(|r| r.size)
            })
    }
}

/// Reads every tag and replica record.
pub fn read_index(view: &SystemView) -> Result<Result<BlobIndex, BlobError>, ReadError> {
    let mut index = BlobIndex::default();
    let mut bad = None;
    view.scan(TAG_PREFIX, |key, value| {
        let name = String::from_utf8(key[TAG_PREFIX.len()..].to_vec())
            .map_err(|_| BlobError::CorruptRecord("tag name is not UTF-8".into()))
            .and_then(TagName::new);
        match name.and_then(|n| Ok((n, TagRecord::decode(value)?))) {
            Ok((name, record)) => {
                index.tags.insert(name, record);
                true
            }
            Err(e) => {
                bad = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = bad {
        return Ok(Err(e));
    }
    view.scan(REPLICA_PREFIX, |key, value| {
        let parsed = parse_replica_key(key)
            .ok_or_else(|| BlobError::CorruptRecord("malformed replica key".into()))
            .and_then(|(h, n)| Ok((h, n, ReplicaRecord::decode(value)?)));
        match parsed {
            Ok((hash, node, record)) => {
                index.replicas.entry(hash).or_default().insert(node, record);
                true
            }
            Err(e) => {
                bad = Some(e);
                false
            }
        }
    })?;
    Ok(match bad {
        Some(e) => Err(e),
        None => Ok(index),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_bytes() {
        let tag = TagName::new("t").unwrap();
        assert_eq!(tag_key(&tag), b"blob/t/t");
        let mut key = b"blob/r/".to_vec();
        key.extend([7; 32]);
        key.extend([0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(replica_key(&[7; 32], 0x102), key);
        assert_eq!(parse_replica_key(&key), Some(([7; 32], 0x102)));
        let record = TagRecord {
            hash: [1; 32],
            size: 300,
            created_at_ms: 2,
        };
        let mut expected = vec![1];
        expected.extend([1; 32]);
        expected.extend([0xac, 0x02, 2]);
        assert_eq!(record.encode(), expected);
        assert_eq!(TagRecord::decode(&expected).unwrap(), record);
        let replica = ReplicaRecord {
            size: 5,
            since_ms: 6,
        };
        assert_eq!(replica.encode(), [1, 5, 6]);
    }

    #[test]
    fn bad_records_are_typed_errors() {
        assert!(matches!(
            TagRecord::decode(&[]),
            Err(BlobError::CorruptRecord(_))
        ));
        assert!(matches!(
            ReplicaRecord::decode(&[2, 5, 6]),
            Err(BlobError::CorruptRecord(_))
        ));
        assert!(matches!(
            ReplicaRecord::decode(&[1, 5, 6, 7]),
            Err(BlobError::CorruptRecord(_))
        ));
        assert_eq!(parse_replica_key(b"blob/r/short"), None);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = TagRecord::decode(&bytes);
            let _ = ReplicaRecord::decode(&bytes);
            let _ = parse_replica_key(&bytes);
        }

        #[test]
        fn records_round_trip(hash in any::<[u8; 32]>(), size in any::<u64>(), at in any::<u64>()) {
            let t = TagRecord { hash, size, created_at_ms: at };
            prop_assert_eq!(TagRecord::decode(&t.encode()).unwrap(), t);
            let r = ReplicaRecord { size, since_ms: at };
            prop_assert_eq!(ReplicaRecord::decode(&r.encode()).unwrap(), r);
        }
    }
}
