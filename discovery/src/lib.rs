//! Finding a cluster by its key: cluster records on the BitTorrent Mainline DHT.
//!
//! A cluster names itself by its public [`ClusterKey`]. To let anyone who knows only that key
//! reach the cluster, the leader publishes a [`ClusterRecord`] (name, members with their
//! direct addresses, relay, validity window) as a BEP-44 *mutable item* under the cluster key,
//! and resolvers fetch, verify and cache it.
//!
//! # The BEP-44 signature is the record signature
//!
//! [`SignedRecord`] is exactly a BEP-44 mutable item: public key = cluster key, salt =
//! [`RECORD_SALT`], `seq`, value = the encoded record, and the Ed25519 signature BEP-44 defines
//! over `salt || seq || value`. There is no second, Aspen-level signature inside the value:
//! what DHT nodes check and what resolvers check is the same signature. The fixed salt does two
//! jobs: it names the DHT slot (target = SHA-1(key || salt)), and it separates this
//! signature's domain from every other use of the cluster key (Aspen's own signatures start
//! with an `aspen/...` context, BEP-44 signables with `4:salt`).
//!
//! # What is verified where
//!
//! - DHT nodes (and mainline on the client side) check the BEP-44 signature and the target;
//!   nodes refuse values over 1000 bytes. That only proves the cluster key signed *something*.
//! - [`ClusterDht::fetch`] returns the item with the highest `seq` among the answers, converted
//!   to a [`SignedRecord`] but *not* verified at Aspen's level.
//! - [`Resolver::resolve`] verifies everything before trusting a record
//!   ([`SignedRecord::verify`]: key match, strict signature, well-formed value, not expired)
//!   and refuses anything older than the record it already trusts
//!   ([`SignedRecord::check_not_older_than`], replay protection). A cached record is
//!   re-verified on every use, exactly like a fresh one.
//!
//! # Sequence numbers
//!
//! `seq` only ever grows. [`ClusterDht::publish`] reads the current item and writes
//! `max(floor_seq, current + 1)` with BEP-44 compare-and-swap (`cas` = the seq it read), so a
//! concurrent publisher is detected and the publish is retried on a fresh read (a bounded number
//! of times). `floor_seq` lets the caller keep seq monotonic even when the DHT has forgotten the
//! item (pass the last seq you published). [`ClusterDht::republish`] puts the same signed item
//! again (same seq) to refresh DHT storage, well within the DHT's record lifetime.
//!
//! # Cache
//!
//! [`RecordCache`] keeps the last good record per cluster on disk (`<dir>/<key hex>.record`,
//! atomic writes, never replaced by a lower seq), so a known cluster stays reachable when the
//! DHT is down or the machine is offline. The resolver asks the DHT first and falls back to the
//! cache, telling the caller why ([`Resolved::dht_problem`]).
//!
//! Every input from the network or the disk is untrusted: it yields a value or a typed error,
//! never a panic.

mod cache;
mod dht;
mod directory;
mod resolve;

pub use cache::{CacheError, RecordCache, MAX_CACHE_FILE_BYTES};
pub use dht::{
    ClusterDht, DhtConfig, DhtError, DEFAULT_REQUEST_TIMEOUT, MAX_PUBLISH_ATTEMPTS,
    MIN_QUERY_DEADLINE, QUERY_DEADLINE_FACTOR,
};
pub use directory::{
    directory_target, DirectoryError, MirrorDirectory, DIRECTORY_ENTRY_TTL_SECS, DIRECTORY_SALT,
    MAX_DIRECTORY_ENTRIES,
};
pub use resolve::{CacheProblem, ResolveError, Resolved, Resolver, Source};

// Re-exported so callers need not depend on aspen-trust just to name these.
pub use aspen_trust::{
    ClusterKey, ClusterRecord, ClusterSecretKey, RecordError, RecordMember, SignedRecord,
    RECORD_SALT,
};

/// The DHT address of `key`'s record: the BEP-44 target, SHA-1(public key || [`RECORD_SALT`]).
/// For diagnostics (e.g. to look the item up with another BEP-44 tool).
pub fn dht_target(key: &ClusterKey) -> [u8; 20] {
    *mainline::MutableItem::target_from_key(&key.to_bytes(), Some(RECORD_SALT)).as_bytes()
}

/// `Ok` if `signed` is a well-formed record genuinely signed by `key`, expired or not.
///
/// The seq of such a record is a trustworthy lower bound (the cluster really issued it), even
/// after it expired; a record that fails this check says nothing.
pub(crate) fn check_authentic(signed: &SignedRecord, key: &ClusterKey) -> Result<(), RecordError> {
    match signed.verify(key, 0) {
        Ok(_) | Err(RecordError::Expired { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync + 'static>() {}
    fn error<T: std::error::Error + Send + Sync + 'static>() {}
    fn send<T: Send>(_: &T) {}

    /// The node spawns these on Tokio and wraps the errors in anyhow.
    #[test]
    fn types_and_futures_can_cross_tasks() {
        send_sync::<ClusterDht>();
        send_sync::<Resolver>();
        send_sync::<RecordCache>();
        error::<DhtError>();
        error::<ResolveError>();
        error::<CacheError>();
        let key = ClusterSecretKey::from_bytes(&[1; 32]);
        let resolver = Resolver::new(None, None);
        send(&resolver.resolve(&key.public(), 0));
        if let Ok(dht) = ClusterDht::start(&DhtConfig {
            bootstrap: Some(vec!["127.0.0.1:9".into()]),
            ..DhtConfig::default()
        }) {
            let record = ClusterRecord {
                name: String::new(),
                relay_url: None,
                members: vec![],
                issued_at: 0,
                expires_at: 0,
            };
            send(&dht.publish(&key, &record, 0));
            send(&dht.fetch(&key.public()));
        }
    }
}
