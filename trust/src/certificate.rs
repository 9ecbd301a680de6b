//! Node certificates: the cluster key vouching that a node (an iroh endpoint id) is a member.
//!
//! A peer proves who it is with iroh's TLS (its endpoint id) and proves which cluster it
//! speaks for with a certificate binding that endpoint id to the cluster key.
//!
//! Encoding (137 bytes, fixed): `version (1) || cluster key (32) || node id (32) ||
//! expires_at (u64 big-endian, Unix seconds) || signature (64)`. The signature covers
//! `aspen/node-cert/v1 || the first 73 bytes`.

use crate::cluster_key::{ClusterKey, ClusterSecretKey, Context};

/// Encoded size of a certificate.
pub const NODE_CERTIFICATE_BYTES: usize = 1 + 32 + 32 + 8 + 64;
const CERTIFICATE_VERSION: u8 = 1;
const SIGNED_PART: usize = 1 + 32 + 32 + 8;

/// The cluster key's statement "node `node` belongs to cluster `cluster` until `expires_at`".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCertificate {
    pub cluster: ClusterKey,
    /// The node's iroh endpoint id (its Ed25519 public key).
    pub node: [u8; 32],
    /// Unix seconds after which the certificate is no longer valid.
    pub expires_at: u64,
    pub signature: [u8; 64],
}

impl NodeCertificate {
    /// Issues a certificate for `node`, valid until `expires_at` (Unix seconds).
    pub fn issue(secret: &ClusterSecretKey, node: [u8; 32], expires_at: u64) -> Self {
        let cluster = secret.public();
        let signed = signed_part(&cluster, &node, expires_at);
        NodeCertificate {
            cluster,
            node,
            expires_at,
            signature: secret.sign(Context::NodeCertificate, &signed),
        }
    }

    pub fn encode(&self) -> [u8; NODE_CERTIFICATE_BYTES] {
        let mut out = [0u8; NODE_CERTIFICATE_BYTES];
        out[..SIGNED_PART].copy_from_slice(&signed_part(
            &self.cluster,
            &self.node,
            self.expires_at,
        ));
        out[SIGNED_PART..].copy_from_slice(&self.signature);
        out
    }

    /// Decodes without verifying (see [`Self::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, CertificateError> {
        if bytes.len() != NODE_CERTIFICATE_BYTES {
            return Err(CertificateError::Length(bytes.len()));
        }
        if bytes[0] != CERTIFICATE_VERSION {
            return Err(CertificateError::Version(bytes[0]));
        }
        let cluster = ClusterKey::from_bytes(bytes[1..33].try_into().expect("32 bytes"))
            .map_err(|_| CertificateError::BadClusterKey)?;
        Ok(NodeCertificate {
            cluster,
            node: bytes[33..65].try_into().expect("32 bytes"),
            expires_at: u64::from_be_bytes(bytes[65..73].try_into().expect("8 bytes")),
            signature: bytes[73..].try_into().expect("64 bytes"),
        })
    }

    /// Checks that this certificate is signed by `cluster`, names `node`, and has not expired
    /// at `now` (Unix seconds).
    pub fn verify(
        &self,
        cluster: &ClusterKey,
        node: &[u8; 32],
        now: u64,
    ) -> Result<(), CertificateError> {
        if self.cluster != *cluster {
            return Err(CertificateError::WrongCluster {
                expected: *cluster,
                found: self.cluster,
            });
        }
        if self.node != *node {
            return Err(CertificateError::WrongNode);
        }
        let signed = signed_part(&self.cluster, &self.node, self.expires_at);
        if !cluster.verify(Context::NodeCertificate, &signed, &self.signature) {
            return Err(CertificateError::BadSignature);
        }
        if now >= self.expires_at {
            return Err(CertificateError::Expired {
                expired_at: self.expires_at,
                now,
            });
        }
        Ok(())
    }
}

fn signed_part(cluster: &ClusterKey, node: &[u8; 32], expires_at: u64) -> [u8; SIGNED_PART] {
    let mut out = [0u8; SIGNED_PART];
    out[0] = CERTIFICATE_VERSION;
    out[1..33].copy_from_slice(&cluster.to_bytes());
    out[33..65].copy_from_slice(node);
    out[65..73].copy_from_slice(&expires_at.to_be_bytes());
    out
}

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("a node certificate is {NODE_CERTIFICATE_BYTES} bytes, found {0}")]
    Length(usize),
    #[error("unsupported node certificate version {0}")]
    Version(u8),
    #[error("the certificate's cluster key is not a valid Ed25519 key")]
    BadClusterKey,
    #[error("the certificate is for cluster {found}, expected {expected}")]
    WrongCluster {
        expected: ClusterKey,
        found: ClusterKey,
    },
    #[error("the certificate names another node")]
    WrongNode,
    #[error("the certificate's signature does not verify")]
    BadSignature,
    #[error("the certificate expired at {expired_at} (now {now}, Unix seconds)")]
    Expired { expired_at: u64, now: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn issue_encode_decode_verify() {
        let k = ClusterSecretKey::generate();
        let node = [3u8; 32];
        let cert = NodeCertificate::issue(&k, node, 1000);
        let back = NodeCertificate::decode(&cert.encode()).unwrap();
        assert_eq!(back, cert);
        back.verify(&k.public(), &node, 999).unwrap();
        assert!(matches!(
            back.verify(&k.public(), &node, 1000),
            Err(CertificateError::Expired { .. })
        ));
        assert_eq!(
            back.verify(&k.public(), &[4u8; 32], 1),
            Err(CertificateError::WrongNode)
        );
        let other = ClusterSecretKey::generate().public();
        assert!(matches!(
            back.verify(&other, &node, 1),
            Err(CertificateError::WrongCluster { .. })
        ));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let k = ClusterSecretKey::generate();
        let cert = NodeCertificate::issue(&k, [3u8; 32], 1000);
        let mut bytes = cert.encode();
        bytes[70] ^= 1; // extend the expiry
        let forged = NodeCertificate::decode(&bytes).unwrap();
        assert_eq!(
            forged.verify(&k.public(), &[3u8; 32], 1),
            Err(CertificateError::BadSignature)
        );
    }

    const GOLDEN_SIGNATURE: &str = "c135d5614f03dad26dc35d213469fbe153eaf3ec7515096841e68e04b822a7a19ff1b072aec5bd4b02f5d3ba6546f266d7555ec364a8d2b9b8e33bd7ab9a8701";

    #[test]
    fn golden_layout() {
        let k = ClusterSecretKey::from_bytes(&[1u8; 32]);
        let cert = NodeCertificate::issue(&k, [2u8; 32], 0x0102030405060708);
        let bytes = cert.encode();
        assert_eq!(bytes[0], 1);
        assert_eq!(&bytes[1..33], &k.public().to_bytes());
        assert_eq!(&bytes[33..65], &[2u8; 32]);
        assert_eq!(&bytes[65..73], &[1, 2, 3, 4, 5, 6, 7, 8]);
        // Ed25519 signatures are deterministic: this pins the signed message format.
        assert_eq!(hex::encode(&bytes[73..]), GOLDEN_SIGNATURE);
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(c) = NodeCertificate::decode(&bytes) {
                prop_assert_eq!(&c.encode()[..], &bytes[..]);
            }
        }
    }
}
