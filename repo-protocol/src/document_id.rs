//! automerge-repo document ids: base58check (Bitcoin's alphabet, a 4-byte double-SHA-256
//! checksum) of a few random bytes, 16 when `Repo.create` makes them. An Automerge URL is
//! [`URL_PREFIX`] followed by the id.

use std::fmt;
use std::str::FromStr;

/// What an Automerge URL starts with.
pub const URL_PREFIX: &str = "automerge:";
/// Most bytes a document id decodes to (automerge-repo makes 16).
pub const MAX_DOCUMENT_ID_BYTES: usize = 32;
/// Longest id text accepted: base58 of [`MAX_DOCUMENT_ID_BYTES`] plus the checksum needs at
/// most 1.37 characters a byte.
const MAX_DOCUMENT_ID_TEXT: usize = 64;

/// A document id, kept in its canonical text form (the one automerge-repo sends).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocumentId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentIdError {
    #[error("document id is empty")]
    Empty,
    #[error("document id is {0} characters long, the limit is {MAX_DOCUMENT_ID_TEXT}")]
    TooLong(usize),
    #[error("'{0}' is not a base58check document id")]
    NotBase58Check(String),
    #[error("document id '{id}' holds {len} bytes (1..={MAX_DOCUMENT_ID_BYTES} allowed)")]
    BadLength { id: String, len: usize },
}

impl DocumentId {
    /// Parses a document id or an Automerge URL (`automerge:<id>`, an optional `#...` heads
    /// suffix is ignored). Only the canonical encoding is accepted, so ids and the names they
    /// map to correspond one to one.
    pub fn parse(text: &str) -> Result<Self, DocumentIdError> {
        let id = text.strip_prefix(URL_PREFIX).unwrap_or(text);
        let id = id.split('#').next().unwrap_or_default();
        if id.is_empty() {
            return Err(DocumentIdError::Empty);
        }
        if id.len() > MAX_DOCUMENT_ID_TEXT {
            return Err(DocumentIdError::TooLong(id.len()));
        }
        let bytes = bs58::decode(id)
            .with_check(None)
            .into_vec()
            .map_err(|_| DocumentIdError::NotBase58Check(id.to_string()))?;
        Self::from_bytes(&bytes).and_then(|canonical| {
            if canonical.0 == id {
                Ok(canonical)
            } else {
                Err(DocumentIdError::NotBase58Check(id.to_string()))
            }
        })
    }

    /// The id of these bytes (16 random bytes for a new document).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DocumentIdError> {
        if bytes.is_empty() || bytes.len() > MAX_DOCUMENT_ID_BYTES {
            return Err(DocumentIdError::BadLength {
                id: bs58::encode(bytes).with_check().into_string(),
                len: bytes.len(),
            });
        }
        Ok(DocumentId(bs58::encode(bytes).with_check().into_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `automerge:<id>`.
    pub fn url(&self) -> String {
        format!("{URL_PREFIX}{}", self.0)
    }
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DocumentId {
    type Err = DocumentIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DocumentId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_ids_round_trip() {
        // As automerge-repo 2.5.6's `stringifyAutomergeUrl` writes them.
        let id = DocumentId::from_bytes(&[0; 16]).unwrap();
        assert_eq!(id.url(), "automerge:11111111111111114Ki9Gx");
        let sevens = DocumentId::from_bytes(&[7; 16]).unwrap();
        assert_eq!(sevens.as_str(), "6gMHXjsZ5cxdn4qSbgGYYY8CnKK");
        assert_eq!(id, DocumentId::parse(id.as_str()).unwrap());
        assert_eq!(id, DocumentId::parse(&id.url()).unwrap());
        assert_eq!(
            id,
            DocumentId::parse(&format!("{}#abc", id.url())).unwrap(),
            "heads after # are ignored"
        );
    }

    #[test]
    fn bad_ids_are_refused() {
        assert_eq!(DocumentId::parse(""), Err(DocumentIdError::Empty));
        assert_eq!(DocumentId::parse("automerge:"), Err(DocumentIdError::Empty));
        assert!(matches!(
            DocumentId::parse("0OIl"),
            Err(DocumentIdError::NotBase58Check(_))
        ));
        assert!(matches!(
            DocumentId::parse(&"z".repeat(65)),
            Err(DocumentIdError::TooLong(65))
        ));
        // A valid id with one character changed fails its checksum.
        let good = DocumentId::from_bytes(&[7; 16]).unwrap().0;
        let mut bad = good.clone().into_bytes();
        bad[3] = if bad[3] == b'2' { b'3' } else { b'2' };
        assert!(DocumentId::parse(std::str::from_utf8(&bad).unwrap()).is_err());
        assert!(DocumentId::from_bytes(&[]).is_err());
        assert!(DocumentId::from_bytes(&[1; 33]).is_err());
    }

    proptest! {
        #[test]
        fn every_id_parses_back(bytes in proptest::collection::vec(any::<u8>(), 1..=32)) {
            let id = DocumentId::from_bytes(&bytes).unwrap();
            prop_assert_eq!(DocumentId::parse(id.as_str()).unwrap(), id);
        }

        #[test]
        fn parsing_never_panics(text in ".{0,80}") {
            let _ = DocumentId::parse(&text);
        }
    }
}
