//! `aspen/federation/1`: what clusters say to each other, and who is calling.
//!
//! A connection starts with a [`Hello`] on its first bi-stream: the caller's node certificate
//! (its cluster key signing its node id). The node id must be the key the QUIC handshake
//! proved ([`caller_cluster`]), so a certificate copied from somewhere else is useless to
//! anyone without that node's secret key, and there is no handshake document to replay.
//! From then on every request on the connection is "from cluster K". The answer
//! ([`HelloReply::Welcome`]) carries the server's own certificate, so the caller knows it
//! reached a member of the cluster it meant to reach.
//!
//! After the hello, one request per bi-stream: a [`FedCall`], answered by a [`FedReply`].
//! Frames are the shared Aspen framing (4-byte length, postcard), bounded by
//! [`MAX_CALL_FRAME`] one way and [`MAX_REPLY_FRAME`] the other. Wire tags are stable:
//! append only (golden-bytes tests below).
//!
//! Nothing is served by default: a resource is served to a cluster only while an export
//! allows that cluster ([`crate::Export::allows`]); a resource that is not exported and one
//! exported to others get the same answer, so a stranger learns nothing from asking.

use std::fmt;

use aspen_sync::Resource;
use aspen_trust::{ClusterKey, NodeCertificate};
use serde::{Deserialize, Serialize};

/// The ALPN of the federation protocol.
pub const FEDERATION_ALPN: &[u8] = b"aspen/federation/1";
/// Largest hello or request frame (requests are small: a resource and some heads).
pub const MAX_CALL_FRAME: usize = 64 * 1024;
/// Most raw change bytes one [`FedReply::DocChanges`] page carries (a single larger change,
/// at most 1 MiB, is sent alone).
pub const MAX_CHANGES_PAGE_BYTES: usize = 8 * 1024 * 1024;
/// Most tags one [`FedReply::BlobTags`] lists (export a narrower prefix for more).
pub const MAX_FED_TAGS: usize = 10_000;
/// Largest saved document one [`FedReply::DocSnapshot`] carries.
pub const MAX_SNAPSHOT_BYTES: usize = MAX_CHANGES_PAGE_BYTES;
/// Largest reply frame: a page of changes, its framing and a manifest.
pub const MAX_REPLY_FRAME: usize = MAX_CHANGES_PAGE_BYTES + 1024 * 1024;

/// The first frame of a connection: who is calling.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The caller's node certificate ([`NodeCertificate::encode`]).
    pub certificate: Vec<u8>,
}

/// The answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Accepted; the server's own node certificate.
    Welcome { certificate: Vec<u8> },
    /// Refused (the connection is then closed).
    Refused(FedError),
}

/// One request, after the hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FedCall {
    /// The origin's current signed manifest of a resource. → [`FedReply::Manifest`]
    Manifest { resource: Resource },
    /// The changes of document `name` that a follower holding `have` lacks, with the signed
    /// manifest of the state they come from. → [`FedReply::DocChanges`]
    DocChanges { name: String, have: Vec<[u8; 32]> },
    /// The tags under an exported prefix and the blobs they name, with the signed manifest
    /// of that list. The blobs themselves are then fetched over iroh-blobs (verified
    /// streaming), which admits the caller's node for them. → [`FedReply::BlobTags`]
    BlobTags { prefix: String },
    /// Document `name` as one saved Automerge document, with the signed manifest of the
    /// state saved (its heads), for a follower that has none of it yet: Automerge loads a
    /// saved document far faster than it applies the same changes one by one.
    /// → [`FedReply::DocSnapshot`], or [`FedError::TooLarge`] past [`MAX_SNAPSHOT_BYTES`]
    /// (then ask for changes).
    DocSnapshot { name: String },
    /// Another call (encoded, one of the four above), answered by a mirror from its verified
    /// copy of `origin`'s resource: the last manifest `origin` signed that the mirror
    /// accepted, and exactly the data it names. A mirror's answers are checked like the
    /// origin's, against `origin`'s key. Nested mirrored calls are refused.
    Mirrored { origin: [u8; 32], call: Vec<u8> },
}

impl FedCall {
    /// `call` addressed to a mirror of `origin`'s resource.
    pub fn via_mirror(origin: &ClusterKey, call: &FedCall) -> FedCall {
        FedCall::Mirrored {
            origin: origin.to_bytes(),
            call: postcard::to_allocvec(call).expect("a call encodes"),
        }
    }

    /// The origin and the call inside a [`FedCall::Mirrored`] (one level only).
    pub fn open_mirrored(
        origin: &[u8; 32],
        call: &[u8],
    ) -> Result<(ClusterKey, FedCall), FedError> {
        let origin = ClusterKey::from_bytes(origin)
            .map_err(|_| FedError::BadRequest("the origin is not a cluster key".into()))?;
        let inner = match postcard::take_from_bytes::<FedCall>(call) {
            Ok((inner, [])) => inner,
            _ => {
                return Err(FedError::BadRequest(
                    "a mirrored call that does not decode".into(),
                ))
            }
        };
        if matches!(inner, FedCall::Mirrored { .. }) {
            return Err(FedError::BadRequest(
                "a mirrored call inside a mirrored call".into(),
            ));
        }
        Ok((origin, inner))
    }
}

/// The answer to a [`FedCall`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FedReply {
    /// An encoded [`aspen_sync::SignedManifest`].
    Manifest(Vec<u8>),
    /// A page of raw Automerge changes in causal order; `manifest` (encoded signed manifest)
    /// describes the state they were taken from; `more`: ask again with the new heads.
    DocChanges {
        manifest: Vec<u8>,
        changes: Vec<Vec<u8>>,
        more: bool,
    },
    Error(FedError),
    /// Every tag under the prefix and the blob it names (sorted by tag, at most
    /// [`MAX_FED_TAGS`]); `manifest` pins the list ([`aspen_sync::BlobTagList::digest`]).
    BlobTags {
        manifest: Vec<u8>,
        tags: Vec<(String, [u8; 32])>,
    },
    /// A saved document (one document chunk) whose heads are exactly the manifest's.
    DocSnapshot {
        manifest: Vec<u8>,
        document: Vec<u8>,
    },
}

/// Why a federation request was refused or failed. Wire tags are stable: append only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum FedError {
    /// The hello did not prove a cluster (bad certificate, another node's certificate,
    /// expired).
    #[error("not a proven cluster member: {0}")]
    Unproven(String),
    /// Not exported to the caller's cluster (or not exported at all: the same answer).
    #[error("{resource} is not exported to cluster {cluster}")]
    NotExported { resource: String, cluster: String },
    /// Exported, but the origin has no such resource (yet).
    #[error("{0} does not exist at the origin")]
    NotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Try again later (no leader, the cluster is busy, ...).
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error at the origin: {0}")]
    Internal(String),
    /// The answer would exceed its bound (a snapshot: ask for changes instead).
    #[error("too large: {0}")]
    TooLarge(String),
}

impl FedError {
    pub fn not_exported(resource: &Resource, cluster: &ClusterKey) -> Self {
        FedError::NotExported {
            resource: resource.to_string(),
            cluster: cluster.to_string(),
        }
    }
}

/// The cluster a caller speaks for: its hello's certificate must decode, be signed by the
/// cluster key it names, name exactly `remote_id` (the key QUIC proved) and be unexpired at
/// `now` (Unix seconds).
pub fn caller_cluster(
    hello: &Hello,
    remote_id: &[u8; 32],
    now: u64,
) -> Result<ClusterKey, FedError> {
    let cert = NodeCertificate::decode(&hello.certificate)
        .map_err(|e| FedError::Unproven(format!("bad certificate: {e}")))?;
    cert.verify(&cert.cluster, remote_id, now)
        .map_err(|e| FedError::Unproven(e.to_string()))?;
    Ok(cert.cluster)
}

/// Checks the server's [`HelloReply::Welcome`] certificate: signed by `origin`, naming the
/// node we are connected to (`remote_id`), unexpired.
pub fn check_welcome(
    certificate: &[u8],
    origin: &ClusterKey,
    remote_id: &[u8; 32],
    now: u64,
) -> Result<(), FedError> {
    let cert = NodeCertificate::decode(certificate).map_err(|e| {
        FedError::Unproven(format!("the origin's node sent a bad certificate: {e}"))
    })?;
    cert.verify(origin, remote_id, now)
        .map_err(|e| FedError::Unproven(format!("the node reached is not the origin's: {e}")))
}

impl fmt::Display for FedCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FedCall::Manifest { resource } => write!(f, "manifest of {resource}"),
            FedCall::DocChanges { name, have } => write!(
                f,
                "changes of doc:{} after {} heads",
                name.escape_default(),
                have.len()
            ),
            FedCall::BlobTags { prefix } => {
                write!(f, "tags under blob:{}", prefix.escape_default())
            }
            FedCall::DocSnapshot { name } => {
                write!(f, "snapshot of doc:{}", name.escape_default())
            }
            FedCall::Mirrored { origin, call } => match FedCall::open_mirrored(origin, call) {
                Ok((origin, call)) => write!(f, "{call}, mirrored from cluster {origin}"),
                Err(_) => f.write_str("a malformed mirrored call"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aspen_trust::ClusterSecretKey;
    use proptest::prelude::*;

    /// Decodes as the node does (postcard, no trailing bytes).
    fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
        match postcard::take_from_bytes::<T>(bytes) {
            Ok((v, [])) => Some(v),
            _ => None,
        }
    }

    fn encoded<T: Serialize>(v: &T) -> Vec<u8> {
        postcard::to_allocvec(v).unwrap()
    }

    #[test]
    fn golden_bytes() {
        assert_eq!(
            encoded(&Hello {
                certificate: vec![9, 8]
            }),
            vec![2, 9, 8]
        );
        assert_eq!(
            encoded(&HelloReply::Welcome {
                certificate: vec![1]
            }),
            vec![0, 1, 1]
        );
        assert_eq!(
            encoded(&HelloReply::Refused(FedError::Unproven("x".into()))),
            vec![1, 0, 1, b'x']
        );
        assert_eq!(
            encoded(&FedCall::Manifest {
                resource: Resource::doc("d")
            }),
            vec![0, 0, 1, b'd']
        );
        assert_eq!(
            encoded(&FedCall::DocChanges {
                name: "d".into(),
                have: vec![[7; 32]]
            }),
            [vec![1, 1, b'd', 1], vec![7; 32]].concat()
        );
        assert_eq!(encoded(&FedReply::Manifest(vec![5])), vec![0, 1, 5]);
        assert_eq!(
            encoded(&FedCall::BlobTags { prefix: "p".into() }),
            vec![2, 1, b'p']
        );
        assert_eq!(
            encoded(&FedReply::BlobTags {
                manifest: vec![5],
                tags: vec![("t".into(), [4; 32])]
            }),
            [vec![3, 1, 5, 1, 1, b't'], vec![4; 32]].concat()
        );
        assert_eq!(
            encoded(&FedReply::DocChanges {
                manifest: vec![5],
                changes: vec![vec![6, 6]],
                more: true
            }),
            vec![1, 1, 5, 1, 2, 6, 6, 1]
        );
        assert_eq!(
            encoded(&FedCall::DocSnapshot { name: "d".into() }),
            vec![3, 1, b'd']
        );
        assert_eq!(
            encoded(&FedCall::Mirrored {
                origin: [1; 32],
                call: vec![3, 1, b'd']
            }),
            [vec![4], vec![1; 32], vec![3, 3, 1, b'd']].concat()
        );
        assert_eq!(
            encoded(&FedReply::DocSnapshot {
                manifest: vec![5],
                document: vec![6, 6]
            }),
            vec![4, 1, 5, 2, 6, 6]
        );
        let errors = [
            (FedError::Unproven("x".into()), 0u8),
            (
                FedError::NotExported {
                    resource: "x".into(),
                    cluster: "x".into(),
                },
                1,
            ),
            (FedError::NotFound("x".into()), 2),
            (FedError::BadRequest("x".into()), 3),
            (FedError::Unavailable("x".into()), 4),
            (FedError::Internal("x".into()), 5),
            (FedError::TooLarge("x".into()), 6),
        ];
        for (error, tag) in errors {
            let bytes = encoded(&FedReply::Error(error.clone()));
            assert_eq!(bytes[..2], [2, tag], "{error:?}");
        }
    }

    #[test]
    fn a_caller_proves_its_cluster_only_with_its_own_certificate() {
        let cluster = ClusterSecretKey::generate();
        let node = [4u8; 32];
        let now = 1_000;
        let cert = NodeCertificate::issue(&cluster, node, now + 60)
            .encode()
            .to_vec();
        let hello = Hello { certificate: cert };
        assert_eq!(
            caller_cluster(&hello, &node, now).unwrap(),
            cluster.public()
        );
        // Another node presenting it (a copied certificate) is refused.
        assert!(matches!(
            caller_cluster(&hello, &[5; 32], now),
            Err(FedError::Unproven(_))
        ));
        // Expired.
        assert!(matches!(
            caller_cluster(&hello, &node, now + 61),
            Err(FedError::Unproven(_))
        ));
        // A forged signature.
        let mut forged = hello.clone();
        let last = forged.certificate.len() - 1;
        forged.certificate[last] ^= 1;
        assert!(matches!(
            caller_cluster(&forged, &node, now),
            Err(FedError::Unproven(_))
        ));
        // Garbage.
        assert!(matches!(
            caller_cluster(
                &Hello {
                    certificate: vec![1; 3]
                },
                &node,
                now
            ),
            Err(FedError::Unproven(_))
        ));
        // The welcome check binds the server to the cluster the caller meant.
        assert!(check_welcome(&hello.certificate, &cluster.public(), &node, now).is_ok());
        let other = ClusterSecretKey::generate().public();
        assert!(check_welcome(&hello.certificate, &other, &node, now).is_err());
    }

    #[test]
    fn a_mirrored_call_opens_one_level_only() {
        let origin = ClusterSecretKey::generate().public();
        let call = FedCall::DocSnapshot { name: "d".into() };
        let FedCall::Mirrored {
            origin: o,
            call: inner,
        } = FedCall::via_mirror(&origin, &call)
        else {
            panic!("not mirrored")
        };
        assert_eq!(
            FedCall::open_mirrored(&o, &inner).unwrap(),
            (origin, call.clone())
        );
        let nested = FedCall::via_mirror(&origin, &FedCall::via_mirror(&origin, &call));
        let FedCall::Mirrored {
            origin: o,
            call: inner,
        } = nested
        else {
            panic!("not mirrored")
        };
        assert!(matches!(
            FedCall::open_mirrored(&o, &inner),
            Err(FedError::BadRequest(_))
        ));
        // Trailing bytes and garbage are refused, not ignored.
        let FedCall::Mirrored {
            call: mut inner, ..
        } = FedCall::via_mirror(&origin, &call)
        else {
            panic!("not mirrored")
        };
        inner.push(0);
        assert!(FedCall::open_mirrored(&o, &inner).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Some(FedCall::Mirrored { origin, call }) = decode::<FedCall>(&bytes) {
                let _ = FedCall::open_mirrored(&origin, &call);
            }
            let _ = decode::<Hello>(&bytes);
            let _ = decode::<HelloReply>(&bytes);
            let _ = decode::<FedCall>(&bytes);
            let _ = decode::<FedReply>(&bytes);
        }

        #[test]
        fn calls_round_trip(name in ".{0,40}", have in proptest::collection::vec(any::<[u8; 32]>(), 0..8)) {
            let call = FedCall::DocChanges { name, have };
            prop_assert_eq!(decode::<FedCall>(&encoded(&call)), Some(call));
        }
    }
}
