//! Mirror directories: which clusters say they mirror a resource, on the DHT.
//!
//! A directory is a BEP-44 mutable item whose key pair is derived from a public *topic*
//! (the origin key and the resource, see `aspen_federation::directory_topic`), so every
//! mirror can write it and every reader can find it knowing only the origin and the
//! resource. The price of a key anyone can derive: anyone can also overwrite the directory.
//! Its entries are therefore hints and nothing more. A reader resolves each named cluster's
//! own signed record, proves the cluster in the federation hello and verifies every byte it
//! serves against the origin's key; a forged entry costs it one failed lookup, an erased
//! directory costs it the mirrors it did not know through `--via`, and mirrors re-announce.
//!
//! Value: a version byte (1), then up to [`MAX_DIRECTORY_ENTRIES`] entries of a 32-byte
//! cluster key and the 8-byte big-endian Unix second it was last announced.

use aspen_trust::{bep44_signable, ClusterKey};
use ed25519_dalek::{Signer, SigningKey};
use mainline::errors::PutMutableError;
use mainline::MutableItem;
use tracing::debug;

use crate::dht::{ClusterDht, DhtError, MAX_PUBLISH_ATTEMPTS};

/// The BEP-44 salt of every mirror directory.
pub const DIRECTORY_SALT: &[u8] = b"aspen-mirrors";
/// Most mirrors one directory lists (BEP-44 values are at most 1000 bytes).
pub const MAX_DIRECTORY_ENTRIES: usize = 24;
/// An entry not re-announced for this long (seconds) is dropped by the next writer and
/// ignored by readers.
pub const DIRECTORY_ENTRY_TTL_SECS: u64 = 2 * 60 * 60;
const ENTRY_BYTES: usize = 40;
const VERSION: u8 = 1;

/// The mirrors a directory names, newest announcement first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorDirectory {
    pub entries: Vec<(ClusterKey, u64)>,
}

/// Why a directory value was not understood.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("unknown directory version {0}")]
    Version(u8),
    #[error("a directory of {0} bytes is not whole entries")]
    Length(usize),
    #[error("more than {MAX_DIRECTORY_ENTRIES} entries")]
    TooMany,
    #[error("an entry that is not a cluster key")]
    BadKey,
}

impl MirrorDirectory {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        for (key, at) in self.entries.iter().take(MAX_DIRECTORY_ENTRIES) {
            out.extend_from_slice(&key.to_bytes());
            out.extend_from_slice(&at.to_be_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DirectoryError> {
        let Some((&version, rest)) = bytes.split_first() else {
            return Err(DirectoryError::Length(0));
        };
        if version != VERSION {
            return Err(DirectoryError::Version(version));
        }
        if rest.len() % ENTRY_BYTES != 0 {
            return Err(DirectoryError::Length(bytes.len()));
        }
        if rest.len() / ENTRY_BYTES > MAX_DIRECTORY_ENTRIES {
            return Err(DirectoryError::TooMany);
        }
        let entries = rest
            .chunks_exact(ENTRY_BYTES)
            .map(|c| {
                let key: [u8; 32] = c[..32].try_into().expect("32 bytes");
                let at = u64::from_be_bytes(c[32..].try_into().expect("8 bytes"));
                ClusterKey::from_bytes(&key)
                    .map(|k| (k, at))
                    .map_err(|_| DirectoryError::BadKey)
            })
            .collect::<Result<_, _>>()?;
        Ok(MirrorDirectory { entries })
    }

    /// `mirror` announced at `now`: listed first, entries older than the TTL (or dated in
    /// the future by more than the TTL) dropped, at most [`MAX_DIRECTORY_ENTRIES`] kept.
    pub fn announce(&mut self, mirror: &ClusterKey, now: u64) {
        self.entries.retain(|(k, _)| k != mirror);
        self.drop_expired(now);
        self.entries.insert(0, (*mirror, now));
        self.entries.sort_by_key(|e| std::cmp::Reverse(e.1));
        self.entries.truncate(MAX_DIRECTORY_ENTRIES);
    }

    /// Keeps the entries announced within the TTL of `now`.
    pub fn drop_expired(&mut self, now: u64) {
        self.entries
            .retain(|(_, at)| at.abs_diff(now) <= DIRECTORY_ENTRY_TTL_SECS);
    }
}

/// The key pair of `topic`'s directory (derived, so public: see the module docs).
fn directory_signer(topic: &[u8]) -> SigningKey {
    SigningKey::from_bytes(&blake3::derive_key(
        "aspen mirror directory v1 signing key",
        topic,
    ))
}

/// The DHT address (BEP-44 target) of `topic`'s directory.
pub fn directory_target(topic: &[u8]) -> [u8; 20] {
    let public = directory_signer(topic).verifying_key().to_bytes();
    *MutableItem::target_from_key(&public, Some(DIRECTORY_SALT)).as_bytes()
}

impl ClusterDht {
    /// The directory of `topic` as the DHT holds it (`None`: no item, or one that does not
    /// decode), with its seq. `origin` only names the lookup in errors.
    async fn directory(
        &self,
        topic: &[u8],
        origin: &ClusterKey,
    ) -> Result<Option<(i64, Option<MirrorDirectory>)>, DhtError> {
        let public = directory_signer(topic).verifying_key().to_bytes();
        let item = self
            .best_item(public, DIRECTORY_SALT, *origin, "mirror lookup")
            .await?;
        Ok(item.map(|item| (item.seq(), MirrorDirectory::decode(item.value()).ok())))
    }

    /// The clusters that announced, within the TTL of `now`, that they mirror `topic`
    /// (hints: see the module docs).
    pub async fn find_mirrors(
        &self,
        topic: &[u8],
        origin: &ClusterKey,
        now: u64,
    ) -> Result<Vec<ClusterKey>, DhtError> {
        let Some((_, Some(mut directory))) = self.directory(topic, origin).await? else {
            return Ok(Vec::new());
        };
        directory.drop_expired(now);
        Ok(directory.entries.into_iter().map(|(k, _)| k).collect())
    }

    /// Adds (or refreshes) `mirror` in `topic`'s directory: read, edit, write with BEP-44
    /// compare-and-swap, read back, retried on conflicts (at most [`MAX_PUBLISH_ATTEMPTS`]
    /// times). A directory that does not decode is replaced.
    pub async fn announce_mirror(
        &self,
        topic: &[u8],
        origin: &ClusterKey,
        mirror: &ClusterKey,
        now: u64,
    ) -> Result<(), DhtError> {
        let signer = directory_signer(topic);
        let public = signer.verifying_key().to_bytes();
        let mut last_read: Option<Option<i64>> = None;
        let mut last_conflict = None;
        for attempt in 1..=MAX_PUBLISH_ATTEMPTS {
            let current = self.directory(topic, origin).await?;
            let current_seq = current.as_ref().map(|(seq, _)| *seq);
            let mut directory = current.and_then(|(_, d)| d).unwrap_or_default();
            directory.announce(mirror, now);
            let value = directory.encode();
            // Above the current seq, and at least the clock in milliseconds: two mirrors that
            // both find no directory write different seqs (the higher wins everywhere, and
            // the other, reading back, tries again). Equal seqs would not be told apart:
            // mainline yields one item per seq, whichever answer came first.
            let clock_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let seq = current_seq.map_or(clock_ms, |s| s.saturating_add(1).max(clock_ms));
            // The same seq read again after a conflict: stale replicas, not a writer.
            let cas = if last_read == Some(current_seq) {
                None
            } else {
                current_seq
            };
            let signature = signer
                .sign(&bep44_signable(DIRECTORY_SALT, seq, &value))
                .to_bytes();
            let item = MutableItem::new_signed_unchecked(
                public,
                signature,
                &value,
                seq,
                Some(DIRECTORY_SALT),
            );
            let dht = self.dht.clone();
            let put = self
                .guarded(*mirror, "mirror announce", async move {
                    dht.put_mutable(item, cas).await.map(|_| ())
                })
                .await?;
            match put {
                Ok(()) => {
                    // Two writers that both found no directory both write seq 1, and only
                    // one of them stays: read back, and go again if we are not listed.
                    let listed = self.find_mirrors(topic, origin, now).await?;
                    if listed.contains(mirror) {
                        debug!(%origin, %mirror, seq, attempt, "mirror announced");
                        return Ok(());
                    }
                    debug!(%origin, %mirror, seq, attempt, "mirror announcement overwritten; again");
                    last_conflict = Some(mainline::errors::ConcurrencyError::CasFailed);
                    last_read = None;
                }
                Err(PutMutableError::Concurrency(conflict)) => {
                    last_conflict = Some(conflict);
                    last_read = Some(current_seq);
                }
                Err(PutMutableError::Query(source)) => {
                    return Err(DhtError::Put {
                        cluster: *mirror,
                        source,
                    })
                }
            }
        }
        Err(DhtError::Conflict {
            cluster: *mirror,
            attempts: MAX_PUBLISH_ATTEMPTS,
            last: last_conflict.unwrap_or(mainline::errors::ConcurrencyError::CasFailed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> ClusterKey {
        aspen_trust::ClusterSecretKey::from_bytes(&[n; 32]).public()
    }

    #[test]
    fn golden_bytes() {
        let d = MirrorDirectory {
            entries: vec![(key(1), 0x0102)],
        };
        let bytes = d.encode();
        assert_eq!(
            bytes,
            [&[1][..], &key(1).to_bytes(), &[0, 0, 0, 0, 0, 0, 1, 2]].concat()
        );
        assert_eq!(MirrorDirectory::decode(&bytes).unwrap(), d);
        assert_eq!(
            MirrorDirectory::decode(&[2]),
            Err(DirectoryError::Version(2))
        );
        assert!(MirrorDirectory::decode(&bytes[..20]).is_err());
        // The largest directory fits a BEP-44 value.
        let full = MirrorDirectory {
            entries: (0..MAX_DIRECTORY_ENTRIES as u8)
                .map(|n| (key(n), 1))
                .collect(),
        };
        assert!(full.encode().len() <= 1000);
        // The address depends on the topic only.
        assert_eq!(directory_target(b"t"), directory_target(b"t"));
        assert_ne!(directory_target(b"t"), directory_target(b"u"));
    }

    #[test]
    fn announcing_refreshes_expires_and_bounds() {
        let mut d = MirrorDirectory::default();
        d.announce(&key(1), 100);
        d.announce(&key(2), 200);
        d.announce(&key(1), 300);
        assert_eq!(d.entries, vec![(key(1), 300), (key(2), 200)]);
        d.announce(&key(3), 200 + DIRECTORY_ENTRY_TTL_SECS + 1);
        assert_eq!(d.entries.len(), 2, "key 2 expired: {d:?}");
        for n in 10..10 + MAX_DIRECTORY_ENTRIES as u8 + 5 {
            d.announce(&key(n), 300 + n as u64);
        }
        assert_eq!(d.entries.len(), MAX_DIRECTORY_ENTRIES);
        // Newest first: key 3's announcement is the latest.
        assert_eq!(d.entries[0].0, key(3));
        assert_eq!(d.entries[1].0, key(10 + MAX_DIRECTORY_ENTRIES as u8 + 4));
    }

    proptest! {
        #[test]
        fn the_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            if let Ok(d) = MirrorDirectory::decode(&bytes) {
                prop_assert!(d.entries.len() <= MAX_DIRECTORY_ENTRIES);
                prop_assert_eq!(MirrorDirectory::decode(&d.encode()), Ok(d));
            }
        }
    }
}
