//! Document names.

use std::fmt;

use crate::limits::MAX_NAME_BYTES;
use crate::DocError;

/// A document's name: 1..=[`MAX_NAME_BYTES`] bytes of UTF-8 without control characters
/// (`/` is allowed, so names can look like paths: `notes/2026-12-02`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocName(String);

impl DocName {
    pub fn new(name: impl Into<String>) -> Result<Self, DocError> {
        let name = name.into();
        let bad = |reason: &str| DocError::BadName {
            name: name.chars().take(MAX_NAME_BYTES).collect(),
            reason: reason.into(),
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(bad(&format!(
                "it is {} bytes, the limit is {MAX_NAME_BYTES}",
                name.len()
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(bad("it contains control characters"));
        }
        Ok(DocName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DocName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DocName {
    type Err = DocError;
    fn from_str(s: &str) -> Result<Self, DocError> {
        DocName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_printable() {
        assert!(DocName::new("notes/today").is_ok());
        assert!(DocName::new("é").is_ok());
        assert!(DocName::new("").is_err());
        assert!(DocName::new("a\nb").is_err());
        assert!(DocName::new("x".repeat(MAX_NAME_BYTES)).is_ok());
        assert!(matches!(
            DocName::new("x".repeat(MAX_NAME_BYTES + 1)),
            Err(DocError::BadName { .. })
        ));
    }
}
