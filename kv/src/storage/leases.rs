//! Leases as replicated state: which leases exist, their time to live, and the keys
//! attached to each.
//!
//! Only the facts every replica agrees on live here. When a lease runs out is not among
//! them: deadlines are kept in memory by the leader ([`crate::Lessor`]), which proposes a
//! [`crate::api::WriteOp::LeaseExpire`] when one passes, so apply never reads a clock.
//!
//! `lease_keys` is derived from the key space (each stored key names its lease): apply keeps
//! both in one transaction, and an installed snapshot rebuilds it ([`rebuild_keys`]); it is
//! not part of snapshots or state digests. `leases` is shipped in snapshots and digested.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

use super::state_db::StateDb;
use serde::{Deserialize, Serialize};

use super::key_index::KeyIndex;
use super::state_machine::record;
use super::REVISIONS;
use crate::api::{Key, LeaseId, LeaseRecord, ReadError};

/// lease id -> postcard([`StoredLease`]).
pub(crate) const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
/// (lease id, key) -> (): the keys attached to each lease.
pub(crate) const LEASE_KEYS: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("lease_keys");

/// One lease as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredLease {
    pub ttl_secs: u64,
    /// Which grant this is (a store-wide counter): tells an expiry of an earlier lease with
    /// the same id from one of this lease.
    pub grant: u64,
    /// Keys attached (the rows of `lease_keys` under this id).
    pub keys: u64,
}

pub(crate) fn decode(bytes: &[u8]) -> Result<StoredLease, redb::Error> {
    postcard::from_bytes(bytes)
        .map_err(|e| redb::Error::Corrupted(format!("undecodable lease: {e}")))
}

/// Rebuilds `lease_keys` and each lease's key count from the key space (`index` indexes
/// `txn`'s records).
pub(crate) fn rebuild_keys(
    txn: &redb::WriteTransaction,
    index: &KeyIndex,
) -> Result<(), redb::Error> {
    let mut lease_keys = txn.open_table(LEASE_KEYS)?;
    lease_keys.retain(|_, _| false)?;
    let mut counts = std::collections::BTreeMap::<u64, u64>::new();
    let revisions = txn.open_table(REVISIONS)?;
    for (key, at) in index.live_at(&[], Some(&[]), u64::MAX, usize::MAX) {
        let stored = record(&revisions, at, &key)?.ok_or_else(|| {
            redb::Error::Corrupted(format!("key {key:?} indexed live at a delete"))
        })?;
        if stored.lease != 0 {
            lease_keys.insert((stored.lease, key.as_slice()), ())?;
            *counts.entry(stored.lease).or_default() += 1;
        }
    }
    let mut leases = txn.open_table(LEASES)?;
    let ids: Vec<u64> = leases
        .iter()?
        .map(|item| item.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()?;
    for id in ids {
        let mut lease = decode(leases.get(id)?.expect("listed just now").value())?;
        lease.keys = counts.get(&id).copied().unwrap_or(0);
        leases.insert(id, super::encode(&lease).as_slice())?;
    }
    Ok(())
}

/// Every lease: (id, time to live, grant number). What the leader's deadlines start from.
pub(crate) fn all(db: &StateDb) -> Result<Vec<(LeaseId, u64, u64)>, redb::Error> {
    let txn = db.begin_read()?;
    let leases = txn.open_table(LEASES)?;
    let mut all = Vec::with_capacity(leases.len()? as usize);
    for item in leases.iter()? {
        let (k, v) = item?;
        let lease = decode(v.value())?;
        all.push((k.value(), lease.ttl_secs, lease.grant));
    }
    Ok(all)
}

/// One lease, with its keys when `keys` (at most [`crate::limits::MAX_KEYS_PER_LEASE`]).
pub(crate) fn read(
    db: &StateDb,
    id: LeaseId,
    keys: bool,
) -> Result<Option<LeaseRecord>, ReadError> {
    let storage = |e: redb::Error| ReadError::Storage(e.to_string());
    let txn = db.begin_read().map_err(|e| storage(e.into()))?;
    let leases = txn.open_table(LEASES).map_err(|e| storage(e.into()))?;
    let Some(v) = leases.get(id).map_err(|e| storage(e.into()))? else {
        return Ok(None);
    };
    let lease = decode(v.value()).map_err(storage)?;
    let mut attached: Vec<Key> = Vec::new();
    if keys {
        let table = txn.open_table(LEASE_KEYS).map_err(|e| storage(e.into()))?;
        for item in table
            .range((id, [].as_slice())..(id + 1, [].as_slice()))
            .map_err(|e| storage(e.into()))?
        {
            let (k, _) = item.map_err(|e| storage(e.into()))?;
            attached.push(k.value().1.to_vec());
        }
    }
    Ok(Some(LeaseRecord {
        id,
        ttl_secs: lease.ttl_secs,
        grant: lease.grant,
        key_count: lease.keys,
        keys: attached,
    }))
}

/// Lease ids from `after` on (exclusive), at most `limit`; and whether more remain.
pub(crate) fn list(
    db: &StateDb,
    after: LeaseId,
    limit: usize,
) -> Result<(Vec<LeaseId>, bool), ReadError> {
    let storage = |e: redb::Error| ReadError::Storage(e.to_string());
    let txn = db.begin_read().map_err(|e| storage(e.into()))?;
    let leases = txn.open_table(LEASES).map_err(|e| storage(e.into()))?;
    let mut ids = Vec::new();
    let start = after.saturating_add(1);
    for item in leases.range(start..).map_err(|e| storage(e.into()))? {
        let (k, _) = item.map_err(|e| storage(e.into()))?;
        if ids.len() == limit {
            return Ok((ids, true));
        }
        ids.push(k.value());
    }
    Ok((ids, false))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use openraft::EntryPayload;

    use crate::api::*;
    use crate::limits::MAX_KEYS_PER_LEASE;
    use crate::raft_types::Entry;
    use crate::{IoMode, StateMachineStore};

    struct Store {
        sm: StateMachineStore,
        index: u64,
        _dir: tempfile::TempDir,
    }

    impl Store {
        fn new() -> Store {
            let dir = tempfile::tempdir().unwrap();
            let db = crate::storage::state_db::StateDb::new(
                redb::Database::create(dir.path().join("sm.redb")).unwrap(),
            );
            let txn = db.begin_write().unwrap();
            super::super::create_sm_tables(&txn).unwrap();
            txn.commit().unwrap();
            let snapshots = dir.path().join("snap");
            std::fs::create_dir_all(&snapshots).unwrap();
            let sm = StateMachineStore::new(Arc::new(db), snapshots, IoMode::Inline).unwrap();
            Store {
                sm,
                index: 0,
                _dir: dir,
            }
        }

        /// A store whose log starts with a membership (as every real one does, so that an
        /// installed snapshot's state equals it exactly).
        async fn with_membership() -> Store {
            let mut s = Store::new();
            s.index += 1;
            let member = crate::Member {
                endpoint_id: [1; 32],
                addrs: vec![],
            };
            let membership = openraft::Membership::new(
                vec![std::collections::BTreeSet::from([1u64])],
                std::collections::BTreeMap::from([(1u64, member)]),
            )
            .expect("a valid membership");
            let entry = Entry {
                log_id: crate::raft_types::log_id(1, 1, s.index),
                payload: EntryPayload::Membership(membership),
            };
            s.sm.apply_committed(vec![entry]).await.unwrap();
            s
        }

        async fn apply(&mut self, ops: Vec<WriteOp>) -> Vec<CommandResult> {
            self.index += 1;
            let entry = Entry {
                log_id: crate::raft_types::log_id(1, 1, self.index),
                payload: EntryPayload::Normal(Batch {
                    proposed_at_ms: 0,
                    proposal: 0,
                    commands: ops
                        .into_iter()
                        .map(|op| Command { session: None, op })
                        .collect(),
                }),
            };
            let mut out = self.sm.apply_committed(vec![entry]).await.unwrap();
            out.pop().unwrap().results
        }

        async fn one(&mut self, op: WriteOp) -> CommandResult {
            self.apply(vec![op]).await.pop().unwrap()
        }

        async fn get(&self, key: &str) -> Option<KeyValue> {
            self.sm.get(key.as_bytes().to_vec(), 0).await.unwrap()
        }
    }

    fn put(key: &str, lease: LeaseId) -> WriteOp {
        WriteOp::PutWith {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            prev_kv: false,
            options: PutOptions {
                lease,
                ..Default::default()
            },
        }
    }

    fn plain_put(key: &str) -> WriteOp {
        WriteOp::Put {
            key: key.as_bytes().to_vec(),
            value: b"w".to_vec(),
            prev_kv: false,
        }
    }

    fn keys_of(record: &LeaseRecord) -> Vec<String> {
        record
            .keys
            .iter()
            .map(|k| String::from_utf8(k.clone()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn keys_follow_their_lease_and_go_with_it_at_one_revision() {
        let mut s = Store::new();
        let granted = s
            .one(WriteOp::LeaseGrant {
                id: 7,
                ttl_secs: 10,
            })
            .await;
        assert!(matches!(
            granted,
            Ok(WriteOutcome::LeaseGrant {
                id: 7,
                ttl_secs: 10,
                grant: 1,
                revision: 0
            })
        ));
        assert_eq!(
            s.one(WriteOp::LeaseGrant { id: 7, ttl_secs: 5 }).await,
            Err(ApplyError::LeaseExists { id: 7 })
        );
        assert_eq!(
            s.one(put("a", 8)).await,
            Err(ApplyError::LeaseNotFound { id: 8 })
        );
        assert_eq!(s.get("a").await, None, "a refused put wrote nothing");
        s.apply(vec![put("a", 7), put("b", 7), put("c", 7), put("d", 0)])
            .await;
        assert_eq!(s.get("a").await.unwrap().lease, 7);
        // A put without a lease detaches the key (as in etcd); one keeping it does not.
        s.one(plain_put("c")).await.unwrap();
        let keep = WriteOp::PutWith {
            key: b"b".to_vec(),
            value: vec![],
            prev_kv: false,
            options: PutOptions {
                ignore_value: true,
                ignore_lease: true,
                ..Default::default()
            },
        };
        s.one(keep).await.unwrap();
        let b = s.get("b").await.unwrap();
        assert_eq!((b.lease, b.value.as_slice(), b.version), (7, &b"v"[..], 2));
        let record = s.sm.lease(7, true).await.unwrap().unwrap();
        assert_eq!(keys_of(&record), ["a", "b"]);
        assert_eq!(record.key_count, 2);
        assert_eq!(s.sm.lessor().len(), 1);

        let before = s.sm.status().await.unwrap().revision;
        let revoked = s.one(WriteOp::LeaseRevoke { id: 7 }).await.unwrap();
        assert_eq!(
            revoked,
            WriteOutcome::LeaseRevoke {
                revision: before + 1,
                deleted: 2,
                revoked: true
            }
        );
        assert_eq!((s.get("a").await, s.get("b").await), (None, None));
        assert!(s.get("c").await.is_some() && s.get("d").await.is_some());
        assert_eq!(s.sm.lease(7, true).await.unwrap(), None);
        assert!(s.sm.lessor().is_empty());
        // The deletes are watch events of one revision, like any delete.
        let page =
            s.sm.changes(ChangesRequest {
                start: vec![],
                end: Some(vec![]),
                from: before + 1,
                after: None,
                prev_kv: false,
            })
            .await
            .unwrap();
        let events: Vec<(u64, EventKind)> = page
            .events
            .iter()
            .map(|e| (e.kv.mod_revision, e.kind))
            .collect();
        assert_eq!(events, [(before + 1, EventKind::Delete); 2]);
        assert_eq!(
            s.one(WriteOp::LeaseRevoke { id: 7 }).await,
            Err(ApplyError::LeaseNotFound { id: 7 })
        );
    }

    #[tokio::test]
    async fn an_expiry_ends_only_the_grant_it_names() {
        let mut s = Store::new();
        s.one(WriteOp::LeaseGrant {
            id: 3,
            ttl_secs: 10,
        })
        .await
        .unwrap();
        s.one(put("k", 3)).await.unwrap();
        s.one(WriteOp::LeaseRevoke { id: 3 }).await.unwrap();
        s.one(WriteOp::LeaseGrant {
            id: 3,
            ttl_secs: 10,
        })
        .await
        .unwrap();
        s.one(put("k", 3)).await.unwrap();
        // A late expiry of the first grant leaves the second alone.
        let stale = s
            .one(WriteOp::LeaseExpire { id: 3, grant: 1 })
            .await
            .unwrap();
        assert!(matches!(
            stale,
            WriteOutcome::LeaseRevoke {
                revoked: false,
                deleted: 0,
                ..
            }
        ));
        assert!(s.get("k").await.is_some());
        let expired = s
            .one(WriteOp::LeaseExpire { id: 3, grant: 2 })
            .await
            .unwrap();
        assert!(matches!(
            expired,
            WriteOutcome::LeaseRevoke {
                revoked: true,
                deleted: 1,
                ..
            }
        ));
        assert!(s.get("k").await.is_none());
    }

    #[tokio::test]
    async fn a_transaction_with_a_missing_lease_changes_nothing() {
        let mut s = Store::new();
        s.one(WriteOp::LeaseGrant {
            id: 1,
            ttl_secs: 10,
        })
        .await
        .unwrap();
        let txn = WriteOp::Txn(Txn {
            compare: vec![],
            success: vec![
                TxnOp::Put {
                    key: b"x".to_vec(),
                    value: b"1".to_vec(),
                    prev_kv: false,
                },
                TxnOp::PutWith {
                    key: b"y".to_vec(),
                    value: b"1".to_vec(),
                    prev_kv: false,
                    options: PutOptions {
                        lease: 2,
                        ..Default::default()
                    },
                },
            ],
            failure: vec![],
        });
        assert_eq!(s.one(txn).await, Err(ApplyError::LeaseNotFound { id: 2 }));
        assert_eq!((s.get("x").await, s.get("y").await), (None, None));
        assert_eq!(s.sm.status().await.unwrap().revision, 0);
        // Keeping the value of a key that does not exist is refused too.
        let keep = WriteOp::PutWith {
            key: b"nope".to_vec(),
            value: vec![],
            prev_kv: false,
            options: PutOptions {
                ignore_value: true,
                ..Default::default()
            },
        };
        assert_eq!(
            s.one(keep).await,
            Err(ApplyError::KeyNotFound {
                key: b"nope".to_vec()
            })
        );
        // A lease comparison sees the key's lease.
        s.one(put("z", 1)).await.unwrap();
        let cmp = WriteOp::Txn(Txn {
            compare: vec![Compare {
                key: b"z".to_vec(),
                target: CompareTarget::Lease(1),
                op: CompareOp::Equal,
            }],
            success: vec![],
            failure: vec![],
        });
        assert!(matches!(
            s.one(cmp).await,
            Ok(WriteOutcome::Txn {
                succeeded: true,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn bad_lease_requests_are_typed_errors() {
        let mut s = Store::new();
        for (op, want) in [
            (
                WriteOp::LeaseGrant {
                    id: 0,
                    ttl_secs: 10,
                },
                LimitError::LeaseIdOutOfRange {
                    id: 0,
                    max: crate::limits::MAX_LEASE_ID,
                },
            ),
            (
                WriteOp::LeaseGrant { id: 1, ttl_secs: 1 },
                LimitError::LeaseTtlOutOfRange {
                    ttl_secs: 1,
                    min: crate::limits::MIN_LEASE_TTL_SECS,
                    max: crate::limits::MAX_LEASE_TTL_SECS,
                },
            ),
            (
                WriteOp::LeaseGrant {
                    id: u64::MAX,
                    ttl_secs: 10,
                },
                LimitError::LeaseIdOutOfRange {
                    id: u64::MAX,
                    max: crate::limits::MAX_LEASE_ID,
                },
            ),
        ] {
            assert_eq!(op.validate(), Err(want.clone()));
            assert_eq!(s.one(op).await, Err(ApplyError::Limit(want)));
        }
        assert!(s.sm.lessor().is_empty());
    }

    #[tokio::test]
    async fn a_lease_holds_a_bounded_number_of_keys() {
        let mut s = Store::new();
        s.one(WriteOp::LeaseGrant {
            id: 1,
            ttl_secs: 10,
        })
        .await
        .unwrap();
        let max = MAX_KEYS_PER_LEASE as usize;
        for chunk in (0..max).collect::<Vec<_>>().chunks(1000) {
            let ops = chunk.iter().map(|i| put(&format!("k{i:05}"), 1)).collect();
            for r in s.apply(ops).await {
                r.unwrap();
            }
        }
        assert_eq!(
            s.one(put("one-more", 1)).await,
            Err(ApplyError::LeaseFull {
                id: 1,
                max: MAX_KEYS_PER_LEASE
            })
        );
        // Re-putting an attached key does not count twice.
        s.one(put("k00000", 1)).await.unwrap();
        let revoked = s.one(WriteOp::LeaseRevoke { id: 1 }).await.unwrap();
        assert!(
            matches!(revoked, WriteOutcome::LeaseRevoke { deleted, .. } if deleted == MAX_KEYS_PER_LEASE)
        );
    }

    #[tokio::test]
    async fn leases_travel_in_snapshots() {
        let mut s = Store::with_membership().await;
        s.one(WriteOp::LeaseGrant {
            id: 5,
            ttl_secs: 30,
        })
        .await
        .unwrap();
        s.one(WriteOp::LeaseGrant {
            id: 6,
            ttl_secs: 40,
        })
        .await
        .unwrap();
        s.apply(vec![put("a", 5), put("b", 6), put("c", 5)]).await;
        let mut builder = s.sm.clone();
        let snapshot = builder.build_snapshot().await.unwrap();
        let mut other = Store::new();
        other
            .sm
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(
            other.sm.state_digest().await.unwrap(),
            s.sm.state_digest().await.unwrap()
        );
        let record = other.sm.lease(5, true).await.unwrap().unwrap();
        assert_eq!(
            (keys_of(&record), record.key_count),
            (vec!["a".into(), "c".into()], 2)
        );
        assert_eq!(other.sm.lessor().len(), 2);
        assert_eq!(other.sm.leases(0, 10).await.unwrap(), (vec![5, 6], false));
        assert_eq!(other.sm.leases(5, 1).await.unwrap(), (vec![6], false));
        assert_eq!(other.sm.leases(0, 1).await.unwrap(), (vec![5], true));
        // The next grant is numbered after the snapshot's.
        other.index = s.index;
        let next = other
            .one(WriteOp::LeaseGrant {
                id: 9,
                ttl_secs: 30,
            })
            .await;
        assert!(matches!(
            next,
            Ok(WriteOutcome::LeaseGrant { grant: 3, .. })
        ));
    }
}
