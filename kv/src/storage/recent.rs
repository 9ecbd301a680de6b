//! The last few revisions' events, in memory, so watchers that are caught up read them
//! without a storage transaction each.
//!
//! With W watchers of a busy key, every write wakes W watch tasks; each reading its page from
//! redb costs W read transactions per write. Apply already has every event in hand (the new
//! value and the one it replaced), so it hands them to this ring after each commit, and
//! [`RecentChanges::read`] answers a [`ChangesRequest`] from memory when the whole page lies
//! inside the ring. Anything else (an older start, a fragment, a revision too large to keep)
//! falls back to the store, which remains the authority: the ring holds whole revisions only,
//! contiguous up to the store's revision, or nothing (it is emptied on a gap, a snapshot
//! install and at start). Its pages are built with the same rules and bounds as the store's
//! (`changes::read`), and a property test checks that both give the same pages.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::api::{ChangesPage, ChangesRequest, Event, Revision};
use crate::limits::{MAX_CHANGES_BYTES, MAX_CHANGES_SCANNED};

/// Most bytes of events the ring keeps.
pub const RECENT_CHANGES_BYTES: usize = 8 * 1024 * 1024;
/// Most revisions the ring keeps.
pub const RECENT_CHANGES_REVISIONS: usize = 4096;

/// One revision's events, in key order, each with its previous value (stripped for readers
/// that did not ask for it).
struct Revisioned {
    revision: Revision,
    events: Arc<Vec<Event>>,
    bytes: usize,
}

#[derive(Default)]
struct Ring {
    /// The store revision the ring is up to date with (its last revision, when not empty).
    current: Revision,
    compacted: Revision,
    revisions: VecDeque<Revisioned>,
    bytes: usize,
}

/// See the module docs.
#[derive(Default)]
pub(crate) struct RecentChanges {
    ring: Mutex<Ring>,
}

pub(crate) fn event_bytes(e: &Event) -> usize {
    let kv = |kv: &crate::api::KeyValue| kv.key.len() + kv.value.len() + 48;
    kv(&e.kv) + e.prev_kv.as_ref().map_or(0, kv)
}

impl RecentChanges {
    /// Forgets everything: the store is at `current` now, by other means than apply.
    pub(crate) fn reset(&self, current: Revision, compacted: Revision) {
        let mut ring = self.ring.lock().expect("recent changes lock");
        *ring = Ring {
            current,
            compacted,
            ..Ring::default()
        };
    }

    /// Apply committed revisions `revisions` (each one's events in key order), moving the
    /// store from revision `before` to `after` (compaction point `compacted`).
    pub(crate) fn applied(
        &self,
        before: Revision,
        after: Revision,
        compacted: Revision,
        revisions: Vec<(Revision, Vec<Event>)>,
    ) {
        let mut ring = self.ring.lock().expect("recent changes lock");
        ring.compacted = compacted;
        let contiguous = ring.current == before
            && revisions
                .iter()
                .enumerate()
                .all(|(i, (r, _))| *r == before + 1 + i as u64)
            && before + revisions.len() as u64 == after;
        if !contiguous {
            // Never leave a hole: start over from the store's revision.
            *ring = Ring {
                current: after,
                compacted,
                ..Ring::default()
            };
            return;
        }
        for (revision, events) in revisions {
            let bytes: usize = events.iter().map(event_bytes).sum();
            if bytes > MAX_CHANGES_BYTES {
                // Too large to keep (readers need fragments): the ring restarts after it.
                *ring = Ring {
                    current: after,
                    compacted,
                    ..Ring::default()
                };
                return;
            }
            ring.bytes += bytes;
            ring.revisions.push_back(Revisioned {
                revision,
                events: Arc::new(events),
                bytes,
            });
        }
        ring.current = after;
        while ring.bytes > RECENT_CHANGES_BYTES || ring.revisions.len() > RECENT_CHANGES_REVISIONS {
            let gone = ring
                .revisions
                .pop_front()
                .expect("over a bound, so not empty");
            ring.bytes -= gone.bytes;
        }
    }

    /// The page the store would give for `req`, if the ring holds all of it.
    pub(crate) fn read(&self, req: &ChangesRequest) -> Option<ChangesPage> {
        self.read_bounded(req, MAX_CHANGES_BYTES, MAX_CHANGES_SCANNED)
    }

    fn read_bounded(
        &self,
        req: &ChangesRequest,
        max_bytes: usize,
        max_scanned: usize,
    ) -> Option<ChangesPage> {
        if req.after.is_some() || req.validate().is_err() {
            return None;
        }
        let ring = self.ring.lock().expect("recent changes lock");
        let from = if req.from == 0 {
            ring.current + 1
        } else {
            req.from
        };
        if from < ring.compacted {
            return None; // The store says "compacted".
        }
        let mut page = ChangesPage {
            events: Vec::new(),
            next_from: ring.current + 1,
            next_after: None,
            revision: ring.current,
            compacted: ring.compacted,
        };
        if from > ring.current {
            page.next_from = from;
            return Some(page);
        }
        let first = ring.revisions.front()?.revision;
        if from < first {
            return None;
        }
        let (start, end) = (req.start.as_slice(), req.end.as_deref());
        let (mut bytes, mut scanned) = (0usize, 0usize);
        // The store's rules (`changes::read_bounded`): a page ends at a revision boundary once
        // a bound is reached; a revision alone over the byte bound is split into fragments,
        // which are left to the store.
        for r in ring.revisions.iter().skip((from - first) as usize) {
            if r.revision > from && (bytes >= max_bytes || scanned >= max_scanned) {
                page.next_from = r.revision;
                return Some(page);
            }
            for e in r.events.iter() {
                scanned += 1;
                if !super::changes::in_range(&e.kv.key, start, end) {
                    continue;
                }
                if bytes >= max_bytes {
                    return None;
                }
                let mut event = e.clone();
                if !req.prev_kv {
                    event.prev_kv = None;
                }
                bytes += event_bytes(&event);
                page.events.push(event);
            }
        }
        Some(page)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::EntryPayload;
    use proptest::prelude::*;

    use crate::api::*;
    use crate::raft_types::Entry;
    use crate::{IoMode, StateMachineStore};

    /// One write of the generated workloads.
    fn op(kind: u8, a: u8, b: u8, value: u8) -> WriteOp {
        let key = |k: u8| vec![b'a' + k % 6];
        match kind % 5 {
            0 | 1 => WriteOp::Put {
                key: key(a),
                value: vec![value; 1 + value as usize % 40],
                prev_kv: false,
            },
            2 => WriteOp::Delete {
                start: key(a),
                end: None,
                prev_kv: false,
            },
            3 => WriteOp::Delete {
                start: key(a.min(b)),
                end: Some(key(a.max(b))),
                prev_kv: false,
            },
            _ => WriteOp::Txn(Txn {
                compare: vec![],
                success: vec![
                    TxnOp::Put {
                        key: key(a),
                        value: vec![value],
                        prev_kv: false,
                    },
                    TxnOp::Delete {
                        start: vec![b'x'],
                        end: None,
                        prev_kv: false,
                    },
                ],
                failure: vec![],
            }),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever was applied (batches of puts, deletes, range deletes, transactions), the
        /// in-memory pages equal the store's, for every start, range, prev_kv choice and page
        /// bound, whenever the ring answers at all; and it answers caught-up readers.
        #[test]
        fn ring_pages_equal_store_pages(
            batches in proptest::collection::vec(
                proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()), 1..5),
                1..25,
            ),
            max_bytes in prop_oneof![Just(1usize), Just(100), Just(300), Just(1 << 20)],
            max_scanned in prop_oneof![Just(1usize), Just(2), Just(7), Just(1 << 14)],
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let db = crate::storage::state_db::StateDb::new(
                    redb::Database::create(dir.path().join("sm.redb")).unwrap(),
                );
                let txn = db.begin_write().unwrap();
                super::super::create_sm_tables(&txn).unwrap();
                txn.commit().unwrap();
                let mut sm =
                    StateMachineStore::new(Arc::new(db), dir.path().join("snap"), IoMode::Inline)
                        .unwrap();
                for (i, batch) in batches.iter().enumerate() {
                    let commands = batch
                        .iter()
                        .map(|(k, a, b, v)| Command { session: None, op: op(*k, *a, *b, *v) })
                        .collect();
                    let entry = Entry {
                        log_id: crate::raft_types::log_id(1, 1, i as u64 + 1),
                        payload: EntryPayload::Normal(Batch {
                            proposed_at_ms: 0,
                            proposal: 0,
                            commands,
                        }),
                    };
                    sm.apply_committed(vec![entry]).await.unwrap();
                }
                let current = sm.status().await.unwrap().revision;
                let ranges: [(&[u8], Option<&[u8]>); 4] =
                    [(b"a", None), (b"b", Some(b"e")), (b"", Some(b"")), (b"c", Some(b""))];
                for from in 0..=current + 1 {
                    for (start, end) in ranges {
                        for prev_kv in [false, true] {
                            let req = ChangesRequest {
                                start: start.to_vec(),
                                end: end.map(|e| e.to_vec()),
                                from,
                                after: None,
                                prev_kv,
                            };
                            let store = super::super::changes::read_bounded(
                                &sm.db, &sm.index, &req, max_bytes, max_scanned,
                            )
                            .unwrap();
                            let ring = sm.recent.read_bounded(&req, max_bytes, max_scanned);
                            if let Some(ring) = ring {
                                assert_eq!(ring, store, "{req:?}");
                            } else {
                                // Only fragments are left to the store.
                                assert!(store.next_after.is_some(), "{req:?}: {store:?}");
                            }
                        }
                    }
                }
            });
        }
    }
}
