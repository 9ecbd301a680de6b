//! The state digest of a fixed history of writes, pinned: replicas of different Aspen builds
//! (and a store moved to a new layout) must digest the same state the same way.
//!
//! The constant was computed by the store layout before `kv_revisions` (a current-value table
//! and a `(key, revision)` history): the digest reads the same rows in the same order from the
//! new layout. A change to it means every replica's digest changes: say so in the commit.

use openraft::EntryPayload;

use aspen_kv::api::*;
use aspen_kv::raft_types::Entry;

fn put(key: &str, value: &str) -> WriteOp {
    WriteOp::Put {
        key: key.into(),
        value: value.into(),
        prev_kv: false,
    }
}

fn delete(start: &str, end: Option<&str>) -> WriteOp {
    WriteOp::Delete {
        start: start.into(),
        end: end.map(Into::into),
        prev_kv: true,
    }
}

/// A history touching every kind of key-space write: puts over puts, a single and a range
/// delete, a transaction each way, a lease with keys then revoked, a compaction, and writes
/// after it.
fn history() -> Vec<Vec<WriteOp>> {
    vec![
        vec![put("a", "1"), put("b", "1"), put("c", "1"), put("d/1", "1")],
        vec![put("a", "2"), delete("b", None), put("d/2", "1")],
        vec![
            WriteOp::Txn(Txn {
                compare: vec![Compare {
                    key: "a".into(),
                    target: CompareTarget::Version(2),
                    op: CompareOp::Equal,
                }],
                success: vec![
                    TxnOp::Put {
                        key: "e".into(),
                        value: "t".into(),
                        prev_kv: false,
                    },
                    TxnOp::Delete {
                        start: "c".into(),
                        end: None,
                        prev_kv: false,
                    },
                ],
                failure: vec![],
            }),
            WriteOp::Txn(Txn {
                compare: vec![Compare {
                    key: "zz".into(),
                    target: CompareTarget::Value("x".into()),
                    op: CompareOp::Equal,
                }],
                success: vec![],
                failure: vec![TxnOp::Put {
                    key: "f".into(),
                    value: "from failure".into(),
                    prev_kv: true,
                }],
            }),
        ],
        vec![
            WriteOp::LeaseGrant {
                id: 7,
                ttl_secs: 60,
            },
            WriteOp::PutWith {
                key: "l/1".into(),
                value: "leased".into(),
                prev_kv: false,
                options: PutOptions {
                    lease: 7,
                    ..Default::default()
                },
            },
            WriteOp::PutWith {
                key: "l/2".into(),
                value: "leased".into(),
                prev_kv: false,
                options: PutOptions {
                    lease: 7,
                    ..Default::default()
                },
            },
            put("a", "3"),
        ],
        vec![WriteOp::LeaseRevoke { id: 7 }, delete("d/", Some("d0"))],
        vec![WriteOp::Compact { revision: 9 }],
        vec![put("a", "4"), put("b", "again"), delete("a", Some(""))],
        vec![put("g", "after"), put("a", "5")],
    ]
}

/// (revision, live keys, digest) after each batch of [`history`], as the earlier layout
/// computed them.
const PINNED: [(u64, u64, &str); 8] = [
    (
        4,
        4,
        "3e721fddc924d5d499950375bc3df62ac61260ed18bd936d11e567511b93c086",
    ),
    (
        7,
        4,
        "e62c85466a1c79259baec5e26efe7b5f01c8ff1693b0c488bec2c485ac5f3098",
    ),
    (
        9,
        5,
        "b42c5872e64a03525d2f6510165eeecbd5f657d8a06802ba34b9a1195eb40558",
    ),
    (
        12,
        7,
        "ced73173a1d3b5870e4bfd7b5a7c7d8cc86f26ef1ca800bf7bc3a2497dcdd01c",
    ),
    (
        14,
        3,
        "d3721c99be85c9e3cfadf754f3fd497ec0c0f35ed159b0703fcf9832e03d195c",
    ),
    (
        14,
        3,
        "cb4cab4ef704df5457579cef773e4d15383f242d1d95a58216551e95c8740bbe",
    ),
    (
        17,
        0,
        "01e72d2d3d501def901f599824f4dd632677d6a7a4fd587ba4dbf3ea4132986d",
    ),
    (
        19,
        2,
        "96f51f88858f82334577a7297dbb967005536fe3fa73f7a7f52b08aaa550bc42",
    ),
];

#[tokio::test]
async fn the_digest_of_a_fixed_history_is_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = aspen_kv::open(dir.path()).unwrap();
    for (i, commands) in history().into_iter().enumerate() {
        let entry = Entry {
            log_id: aspen_kv::raft_types::log_id(1, 1, i as u64 + 1),
            payload: EntryPayload::Normal(Batch {
                proposed_at_ms: 1_000_000 + i as u64,
                proposal: 0,
                commands: commands
                    .into_iter()
                    .map(|op| Command { session: None, op })
                    .collect(),
            }),
        };
        let responses = sm.apply_committed(vec![entry]).await.unwrap();
        for r in &responses[0].results {
            assert!(r.is_ok(), "batch {i}: {r:?}");
        }
        let digest = sm.state_digest().await.unwrap();
        assert_eq!(
            (digest.revision, digest.keys, hex(&digest.hash).as_str()),
            PINNED[i],
            "after batch {i}"
        );
    }
    // The same state digests the same after the store is opened again (the key index is
    // rebuilt from the table).
    drop((_log, sm));
    let (_log, sm) = aspen_kv::open(dir.path()).unwrap();
    let digest = sm.state_digest().await.unwrap();
    assert_eq!(hex(&digest.hash), PINNED[7].2);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A store the earlier layout wrote (the history above, applied by the build before
/// `kv_revisions`, its `state.redb` gzipped) is moved when opened: same digest, same reads.
#[tokio::test]
async fn a_store_of_the_earlier_layout_opens_with_the_same_state() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(&include_bytes!("fixtures/state-before-kv-revisions.redb.gz")[..])
        .read_to_end(&mut bytes)
        .unwrap();
    std::fs::write(dir.path().join("state.redb"), bytes).unwrap();
    for round in 0..2 {
        let (_log, sm) = aspen_kv::open(dir.path()).unwrap();
        let digest = sm.state_digest().await.unwrap();
        assert_eq!(
            (digest.revision, digest.keys, hex(&digest.hash).as_str()),
            PINNED[7],
            "round {round}"
        );
        let now = sm.range(RangeRequest::prefix(b"")).await.unwrap();
        let kvs: Vec<(&[u8], &[u8], u64, u64)> = now
            .kvs
            .iter()
            .map(|kv| (&kv.key[..], &kv.value[..], kv.mod_revision, kv.version))
            .collect();
        assert_eq!(
            kvs,
            [(&b"a"[..], &b"5"[..], 19, 1), (b"g", b"after", 18, 1)]
        );
        // History kept by the compaction at 9 is still readable: at 14, "a" was 3 (put at
        // revision 12, version 3 of the key) and "e", "f" lived.
        let mut at = RangeRequest::prefix(b"");
        at.revision = 14;
        let then: Vec<(Vec<u8>, Vec<u8>)> = sm
            .range(at)
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect();
        assert_eq!(
            then,
            [
                (b"a".to_vec(), b"3".to_vec()),
                (b"e".to_vec(), b"t".to_vec()),
                (b"f".to_vec(), b"from failure".to_vec())
            ]
        );
        let mut below = RangeRequest::prefix(b"");
        below.revision = 8;
        assert!(matches!(
            sm.range(below).await,
            Err(ReadError::Compacted { compacted: 9, .. })
        ));
    }
}
