//! Follows: the resources of other clusters this cluster pulls, and what it last accepted.
//!
//! Layout in the system key space (replicated through Raft, so a new leader carries on):
//! - `fed/f/<origin hex>/<kind>/<name>` -> [`Follow`]: what to pull and where to put it;
//! - `fed/s/<origin hex>/<kind>/<name>` -> the last signed manifest accepted for it (its
//!   encoding). It is the floor for the next pull: a manifest older than it is a replay or a
//!   rollback ([`aspen_sync::check_successor`]). Kept apart from the follow so recording a
//!   pull never races an edit of the follow.
//! - `fed/t/<origin hex>/blob/<prefix>` -> the tag list (a `BlobTagList`, postcard) the last
//!   accepted manifest of a followed blob prefix pins, when it fits one value: what a mirror
//!   serves (the local tags may differ: tags the origin removed stay here).
//! - `fed/m/<kind>/<name>` -> the last manifest this cluster signed for one of its own
//!   exported resources (the origin side; the chain continues from it).
//! - `fed/r/<origin hex>/<kind>/<name>` -> an [`crate::Export`]: which clusters may pull
//!   this cluster's copy of a followed resource from it, as a mirror ([`crate::mirrors`]).

use std::net::SocketAddr;

use aspen_sync::{Resource, ResourceKind};
use aspen_trust::ClusterKey;
use serde::{Deserialize, Serialize};

/// Where follows live.
pub const FOLLOW_PREFIX: &[u8] = b"fed/f/";
/// Where the last accepted manifest of each follow lives.
pub const FOLLOW_STATE_PREFIX: &[u8] = b"fed/s/";
/// Where the accepted tag list of each followed blob prefix lives.
pub const FOLLOW_TAGS_PREFIX: &[u8] = b"fed/t/";
/// Where an origin keeps the last manifest it signed per resource.
pub const ORIGIN_MANIFEST_PREFIX: &[u8] = b"fed/m/";
/// Most follows a cluster keeps.
pub const MAX_FOLLOWS: usize = 1024;
/// Most origin nodes remembered as dialing hints per follow (from a cluster ticket).
pub const MAX_HINTS: usize = 8;
/// Most addresses per hinted node (as many as a node ticket may carry).
pub const MAX_HINT_ADDRS: usize = 16;
/// Most mirrors a follow names to pull from when the origin is unreachable (`--via`).
pub const MAX_VIA: usize = 4;
/// Largest encoded follow accepted when reading one back (hints and mirrors at their bounds
/// fit).
const MAX_FOLLOW_BYTES: usize = 16 * 1024;
/// The prefix, under `fed/`, of a followed document's default local name.
pub const DEFAULT_DOC_PREFIX: &str = "fed/";

/// One follow (the value under its key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Follow {
    /// Where pulled data goes locally: the document name for a document, the tag prefix
    /// the origin's tags are put under for blobs.
    pub into: String,
    /// Origin nodes to try before (and besides) the origin's DHT record.
    pub hints: Vec<Hint>,
    /// When the follow was created (Unix milliseconds).
    pub created_at_ms: u64,
    /// Mirrors to pull from when the origin cannot be reached, tried in this order before
    /// those the DHT names. Everything a mirror serves is verified against the origin's key.
    pub via: Vec<Via>,
}

/// A mirror named for a follow: its cluster key, and nodes of it to dial besides its DHT
/// record's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Via {
    pub cluster: [u8; 32],
    pub nodes: Vec<Hint>,
}

/// The layout of a follow before mirrors (read back from older clusters).
#[derive(Deserialize)]
struct FollowV1 {
    into: String,
    hints: Vec<Hint>,
    created_at_ms: u64,
}

/// An origin node to dial, from a cluster ticket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    pub node: [u8; 32],
    pub addrs: Vec<SocketAddr>,
}

impl Follow {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a follow encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FollowError> {
        if bytes.len() > MAX_FOLLOW_BYTES {
            return Err(FollowError::Stored(format!(
                "{} bytes exceed the limit of {MAX_FOLLOW_BYTES}",
                bytes.len()
            )));
        }
        let follow = match postcard::from_bytes::<Follow>(bytes) {
            Ok(follow) => follow,
            Err(e) => match postcard::from_bytes::<FollowV1>(bytes) {
                Ok(old) => Follow {
                    into: old.into,
                    hints: old.hints,
                    created_at_ms: old.created_at_ms,
                    via: Vec::new(),
                },
                Err(_) => return Err(FollowError::Stored(e.to_string())),
            },
        };
        follow.check_hints()?;
        Ok(follow)
    }

    fn check_hints(&self) -> Result<(), FollowError> {
        if self.via.len() > MAX_VIA {
            return Err(FollowError::TooManyMirrors {
                count: self.via.len(),
                max: MAX_VIA,
            });
        }
        let nodes = self.via.iter().flat_map(|v| &v.nodes);
        if let Some(h) = nodes.clone().find(|h| h.addrs.len() > MAX_HINT_ADDRS) {
            return Err(FollowError::TooManyHints {
                count: h.addrs.len(),
                max: MAX_HINT_ADDRS,
            });
        }
        if let Some(v) = self.via.iter().find(|v| v.nodes.len() > MAX_HINTS) {
            return Err(FollowError::TooManyHints {
                count: v.nodes.len(),
                max: MAX_HINTS,
            });
        }
        if self.hints.len() > MAX_HINTS {
            return Err(FollowError::TooManyHints {
                count: self.hints.len(),
                max: MAX_HINTS,
            });
        }
        if let Some(h) = self.hints.iter().find(|h| h.addrs.len() > MAX_HINT_ADDRS) {
            return Err(FollowError::TooManyHints {
                count: h.addrs.len(),
                max: MAX_HINT_ADDRS,
            });
        }
        Ok(())
    }
}

/// The local name a followed resource goes to: `into` if given, else a name that says where
/// it came from: `fed/<first 16 hex digits of the origin key>/<name>` (a document name, or
/// for blobs the local tag prefix the origin's tags are put under). A namespace keeps its
/// id (an iroh-docs namespace is the same everywhere), so `into` may only repeat it.
pub fn local_name(
    origin: &ClusterKey,
    resource: &Resource,
    into: Option<&str>,
) -> Result<String, FollowError> {
    resource
        .check()
        .map_err(|e| FollowError::BadResource(e.to_string()))?;
    if resource.kind == ResourceKind::Ns {
        return match into {
            Some(other) if other != resource.name => Err(FollowError::NsInto),
            _ => Ok(resource.name.clone()),
        };
    }
    Ok(match into {
        Some(name) => name.to_string(),
        None => format!(
            "{DEFAULT_DOC_PREFIX}{}/{}",
            &hex::encode(origin.to_bytes())[..16],
            resource.name
        ),
    })
}

pub(crate) fn key_with(prefix: &[u8], origin: Option<&ClusterKey>, resource: &Resource) -> Vec<u8> {
    let mut key = prefix.to_vec();
    if let Some(origin) = origin {
        key.extend_from_slice(hex::encode(origin.to_bytes()).as_bytes());
        key.push(b'/');
    }
    key.extend_from_slice(resource.kind.to_string().as_bytes());
    key.push(b'/');
    key.extend_from_slice(resource.name.as_bytes());
    key
}

/// The key a follow of `resource` at `origin` is stored under.
pub fn follow_key(origin: &ClusterKey, resource: &Resource) -> Vec<u8> {
    key_with(FOLLOW_PREFIX, Some(origin), resource)
}

/// The key of the last manifest accepted for that follow.
pub fn follow_state_key(origin: &ClusterKey, resource: &Resource) -> Vec<u8> {
    key_with(FOLLOW_STATE_PREFIX, Some(origin), resource)
}

/// The key of the tag list the last accepted manifest of a followed blob prefix pins.
pub fn follow_tags_key(origin: &ClusterKey, resource: &Resource) -> Vec<u8> {
    key_with(FOLLOW_TAGS_PREFIX, Some(origin), resource)
}

/// The key of the last manifest this cluster signed for its own `resource`.
pub fn origin_manifest_key(resource: &Resource) -> Vec<u8> {
    key_with(ORIGIN_MANIFEST_PREFIX, None, resource)
}

/// The origin and resource a follow key names (the inverse of [`follow_key`]).
pub fn parse_follow_key(key: &[u8]) -> Result<(ClusterKey, Resource), FollowError> {
    let bad = || FollowError::Stored(format!("not a follow key: {}", key.escape_ascii()));
    let rest = key.strip_prefix(FOLLOW_PREFIX).ok_or_else(bad)?;
    if rest.len() < 65 || rest[64] != b'/' {
        return Err(bad());
    }
    let origin: ClusterKey = std::str::from_utf8(&rest[..64])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let rest = &rest[65..];
    let slash = rest.iter().position(|b| *b == b'/').ok_or_else(bad)?;
    let kind = match &rest[..slash] {
        b"doc" => ResourceKind::Doc,
        b"blob" => ResourceKind::Blob,
        b"ns" => ResourceKind::Ns,
        _ => return Err(bad()),
    };
    let name = std::str::from_utf8(&rest[slash + 1..]).map_err(|_| bad())?;
    Ok((
        origin,
        Resource {
            kind,
            name: name.to_string(),
        },
    ))
}

/// Why a follow was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FollowError {
    #[error("bad resource: {0}")]
    BadResource(String),
    #[error("a namespace keeps its id where it is followed: --into may only repeat it")]
    NsInto,
    #[error("{count} dialing hints exceed the limit of {max}")]
    TooManyHints { count: usize, max: usize },
    #[error("{count} mirrors exceed the limit of {max} per follow")]
    TooManyMirrors { count: usize, max: usize },
    #[error("stored follow: {0}")]
    Stored(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn origin() -> ClusterKey {
        aspen_trust::ClusterSecretKey::from_bytes(&[1; 32]).public()
    }

    #[test]
    fn golden_bytes_and_keys() {
        let f = Follow {
            into: "d".into(),
            hints: vec![Hint {
                node: [2; 32],
                addrs: vec!["127.0.0.1:5".parse().unwrap()],
            }],
            created_at_ms: 7,
            via: vec![Via {
                cluster: [3; 32],
                nodes: vec![],
            }],
        };
        let v1 = [&[1, b'd', 1][..], &[2; 32], &[1, 0, 127, 0, 0, 1, 5], &[7]].concat();
        let expected = [&v1[..], &[1], &[3; 32], &[0]].concat();
        assert_eq!(f.encode(), expected);
        assert_eq!(Follow::decode(&expected).unwrap(), f);
        // A follow stored before mirrors existed reads back with none.
        assert_eq!(
            Follow::decode(&v1).unwrap(),
            Follow {
                via: vec![],
                ..f.clone()
            }
        );
        let o = origin();
        let hexo = o.to_string();
        assert_eq!(
            follow_key(&o, &Resource::doc("a/b")),
            format!("fed/f/{hexo}/doc/a/b").into_bytes()
        );
        assert_eq!(
            follow_state_key(&o, &Resource::doc("a")),
            format!("fed/s/{hexo}/doc/a").into_bytes()
        );
        assert_eq!(origin_manifest_key(&Resource::doc("a")), b"fed/m/doc/a");
        assert_eq!(
            parse_follow_key(&follow_key(&o, &Resource::doc("a/b"))).unwrap(),
            (o, Resource::doc("a/b"))
        );
        assert!(parse_follow_key(b"fed/f/zz/doc/a").is_err());
        assert!(parse_follow_key(b"fed/e/doc/a").is_err());
    }

    #[test]
    fn local_names_say_where_a_document_came_from() {
        let o = origin();
        let name = local_name(&o, &Resource::doc("plans"), None).unwrap();
        assert_eq!(name, format!("fed/{}/plans", &o.to_string()[..16]));
        assert_eq!(
            local_name(&o, &Resource::doc("plans"), Some("mine")).unwrap(),
            "mine"
        );
        assert_eq!(
            local_name(&o, &Resource::blob("p/"), None).unwrap(),
            format!("fed/{}/p/", &o.to_string()[..16])
        );
        let ns = Resource::ns(&[1; 32]);
        assert_eq!(local_name(&o, &ns, None).unwrap(), ns.name);
        assert_eq!(local_name(&o, &ns, Some(&ns.name)).unwrap(), ns.name);
        assert!(matches!(
            local_name(&o, &ns, Some("mine")),
            Err(FollowError::NsInto)
        ));
        assert!(local_name(&o, &Resource::doc(""), None).is_err());
    }

    #[test]
    fn oversized_hints_are_refused_when_read_back() {
        let f = Follow {
            into: "d".into(),
            hints: vec![
                Hint {
                    node: [0; 32],
                    addrs: vec![]
                };
                MAX_HINTS + 1
            ],
            created_at_ms: 0,
            via: vec![],
        };
        assert!(matches!(
            Follow::decode(&f.encode()),
            Err(FollowError::TooManyHints { .. })
        ));
        let via = Via {
            cluster: [1; 32],
            nodes: vec![],
        };
        let f = Follow {
            hints: vec![],
            via: vec![via; MAX_VIA + 1],
            ..f
        };
        assert!(matches!(
            Follow::decode(&f.encode()),
            Err(FollowError::TooManyMirrors { .. })
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Follow::decode(&bytes);
            let _ = parse_follow_key(&bytes);
        }

        #[test]
        fn follow_keys_round_trip(name in "[a-z/]{1,30}") {
            let o = origin();
            let r = Resource::doc(name);
            prop_assert_eq!(parse_follow_key(&follow_key(&o, &r)).unwrap(), (o, r));
        }
    }
}
