//! Push triggers: what an announcement of a new manifest is, and when a follower acts on one.
//!
//! Polling alone makes a change wait for the follower's next pull. An origin (or a mirror)
//! can instead announce each new signed manifest of a resource on a gossip topic derived
//! from the origin key and the resource ([`gossip_topic`]); a follower that hears it pulls at
//! once. An [`Announcement`] carries the encoded [`SignedManifest`], so it proves itself: a
//! follower acts only on one the origin signed for exactly that resource and that is newer
//! than the manifest it already accepted ([`check_announcement`]). A mirror announces the
//! manifests it accepted in its own envelope, naming itself: iroh-gossip drops a message
//! whose bytes it has already seen, and the origin's announcement usually reaches a
//! mirror's readers (relayed by the mirror) before the mirror has pulled what it names, so
//! a reader that pulled from the mirror then got nothing new and needs a second, distinct
//! "now". The mirror's name is a hint: nothing checks that it is true. Anyone on the
//! topic can send bytes, so the check comes first and the rate limit after it
//! ([`AnnouncementLimiter`]): forged or replayed announcements cost a signature check and
//! never use up an honest origin's budget. The pull itself then verifies everything, as any
//! pull does; the announcement only says "now".
//!
//! This module decides; the node wires it to iroh-gossip
//! (`node/src/server/federation/triggers.rs`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aspen_sync::{Manifest, ManifestError, Resource, SignedManifest};
use aspen_trust::ClusterKey;
use serde::{Deserialize, Serialize};

/// Largest announcement (iroh-gossip's default message bound).
pub const MAX_ANNOUNCEMENT_BYTES: usize = 4096;
/// Pulls one origin's announcements may trigger in a burst.
pub const ANNOUNCEMENT_BURST: u32 = 20;
/// After the burst, one triggered pull per this long, per origin.
pub const ANNOUNCEMENT_REFILL: Duration = Duration::from_millis(50);
/// Most origins the limiter tracks (a follower follows at most this many resources).
pub const MAX_LIMITED_ORIGINS: usize = crate::MAX_FOLLOWS;

/// The gossip topic of `origin`'s `resource` (32 bytes, an iroh-gossip `TopicId`).
pub fn gossip_topic(origin: &ClusterKey, resource: &Resource) -> [u8; 32] {
    blake3::derive_key(
        "aspen federation announcements v1 topic",
        &crate::directory_topic(origin, resource),
    )
}

/// One message on an announcement topic. Wire tags are stable (postcard enum index;
/// golden-bytes tested): new kinds are appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Announcement {
    /// Tag 0: the origin's new manifest.
    Origin { manifest: Vec<u8> },
    /// Tag 1: a mirror (the cluster key it claims) now serves this origin manifest.
    Mirror { mirror: [u8; 32], manifest: Vec<u8> },
}

impl Announcement {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("an announcement encodes")
    }

    /// Parses an announcement: at most [`MAX_ANNOUNCEMENT_BYTES`], nothing after it.
    pub fn decode(bytes: &[u8]) -> Result<Self, AnnouncementError> {
        if bytes.len() > MAX_ANNOUNCEMENT_BYTES {
            return Err(AnnouncementError::TooLarge { len: bytes.len() });
        }
        let (announcement, rest): (Self, _) = postcard::take_from_bytes(bytes)
            .map_err(|e| AnnouncementError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(AnnouncementError::Malformed(format!(
                "{} bytes after the announcement",
                rest.len()
            )));
        }
        Ok(announcement)
    }

    /// The signed manifest it carries (still encoded).
    pub fn manifest(&self) -> &[u8] {
        match self {
            Announcement::Origin { manifest } | Announcement::Mirror { manifest, .. } => manifest,
        }
    }

    /// The mirror it claims to come from (None: the origin).
    pub fn mirror(&self) -> Option<[u8; 32]> {
        match self {
            Announcement::Origin { .. } => None,
            Announcement::Mirror { mirror, .. } => Some(*mirror),
        }
    }
}

/// Why an announcement is ignored.
#[derive(Debug, thiserror::Error)]
pub enum AnnouncementError {
    #[error("{len} bytes exceed the limit of {MAX_ANNOUNCEMENT_BYTES}")]
    TooLarge { len: usize },
    #[error("not an announcement: {0}")]
    Malformed(String),
    #[error("not the origin's manifest of the resource: {0}")]
    NotAuthentic(ManifestError),
    #[error("seq {got} is not newer than the accepted seq {have} (a replay, or old news)")]
    NotNewer { have: u64, got: u64 },
}

/// The manifest an announcement carries (and the mirror it names, if any), if `origin`
/// signed it for `resource` and it is newer than `accepted` (the follow's last accepted
/// manifest).
pub fn check_announcement(
    bytes: &[u8],
    origin: &ClusterKey,
    resource: &Resource,
    accepted: Option<&Manifest>,
) -> Result<(Manifest, Option<[u8; 32]>), AnnouncementError> {
    let announcement = Announcement::decode(bytes)?;
    let signed =
        SignedManifest::decode(announcement.manifest()).map_err(AnnouncementError::NotAuthentic)?;
    let manifest = signed
        .verify(origin, resource)
        .map_err(AnnouncementError::NotAuthentic)?;
    if let Some(have) = accepted {
        if manifest.seq <= have.seq {
            return Err(AnnouncementError::NotNewer {
                have: have.seq,
                got: manifest.seq,
            });
        }
    }
    Ok((manifest, announcement.mirror()))
}

/// A token bucket per origin, consulted only for announcements that passed
/// [`check_announcement`].
#[derive(Debug, Default)]
pub struct AnnouncementLimiter {
    buckets: HashMap<[u8; 32], (u32, Instant)>,
}

impl AnnouncementLimiter {
    /// Whether an authentic announcement of `origin` at `now` may trigger a pull (and takes
    /// a token if so).
    pub fn allow(&mut self, origin: &ClusterKey, now: Instant) -> bool {
        let key = origin.to_bytes();
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_LIMITED_ORIGINS {
            // Full buckets are the same as no bucket: forget those first.
            self.buckets
                .retain(|_, (tokens, _)| *tokens < ANNOUNCEMENT_BURST);
            if self.buckets.len() >= MAX_LIMITED_ORIGINS {
                return false;
            }
        }
        let (tokens, since) = self.buckets.entry(key).or_insert((ANNOUNCEMENT_BURST, now));
        let refills =
            now.saturating_duration_since(*since).as_nanos() / ANNOUNCEMENT_REFILL.as_nanos();
        if refills > 0 {
            let refills = u32::try_from(refills).unwrap_or(u32::MAX);
            *tokens = tokens.saturating_add(refills).min(ANNOUNCEMENT_BURST);
            *since += ANNOUNCEMENT_REFILL * refills.min(ANNOUNCEMENT_BURST);
            if *tokens == ANNOUNCEMENT_BURST {
                *since = now;
            }
        }
        if *tokens == 0 {
            return false;
        }
        *tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aspen_sync::manifest::MANIFEST_VERSION;
    use aspen_sync::ContentDigest;
    use aspen_trust::ClusterSecretKey;
    use proptest::prelude::*;

    fn manifest(origin: &ClusterSecretKey, resource: &Resource, seq: u64) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            origin: origin.public().to_bytes(),
            resource: resource.clone(),
            seq,
            digest: ContentDigest::heads(vec![[seq as u8; 32]]),
            parent: (seq > 1).then_some([seq as u8 - 1; 32]),
            issued_at: 1_000,
        }
    }

    #[test]
    fn topics_are_per_origin_and_resource() {
        let a = ClusterSecretKey::from_bytes(&[1; 32]).public();
        let b = ClusterSecretKey::from_bytes(&[2; 32]).public();
        let doc = Resource::doc("plans");
        assert_eq!(gossip_topic(&a, &doc), gossip_topic(&a, &doc));
        assert_ne!(gossip_topic(&a, &doc), gossip_topic(&b, &doc));
        assert_ne!(
            gossip_topic(&a, &doc),
            gossip_topic(&a, &Resource::blob("plans"))
        );
        // Not the DHT directory's address material.
        assert_ne!(
            gossip_topic(&a, &doc).to_vec(),
            crate::directory_topic(&a, &doc)
        );
    }

    fn by_origin(signed: &SignedManifest) -> Vec<u8> {
        Announcement::Origin {
            manifest: signed.encode(),
        }
        .encode()
    }

    #[test]
    fn golden_bytes() {
        let origin = Announcement::Origin {
            manifest: vec![7, 8],
        };
        assert_eq!(origin.encode(), [0, 2, 7, 8]);
        let mirror = Announcement::Mirror {
            mirror: [9; 32],
            manifest: vec![7],
        };
        let mut expected = vec![1];
        expected.extend([9; 32]);
        expected.extend([1, 7]);
        assert_eq!(mirror.encode(), expected);
        assert_eq!(Announcement::decode(&expected).unwrap(), mirror);
        expected.push(0);
        assert!(matches!(
            Announcement::decode(&expected),
            Err(AnnouncementError::Malformed(_))
        ));
    }

    #[test]
    fn only_the_origins_newer_manifests_count() {
        let origin = ClusterSecretKey::generate();
        let doc = Resource::doc("plans");
        let m2 = manifest(&origin, &doc, 2);
        let signed = by_origin(&SignedManifest::sign(&m2, &origin).unwrap());
        let key = origin.public();
        assert_eq!(
            check_announcement(&signed, &key, &doc, None).unwrap(),
            (m2.clone(), None)
        );
        let m1 = manifest(&origin, &doc, 1);
        assert_eq!(
            check_announcement(&signed, &key, &doc, Some(&m1))
                .unwrap()
                .0,
            m2
        );
        // A mirror's envelope carries the same proof, and names the mirror.
        let relayed = Announcement::Mirror {
            mirror: [5; 32],
            manifest: SignedManifest::sign(&m2, &origin).unwrap().encode(),
        }
        .encode();
        assert_ne!(relayed, signed, "distinct bytes: gossip does not drop it");
        assert_eq!(
            check_announcement(&relayed, &key, &doc, Some(&m1)).unwrap(),
            (m2.clone(), Some([5; 32]))
        );
        // A replay (or old news): not newer than what the follower holds.
        assert!(matches!(
            check_announcement(&signed, &key, &doc, Some(&m2)),
            Err(AnnouncementError::NotNewer { have: 2, got: 2 })
        ));
        // Signed by another key, for another resource, or damaged: not authentic.
        let liar = ClusterSecretKey::generate();
        let forged = by_origin(&SignedManifest::sign(&manifest(&liar, &doc, 9), &liar).unwrap());
        assert!(matches!(
            check_announcement(&forged, &key, &doc, None),
            Err(AnnouncementError::NotAuthentic(_))
        ));
        assert!(matches!(
            check_announcement(&signed, &key, &Resource::doc("other"), None),
            Err(AnnouncementError::NotAuthentic(_))
        ));
        // The bare manifest, without an envelope, is not an announcement.
        let bare = SignedManifest::sign(&m2, &origin).unwrap().encode();
        assert!(check_announcement(&bare, &key, &doc, None).is_err());
        let mut damaged = signed.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(check_announcement(&damaged, &key, &doc, None).is_err());
        assert!(matches!(
            check_announcement(&vec![0; MAX_ANNOUNCEMENT_BYTES + 1], &key, &doc, None),
            Err(AnnouncementError::TooLarge { .. })
        ));
    }

    #[test]
    fn each_origin_has_its_own_budget() {
        let mut limiter = AnnouncementLimiter::default();
        let a = ClusterSecretKey::from_bytes(&[1; 32]).public();
        let b = ClusterSecretKey::from_bytes(&[2; 32]).public();
        let t0 = Instant::now();
        for _ in 0..ANNOUNCEMENT_BURST {
            assert!(limiter.allow(&a, t0));
        }
        assert!(!limiter.allow(&a, t0), "the burst is spent");
        // Another origin is not affected by a's announcements.
        assert!(limiter.allow(&b, t0));
        // Tokens come back with time, up to the burst.
        assert!(limiter.allow(&a, t0 + ANNOUNCEMENT_REFILL));
        assert!(!limiter.allow(&a, t0 + ANNOUNCEMENT_REFILL));
        let later = t0 + ANNOUNCEMENT_REFILL * 1000;
        for _ in 0..ANNOUNCEMENT_BURST {
            assert!(limiter.allow(&a, later));
        }
        assert!(!limiter.allow(&a, later));
    }

    proptest! {
        #[test]
        fn the_check_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let key = ClusterSecretKey::from_bytes(&[3; 32]).public();
            let _ = check_announcement(&bytes, &key, &Resource::doc("d"), None);
        }

        #[test]
        fn announcements_round_trip(
            mirror in proptest::option::of(any::<[u8; 32]>()),
            manifest in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let announcement = match mirror {
                None => Announcement::Origin { manifest },
                Some(mirror) => Announcement::Mirror { mirror, manifest },
            };
            prop_assert_eq!(Announcement::decode(&announcement.encode()).unwrap(), announcement);
        }

        #[test]
        fn a_steady_origin_gets_at_most_the_refill_rate(
            gaps in proptest::collection::vec(0u64..400, 1..200)
        ) {
            let mut limiter = AnnouncementLimiter::default();
            let a = ClusterSecretKey::from_bytes(&[1; 32]).public();
            let t0 = Instant::now();
            let mut now = t0;
            let mut allowed = 0u64;
            for gap in gaps {
                now += Duration::from_millis(gap);
                allowed += u64::from(limiter.allow(&a, now));
            }
            let elapsed = now.duration_since(t0).as_millis() as u64;
            let bound = u64::from(ANNOUNCEMENT_BURST)
                + elapsed / ANNOUNCEMENT_REFILL.as_millis() as u64;
            prop_assert!(allowed <= bound, "{allowed} > {bound}");
        }
    }
}
