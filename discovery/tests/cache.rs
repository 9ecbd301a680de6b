//! The on-disk record cache, without any network.

use std::net::SocketAddr;

use aspen_discovery::{
    CacheError, CacheProblem, RecordCache, ResolveError, Resolver, Source, MAX_CACHE_FILE_BYTES,
};
use aspen_trust::{ClusterRecord, ClusterSecretKey, RecordError, RecordMember, SignedRecord};
use proptest::prelude::*;

const NOW: u64 = 1_800_000_000;

fn record(port: u16) -> ClusterRecord {
    ClusterRecord {
        name: "alpha".into(),
        relay_url: Some("https://relay.example".into()),
        members: vec![RecordMember {
            node: [7; 32],
            addrs: vec![SocketAddr::from(([10, 0, 0, 1], port))],
        }],
        issued_at: NOW - 60,
        expires_at: NOW + 3600,
    }
}

fn cache() -> (tempfile::TempDir, RecordCache) {
    let dir = tempfile::tempdir().unwrap();
    // A subdirectory that does not exist yet: the first store creates it.
    let cache = RecordCache::new(dir.path().join("records"));
    (dir, cache)
}

#[test]
fn store_then_load_round_trips_and_leaves_no_temporary_files() {
    let (_dir, cache) = cache();
    let k = ClusterSecretKey::generate();
    assert_eq!(cache.load(&k.public()).unwrap(), None);
    let s = SignedRecord::sign(&k, &record(1), 1).unwrap();
    cache.store(&s).unwrap();
    cache.store(&s).unwrap(); // the same record again: a no-op
    assert_eq!(cache.load(&k.public()).unwrap(), Some(s));
    let names: Vec<_> = std::fs::read_dir(cache.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![format!("{}.record", k.public())]);
}

#[test]
fn a_lower_seq_never_replaces_a_higher_one() {
    let (_dir, cache) = cache();
    let k = ClusterSecretKey::generate();
    let s7 = SignedRecord::sign(&k, &record(7), 7).unwrap();
    let s3 = SignedRecord::sign(&k, &record(3), 3).unwrap();
    let s8 = SignedRecord::sign(&k, &record(8), 8).unwrap();
    cache.store(&s7).unwrap();
    let err = cache.store(&s3).unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::Older {
                seq: 3,
                cached: 7,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(cache.load(&k.public()).unwrap(), Some(s7));
    cache.store(&s8).unwrap();
    assert_eq!(cache.load(&k.public()).unwrap(), Some(s8));
}

#[test]
fn only_authentic_records_are_stored_expired_ones_included() {
    let (_dir, cache) = cache();
    let (a, b) = (ClusterSecretKey::generate(), ClusterSecretKey::generate());
    let mut forged = SignedRecord::sign(&b, &record(1), 1).unwrap();
    forged.cluster = a.public();
    assert!(matches!(
        cache.store(&forged),
        Err(CacheError::NotAuthentic {
            reason: RecordError::BadSignature,
            ..
        })
    ));
    let mut old = record(1);
    old.expires_at = NOW - 1;
    old.issued_at = NOW - 10;
    cache
        .store(&SignedRecord::sign(&a, &old, 1).unwrap())
        .unwrap();
}

#[test]
fn corrupt_and_forged_files_are_typed_errors_and_get_replaced() {
    let (_dir, cache) = cache();
    let k = ClusterSecretKey::generate();
    std::fs::create_dir_all(cache.dir()).unwrap();
    let path = cache.path(&k.public());
    for bad in [
        vec![],
        vec![9u8],
        b"\x01garbage".to_vec(),
        vec![0; MAX_CACHE_FILE_BYTES + 1],
    ] {
        std::fs::write(&path, &bad).unwrap();
        let err = cache.load(&k.public()).unwrap_err();
        assert!(matches!(err, CacheError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("is corrupt"), "{err}");
    }
    // A corrupt file does not block a store, and neither does a forged one with a huge seq.
    let s = SignedRecord::sign(&k, &record(1), 1).unwrap();
    cache.store(&s).unwrap();
    assert_eq!(cache.load(&k.public()).unwrap(), Some(s.clone()));
    let other = ClusterSecretKey::generate();
    let mut forged = SignedRecord::sign(&other, &record(2), i64::MAX).unwrap();
    forged.cluster = k.public();
    std::fs::write(&path, forged.encode()).unwrap();
    cache.store(&s).unwrap();
    assert_eq!(cache.load(&k.public()).unwrap(), Some(s));
}

#[tokio::test]
async fn the_resolver_ignores_a_corrupt_cache_and_uses_a_good_one() {
    let (_dir, cache) = cache();
    let k = ClusterSecretKey::generate();
    let resolver = Resolver::new(None, Some(cache.clone()));

    let err = resolver.resolve(&k.public(), NOW).await.unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::Unreachable {
                dht: None,
                cache_problem: None,
                ..
            }
        ),
        "{err:?}"
    );

    std::fs::create_dir_all(cache.dir()).unwrap();
    std::fs::write(cache.path(&k.public()), b"\x01garbage").unwrap();
    let err = resolver.resolve(&k.public(), NOW).await.unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::Unreachable {
                cache_problem: Some(CacheProblem::Unreadable(CacheError::Corrupt { .. })),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("no usable cached record"), "{err}");

    let s = SignedRecord::sign(&k, &record(1), 1).unwrap();
    cache.store_async(&s).await.unwrap();
    assert_eq!(
        cache.load_async(&k.public()).await.unwrap(),
        Some(s.clone())
    );
    let got = resolver.resolve(&k.public(), NOW).await.unwrap();
    assert_eq!((got.source, &got.signed), (Source::Cache, &s));
    assert_eq!(got.record, record(1));
    assert_eq!(got.dht_problem.as_deref(), Some("the DHT is off"));

    // Expired: no longer used, and the error says why.
    let err = resolver.resolve(&k.public(), NOW + 3600).await.unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::Unreachable {
                cache_problem: Some(CacheProblem::Rejected(RecordError::Expired { .. })),
                ..
            }
        ),
        "{err:?}"
    );
}

proptest! {
    #[test]
    fn loading_arbitrary_files_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
        let (_dir, cache) = cache();
        let k = ClusterSecretKey::from_bytes(&[3; 32]);
        std::fs::create_dir_all(cache.dir()).unwrap();
        std::fs::write(cache.path(&k.public()), &bytes).unwrap();
        match cache.load(&k.public()) {
            // Whatever loads is exactly what the file holds (and still has to be verified).
            Ok(Some(s)) => prop_assert_eq!(s.encode(), bytes),
            Ok(None) => prop_assert!(false, "the file exists"),
            Err(e) => prop_assert!(matches!(e, CacheError::Corrupt { .. }), "{}", e),
        }
    }

    #[test]
    fn loading_damaged_records_never_panics(at in any::<usize>(), byte in any::<u8>(), cut in any::<bool>()) {
        let (_dir, cache) = cache();
        let k = ClusterSecretKey::from_bytes(&[4; 32]);
        let mut bytes = SignedRecord::sign(&k, &record(1), 1).unwrap().encode();
        let i = at % bytes.len();
        if cut { bytes.truncate(i) } else { bytes[i] = byte }
        std::fs::create_dir_all(cache.dir()).unwrap();
        std::fs::write(cache.path(&k.public()), &bytes).unwrap();
        if let Ok(Some(s)) = cache.load(&k.public()) {
            // Decodes, but a damaged record never verifies as the original.
            if s.encode() != SignedRecord::sign(&k, &record(1), 1).unwrap().encode() {
                prop_assert!(s.verify(&k.public(), NOW).is_err());
            }
        }
    }
}
