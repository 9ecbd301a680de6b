//! Mirrors: a cluster that follows a resource can serve its verified copy onward, so the
//! data stays available while its origin is offline.
//!
//! A mirror is opt-in per followed resource: `fed/r/<origin hex>/<kind>/<name>` holds an
//! [`crate::Export`] saying which clusters may pull the copy from this cluster (the same shape as
//! an origin's export, and the same default: nobody). A mirror serves only what it verified:
//! the last manifest the origin signed that it accepted, and the data that manifest names
//! (a document exactly at the signed heads, the signed tag list), never its own additions.
//! Readers check a mirror's answer exactly as an origin's (the origin's signature, the
//! resource, never older than what they hold, the data against the digest), so a mirror
//! cannot lie; it can only be stale or silent, and readers then try the next one.
//!
//! Readers find mirrors through the follow's `--via` list and through the DHT: each mirror's
//! leader announces its cluster key in a directory item whose address is derived from the
//! origin key and the resource ([`directory_topic`]). Anyone can derive that address and
//! write to it, so its entries are hints only: a reader resolves each named cluster's own
//! signed record, proves it in the federation hello, and verifies everything it serves.

use aspen_sync::{Resource, ResourceKind};
use aspen_trust::ClusterKey;

use crate::follows::{key_with, FollowError};

/// Where mirror policies live.
pub const MIRROR_PREFIX: &[u8] = b"fed/r/";
/// Most resources a cluster mirrors (it can mirror only what it follows).
pub const MAX_MIRRORS: usize = crate::MAX_FOLLOWS;
/// Most mirrors a reader tries in one pull (explicit ones first, then the DHT's).
pub const MAX_MIRRORS_TRIED: usize = 8;

/// The key of the mirror policy for `origin`'s `resource`.
pub fn mirror_key(origin: &ClusterKey, resource: &Resource) -> Vec<u8> {
    key_with(MIRROR_PREFIX, Some(origin), resource)
}

/// The origin and resource a mirror key names (the inverse of [`mirror_key`]).
pub fn parse_mirror_key(key: &[u8]) -> Result<(ClusterKey, Resource), FollowError> {
    let rest = key
        .strip_prefix(MIRROR_PREFIX)
        .ok_or_else(|| FollowError::Stored(format!("not a mirror key: {}", key.escape_ascii())))?;
    let mut as_follow = crate::FOLLOW_PREFIX.to_vec();
    as_follow.extend_from_slice(rest);
    crate::parse_follow_key(&as_follow)
}

/// The bytes the DHT directory of `origin`'s `resource` is derived from: a domain label,
/// the origin key, the kind and the name. Stable: readers and mirrors of every version must
/// derive the same address.
pub fn directory_topic(origin: &ClusterKey, resource: &Resource) -> Vec<u8> {
    let mut topic = b"aspen/mirrors/1\0".to_vec();
    topic.extend_from_slice(&origin.to_bytes());
    topic.push(match resource.kind {
        ResourceKind::Doc => 0,
        ResourceKind::Blob => 1,
        ResourceKind::Ns => 2,
    });
    topic.extend_from_slice(resource.name.as_bytes());
    topic
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn origin() -> ClusterKey {
        aspen_trust::ClusterSecretKey::from_bytes(&[1; 32]).public()
    }

    #[test]
    fn golden_keys_and_topic() {
        let o = origin();
        assert_eq!(
            mirror_key(&o, &Resource::blob("git/")),
            format!("fed/r/{o}/blob/git/").into_bytes()
        );
        assert_eq!(
            parse_mirror_key(&mirror_key(&o, &Resource::doc("a/b"))).unwrap(),
            (o, Resource::doc("a/b"))
        );
        assert!(parse_mirror_key(b"fed/f/x").is_err());
        let topic = directory_topic(&o, &Resource::doc("d"));
        assert_eq!(
            topic,
            [&b"aspen/mirrors/1\0"[..], &o.to_bytes(), &[0], b"d"].concat()
        );
        assert_ne!(topic, directory_topic(&o, &Resource::blob("d")));
    }

    proptest! {
        #[test]
        fn mirror_keys_round_trip(name in "[a-z/]{1,30}") {
            let r = Resource::blob(name);
            prop_assert_eq!(parse_mirror_key(&mirror_key(&origin(), &r)).unwrap(), (origin(), r));
        }

        #[test]
        fn the_key_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_mirror_key(&bytes);
        }
    }
}
