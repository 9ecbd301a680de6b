//! The cluster key pair and domain-separated signing.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// What a signature is for. The signed message is `label || exact bytes`.
///
/// Labels are ASCII, start with `aspen/`, end with a version, and none is a prefix of another,
/// so a message signed under one context can never be read as a message of another. BEP-44
/// items signed by the DHT code start with `4:salt` (see [`crate::bep44_signable`]), so they
/// never collide with these either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// A [`crate::NodeCertificate`].
    NodeCertificate,
    /// One link of a [`crate::CapabilityToken`], signed by the link's issuer.
    CapabilityToken,
    /// A federation manifest: the origin cluster's statement of what an exported resource
    /// holds (`aspen-sync`).
    Manifest,
}

impl Context {
    /// Every context, for tests that check they are prefix-free.
    pub const ALL: [Context; 3] = [
        Context::NodeCertificate,
        Context::CapabilityToken,
        Context::Manifest,
    ];

    pub fn label(self) -> &'static [u8] {
        match self {
            Context::NodeCertificate => b"aspen/node-cert/v1",
            Context::CapabilityToken => b"aspen/capability-token/v1",
            Context::Manifest => b"aspen/manifest/v1",
        }
    }

    pub(crate) fn message(self, bytes: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(self.label().len() + bytes.len());
        m.extend_from_slice(self.label());
        m.extend_from_slice(bytes);
        m
    }
}

/// The cluster's secret key. `Debug` never shows it; it is zeroed on drop.
#[derive(Clone)]
pub struct ClusterSecretKey {
    secret: SigningKey,
}

impl ClusterSecretKey {
    /// A fresh key from the operating system's RNG.
    pub fn generate() -> Self {
        ClusterSecretKey {
            secret: SigningKey::from_bytes(&rand::random::<[u8; 32]>()),
        }
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        ClusterSecretKey {
            secret: SigningKey::from_bytes(bytes),
        }
    }

    /// The 32 secret bytes (handle with care: never log or print them).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    pub fn public(&self) -> ClusterKey {
        ClusterKey(self.secret.verifying_key().to_bytes())
    }

    /// Signs `context || bytes`.
    pub fn sign(&self, context: Context, bytes: &[u8]) -> [u8; 64] {
        self.secret.sign(&context.message(bytes)).to_bytes()
    }

    /// Signs `message` as is. Only for formats with their own domain separation (BEP-44).
    pub(crate) fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        self.secret.sign(message).to_bytes()
    }
}

impl fmt::Debug for ClusterSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecretKey(public {})", self.public())
    }
}

/// A cluster's public key: the name by which anyone finds and verifies the cluster.
///
/// Shown as 64 lowercase hex digits. Always a valid Ed25519 point (checked on construction;
/// kept as bytes so the type and the errors carrying it stay small).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    /// Validates that `bytes` is an Ed25519 public key.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, ClusterKeyParseError> {
        VerifyingKey::from_bytes(bytes)
            .map(|_| ClusterKey(*bytes))
            .map_err(|_| ClusterKeyParseError::NotAKey)
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// Whether `signature` covers `context || bytes` under this key (strict verification:
    /// no malleable or small-order signatures).
    pub fn verify(&self, context: Context, bytes: &[u8], signature: &[u8; 64]) -> bool {
        self.verify_raw(&context.message(bytes), signature)
    }

    pub(crate) fn verify_raw(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        verify_raw(&self.0, message, signature)
    }
}

/// Whether `signature` covers `context || bytes` under the Ed25519 public key `public` (any
/// key: a node's or a client's endpoint id). Strict, like [`ClusterKey::verify`]; an invalid
/// key never verifies.
pub fn verify_signature(
    public: &[u8; 32],
    context: Context,
    bytes: &[u8],
    signature: &[u8; 64],
) -> bool {
    verify_raw(public, &context.message(bytes), signature)
}

fn verify_raw(public: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    let signature = Signature::from_bytes(signature);
    VerifyingKey::from_bytes(public).is_ok_and(|key| key.verify_strict(message, &signature).is_ok())
}

impl fmt::Display for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({self})")
    }
}

impl FromStr for ClusterKey {
    type Err = ClusterKeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 64 {
            return Err(ClusterKeyParseError::Length(s.len()));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| ClusterKeyParseError::NotHex)?;
        ClusterKey::from_bytes(&bytes)
    }
}

/// Why a string or bytes are not a cluster key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterKeyParseError {
    #[error("a cluster key is 64 hex digits, found {0} characters")]
    Length(usize),
    #[error("a cluster key is 64 hex digits; found a non-hex character")]
    NotHex,
    #[error("not a valid Ed25519 public key")]
    NotAKey,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn contexts_are_prefix_free_and_versioned() {
        for a in Context::ALL {
            assert!(a.label().starts_with(b"aspen/"));
            assert!(a.label().ends_with(b"/v1"));
            for b in Context::ALL {
                if a != b {
                    assert!(!a.label().starts_with(b.label()));
                }
            }
        }
    }

    #[test]
    fn signatures_are_bound_to_key_context_and_bytes() {
        let k = ClusterSecretKey::generate();
        let sig = k.sign(Context::NodeCertificate, b"hello");
        assert!(k.public().verify(Context::NodeCertificate, b"hello", &sig));
        assert!(!k.public().verify(Context::NodeCertificate, b"hellp", &sig));
        let other = ClusterSecretKey::generate();
        assert!(!other
            .public()
            .verify(Context::NodeCertificate, b"hello", &sig));
        // The context is part of the message: a raw signature of the bytes does not verify.
        let raw = k.sign_raw(b"hello");
        assert!(!k.public().verify(Context::NodeCertificate, b"hello", &raw));
    }

    #[test]
    fn key_text_round_trips_and_debug_hides_the_secret() {
        let k = ClusterSecretKey::from_bytes(&[9u8; 32]);
        let text = k.public().to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<ClusterKey>().unwrap(), k.public());
        assert!(!format!("{k:?}").contains(&hex::encode([9u8; 32])));
        assert_eq!(
            "abc".parse::<ClusterKey>(),
            Err(ClusterKeyParseError::Length(3))
        );
        assert_eq!(
            "zz".repeat(32).parse::<ClusterKey>(),
            Err(ClusterKeyParseError::NotHex)
        );
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in ".{0,80}") {
            let _ = s.parse::<ClusterKey>();
        }

        #[test]
        fn from_bytes_never_panics(b in any::<[u8; 32]>()) {
            let _ = ClusterKey::from_bytes(&b);
        }
    }
}
