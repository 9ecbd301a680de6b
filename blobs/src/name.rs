use std::fmt;

use crate::limits::MAX_TAG_BYTES;
use crate::BlobError;

/// A tag: the name a blob is referenced by. Non-empty UTF-8 of at most
/// [`MAX_TAG_BYTES`] bytes without control characters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TagName(String);

impl TagName {
    pub fn new(name: impl Into<String>) -> Result<Self, BlobError> {
        let name = name.into();
        let bad = |reason: &str| BlobError::BadTagName {
            name: name.chars().take(MAX_TAG_BYTES).collect(),
            reason: reason.into(),
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > MAX_TAG_BYTES {
            return Err(bad(&format!(
                "it is {} bytes, the limit is {MAX_TAG_BYTES}",
                name.len()
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(bad("it contains control characters"));
        }
        Ok(TagName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TagName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_printable() {
        assert!(TagName::new("builds/2026-12-02.tar").is_ok());
        assert!(TagName::new("").is_err());
        assert!(TagName::new("a\nb").is_err());
        assert!(TagName::new("x".repeat(MAX_TAG_BYTES)).is_ok());
        assert!(TagName::new("x".repeat(MAX_TAG_BYTES + 1)).is_err());
    }
}
