//! Exports: which resources this cluster lets other clusters pull, and to whom.
//!
//! Layout in the system key space: `fed/e/<kind>/<name>` -> [`Export`] (postcard), where
//! `<kind>` is `doc`, `blob` or `ns` and `<name>` the resource's name (a document name, a tag
//! prefix, a namespace id in hex; it may contain `/`). An export is public (any cluster) or
//! lists the cluster keys it is for. Nothing is exported by default.

use aspen_sync::{Resource, ResourceKind};
use serde::{Deserialize, Serialize};

/// Where exports live in the system key space.
pub const EXPORT_PREFIX: &[u8] = b"fed/e/";
/// Most exports a cluster keeps.
pub const MAX_EXPORTS: usize = 1024;
/// Most cluster keys one export names.
pub const MAX_EXPORT_TARGETS: usize = 64;
/// Largest encoded export accepted when reading one back.
const MAX_EXPORT_BYTES: usize = 16 + 33 * MAX_EXPORT_TARGETS + 16;

/// One export (the value under its key).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// Any cluster may pull it.
    pub public: bool,
    /// The cluster keys that may pull it (sorted, unique), in addition to `public`.
    pub to: Vec<[u8; 32]>,
    /// When it was first exported (Unix milliseconds).
    pub created_at_ms: u64,
}

impl Export {
    /// Whether the cluster with key `cluster` may pull the resource.
    pub fn allows(&self, cluster: &[u8; 32]) -> bool {
        self.public || self.to.binary_search(cluster).is_ok()
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("an export encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ExportError> {
        if bytes.len() > MAX_EXPORT_BYTES {
            return Err(ExportError::Stored(format!(
                "{} bytes exceed the limit of {MAX_EXPORT_BYTES}",
                bytes.len()
            )));
        }
        let export: Export =
            postcard::from_bytes(bytes).map_err(|e| ExportError::Stored(e.to_string()))?;
        export.check()?;
        Ok(export)
    }

    /// Public or naming someone; targets sorted, unique, valid keys, bounded.
    pub fn check(&self) -> Result<(), ExportError> {
        if !self.public && self.to.is_empty() {
            return Err(ExportError::NoTarget);
        }
        if self.to.len() > MAX_EXPORT_TARGETS {
            return Err(ExportError::TooManyTargets {
                count: self.to.len(),
                max: MAX_EXPORT_TARGETS,
            });
        }
        if self.to.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ExportError::Stored("targets not sorted and unique".into()));
        }
        for key in &self.to {
            aspen_trust::ClusterKey::from_bytes(key)
                .map_err(|_| ExportError::BadClusterKey(hex::encode(key)))?;
        }
        Ok(())
    }
}

/// The key an export of `resource` is stored under.
pub fn export_key(resource: &Resource) -> Vec<u8> {
    let mut key = EXPORT_PREFIX.to_vec();
    key.extend_from_slice(resource.kind.to_string().as_bytes());
    key.push(b'/');
    key.extend_from_slice(resource.name.as_bytes());
    key
}

/// The resource an export key names (the inverse of [`export_key`]).
pub fn resource_of_key(key: &[u8]) -> Result<Resource, ExportError> {
    let bad = || ExportError::Stored(format!("not an export key: {}", key.escape_ascii()));
    let rest = key.strip_prefix(EXPORT_PREFIX).ok_or_else(bad)?;
    let slash = rest.iter().position(|b| *b == b'/').ok_or_else(bad)?;
    let kind = match &rest[..slash] {
        b"doc" => ResourceKind::Doc,
        b"blob" => ResourceKind::Blob,
        b"ns" => ResourceKind::Ns,
        _ => return Err(bad()),
    };
    let name = std::str::from_utf8(&rest[slash + 1..]).map_err(|_| bad())?;
    Ok(Resource {
        kind,
        name: name.to_string(),
    })
}

/// A change to one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportEdit {
    /// Export to these clusters too (and to anyone, with `public`).
    Add { to: Vec<[u8; 32]>, public: bool },
    /// Stop exporting to these clusters (and to anyone, with `public`); with `all`, remove
    /// the export.
    Remove {
        to: Vec<[u8; 32]>,
        public: bool,
        all: bool,
    },
}

/// The export after `edit` (None: nothing left, delete it). `now_ms` dates a new export.
pub fn edit_export(
    resource: &Resource,
    old: Option<&Export>,
    edit: &ExportEdit,
    now_ms: u64,
) -> Result<Option<Export>, ExportError> {
    resource
        .check()
        .map_err(|e| ExportError::BadResource(e.to_string()))?;
    let mut export = old.cloned().unwrap_or(Export {
        public: false,
        to: Vec::new(),
        created_at_ms: now_ms,
    });
    match edit {
        ExportEdit::Add { to, public } => {
            if to.is_empty() && !public {
                return Err(ExportError::NoTarget);
            }
            for key in to {
                aspen_trust::ClusterKey::from_bytes(key)
                    .map_err(|_| ExportError::BadClusterKey(hex::encode(key)))?;
            }
            export.public |= public;
            export.to.extend_from_slice(to);
        }
        ExportEdit::Remove { to, public, all } => {
            if *all {
                return Ok(None);
            }
            if *public {
                export.public = false;
            }
            export.to.retain(|k| !to.contains(k));
        }
    }
    export.to.sort_unstable();
    export.to.dedup();
    if !export.public && export.to.is_empty() {
        return Ok(None);
    }
    export.check()?;
    Ok(Some(export))
}

/// Why an export was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("export to whom? name cluster keys (--to) or make it public (--public)")]
    NoTarget,
    #[error("an export names at most {max} clusters (got {count})")]
    TooManyTargets { count: usize, max: usize },
    #[error("{0} is not a cluster key")]
    BadClusterKey(String),
    #[error("bad resource: {0}")]
    BadResource(String),
    #[error("stored export: {0}")]
    Stored(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cluster(n: u8) -> [u8; 32] {
        aspen_trust::ClusterSecretKey::from_bytes(&[n; 32])
            .public()
            .to_bytes()
    }

    #[test]
    fn golden_bytes() {
        let e = Export {
            public: true,
            to: vec![[3; 32]],
            created_at_ms: 5,
        };
        let expected = [&[1, 1][..], &[3; 32], &[5]].concat();
        assert_eq!(e.encode(), expected);
        assert_eq!(export_key(&Resource::doc("a/b")), b"fed/e/doc/a/b");
        assert_eq!(export_key(&Resource::blob("")), b"fed/e/blob/");
        assert_eq!(
            export_key(&Resource::ns(&[0xab; 32])),
            [&b"fed/e/ns/"[..], "ab".repeat(32).as_bytes()].concat()
        );
    }

    #[test]
    fn keys_round_trip_and_garbage_is_refused() {
        for r in [
            Resource::doc("plans/2027"),
            Resource::blob(""),
            Resource::blob("site/a/"),
            Resource::ns(&[7; 32]),
        ] {
            assert_eq!(resource_of_key(&export_key(&r)).unwrap(), r);
        }
        for bad in [
            &b"fed/e/"[..],
            b"fed/e/doc",
            b"fed/e/tag/x",
            b"auth/g/x",
            b"fed/e/doc/\xff",
        ] {
            assert!(resource_of_key(bad).is_err(), "{}", bad.escape_ascii());
        }
    }

    #[test]
    fn edits_add_remove_and_validate() {
        let doc = Resource::doc("plans");
        let (a, b) = (cluster(1), cluster(2));
        // Nothing to export to.
        assert_eq!(
            edit_export(
                &doc,
                None,
                &ExportEdit::Add {
                    to: vec![],
                    public: false
                },
                1
            ),
            Err(ExportError::NoTarget)
        );
        let e = edit_export(
            &doc,
            None,
            &ExportEdit::Add {
                to: vec![b, a, b],
                public: false,
            },
            7,
        )
        .unwrap()
        .unwrap();
        let mut sorted = vec![a, b];
        sorted.sort();
        assert_eq!(e.to, sorted);
        assert_eq!(e.created_at_ms, 7);
        assert!(e.allows(&a) && e.allows(&b) && !e.allows(&cluster(3)));
        // Adding keeps the creation time; public widens.
        let e2 = edit_export(
            &doc,
            Some(&e),
            &ExportEdit::Add {
                to: vec![],
                public: true,
            },
            9,
        )
        .unwrap()
        .unwrap();
        assert!(e2.public && e2.allows(&cluster(3)) && e2.created_at_ms == 7);
        // Removing the last target (and not public) removes the export.
        let only_a = edit_export(
            &doc,
            Some(&e),
            &ExportEdit::Remove {
                to: vec![b],
                public: false,
                all: false,
            },
            9,
        )
        .unwrap()
        .unwrap();
        assert!(only_a.allows(&a) && !only_a.allows(&b));
        assert_eq!(
            edit_export(
                &doc,
                Some(&only_a),
                &ExportEdit::Remove {
                    to: vec![a],
                    public: false,
                    all: false
                },
                9
            ),
            Ok(None)
        );
        assert_eq!(
            edit_export(
                &doc,
                Some(&e2),
                &ExportEdit::Remove {
                    to: vec![],
                    public: false,
                    all: true
                },
                9
            ),
            Ok(None)
        );
        // Not a key; too many; bad resource names.
        let mut not_a_point = [0u8; 32];
        not_a_point[31] = 0x80;
        not_a_point[0] = 2;
        let not_a_key = (0..=255u8)
            .map(|i| {
                let mut k = not_a_point;
                k[1] = i;
                k
            })
            .find(|k| aspen_trust::ClusterKey::from_bytes(k).is_err())
            .expect("some 32 bytes are not a point");
        assert!(matches!(
            edit_export(
                &doc,
                None,
                &ExportEdit::Add {
                    to: vec![not_a_key],
                    public: false
                },
                1
            ),
            Err(ExportError::BadClusterKey(_))
        ));
        let many: Vec<[u8; 32]> = (0..=MAX_EXPORT_TARGETS as u8).map(cluster).collect();
        assert!(matches!(
            edit_export(
                &doc,
                None,
                &ExportEdit::Add {
                    to: many,
                    public: false
                },
                1
            ),
            Err(ExportError::TooManyTargets { .. })
        ));
        assert!(matches!(
            edit_export(
                &Resource::doc(""),
                None,
                &ExportEdit::Add {
                    to: vec![],
                    public: true
                },
                1
            ),
            Err(ExportError::BadResource(_))
        ));
    }

    #[test]
    fn stored_exports_are_checked_when_read() {
        assert!(Export::decode(&[0, 0, 0]).is_err(), "names nobody");
        let mut keys = vec![cluster(1), cluster(2)];
        keys.sort();
        keys.reverse();
        let unsorted_bytes = Export {
            public: false,
            to: keys,
            created_at_ms: 0,
        }
        .encode();
        assert!(Export::decode(&unsorted_bytes).is_err());
        assert!(Export::decode(&vec![1; MAX_EXPORT_BYTES + 1]).is_err());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Export::decode(&bytes);
            let _ = resource_of_key(&bytes);
        }
    }
}
