//! The node key: the Ed25519 secret that is also the node's iroh endpoint key, and its
//! on-disk form.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey};

use crate::cluster_key::Context;

/// The first line of a node key file: names the format and its version.
pub const NODE_KEY_FILE_HEADER: &str = "aspen-node-key-v1";

/// A node's Ed25519 secret key. `Debug` never prints the secret.
#[derive(Clone)]
pub struct NodeKey {
    secret: SigningKey,
}

impl NodeKey {
    /// A fresh key from the operating system's RNG.
    pub fn generate() -> Self {
        NodeKey {
            secret: SigningKey::from_bytes(&rand::random::<[u8; 32]>()),
        }
    }

    pub fn from_secret_bytes(bytes: &[u8; 32]) -> Self {
        NodeKey {
            secret: SigningKey::from_bytes(bytes),
        }
    }

    /// The 32 secret bytes (handle with care: never log them).
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// The public key: the node's endpoint id.
    pub fn public(&self) -> [u8; 32] {
        self.secret.verifying_key().to_bytes()
    }

    /// Signs `context || bytes` (verify with [`crate::verify_signature`]).
    pub fn sign(&self, context: Context, bytes: &[u8]) -> [u8; 64] {
        self.secret.sign(&context.message(bytes)).to_bytes()
    }

    /// The key file's contents: a header line and the secret in hex.
    pub fn to_file_contents(&self) -> String {
        format!(
            "{NODE_KEY_FILE_HEADER}\n{}\n",
            hex::encode(self.secret.to_bytes())
        )
    }

    /// Parses a key file written by [`Self::to_file_contents`].
    pub fn from_file_contents(contents: &str) -> Result<Self, KeyFileError> {
        let mut lines = contents.lines();
        match lines.next() {
            Some(h) if h.trim() == NODE_KEY_FILE_HEADER => {}
            Some(h) => return Err(KeyFileError::BadHeader(h.chars().take(40).collect())),
            None => return Err(KeyFileError::Empty),
        }
        let secret = lines.next().ok_or(KeyFileError::MissingKey)?.trim();
        if secret.len() != 64 {
            return Err(KeyFileError::BadKey(format!(
                "expected 64 hex digits, found {}",
                secret.len()
            )));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(secret, &mut bytes)
            .map_err(|e| KeyFileError::BadKey(e.to_string()))?;
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(KeyFileError::TrailingData);
        }
        Ok(NodeKey::from_secret_bytes(&bytes))
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey(public {})", hex::encode(self.public()))
    }
}

/// Why a key file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file is empty")]
    Empty,
    #[error("key file does not start with '{NODE_KEY_FILE_HEADER}' (found '{0}')")]
    BadHeader(String),
    #[error("key file has no key line")]
    MissingKey,
    #[error("key file's key is malformed: {0}")]
    BadKey(String),
    #[error("key file has unexpected trailing data")]
    TrailingData,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_file_round_trips() {
        let key = NodeKey::generate();
        let back = NodeKey::from_file_contents(&key.to_file_contents()).unwrap();
        assert_eq!(key.secret_bytes(), back.secret_bytes());
        assert_eq!(key.public(), back.public());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = NodeKey::from_secret_bytes(&[7u8; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&hex::encode([7u8; 32])));
    }

    #[test]
    fn bad_files_are_typed_errors() {
        assert!(matches!(
            NodeKey::from_file_contents(""),
            Err(KeyFileError::Empty)
        ));
        assert!(matches!(
            NodeKey::from_file_contents("nope\n00"),
            Err(KeyFileError::BadHeader(_))
        ));
        assert!(matches!(
            NodeKey::from_file_contents("aspen-node-key-v1\n"),
            Err(KeyFileError::MissingKey)
        ));
        assert!(matches!(
            NodeKey::from_file_contents("aspen-node-key-v1\nzz"),
            Err(KeyFileError::BadKey(_))
        ));
        let good = NodeKey::generate().to_file_contents();
        assert_eq!(
            NodeKey::from_file_contents(&format!("{good}extra")).map(|_| ()),
            Err(KeyFileError::TrailingData)
        );
    }

    #[test]
    fn signatures_verify_under_the_public_key_and_context_only() {
        let key = NodeKey::from_secret_bytes(&[7u8; 32]);
        let sig = key.sign(Context::CapabilityToken, b"link");
        assert!(crate::verify_signature(
            &key.public(),
            Context::CapabilityToken,
            b"link",
            &sig
        ));
        assert!(!crate::verify_signature(
            &key.public(),
            Context::NodeCertificate,
            b"link",
            &sig
        ));
        assert!(!crate::verify_signature(
            &key.public(),
            Context::CapabilityToken,
            b"linj",
            &sig
        ));
        let other = NodeKey::generate().public();
        assert!(!crate::verify_signature(
            &other,
            Context::CapabilityToken,
            b"link",
            &sig
        ));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(s in ".{0,200}") {
            let _ = NodeKey::from_file_contents(&s);
        }
    }
}
