//! Signed manifests: the origin cluster's statement of what one exported resource holds.
//!
//! A manifest names its origin (the cluster key), the resource (kind and name), a sequence
//! number, a digest of the content (Automerge heads; the hash of a blob prefix's sorted tag
//! list; an iroh-docs namespace's id and state), the hash of the previous manifest and when it
//! was issued. The origin signs it with its cluster key under the context
//! `aspen/manifest/v1`. A reader checks three things, in this order:
//!
//! 1. [`SignedManifest::verify`]: the signature is the origin's, over exactly these bytes,
//!    for the resource the reader asked for;
//! 2. [`check_successor`]: it does not go backwards from the last manifest the reader
//!    accepted (a lower seq is a replay or a rollback; the same seq with other content is a
//!    fork; the next seq must name the previous manifest as its parent);
//! 3. the data against the digest (the `sync` pulls do that), so whoever served it, the
//!    origin or a mirror, cannot change it.
//!
//! Encoding: a signed manifest is the postcard encoding of `{ body, signature }`, where `body`
//! is the postcard encoding of [`Manifest`] and the signature covers
//! `aspen/manifest/v1 || body`. The body is kept as it arrived (verification never depends on
//! re-encoding) and must be canonical (it re-encodes to the same bytes), so a manifest has
//! exactly one hash ([`SignedManifest::hash`]). Sizes are checked before anything is decoded.

use std::fmt;

use aspen_trust::{ClusterKey, ClusterSecretKey, Context};
use serde::{Deserialize, Serialize};

/// The manifest format this code writes and reads.
pub const MANIFEST_VERSION: u8 = 1;
/// Largest encoded signed manifest accepted (a manifest with [`MAX_HEADS`] heads and the
/// longest name takes under 9 KiB).
pub const MAX_MANIFEST_BYTES: usize = 16 * 1024;
/// Most Automerge heads a manifest may list (concurrent branches not yet merged).
pub const MAX_HEADS: usize = 256;
/// Longest resource name, in bytes (a document name, a tag prefix, a namespace id in hex).
pub const MAX_RESOURCE_NAME_BYTES: usize = 255;

/// Key for the BLAKE3 hash of a signed manifest (what `parent` holds).
const MANIFEST_HASH_CONTEXT: &str = "aspen/manifest-hash/v1";
/// Key for the BLAKE3 hash of a blob prefix's tag list.
const TAG_LIST_HASH_CONTEXT: &str = "aspen/blob-tag-list/v1";
/// Key for the BLAKE3 hash of a namespace's records.
const NS_STATE_HASH_CONTEXT: &str = "aspen/ns-state/v1";

/// What kind of resource a manifest describes. Wire tags are stable: append only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ResourceKind {
    /// An Automerge document, by name.
    Doc,
    /// The blobs tagged under a tag prefix.
    Blob,
    /// An iroh-docs namespace, by id (hex).
    Ns,
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Doc => "doc",
            ResourceKind::Blob => "blob",
            ResourceKind::Ns => "ns",
        })
    }
}

/// One exported resource of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Resource {
    pub kind: ResourceKind,
    /// A document name, a tag prefix (may be empty: every tag), or a namespace id in
    /// lowercase hex.
    pub name: String,
}

impl Resource {
    pub fn doc(name: impl Into<String>) -> Self {
        Resource {
            kind: ResourceKind::Doc,
            name: name.into(),
        }
    }

    pub fn blob(prefix: impl Into<String>) -> Self {
        Resource {
            kind: ResourceKind::Blob,
            name: prefix.into(),
        }
    }

    pub fn ns(id: &[u8; 32]) -> Self {
        Resource {
            kind: ResourceKind::Ns,
            name: hex::encode(id),
        }
    }

    /// Bounds and form: a name within [`MAX_RESOURCE_NAME_BYTES`]; a document name that is
    /// not empty; a namespace named by 64 lowercase hex digits.
    pub fn check(&self) -> Result<(), ManifestError> {
        if self.name.len() > MAX_RESOURCE_NAME_BYTES {
            return Err(ManifestError::NameTooLong {
                len: self.name.len(),
                max: MAX_RESOURCE_NAME_BYTES,
            });
        }
        let ok = match self.kind {
            ResourceKind::Doc => !self.name.is_empty(),
            ResourceKind::Blob => true,
            ResourceKind::Ns => {
                self.name.len() == 64
                    && self
                        .name
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            }
        };
        if ok {
            Ok(())
        } else {
            Err(ManifestError::BadResource(self.to_string()))
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.name.escape_default())
    }
}

/// What the resource holds, in a form a reader can check pulled data against. Wire tags are
/// stable: append only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContentDigest {
    /// An Automerge document's heads (change hashes), sorted ascending, without duplicates;
    /// empty for a document without changes.
    Heads(Vec<[u8; 32]>),
    /// The tags under a prefix and the blobs they name: how many, and the hash of the sorted
    /// list ([`BlobTagList::digest`]). The list travels separately and is checked against it.
    BlobTags { count: u64, list: [u8; 32] },
    /// An iroh-docs namespace: its id, and how many entries and which (a hash the namespace
    /// code defines over its latest entries).
    Namespace {
        id: [u8; 32],
        entries: u64,
        state: [u8; 32],
    },
}

impl ContentDigest {
    /// Heads in canonical order (sorted, duplicates removed).
    pub fn heads(mut heads: Vec<[u8; 32]>) -> Self {
        heads.sort_unstable();
        heads.dedup();
        ContentDigest::Heads(heads)
    }

    pub fn kind(&self) -> ResourceKind {
        match self {
            ContentDigest::Heads(_) => ResourceKind::Doc,
            ContentDigest::BlobTags { .. } => ResourceKind::Blob,
            ContentDigest::Namespace { .. } => ResourceKind::Ns,
        }
    }
}

/// A blob prefix's tags and the blobs they name, sorted by tag: what a
/// [`ContentDigest::BlobTags`] digest pins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobTagList(Vec<(String, [u8; 32])>);

impl BlobTagList {
    /// Sorts `entries` by tag; a tag listed twice is an error.
    pub fn new(mut entries: Vec<(String, [u8; 32])>) -> Result<Self, ManifestError> {
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(ManifestError::DuplicateTag(w[0].0.clone()));
        }
        Ok(BlobTagList(entries))
    }

    pub fn entries(&self) -> &[(String, [u8; 32])] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The digest a manifest carries for this list.
    pub fn digest(&self) -> ContentDigest {
        let bytes = postcard::to_allocvec(&self.0).expect("a tag list encodes");
        ContentDigest::BlobTags {
            count: self.0.len() as u64,
            list: blake3::derive_key(TAG_LIST_HASH_CONTEXT, &bytes),
        }
    }
}

/// One record of an iroh-docs namespace as a [`NamespaceState`] pins it: the latest entry of
/// one author for one key (deletion markers, empty, included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsEntryState {
    pub author: [u8; 32],
    pub key: Vec<u8>,
    /// BLAKE3 hash and length of the entry's content.
    pub hash: [u8; 32],
    pub len: u64,
    /// The entry's own timestamp (microseconds, set and signed by its author).
    pub timestamp: u64,
}

/// A namespace's records sorted by (author, key): what a [`ContentDigest::Namespace`] pins.
/// The entries themselves are signed by the namespace and their authors (iroh-docs checks
/// that); the digest adds that the origin cluster held exactly this set at that seq.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceState(Vec<NsEntryState>);

impl NamespaceState {
    /// Sorts `entries`; a record (author, key) listed twice is an error.
    pub fn new(mut entries: Vec<NsEntryState>) -> Result<Self, ManifestError> {
        entries.sort_unstable_by(|a, b| (a.author, &a.key).cmp(&(b.author, &b.key)));
        if let Some(w) = entries
            .windows(2)
            .find(|w| (w[0].author, &w[0].key) == (w[1].author, &w[1].key))
        {
            return Err(ManifestError::DuplicateEntry(format!(
                "author {} key {:?}",
                hex::encode(w[0].author),
                String::from_utf8_lossy(&w[0].key)
            )));
        }
        Ok(NamespaceState(entries))
    }

    pub fn entries(&self) -> &[NsEntryState] {
        &self.0
    }

    /// The digest a manifest of namespace `id` carries for this state.
    pub fn digest(&self, id: [u8; 32]) -> ContentDigest {
        let bytes = postcard::to_allocvec(&self.0).expect("a namespace state encodes");
        ContentDigest::Namespace {
            id,
            entries: self.0.len() as u64,
            state: blake3::derive_key(NS_STATE_HASH_CONTEXT, &bytes),
        }
    }
}

/// The statement an origin signs (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u8,
    /// The origin cluster's key.
    pub origin: [u8; 32],
    pub resource: Resource,
    /// Strictly increasing per resource, from 1.
    pub seq: u64,
    pub digest: ContentDigest,
    /// [`SignedManifest::hash`] of the manifest with `seq - 1`; `None` for the first one.
    pub parent: Option<[u8; 32]>,
    /// Unix seconds, the origin's clock (informational: freshness is decided by `seq`).
    pub issued_at: u64,
}

impl Manifest {
    /// Everything that can be checked without the previous manifest: version, bounds, the
    /// digest's kind against the resource's, canonical heads, a namespace digest naming the
    /// namespace the resource names, and `parent` present exactly when `seq > 1`.
    pub fn check(&self) -> Result<(), ManifestError> {
        if self.version != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion(self.version));
        }
        self.resource.check()?;
        if self.digest.kind() != self.resource.kind {
            return Err(ManifestError::KindMismatch {
                resource: self.resource.kind,
                digest: self.digest.kind(),
            });
        }
        match &self.digest {
            ContentDigest::Heads(heads) => {
                if heads.len() > MAX_HEADS {
                    return Err(ManifestError::TooManyHeads {
                        count: heads.len(),
                        max: MAX_HEADS,
                    });
                }
                if heads.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(ManifestError::HeadsNotCanonical);
                }
            }
            ContentDigest::Namespace { id, .. } => {
                if hex::encode(id) != self.resource.name {
                    return Err(ManifestError::BadResource(format!(
                        "{} carries the state of namespace {}",
                        self.resource,
                        hex::encode(id)
                    )));
                }
            }
            ContentDigest::BlobTags { .. } => {}
        }
        if self.seq == 0 {
            return Err(ManifestError::ZeroSeq);
        }
        if (self.seq == 1) != self.parent.is_none() {
            return Err(ManifestError::BrokenChain { seq: self.seq });
        }
        Ok(())
    }
}

/// A manifest and the origin's signature over its exact bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    body: Vec<u8>,
    /// The 64 signature bytes, in two halves (serde has no 64-byte arrays; postcard writes
    /// both halves without a length, so the wire holds the plain 64 bytes).
    signature: ([u8; 32], [u8; 32]),
}

fn split(signature: [u8; 64]) -> ([u8; 32], [u8; 32]) {
    let mut a = [0; 32];
    let mut b = [0; 32];
    a.copy_from_slice(&signature[..32]);
    b.copy_from_slice(&signature[32..]);
    (a, b)
}

fn join(signature: &([u8; 32], [u8; 32])) -> [u8; 64] {
    let mut out = [0; 64];
    out[..32].copy_from_slice(&signature.0);
    out[32..].copy_from_slice(&signature.1);
    out
}

impl SignedManifest {
    /// Signs `manifest` with the origin's cluster key (which must be the manifest's origin).
    pub fn sign(manifest: &Manifest, key: &ClusterSecretKey) -> Result<Self, ManifestError> {
        manifest.check()?;
        let signer = key.public().to_bytes();
        if signer != manifest.origin {
            return Err(ManifestError::WrongOrigin {
                expected: manifest.origin,
                got: signer,
            });
        }
        let body = postcard::to_allocvec(manifest).expect("a manifest encodes");
        let signed = SignedManifest {
            signature: split(key.sign(Context::Manifest, &body)),
            body,
        };
        let len = signed.encode().len();
        if len > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                len,
                max: MAX_MANIFEST_BYTES,
            });
        }
        Ok(signed)
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a signed manifest encodes")
    }

    /// Parses an encoded signed manifest (nothing verified yet: see [`Self::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                len: bytes.len(),
                max: MAX_MANIFEST_BYTES,
            });
        }
        let (signed, rest): (SignedManifest, _) = postcard::take_from_bytes(bytes)
            .map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ManifestError::Malformed(format!(
                "{} bytes after the manifest",
                rest.len()
            )));
        }
        if signed.encode() != bytes {
            return Err(ManifestError::NotCanonical);
        }
        Ok(signed)
    }

    /// The manifest, if `origin` signed exactly these bytes for `resource` and the manifest
    /// is well formed ([`Manifest::check`]).
    pub fn verify(
        &self,
        origin: &ClusterKey,
        resource: &Resource,
    ) -> Result<Manifest, ManifestError> {
        if !origin.verify(Context::Manifest, &self.body, &join(&self.signature)) {
            return Err(ManifestError::BadSignature);
        }
        let manifest = self.manifest()?;
        if manifest.origin != origin.to_bytes() {
            return Err(ManifestError::WrongOrigin {
                expected: origin.to_bytes(),
                got: manifest.origin,
            });
        }
        if &manifest.resource != resource {
            return Err(ManifestError::WrongResource {
                expected: resource.to_string(),
                got: manifest.resource.to_string(),
            });
        }
        Ok(manifest)
    }

    /// The manifest as it claims to be, signature not checked (for display and logs; decide
    /// nothing on it).
    pub fn manifest(&self) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = postcard::from_bytes(&self.body)
            .map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if postcard::to_allocvec(&manifest).expect("a manifest encodes") != self.body {
            return Err(ManifestError::NotCanonical);
        }
        manifest.check()?;
        Ok(manifest)
    }

    /// What a successor names as its `parent`: BLAKE3 (keyed for manifests) of the encoding.
    pub fn hash(&self) -> [u8; 32] {
        blake3::derive_key(MANIFEST_HASH_CONTEXT, &self.encode())
    }
}

/// Whether `next` may replace the last accepted manifest `previous` (with its hash) of the
/// same resource: a higher seq (the next seq must name `previous` as its parent), or the very
/// same manifest again. A lower seq is a replay or a rollback; the same seq with other
/// content is a fork (the origin signed two different things).
pub fn check_successor(
    previous: Option<(&Manifest, [u8; 32])>,
    next: &Manifest,
    next_hash: [u8; 32],
) -> Result<(), ManifestError> {
    let Some((previous, previous_hash)) = previous else {
        return Ok(());
    };
    if next.origin != previous.origin || next.resource != previous.resource {
        return Err(ManifestError::WrongResource {
            expected: previous.resource.to_string(),
            got: next.resource.to_string(),
        });
    }
    match next.seq.cmp(&previous.seq) {
        std::cmp::Ordering::Less => Err(ManifestError::Rollback {
            have: previous.seq,
            got: next.seq,
        }),
        std::cmp::Ordering::Equal if next_hash == previous_hash => Ok(()),
        std::cmp::Ordering::Equal => Err(ManifestError::Fork { seq: next.seq }),
        std::cmp::Ordering::Greater
            if next.seq == previous.seq + 1 && next.parent != Some(previous_hash) =>
        {
            Err(ManifestError::BrokenChain { seq: next.seq })
        }
        std::cmp::Ordering::Greater => Ok(()),
    }
}

/// Why a manifest was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed manifest: {0}")]
    Malformed(String),
    #[error("manifest bytes are not in canonical form")]
    NotCanonical,
    #[error("manifest version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(u8),
    #[error("the manifest's signature is not the origin's")]
    BadSignature,
    #[error(
        "manifest from origin {}, expected {}",
        hex::encode(got),
        hex::encode(expected)
    )]
    WrongOrigin { expected: [u8; 32], got: [u8; 32] },
    #[error("manifest for {got}, expected {expected}")]
    WrongResource { expected: String, got: String },
    #[error("bad resource {0}")]
    BadResource(String),
    #[error("resource name of {len} bytes exceeds the limit of {max}")]
    NameTooLong { len: usize, max: usize },
    #[error("a {resource} resource with a {digest} digest")]
    KindMismatch {
        resource: ResourceKind,
        digest: ResourceKind,
    },
    #[error("{count} heads exceed the limit of {max}")]
    TooManyHeads { count: usize, max: usize },
    #[error("heads are not sorted and unique")]
    HeadsNotCanonical,
    #[error("tag {0:?} is listed twice")]
    DuplicateTag(String),
    #[error("namespace record ({0}) is listed twice")]
    DuplicateEntry(String),
    #[error("manifest seq 0 (seqs start at 1)")]
    ZeroSeq,
    #[error("manifest seq {got} is older than the accepted seq {have} (replay or rollback)")]
    Rollback { have: u64, got: u64 },
    #[error("the origin signed two different manifests with seq {seq}")]
    Fork { seq: u64 },
    #[error("manifest seq {seq} does not name the previous manifest as its parent")]
    BrokenChain { seq: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> ClusterSecretKey {
        ClusterSecretKey::from_bytes(&[n; 32])
    }

    fn doc_manifest(origin: &ClusterSecretKey, seq: u64, parent: Option<[u8; 32]>) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            origin: origin.public().to_bytes(),
            resource: Resource::doc("plans"),
            seq,
            digest: ContentDigest::heads(vec![[2; 32], [1; 32]]),
            parent,
            issued_at: 1_700_000_000,
        }
    }

    /// The encoding is stable: these bytes must never change for this manifest.
    #[test]
    fn golden_bytes() {
        let origin = key(7);
        let m = doc_manifest(&origin, 2, Some([9; 32]));
        let body = postcard::to_allocvec(&m).unwrap();
        let expected = [
            &[1][..],                        // version
            &origin.public().to_bytes()[..], // origin
            &[0, 5],                         // Doc, name length
            b"plans",
            &[2],     // seq
            &[0, 2],  // Heads, two of them
            &[1; 32], // sorted
            &[2; 32],
            &[1], // parent: Some
            &[9; 32],
            &[0x80, 0xe2, 0xcf, 0xaa, 0x06], // issued_at varint
        ]
        .concat();
        assert_eq!(body, expected);
        let signed = SignedManifest::sign(&m, &origin).unwrap();
        let encoded = signed.encode();
        // body length (a two-byte varint here), body, then the 64 signature bytes.
        let len = body.len();
        assert!((128..16384).contains(&len));
        assert_eq!(encoded[..2], [(len as u8 & 0x7f) | 0x80, (len >> 7) as u8]);
        assert_eq!(&encoded[2..2 + len], &body[..]);
        assert_eq!(encoded.len(), 2 + len + 64);
        // Ed25519 is deterministic: the whole encoding, and so the hash, is pinned too.
        assert_eq!(
            hex::encode(signed.hash()),
            "2325c3aed3058b5a0440c90a4be89cf9b5caca42f053b69981baacbf03ec4b52"
        );
        assert_eq!(
            postcard::to_allocvec(&ResourceKind::Ns).unwrap(),
            [2],
            "resource kinds keep their tags"
        );
        let tags = BlobTagList::new(vec![("b".into(), [2; 32]), ("a".into(), [1; 32])]).unwrap();
        let ContentDigest::BlobTags { count, list } = tags.digest() else {
            unreachable!()
        };
        assert_eq!(count, 2);
        let list_bytes = [&[2, 1, b'a'][..], &[1; 32], &[1, b'b'], &[2; 32]].concat();
        assert_eq!(list, blake3::derive_key(TAG_LIST_HASH_CONTEXT, &list_bytes));
    }

    /// A namespace state's digest is pinned too, whatever order its records came in.
    #[test]
    fn namespace_state_golden_digest() {
        let entry = |author: u8, key: &[u8], ts: u64| NsEntryState {
            author: [author; 32],
            key: key.to_vec(),
            hash: [9; 32],
            len: 3,
            timestamp: ts,
        };
        let state = NamespaceState::new(vec![entry(2, b"a", 5), entry(1, b"b", 7)]).unwrap();
        let again = NamespaceState::new(vec![entry(1, b"b", 7), entry(2, b"a", 5)]).unwrap();
        assert_eq!(state, again);
        let ContentDigest::Namespace {
            id,
            entries,
            state: hash,
        } = state.digest([4; 32])
        else {
            unreachable!()
        };
        assert_eq!((id, entries), ([4; 32], 2));
        let bytes = [
            &[2][..],
            &[1; 32],
            &[1, b'b'],
            &[9; 32],
            &[3, 7],
            &[2; 32],
            &[1, b'a'],
            &[9; 32],
            &[3, 5],
        ]
        .concat();
        assert_eq!(hash, blake3::derive_key(NS_STATE_HASH_CONTEXT, &bytes));
        assert!(matches!(
            NamespaceState::new(vec![entry(1, b"k", 1), entry(1, b"k", 2)]),
            Err(ManifestError::DuplicateEntry(_))
        ));
        // Any change to a record changes the digest.
        let newer = NamespaceState::new(vec![entry(2, b"a", 6), entry(1, b"b", 7)]).unwrap();
        assert_ne!(newer.digest([4; 32]), state.digest([4; 32]));
    }

    #[test]
    fn a_signed_manifest_verifies_for_its_origin_and_resource_only() {
        let origin = key(1);
        let m = doc_manifest(&origin, 1, None);
        let signed = SignedManifest::sign(&m, &origin).unwrap();
        let back = SignedManifest::decode(&signed.encode()).unwrap();
        assert_eq!(back.verify(&origin.public(), &m.resource).unwrap(), m);
        // Another cluster's key: the signature is not its.
        assert_eq!(
            back.verify(&key(2).public(), &m.resource),
            Err(ManifestError::BadSignature)
        );
        // The right origin, but the reader asked about another resource.
        assert!(matches!(
            back.verify(&origin.public(), &Resource::doc("other")),
            Err(ManifestError::WrongResource { .. })
        ));
        // A key cannot sign in another cluster's name.
        let claimed = doc_manifest(&origin, 1, None);
        assert!(matches!(
            SignedManifest::sign(&claimed, &key(3)),
            Err(ManifestError::WrongOrigin { .. })
        ));
    }

    #[test]
    fn a_manifest_signed_by_another_key_in_the_origins_name_is_refused() {
        // A forger builds the body claiming origin 1 and signs it with its own key.
        let origin = key(1);
        let forger = key(4);
        let m = doc_manifest(&origin, 1, None);
        let body = postcard::to_allocvec(&m).unwrap();
        let forged = SignedManifest {
            signature: split(forger.sign(Context::Manifest, &body)),
            body,
        };
        let bytes = forged.encode();
        let back = SignedManifest::decode(&bytes).unwrap();
        assert_eq!(
            back.verify(&origin.public(), &m.resource),
            Err(ManifestError::BadSignature)
        );
        // A signature made for another context (a node certificate) does not count either.
        let body = postcard::to_allocvec(&m).unwrap();
        let cross = SignedManifest {
            signature: split(origin.sign(Context::NodeCertificate, &body)),
            body,
        };
        assert_eq!(
            cross.verify(&origin.public(), &m.resource),
            Err(ManifestError::BadSignature)
        );
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let origin = key(1);
        let m = doc_manifest(&origin, 3, Some([5; 32]));
        let bytes = SignedManifest::sign(&m, &origin).unwrap().encode();
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                let verdict = SignedManifest::decode(&b)
                    .and_then(|s| s.verify(&origin.public(), &m.resource));
                assert!(
                    verdict.is_err(),
                    "byte {i} flipped by {bit:#x} still verifies"
                );
            }
        }
    }

    #[test]
    fn malformed_manifests_are_typed_errors() {
        let origin = key(1);
        let mut m = doc_manifest(&origin, 1, None);
        m.digest = ContentDigest::Heads(vec![[2; 32], [1; 32]]);
        assert_eq!(
            SignedManifest::sign(&m, &origin),
            Err(ManifestError::HeadsNotCanonical)
        );
        m.digest = ContentDigest::Heads(vec![[1; 32]; 2]);
        assert_eq!(
            SignedManifest::sign(&m, &origin),
            Err(ManifestError::HeadsNotCanonical)
        );
        m.digest = ContentDigest::heads(
            (0..=MAX_HEADS as u32)
                .map(|i| {
                    let mut h = [0; 32];
                    h[..4].copy_from_slice(&i.to_be_bytes());
                    h
                })
                .collect(),
        );
        assert!(matches!(
            SignedManifest::sign(&m, &origin),
            Err(ManifestError::TooManyHeads { .. })
        ));
        m.digest = ContentDigest::BlobTags {
            count: 0,
            list: [0; 32],
        };
        assert!(matches!(
            SignedManifest::sign(&m, &origin),
            Err(ManifestError::KindMismatch { .. })
        ));
        let mut m = doc_manifest(&origin, 1, None);
        m.resource = Resource::doc("x".repeat(MAX_RESOURCE_NAME_BYTES + 1));
        assert!(matches!(
            SignedManifest::sign(&m, &origin),
            Err(ManifestError::NameTooLong { .. })
        ));
        let mut m = doc_manifest(&origin, 1, None);
        m.version = 2;
        assert_eq!(
            SignedManifest::sign(&m, &origin),
            Err(ManifestError::UnsupportedVersion(2))
        );
        // seq 1 has no parent, later seqs have one.
        assert_eq!(
            SignedManifest::sign(&doc_manifest(&origin, 1, Some([1; 32])), &origin),
            Err(ManifestError::BrokenChain { seq: 1 })
        );
        assert_eq!(
            SignedManifest::sign(&doc_manifest(&origin, 2, None), &origin),
            Err(ManifestError::BrokenChain { seq: 2 })
        );
        assert_eq!(
            SignedManifest::sign(&doc_manifest(&origin, 0, None), &origin),
            Err(ManifestError::ZeroSeq)
        );
        // A namespace manifest must describe the namespace it names.
        let ns = Manifest {
            resource: Resource::ns(&[3; 32]),
            digest: ContentDigest::Namespace {
                id: [4; 32],
                entries: 0,
                state: [0; 32],
            },
            ..doc_manifest(&origin, 1, None)
        };
        assert!(matches!(
            SignedManifest::sign(&ns, &origin),
            Err(ManifestError::BadResource(_))
        ));
        assert!(matches!(
            Resource {
                kind: ResourceKind::Ns,
                name: "zz".into()
            }
            .check(),
            Err(ManifestError::BadResource(_))
        ));
        assert_eq!(
            BlobTagList::new(vec![("a".into(), [1; 32]), ("a".into(), [2; 32])]),
            Err(ManifestError::DuplicateTag("a".into()))
        );
        // Too large before anything is parsed; trailing and non-canonical bytes.
        assert!(matches!(
            SignedManifest::decode(&vec![0; MAX_MANIFEST_BYTES + 1]),
            Err(ManifestError::TooLarge { .. })
        ));
        let mut bytes = SignedManifest::sign(&doc_manifest(&origin, 1, None), &origin)
            .unwrap()
            .encode();
        bytes.push(0);
        assert!(matches!(
            SignedManifest::decode(&bytes),
            Err(ManifestError::Malformed(_))
        ));
        // The body length written as a two-byte varint: same value, other bytes.
        let good = SignedManifest::sign(&doc_manifest(&origin, 1, None), &origin)
            .unwrap()
            .encode();
        let mut padded = vec![good[0] | 0x80, 0];
        padded.extend_from_slice(&good[1..]);
        assert!(matches!(
            SignedManifest::decode(&padded),
            Err(ManifestError::NotCanonical) | Err(ManifestError::Malformed(_))
        ));
    }

    #[test]
    fn the_biggest_manifest_fits_the_limit() {
        let origin = key(1);
        let heads = (0..MAX_HEADS as u32)
            .map(|i| {
                let mut h = [0xff; 32];
                h[..4].copy_from_slice(&i.to_be_bytes());
                h
            })
            .collect();
        let m = Manifest {
            resource: Resource::doc("n".repeat(MAX_RESOURCE_NAME_BYTES)),
            digest: ContentDigest::heads(heads),
            seq: u64::MAX,
            parent: Some([0xff; 32]),
            issued_at: u64::MAX,
            ..doc_manifest(&origin, 1, None)
        };
        let len = SignedManifest::sign(&m, &origin).unwrap().encode().len();
        assert!(len <= MAX_MANIFEST_BYTES, "{len}");
    }

    #[test]
    fn manifests_never_go_backwards() {
        let origin = key(1);
        let first = doc_manifest(&origin, 1, None);
        let first_signed = SignedManifest::sign(&first, &origin).unwrap();
        let h1 = first_signed.hash();
        let second = doc_manifest(&origin, 2, Some(h1));
        let h2 = SignedManifest::sign(&second, &origin).unwrap().hash();
        // Nothing accepted yet: anything well formed goes.
        assert_eq!(check_successor(None, &second, h2), Ok(()));
        // The next one, naming its parent.
        assert_eq!(check_successor(Some((&first, h1)), &second, h2), Ok(()));
        // The same one again: harmless.
        assert_eq!(check_successor(Some((&second, h2)), &second, h2), Ok(()));
        // An older one: a replay or a rollback.
        assert_eq!(
            check_successor(Some((&second, h2)), &first, h1),
            Err(ManifestError::Rollback { have: 2, got: 1 })
        );
        // The same seq with other content: the origin signed two things.
        let mut other = second.clone();
        other.digest = ContentDigest::heads(vec![[7; 32]]);
        let ho = SignedManifest::sign(&other, &origin).unwrap().hash();
        assert_eq!(
            check_successor(Some((&second, h2)), &other, ho),
            Err(ManifestError::Fork { seq: 2 })
        );
        // The next seq with a parent that is not the accepted manifest.
        let stray = doc_manifest(&origin, 2, Some([8; 32]));
        let hs = SignedManifest::sign(&stray, &origin).unwrap().hash();
        assert_eq!(
            check_successor(Some((&first, h1)), &stray, hs),
            Err(ManifestError::BrokenChain { seq: 2 })
        );
        // Further ahead (the reader missed some): only the order is checkable.
        let later = doc_manifest(&origin, 9, Some([8; 32]));
        let hl = SignedManifest::sign(&later, &origin).unwrap().hash();
        assert_eq!(check_successor(Some((&first, h1)), &later, hl), Ok(()));
        // Another resource's manifest is not a successor.
        let mut elsewhere = later.clone();
        elsewhere.resource = Resource::doc("other");
        assert!(matches!(
            check_successor(Some((&first, h1)), &elsewhere, hl),
            Err(ManifestError::WrongResource { .. })
        ));
    }

    fn arb_digest() -> impl Strategy<Value = (ResourceKind, ContentDigest)> {
        prop_oneof![
            proptest::collection::vec(any::<[u8; 32]>(), 0..8)
                .prop_map(|h| (ResourceKind::Doc, ContentDigest::heads(h))),
            (any::<u64>(), any::<[u8; 32]>()).prop_map(|(count, list)| (
                ResourceKind::Blob,
                ContentDigest::BlobTags { count, list }
            )),
            (any::<[u8; 32]>(), any::<u64>(), any::<[u8; 32]>()).prop_map(
                |(id, entries, state)| (
                    ResourceKind::Ns,
                    ContentDigest::Namespace { id, entries, state }
                )
            ),
        ]
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(s) = SignedManifest::decode(&bytes) {
                let _ = s.manifest();
                let _ = s.verify(&key(1).public(), &Resource::doc("d"));
            }
        }

        #[test]
        fn well_formed_manifests_round_trip(
            (kind, digest) in arb_digest(),
            name in "[a-z/]{1,40}",
            seq in 1u64..u64::MAX,
            parent in any::<[u8; 32]>(),
            issued_at in any::<u64>(),
        ) {
            let origin = key(5);
            let resource = match (&kind, &digest) {
                (ResourceKind::Ns, ContentDigest::Namespace { id, .. }) => Resource::ns(id),
                _ => Resource { kind, name },
            };
            let m = Manifest {
                version: MANIFEST_VERSION,
                origin: origin.public().to_bytes(),
                resource: resource.clone(),
                seq,
                digest,
                parent: (seq > 1).then_some(parent),
                issued_at,
            };
            let signed = SignedManifest::sign(&m, &origin).unwrap();
            let back = SignedManifest::decode(&signed.encode()).unwrap();
            prop_assert_eq!(back.hash(), signed.hash());
            prop_assert_eq!(back.verify(&origin.public(), &resource).unwrap(), m);
        }
    }
}
