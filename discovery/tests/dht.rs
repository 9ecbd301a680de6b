//! Publish / resolve / verify / cache against a local Mainline testnet. Everything binds
//! 127.0.0.1: nothing leaves the machine.

use std::fmt::Debug;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use aspen_discovery::{
    CacheError, CacheProblem, ClusterDht, DhtConfig, DhtError, RecordCache, ResolveError, Resolved,
    Resolver, Source,
};
use aspen_trust::{
    ClusterKey, ClusterRecord, ClusterSecretKey, RecordError, RecordMember, SignedRecord,
    RECORD_SALT,
};
use mainline::errors::{PutMutableError, PutQueryError};
use mainline::{Dht, MutableItem, SigningKey, Testnet};
use tempfile::TempDir;

/// "Now" for every test (Unix seconds): records are valid from NOW - 60 to NOW + 3600.
const NOW: u64 = 1_800_000_000;
/// Upper bound for anything to happen; never reached unless something is broken.
const PATIENCE: Duration = Duration::from_secs(90);

fn testnet() -> Testnet {
    Testnet::builder(8).build().expect("local testnet")
}

fn config(bootstrap: Vec<String>) -> DhtConfig {
    DhtConfig {
        bootstrap: Some(bootstrap),
        request_timeout: Duration::from_millis(300),
    }
}

fn client(testnet: &Testnet) -> ClusterDht {
    ClusterDht::start(&config(testnet.bootstrap.clone())).expect("DHT client")
}

/// A raw mainline client, to put items our API would never produce.
fn raw_client(testnet: &Testnet) -> mainline::async_dht::AsyncDht {
    Dht::builder()
        .bootstrap(&testnet.bootstrap)
        .bind_address(Ipv4Addr::LOCALHOST)
        .request_timeout(Duration::from_millis(300))
        .build()
        .expect("raw client")
        .as_async()
}

fn record(name: &str, ports: &[u16]) -> ClusterRecord {
    ClusterRecord {
        name: name.into(),
        relay_url: None,
        members: ports
            .iter()
            .map(|&port| RecordMember {
                node: [port as u8; 32],
                addrs: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            })
            .collect(),
        issued_at: NOW - 60,
        expires_at: NOW + 3600,
    }
}

fn cache() -> (TempDir, RecordCache) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = RecordCache::new(dir.path().to_owned());
    (dir, cache)
}

/// A UDP port on 127.0.0.1 that never answers (bound, never read).
fn silent_bootstrap() -> (UdpSocket, Vec<String>) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr").to_string();
    (socket, vec![addr])
}

/// Binds every address once its owner (a dropped testnet node) has released it; the sockets
/// are never read, so nothing answers there any more.
async fn take_over(addrs: &[String]) -> Vec<UdpSocket> {
    let deadline = Instant::now() + PATIENCE;
    let mut taken = Vec::new();
    for addr in addrs {
        loop {
            if let Ok(socket) = UdpSocket::bind(addr.as_str()) {
                taken.push(socket);
                break;
            }
            assert!(Instant::now() < deadline, "{addr} is still in use");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    taken
}

/// Runs `attempt` until `done` holds (the DHT is eventually consistent and the machine may be
/// loaded), failing after PATIENCE with the last value.
async fn eventually<T: Debug, Fut: Future<Output = T>>(
    what: &str,
    mut attempt: impl FnMut() -> Fut,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let value = attempt().await;
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: gave up; last result {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resolves until the DHT serves seq `seq` of `key`.
async fn resolve_seq(resolver: &Resolver, key: &ClusterKey, seq: i64) -> Resolved {
    eventually(
        "resolve from the DHT",
        || resolver.resolve(key, NOW),
        |r| matches!(r, Ok(r) if r.source == Source::Dht && r.signed.seq == seq),
    )
    .await
    .expect("resolved")
}

/// Bounds a whole test step: it must return (we do not assert how fast).
async fn bounded<T>(step: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, step)
        .await
        .expect("returned in bounded time")
}

#[tokio::test]
async fn two_clusters_resolve_independently() {
    let net = testnet();
    let publisher = client(&net);
    let (a, b) = (ClusterSecretKey::generate(), ClusterSecretKey::generate());
    let ka = a.public();
    let (rec_a, rec_b) = (record("alpha", &[7001, 7002]), record("beta", &[8001]));
    let sa = publisher.publish(&a, &rec_a, 1).await.expect("publish A");
    let sb = publisher.publish(&b, &rec_b, 1).await.expect("publish B");
    assert_eq!((sa.seq, sb.seq), (1, 1));
    assert_eq!((sa.cluster, sb.cluster), (ka, b.public()));

    // A different machine that knows only the keys.
    let (_dir, cache) = cache();
    let resolver = Resolver::new(Some(client(&net)), Some(cache.clone()));
    let got_a = resolve_seq(&resolver, &ka, 1).await;
    assert_eq!(got_a.record, rec_a);
    assert_eq!(got_a.signed, sa);
    assert_eq!(got_a.dht_problem, None);
    let got_b = resolve_seq(&resolver, &b.public(), 1).await;
    assert_eq!(got_b.record.members, rec_b.members);
    assert_ne!(got_a.record.members, got_b.record.members);
    // Each is cached under its own key.
    assert_eq!(cache.load(&ka).unwrap(), Some(sa));
    assert_eq!(cache.load(&b.public()).unwrap(), Some(sb));

    // A key nobody published: not found (the DHT answered, it just has nothing).
    let unknown = ClusterSecretKey::generate().public();
    let err = resolver.resolve(&unknown, NOW).await.unwrap_err();
    assert!(
        matches!(err, ResolveError::NotFound { cluster, cache_problem: None } if cluster == unknown),
        "{err:?}"
    );
    assert!(err
        .to_string()
        .contains("not found on the DHT and not cached"));
}

#[tokio::test]
async fn a_new_publish_raises_seq_and_replaces_addresses() {
    let net = testnet();
    let publisher = client(&net);
    let a = ClusterSecretKey::generate();
    let ka = a.public();
    let (_dir, cache) = cache();
    let resolver = Resolver::new(Some(client(&net)), Some(cache.clone()));

    let s1 = publisher
        .publish(&a, &record("alpha", &[7001]), 0)
        .await
        .unwrap();
    assert_eq!(s1.seq, 0);
    resolve_seq(&resolver, &ka, s1.seq).await;

    // The members moved.
    let moved = record("alpha", &[9001, 9002]);
    let s2 = publisher.publish(&a, &moved, s1.seq).await.unwrap();
    assert!(s2.seq > s1.seq, "{} > {}", s2.seq, s1.seq);
    let got = resolve_seq(&resolver, &ka, s2.seq).await;
    assert_eq!(got.record.members, moved.members);
    assert_eq!(cache.load(&ka).unwrap(), Some(s2.clone()));

    // Republishing the current item is fine; republishing the old one is refused.
    publisher.republish(&s2).await.expect("republish");
    let err = publisher.republish(&s1).await.unwrap_err();
    assert!(
        matches!(err, DhtError::Superseded { seq, .. } if seq == s1.seq),
        "{err}"
    );
}

#[tokio::test]
async fn compare_and_swap_keeps_seq_increasing() {
    let net = testnet();
    let (p1, p2) = (client(&net), client(&net));
    let a = ClusterSecretKey::generate();
    let ka = a.public();

    // Nothing published yet: the floor is used as is.
    let first = p1.publish(&a, &record("alpha", &[1]), 10).await.unwrap();
    assert_eq!(first.seq, 10);
    eventually(
        "p2 sees seq 10",
        || p2.fetch(&ka),
        |r| matches!(r, Ok(Some(s)) if s.seq == 10),
    )
    .await
    .unwrap();

    // Two members publish at the same moment, both starting from seq 10.
    let (rec2, rec3) = (record("alpha", &[2]), record("alpha", &[3]));
    let (r1, r2) = tokio::join!(p1.publish(&a, &rec2, 0), p2.publish(&a, &rec3, 0));
    let mut published = Vec::new();
    for r in [r1, r2] {
        match r {
            Ok(s) => {
                assert!(s.seq > 10, "seq {}", s.seq);
                published.push(s.seq);
            }
            Err(e) => assert!(matches!(e, DhtError::Conflict { .. }), "{e}"),
        }
    }
    assert!(!published.is_empty(), "at least one publisher wins");
    let highest = *published.iter().max().unwrap();
    let observer = client(&net);
    let current = eventually(
        "the DHT holds the newest seq",
        || observer.fetch(&ka),
        |r| matches!(r, Ok(Some(s)) if s.seq >= highest),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(current.seq > 10);

    // A floor below the current seq does not matter: current + 1.
    let next = p1.publish(&a, &record("alpha", &[4]), 0).await.unwrap();
    assert_eq!(next.seq, current.seq + 1);
    // A floor above it wins.
    let jump = p2
        .publish(&a, &record("alpha", &[5]), next.seq + 100)
        .await
        .unwrap();
    assert_eq!(jump.seq, next.seq + 100);
}

#[tokio::test]
async fn replicas_holding_an_older_item_do_not_block_publishing() {
    let net = testnet();
    let a = ClusterSecretKey::generate();
    let ka = a.public();
    // Every testnet node holds seq 1.
    client(&net)
        .publish(&a, &record("alpha", &[1]), 1)
        .await
        .unwrap();
    // One extra node, unknown to the testnet, holds seq 2: as if a put of seq 2 had reached
    // only one replica.
    let lone = Dht::builder()
        .server_mode()
        .no_bootstrap()
        .bind_address(Ipv4Addr::LOCALHOST)
        .build()
        .unwrap();
    let lone_addr = lone
        .clone()
        .as_async()
        .info()
        .await
        .local_addr()
        .to_string();
    let s2 = ClusterDht::start(&config(vec![lone_addr.clone()]))
        .unwrap()
        .publish(&a, &record("alpha", &[2]), 2)
        .await
        .unwrap();
    assert_eq!(s2.seq, 2);

    // A publisher that sees all nine: CAS on seq 2 is refused by the eight stale replicas, and
    // keeps being refused however often it re-reads; the publish must still go through.
    let mut everyone = net.bootstrap.clone();
    everyone.push(lone_addr);
    let publisher = ClusterDht::start(&config(everyone)).unwrap();
    let s3 = bounded(publisher.publish(&a, &record("alpha", &[3]), 0))
        .await
        .expect("publish despite stale replicas");
    // Seq 3 (CAS 2) was refused by the majority but stored by the lone node; re-reading shows
    // only our own attempt, so seq 4 went out without CAS.
    assert_eq!(s3.seq, 4);
    let observer = client(&net);
    eventually(
        "the testnet holds the new seq",
        || observer.fetch(&ka),
        |r| matches!(r, Ok(Some(s)) if s.seq == s3.seq),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn records_under_or_signed_by_another_key_are_rejected() {
    let net = testnet();
    let (a, b) = (ClusterSecretKey::generate(), ClusterSecretKey::generate());
    let ka = a.public();
    let (dir, cache) = cache();
    let resolver = Resolver::new(Some(client(&net)), Some(cache.clone()));

    // B's genuine record copied to A's cache file.
    let of_b = SignedRecord::sign(&b, &record("beta", &[1]), 3).unwrap();
    std::fs::write(cache.path(&ka), of_b.encode()).unwrap();
    let err = bounded(resolver.resolve(&ka, NOW)).await.unwrap_err();
    match &err {
        ResolveError::NotFound {
            cache_problem: Some(CacheProblem::Rejected(RecordError::WrongKey { expected, found })),
            ..
        } => assert_eq!((*expected, *found), (ka, b.public())),
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("not found on the DHT"), "{text}");
    assert!(
        text.contains(&format!(
            "record is signed by {}, not by the cluster key {}",
            b.public(),
            ka
        )),
        "{text}"
    );

    // A record claiming to be A's but signed by B.
    let mut forged = SignedRecord::sign(&b, &record("alpha", &[1]), 4).unwrap();
    forged.cluster = ka;
    std::fs::write(cache.path(&ka), forged.encode()).unwrap();
    let err = bounded(resolver.resolve(&ka, NOW)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::NotFound {
                cache_problem: Some(CacheProblem::Rejected(RecordError::BadSignature)),
                ..
            }
        ),
        "{err:?}"
    );
    // The cache itself refuses to store it.
    assert!(matches!(
        cache.store(&forged),
        Err(CacheError::NotAuthentic {
            reason: RecordError::BadSignature,
            ..
        })
    ));
    // And the DHT nodes refuse it too (mainline reports that as a timeout), so nobody has it.
    let item = MutableItem::new_signed_unchecked(
        ka.to_bytes(),
        forged.signature,
        &forged.value,
        forged.seq,
        Some(RECORD_SALT),
    );
    let put = bounded(raw_client(&net).put_mutable(item, None)).await;
    assert!(
        matches!(put, Err(PutMutableError::Query(PutQueryError::Timeout))),
        "{put:?}"
    );
    assert_eq!(bounded(client(&net).fetch(&ka)).await.unwrap(), None);
    drop(dir);
}

#[tokio::test]
async fn an_older_seq_is_a_replay() {
    let a = ClusterSecretKey::generate();
    let ka = a.public();
    let (_dir, cache) = cache();

    // Seq 5 is resolved (and cached) from a first DHT.
    {
        let net1 = testnet();
        let s5 = client(&net1)
            .publish(&a, &record("alpha", &[5]), 5)
            .await
            .unwrap();
        assert_eq!(s5.seq, 5);
        let resolver = Resolver::new(Some(client(&net1)), Some(cache.clone()));
        resolve_seq(&resolver, &ka, 5).await;
    }
    assert_eq!(cache.load(&ka).unwrap().unwrap().seq, 5);

    // A fresh DHT serves a validly signed, but older, seq 3.
    let net2 = testnet();
    let s3 = client(&net2)
        .publish(&a, &record("alpha", &[3]), 3)
        .await
        .unwrap();
    assert_eq!(s3.seq, 3);
    let resolver = Resolver::new(Some(client(&net2)), Some(cache.clone()));
    let got = eventually(
        "the replay is detected",
        || resolver.resolve(&ka, NOW),
        |r| matches!(r, Ok(r) if r.dht_problem.as_deref().is_some_and(|p| p.contains("replay"))),
    )
    .await
    .unwrap();
    assert_eq!(got.source, Source::Cache);
    assert_eq!(got.signed.seq, 5);
    assert_eq!(got.record.members, record("alpha", &[5]).members);
    // The cache was not touched.
    assert_eq!(cache.load(&ka).unwrap().unwrap().seq, 5);

    // An authentic but expired cached record is not usable, yet its seq still counts.
    let mut old = record("alpha", &[9]);
    old.issued_at = NOW - 7200;
    old.expires_at = NOW - 3600;
    cache
        .store(&SignedRecord::sign(&a, &old, 9).unwrap())
        .unwrap();
    let err = eventually(
        "the replay is rejected",
        || resolver.resolve(&ka, NOW),
        |r| {
            matches!(
                r,
                Err(ResolveError::Rejected {
                    reason: RecordError::Replayed { .. },
                    ..
                })
            )
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &err,
            ResolveError::Rejected {
                reason: RecordError::Replayed { seq: 3, known: 9 },
                cache_problem: Some(CacheProblem::Rejected(RecordError::Expired { .. })),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("rejected"), "{err}");
}

#[tokio::test]
async fn an_expired_record_is_rejected() {
    let net = testnet();
    let a = ClusterSecretKey::generate();
    let ka = a.public();
    let mut expired = record("alpha", &[1]);
    expired.issued_at = NOW - 100;
    expired.expires_at = NOW - 1;
    client(&net).publish(&a, &expired, 1).await.unwrap();

    let resolver = Resolver::new(Some(client(&net)), None);
    let err = eventually(
        "the expired record is fetched and rejected",
        || resolver.resolve(&ka, NOW),
        |r| !matches!(r, Err(ResolveError::NotFound { .. })),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::Rejected {
                reason: RecordError::Expired {
                    expires_at,
                    now: NOW
                },
                cache_problem: None,
                ..
            } if expires_at == NOW - 1
        ),
        "{err:?}"
    );
    // Still valid a second earlier.
    let ok = resolver.resolve(&ka, NOW - 2).await.unwrap();
    assert_eq!(ok.record, expired);
}

#[tokio::test]
async fn values_over_1000_bytes_never_reach_the_resolver() {
    let net = testnet();
    let raw = raw_client(&net);
    let dht = client(&net);
    let resolver = Resolver::new(Some(client(&net)), None);
    let (big, garbage) = (ClusterSecretKey::generate(), ClusterSecretKey::generate());
    let kg = garbage.public();

    // 1001 bytes: every DHT node refuses it (error 205), which mainline reports as a timeout.
    let item = MutableItem::new(
        SigningKey::from_bytes(&big.to_bytes()),
        &[1u8; 1001],
        1,
        Some(RECORD_SALT),
    );
    let put = bounded(raw.put_mutable(item, None)).await;
    assert!(
        matches!(put, Err(PutMutableError::Query(PutQueryError::Timeout))),
        "{put:?}"
    );
    assert_eq!(bounded(dht.fetch(&big.public())).await.unwrap(), None);
    let err = bounded(resolver.resolve(&big.public(), NOW))
        .await
        .unwrap_err();
    assert!(matches!(err, ResolveError::NotFound { .. }), "{err:?}");

    // Our own code refuses such a value before the network does.
    let mut oversized = SignedRecord::sign(&big, &record("big", &[1]), 1).unwrap();
    oversized.value = vec![1; 1001];
    assert_eq!(
        oversized.verify(&big.public(), NOW),
        Err(RecordError::TooLarge(1001))
    );
    let err = dht.republish(&oversized).await.unwrap_err();
    assert!(
        matches!(
            err,
            DhtError::Record {
                source: RecordError::TooLarge(1001),
                ..
            }
        ),
        "{err}"
    );

    // Exactly 1000 bytes of garbage, validly signed: the DHT stores it, our decoder refuses it.
    let item = MutableItem::new(
        SigningKey::from_bytes(&garbage.to_bytes()),
        &[0xff; 1000],
        1,
        Some(RECORD_SALT),
    );
    bounded(raw.put_mutable(item, None))
        .await
        .expect("a 1000-byte value is accepted");
    let err = eventually(
        "the garbage is fetched and rejected",
        || resolver.resolve(&kg, NOW),
        |r| !matches!(r, Err(ResolveError::NotFound { .. })),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::Rejected {
                reason: RecordError::Version(0xff),
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_garbage_value_is_a_decode_error() {
    let net = testnet();
    let a = ClusterSecretKey::generate();
    let ka = a.public();
    let item = MutableItem::new(
        SigningKey::from_bytes(&a.to_bytes()),
        b"\x01not a cluster record",
        7,
        Some(RECORD_SALT),
    );
    bounded(raw_client(&net).put_mutable(item, None))
        .await
        .unwrap();
    // fetch returns it unverified...
    let dht = client(&net);
    let fetched = eventually(
        "the item is fetched",
        || dht.fetch(&ka),
        |r| matches!(r, Ok(Some(_))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(fetched.seq, 7);
    // ...and the resolver refuses it with the decoder's reason.
    let (_dir, cache) = cache();
    let resolver = Resolver::new(Some(dht.clone()), Some(cache.clone()));
    let err = resolver.resolve(&ka, NOW).await.unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::Rejected {
                reason: RecordError::NameTooLong(99),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(cache.load(&ka).unwrap(), None, "nothing cached");
    // The next publish still goes above the garbage's seq.
    let s = dht.publish(&a, &record("alpha", &[1]), 0).await.unwrap();
    assert_eq!(s.seq, 8);
}

#[tokio::test]
async fn an_unreachable_dht_falls_back_to_the_cache() {
    let a = ClusterSecretKey::generate();
    let ka = a.public();
    let (_silent, bootstrap) = silent_bootstrap();
    let dht = ClusterDht::start(&config(bootstrap)).unwrap();
    let (_dir, cache) = cache();
    let signed = SignedRecord::sign(&a, &record("alpha", &[1]), 4).unwrap();
    cache.store(&signed).unwrap();

    let got = bounded(Resolver::new(Some(dht.clone()), Some(cache)).resolve(&ka, NOW))
        .await
        .unwrap();
    assert_eq!(got.source, Source::Cache);
    assert_eq!(got.signed, signed);
    let problem = got.dht_problem.expect("why the DHT was not used");
    assert!(problem.contains("unreachable"), "{problem}");

    // Without a cache: a typed error that says so.
    let err = bounded(Resolver::new(Some(dht.clone()), None).resolve(&ka, NOW))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::Unreachable {
                dht: Some(DhtError::Unreachable { .. }),
                cache_problem: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "cannot find cluster {ka}: DHT unreachable: no DHT node answered (1 queried), \
             and no cached record"
        )
    );
    let err = bounded(Resolver::new(None, None).resolve(&ka, NOW))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ResolveError::Unreachable { dht: None, .. }),
        "{err:?}"
    );
    // Publishing fails cleanly too.
    let err = bounded(dht.publish(&a, &record("alpha", &[1]), 5))
        .await
        .unwrap_err();
    assert!(matches!(err, DhtError::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn a_client_answers_nobody() {
    let net = testnet();
    let a = client(&net);
    a.fetch(&ClusterSecretKey::generate().public())
        .await
        .unwrap();
    let addr = a.local_addr().await.unwrap();
    assert!(addr.ip().is_loopback(), "{addr}");
    // Another client that only knows `a` gets no answer at all.
    let b = ClusterDht::start(&config(vec![addr.to_string()])).unwrap();
    let err = bounded(b.fetch(&ClusterSecretKey::generate().public()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DhtError::Unreachable { queried: 1, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_vanished_dht_falls_back_to_the_cache() {
    let a = ClusterSecretKey::generate();
    let ka = a.public();
    let net = testnet();
    let published = client(&net)
        .publish(&a, &record("alpha", &[1]), 1)
        .await
        .unwrap();
    let (_dir, cache) = cache();
    let with_cache = Resolver::new(Some(client(&net)), Some(cache));
    let without_cache = Resolver::new(Some(client(&net)), None);
    resolve_seq(&with_cache, &ka, published.seq).await;
    resolve_seq(&without_cache, &ka, published.seq).await;

    // Mainline stops a node's thread only after its current receive: wait until every node's
    // socket is closed, and keep the ports (silently) so nothing else answers there.
    let addrs = net.bootstrap.clone();
    drop(net);
    let _gone = take_over(&addrs).await;
    let got = bounded(with_cache.resolve(&ka, NOW)).await.unwrap();
    assert_eq!((got.source, got.signed), (Source::Cache, published));
    assert!(got.dht_problem.is_some());
    // Without a cache there is no record. Usually no DHT node answers at all (unreachable);
    // the other resolver's own DHT client may still be in this one's routing table and
    // answer that it holds nothing (not found). Either way: an error, never a record.
    let err = bounded(without_cache.resolve(&ka, NOW)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::Unreachable { .. }
                | ResolveError::NotFound {
                    cache_problem: None,
                    ..
                }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_corrupt_cache_file_is_ignored_and_replaced() {
    let net = testnet();
    let a = ClusterSecretKey::generate();
    let ka = a.public();
    let (_dir, cache) = cache();
    std::fs::write(cache.path(&ka), b"\x01 definitely not a record").unwrap();
    assert!(matches!(cache.load(&ka), Err(CacheError::Corrupt { .. })));

    let resolver = Resolver::new(Some(client(&net)), Some(cache.clone()));
    let err = bounded(resolver.resolve(&ka, NOW)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::NotFound {
                cache_problem: Some(CacheProblem::Unreadable(CacheError::Corrupt { .. })),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("corrupt"), "{err}");

    let s = client(&net)
        .publish(&a, &record("alpha", &[1]), 2)
        .await
        .unwrap();
    resolve_seq(&resolver, &ka, s.seq).await;
    assert_eq!(cache.load(&ka).unwrap(), Some(s));
}

#[tokio::test]
async fn mirrors_announce_themselves_and_garbage_is_replaced() {
    let net = testnet();
    let dht = client(&net);
    let origin = ClusterSecretKey::generate().public();
    let (b, c) = (
        ClusterSecretKey::generate().public(),
        ClusterSecretKey::generate().public(),
    );
    let topic = b"aspen/mirrors/1\0 test topic".to_vec();
    assert_eq!(
        bounded(dht.find_mirrors(&topic, &origin, NOW))
            .await
            .unwrap(),
        vec![],
        "nobody announced yet"
    );
    // Someone writes garbage under the directory's (public) key first.
    let signer = SigningKey::from_bytes(&blake3_directory_key(&topic));
    let item = MutableItem::new(
        signer,
        b"\x07garbage",
        3,
        Some(aspen_discovery::DIRECTORY_SALT),
    );
    bounded(raw_client(&net).put_mutable(item, None))
        .await
        .unwrap();
    // Two mirrors announce at the same moment: both stay listed.
    let (from_b, from_c) = bounded(async {
        tokio::join!(
            dht.announce_mirror(&topic, &origin, &b, NOW),
            dht.announce_mirror(&topic, &origin, &c, NOW + 1)
        )
    })
    .await;
    from_b.unwrap();
    from_c.unwrap();
    let found = eventually(
        "both mirrors are listed",
        || dht.find_mirrors(&topic, &origin, NOW + 2),
        |r| matches!(r, Ok(found) if found.len() == 2),
    )
    .await
    .unwrap();
    assert_eq!(found, vec![c, b], "newest first");
    // Another topic's directory is elsewhere.
    let other = bounded(dht.find_mirrors(b"another topic", &origin, NOW))
        .await
        .unwrap();
    assert!(other.is_empty());
    // Entries past their lifetime are not offered.
    let later = NOW + aspen_discovery::DIRECTORY_ENTRY_TTL_SECS + 10;
    assert_eq!(
        bounded(dht.find_mirrors(&topic, &origin, later))
            .await
            .unwrap(),
        vec![]
    );
}

/// The directory's signing key, derived as the crate derives it (so a raw client can
/// write to it, as anyone can).
fn blake3_directory_key(topic: &[u8]) -> [u8; 32] {
    blake3::derive_key("aspen mirror directory v1 signing key", topic)
}
